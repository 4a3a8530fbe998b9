"""Writes the reference outputs of `bpd`, `attribute` and `lds` on `tiny` that
tests/test_golden.py compares today's code with (first made with the code of commit 15121fb,
before the attribution-method registry; remade when `tiny`'s likelihood grid changed; rerun only
to accept a deliberate change of results, on a clean checkout, whose commit the LDS report names).

    .venv/bin/python tests/golden/make_golden.py
"""

import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
COMMANDS = {
    "bpd": ["bpd", "--run", "{run}", "test:0", "test:7", "--json"],
    "attribute": ["attribute", "--run", "{run}", "test:0", "test:7", "--out", "{tmp}/attribute.npz", "--json"],
    "lds": ["lds", "--run", "{run}", "--out", "{tmp}/lds", "--queries", "2", "--drop-sets", "4", "--jobs", "1", "--json"],
}


def run_all(tmp: Path) -> dict:
    """Train `tiny` into tmp/run, run the three commands; {name: parsed JSON stdout}. The
    commands run through engine.cli.main in this process (what `python -m engine` runs), which
    spares a torch import per command."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from engine import cli
    out = {}
    for name, args in {"train": ["train", "--preset", "tiny", "--out", "{run}", "--json"], **COMMANDS}.items():
        args = [a.format(run=tmp / "run", tmp=tmp) for a in args]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli.main(args)
        if rc != 0:
            raise RuntimeError(f"engine {' '.join(args)} exited {rc}")
        out[name] = json.loads(buf.getvalue())
    del out["train"]
    return out


def lds_report(tmp: Path) -> Path:
    """MAGIC's protocol-A report: lds.json before the method registry, reports/magic_A.json since."""
    old = tmp / "lds" / "lds.json"
    return old if old.is_file() else tmp / "lds" / "reports" / "magic_A.json"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res = run_all(tmp)
        (HERE / "tiny").mkdir(exist_ok=True)
        shutil.copy(tmp / "attribute.npz", HERE / "tiny" / "attribute.npz")
        shutil.copy(lds_report(tmp), HERE / "tiny" / "lds.json")
        (HERE / "tiny" / "bpd.json").write_text(json.dumps(res["bpd"], indent=2) + "\n")
    print("wrote", HERE / "tiny")
