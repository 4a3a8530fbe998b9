"""scripts/gpu_check.sh rehearsed on the CPU (--dry-run), so the GPU call is not its first run."""

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
