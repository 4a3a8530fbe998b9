"""The app's disk memo and background jobs (no streamlit here either).

`Memo` (memo.py): diskcache-backed results keyed by a digest of the run, the input tensor,
the settings and the engine version; checksummed so a corrupt entry is recomputed, never
shown; one computation per key across threads and processes; a size limit with LRU eviction.
`Jobs` (jobs.py): long computations in background threads with progress, shared by every
browser session that asks for the same key.
"""

from cache.jobs import Job, Jobs
from cache.memo import Memo, make_key

__all__ = ["Job", "Jobs", "Memo", "make_key"]
