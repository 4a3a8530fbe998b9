"""What shipping a query basis in float16 costs: bytes saved, and how far the installed
representation's scores are from the precompute's own.

    python benchmarks/bench_ship_encoding.py --run RUN [--rep basis64] [--out results/bench_ship_encoding_cpu.txt]

RUN is the run whose precompute made the basis (for the `cpu` default's shipped file,
runs/candidates/cpu/3000_steps___lr_2.5e-4___eps_1e-2___positional_x10/run): a run that installed the
shipped file holds it already rounded, and is refused.

The run's representation (RUN/precomputed/<rep>.npz, as the precompute made it, or as installed
from a shipped file of the older, float32 kind) is encoded as `python -m engine precompute --ship`
encodes it (engine.precompute.shipped.encode) and decoded as a fresh clone's install decodes it,
in memory. Then, for test digits (none among the basis images), two of their 90-degree rotations
and a uniform noise image, the scores A (B g) from both: their relative L2 distance, their
Spearman correlation and how many of the top-16 proponents and opponents they share; and the
basis's own query gradients G = M B, per row, before and after.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import data  # noqa: E402
from engine.bpd import run_bpd  # noqa: E402
from engine.precompute import representation as R, shipped  # noqa: E402
from engine.precompute.tangents import flatten  # noqa: E402
from engine.store import load_run  # noqa: E402

TEST_DIGITS = (11, 222, 3333, 4444, 5555, 6666)


def _nbytes(arrays: dict) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # as atomic.save_npz writes them: uncompressed
    return buf.getbuffer().nbytes


def _rep(d: dict) -> R.Representation:
    return R.Representation("", str(d["method"]), d["a"], d["b"], {}, {"gram": d["extra_gram"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="the run whose precompute made the basis")
    ap.add_argument("--rep", default="basis64")
    ap.add_argument("--out", help="also write the table here, with the command and commit that made it")
    a = ap.parse_args()
    from engine import provenance
    provenance.start()
    run = load_run(a.run)
    R.load(run, a.rep)  # refuses a foreign, stale or damaged file with one line
    with np.load(R.folder(run) / f"{a.rep}.npz", allow_pickle=False) as f:
        kept = {k: f[k] for k in f.files}
    if shipped.installed_from_shipped(kept):
        raise SystemExit(f"{a.run}'s {a.rep} was installed from shipped/ (already rounded to float16); "
                         f"run this on the run whose precompute made it")
    if str(kept["method"]) != "basis":
        raise SystemExit(f"{a.rep} is not a query basis: it ships as it is")
    enc = shipped.encode(kept)
    back = shipped.decode(enc)
    before, after = _rep(kept), _rep(back)

    def grads(r):
        return r.extra["gram"] @ r.b.astype(np.float64)
    g0, g1 = grads(before), grads(after)
    row = np.linalg.norm(g1 - g0, axis=1) / np.linalg.norm(g0, axis=1)

    test = data.load_test()[0]
    x = torch.cat([test[list(TEST_DIGITS)], data.rotate(test[list(TEST_DIGITS[:2])], 90),
                   data.uniform_noise(1, torch.Generator().manual_seed(0))])
    names = [f"test:{i}" for i in TEST_DIGITS] + [f"rotated 90 test:{i}" for i in TEST_DIGITS[:2]] + ["noise"]
    _, gr = run_bpd(run, x, grad=True)
    q = np.stack([flatten(g).double().numpy() for g in gr])
    s0, s1 = before.scores(q), after.scores(q)

    lines = [f"Shipping {a.rep} of {a.run} (preset {run.preset.name}, K = {kept['b'].shape[0]}, "
             f"P = {kept['b'].shape[1]}, n = {kept['a'].shape[0]}) with its query gradients in float16",
             f"bytes: kept {_nbytes(kept):,}, shipped {_nbytes(enc):,} ({_nbytes(enc) / _nbytes(kept):.3f} of kept)",
             f"basis query gradients G = M B, relative L2 change per row: mean {row.mean():.2e}, max {row.max():.2e}",
             "",
             f"{'query':24s} {'scores rel. L2':>15s} {'Spearman':>10s} {'top-16 prop. shared':>20s} {'top-16 opp. shared':>19s}"]
    worst = 0.0
    for name, u, v in zip(names, s0, s1):
        rel = float(np.linalg.norm(v - u) / np.linalg.norm(u))
        worst = max(worst, rel)
        prop = len(set(np.argsort(-u)[:16]) & set(np.argsort(-v)[:16]))
        opp = len(set(np.argsort(u)[:16]) & set(np.argsort(v)[:16]))
        lines.append(f"{name:24s} {rel:15.2e} {spearmanr(u, v)[0]:10.6f} {prop:20d} {opp:19d}")
    lines.append(f"largest relative L2 change of a query's scores: {worst:.2e}")
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
