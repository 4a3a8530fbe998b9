"""Draw the LDS reports' scatter plots again from their JSON (results/lds_*/reports/*.png), with
today's engine.experiments.plots (e.g. after a change of layout).

    python scripts/replot_lds.py [REPORT.json ...]     (default: results/lds_*/reports/*.json)

A plot is made from its report's predicted and actual changes alone, so drawing it again changes
no number: the JSON stays as its command wrote it (it names that command and commit), and the
PNG says under its title which command and commit drew it, from which file made at which commit.
A file that is not an LDS report, or cannot be read, is named in one line and left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine import atomic, provenance  # noqa: E402
from engine.experiments import plots  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="*", help="LDS report JSON files (default: results/lds_*/reports/*.json)")
    a = ap.parse_args()
    provenance.start()
    paths = [Path(p) for p in a.reports] or sorted(ROOT.glob("results/lds_*/reports/*.json"))
    st = provenance.stamp()
    by = f"drawn by `{st['command']}` at {st['commit']} from the numbers of {{}} (made at {{}})"
    done = 0
    for path in paths:
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"{path}: not read ({type(e).__name__}); left alone")
            continue
        try:  # drawn in memory first: a report short of a field leaves its old plot as it was
            if not (isinstance(r, dict) and r.get("queries")
                    and all(isinstance(q, dict) and "predicted_change" in q for q in r["queries"])):
                raise KeyError("predicted_change")
            png = plots.scatter_png(r, note=by.format(path.name, r.get("commit", "?")))
        except (KeyError, TypeError, ValueError) as e:
            print(f"{path}: not an LDS report (no {e}); left alone")
            continue
        atomic.save_bytes(png, path.with_suffix(".png"))
        done += 1
    print(f"drew {done} of {len(paths)} plots")


if __name__ == "__main__":
    main()
