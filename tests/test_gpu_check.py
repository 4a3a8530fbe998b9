"""scripts/gpu_check.sh rehearsed on the CPU (--dry-run), so the GPU call is not its first run."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu.md"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--queries", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    head, table = text.split("\n\n| check", 1)
    assert head.startswith("# GPU check (dry run)\n\n`python benchmarks/gpu_check.py --dry-run")  # its command
    assert re.search(r"at commit [0-9a-f]{7}", head)  # and the commit it ran on
    assert "| check" + table == r.stdout.rstrip("\n") + "\n"  # the table printed is the one written
    # its checks are real: reruns are bit-identical and one dropped image changes the parameters
    assert "| determinism | bit-identical reruns; dropping one image changes the parameters |" in text
    assert re.search(r"\| fresh-process replay \| steps [0-9]+-[0-9]+: bit-identical \|", text)
    bpd = re.search(r"mean ([0-9.]+) bits/dim", text)
    assert bpd and 0.5 < float(bpd.group(1)) < 20
    ratio = re.search(r"metagradient, 1 query \| [0-9.]+ s = ([0-9.]+) x training", text)
    assert ratio and float(ratio.group(1)) > 0
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--steps", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "at least 1" in bad.stderr


def test_gpu_all_dry_run_writes_every_part_and_says_how_each_ended(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_all.sh"), str(out), "--dry-run"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "log.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in log] == ["gpu_check", "bench_tangent_batch", "bench_likelihood"]
    assert all(re.fullmatch(r"[a-z_]+: exit 0, [0-9]+ s", line) for line in log)
    assert "| determinism | bit-identical reruns" in (out / "gpu.md").read_text()
    for name, script in (("bench_tangent_batch_gpu.txt", "bench_tangent_batch.py"),
                         ("bench_likelihood_gpu.txt", "bench_likelihood.py")):
        head = (out / name).read_text().splitlines()[0]
        assert head.startswith(f"# python benchmarks/{script} --preset tiny") and "(commit " in head  # command and commit
    # every chunk size gives the same likelihood: the timings compare like with like
    assert "0.00e+00" in (out / "bench_tangent_batch_gpu.txt").read_text().splitlines()[3]
    # a part that fails is said, and the others still run: here the time limit is too short for any
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_all.sh"), str(tmp_path / "slow"), "--dry-run"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "GPU_ALL_LIMIT": "0.01"})
    assert r.returncode == 1
    log = (tmp_path / "slow" / "log.txt").read_text().splitlines()
    assert len(log) == 3 and all("exit 124 (over the time limit)" in line for line in log)
    for bad in ([], ["--dry-run"], [str(tmp_path / "x"), "--fast"], [str(tmp_path / "x"), "--dry-run", "extra"]):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_all.sh"), *bad], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
