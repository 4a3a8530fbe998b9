"""The app's disk memo (no streamlit here either).

`Memo` (memo.py): diskcache-backed results keyed by a digest of the run, the input tensor,
the settings and the engine version; checksummed so a corrupt entry is recomputed, never
shown; one computation per key across threads and processes; a size limit with LRU eviction.
"""

from cache.memo import Memo, make_key

__all__ = ["Memo", "make_key"]
