"""The experiment and benchmark scripts answer a bad input as the command line does: one line on
stderr, a non-zero exit, no traceback (engine.errors.run_script), and nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripts") / "run"
    subprocess.run([sys.executable, "-m", "engine", "train", "--preset", "tiny", "--out", str(out)], cwd=ROOT,
                   capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


@pytest.mark.parametrize("script, args, says", [
    ("experiments/grid_smoothness.py", ["--drop-sets", "0"], "--drop-sets"),  # a UserError raised inside main
    ("experiments/precompute_fidelity.py", ["--ranks", "a,b", "--bank", "TMP/bank"], "--ranks"),  # was an int() traceback later on
    ("experiments/sample_quality.py", ["--run", "RUN", "--n", "0"], "--n"),  # was a torch.cat traceback
    # a representation the run lacks, with the options that make that one
    ("experiments/basis_fit.py", ["--run", "RUN", "--rep", "basis3", "--bank", "TMP/bank"],
     "precompute --run RUN --method basis --rank 3)"),
    ("benchmarks/bench_metagrad.py", ["--stages", "nope"], "--stages"),
    # a missing run: refused before the app starts (it would train one under the benchmark)
    ("benchmarks/bench_app.py", ["--run", "/nonexistent/run"], "does not exist"),
])
def test_a_script_s_bad_input_is_one_line(script, args, says, run, tmp_path):
    out = tmp_path / "out"
    # every path a script could write to lies under tmp_path (a script's default bank is in results/)
    argv = [str(run) if x == "RUN" else x.replace("TMP", str(tmp_path)) for x in args] + ["--out", str(out)]
    r = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-1500:]
    assert says.replace("RUN", str(run)) in r.stderr
    assert not out.exists() and not (tmp_path / "bank").exists()
