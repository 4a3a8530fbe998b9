"""How far the same training lands on another kind of CPU, and whether the shipped query basis
still passes its check there (engine.precompute.representation).

    python experiments/cpu_rounding.py --run runs/cpu [--other runs/cpu-avx2] [--isa avx2]
        [--out results/cpu_rounding]

Trains the run's preset and seed again in a child process with torch held to another instruction
set (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS; `--other` keeps it and a
rerun resumes or reuses it), then prints and writes (cpu_rounding.{json,md}): both weights'
checksums, their relative L2 and largest entry-wise distance, and for each run the distance
between the shipped basis's first query gradient and the one recomputed under the run's weights
(what `load` holds to GRADIENT_TOL when the checksums differ), with the seconds it took.
Bit-for-bit agreement between two kinds of CPU is not expected: float32 sums round differently
under other vector widths.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, provenance  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.precompute import representation as R, shipped  # noqa: E402
from engine.store import load_run  # noqa: E402

# torch's, oneDNN's and MKL's names for one instruction set
ISAS = {"avx2": ("avx2", "AVX2", "AVX2")}


def _flat(run) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in run.load_final().model_params.values()]).double()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="the trained run (as `engine train` made it here)")
    ap.add_argument("--other", default=None, help="where the other instruction set's run goes (default: RUN-ISA)")
    ap.add_argument("--isa", default="avx2", choices=sorted(ISAS))
    ap.add_argument("--shipped", default=None, help="folder of shipped representations (default: shipped/)")
    ap.add_argument("--out", default="results/cpu_rounding")
    a = ap.parse_args()
    provenance.start()
    try:
        run = load_run(a.run)
    except UserError as e:
        sys.exit(f"error: {e}")
    other_path = Path(a.other or f"{a.run.rstrip('/')}-{a.isa}")
    aten, onednn, mkl = ISAS[a.isa]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn, "MKL_ENABLE_INSTRUCTIONS": mkl}
    t0 = time.perf_counter()
    # a child process: torch reads these at start-up; `train` resumes or reuses a finished run
    subprocess.run([sys.executable, "-m", "engine", "train", "--preset", run.preset.name, "--seed", str(run.seed),
                    "--out", str(other_path)], env=env, check=True, cwd=Path(__file__).resolve().parent.parent)
    capability = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                env=env, check=True, capture_output=True, text=True).stdout.strip()
    print(f"trained {other_path} with torch's CPU capability {capability} ({time.perf_counter() - t0:.0f} s)", flush=True)
    other = load_run(other_path)
    wa, wb = _flat(run), _flat(other)
    rows = {"cpu": provenance.cpu_model(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "other_capability": capability, "preset": run.preset.name, "run_digest": run.digest,
            "weights_relative_l2": float((wa - wb).norm() / wa.norm()), "weights_max_abs": float((wa - wb).abs().max()),
            "gradient_tolerance": R.GRADIENT_TOL, "runs": []}
    print(f"weights: relative L2 {rows['weights_relative_l2']:.2e}, largest entry-wise {rows['weights_max_abs']:.2e}")
    src = shipped.folder(run.preset.name, Path(a.shipped) if a.shipped else None)
    for name_, r, cap in ((str(run.path), run, rows["capability"]), (str(other_path), other, capability)):
        row = {"run": name_, "capability": cap, "weights_sha256": R.weights_checksum(r.load_final().model_params),
               "shipped": {}}
        for path in sorted(src.glob("basis*.npz")):
            with np.load(path, allow_pickle=False) as f:
                d = shipped.decode({k: f[k] for k in f.files})  # a query basis ships as float16 G
            if str(d["run_digest"]) != r.digest:
                continue
            t1 = time.perf_counter()
            rel = R.query_gradient_distance(r, d)
            row["shipped"][path.name] = {"file_weights_sha256": str(d["weights_sha256"]),
                                         "checksum_matches": str(d["weights_sha256"]) == row["weights_sha256"],
                                         "gradient_relative_l2": rel, "seconds": time.perf_counter() - t1}
            print(f"{name_} ({cap}): weights {row['weights_sha256'][:8]}, {path.name} made for "
                  f"{str(d['weights_sha256'])[:8]}; first query gradient {rel:.2e} from the file's (relative L2), "
                  f"{row['shipped'][path.name]['seconds']:.0f} s", flush=True)
        rows["runs"].append(row)
    out = Path(a.out)
    st = provenance.stamp()
    atomic.save_json({**st, **rows}, out / "cpu_rounding.json")
    md = [f"`{st['command']}` (commit {st['commit']})", "",
          f"The `{run.preset.name}` training on one {rows['cpu']} (torch {rows['torch']}), with torch's CPU capability "
          f"{rows['capability']} and held to {capability}: final weights {rows['weights_relative_l2']:.2e} apart "
          f"(relative L2; largest entry-wise {rows['weights_max_abs']:.2e}). A shipped query basis is accepted "
          f"under other weights when its first query gradient is within {R.GRADIENT_TOL:g} of the recomputed one.", "",
          "| run | CPU capability | weights sha256 | shipped file | made for | gradient distance | seconds |",
          "|---|---|---|---|---|---|---|"]
    for row in rows["runs"]:
        for f, s in row["shipped"].items():
            md.append(f"| {row['run']} | {row['capability']} | {row['weights_sha256'][:8]} | {f} | "
                      f"{s['file_weights_sha256'][:8]} | {s['gradient_relative_l2']:.2e} | {s['seconds']:.0f} |")
    atomic.save_text("\n".join(md) + "\n", out / "cpu_rounding.md")
    print(f"wrote {out}/cpu_rounding.md")


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
