"""scripts/replot_lds.py: LDS plots drawn again from their reports' numbers, nothing else touched."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _report(rho: float) -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(20)
    return {"command": "python -m engine lds ...", "commit": "abc1234", "method": "magic", "protocol": "A",
            "preset": "tiny", "drop_sets": 20, "drop_size": 5, "units": "bits/dim", "spearman_mean": rho,
            "queries": [{"query": q, "label": 7, "spearman": rho, "predicted_change": (a * 1e-3).tolist(),
                         "actual_change": (a * 1e-3 + q * 1e-4).tolist()} for q in range(3)]}


def test_replot_draws_each_lds_report_again_and_leaves_its_json_and_other_files_alone(tmp_path):
    good = tmp_path / "magic_A.json"
    good.write_text(json.dumps(_report(0.9)))
    (tmp_path / "magic_A.png").write_bytes(b"old plot")
    other = tmp_path / "summary.json"
    other.write_text(json.dumps({"rows": []}))
    short = tmp_path / "short.json"  # its queries, but not the report's other fields
    short.write_text(json.dumps({"queries": _report(0.9)["queries"]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    before = {p: p.read_bytes() for p in (good, other, short, broken)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "replot_lds.py"), str(good), str(other), str(short),
                          str(broken)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == [f"{other}: not an LDS report (no 'predicted_change'); left alone",
                     f"{short}: not an LDS report (no 'protocol'); left alone",
                     f"{broken}: not read (JSONDecodeError); left alone", "drew 1 of 4 plots"]
    assert {p: p.read_bytes() for p in before} == before  # no JSON rewritten
    png = (tmp_path / "magic_A.png").read_bytes()
    assert png.startswith(b"\x89PNG") and not any((tmp_path / f"{n}.png").exists() for n in ("summary", "short", "broken"))
    # the plot is drawn from the numbers: other numbers, another picture
    good.write_text(json.dumps(_report(0.5)))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "replot_lds.py"), str(good)], check=True,
                   capture_output=True, timeout=120, cwd=ROOT)
    assert (tmp_path / "magic_A.png").read_bytes() != png
