"""One-call check of everything GPU-related: determinism, training step time, exact BPD per image,
and the metagradient's cost ratio on a shortened run of the `gpu` preset.

    scripts/gpu_check.sh [--dry-run] [--offline] [--steps 200] [--out results/gpu.md]

Data: full MNIST through torchvision when it can be downloaded (or is already in
~/.cache/mnist-torchvision); otherwise, or at once with --offline (a machine with no network,
where a download attempt could only wait), the 5k training subset bundled in data/mnist/ (the
table says which). --dry-run shrinks everything (a tiny network, 8 steps, 256 images) so that
the script can be tested on a CPU before it is run on a GPU. Every number is measured in this
process; the table is printed and, with --out, written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, data, provenance, training as train  # noqa: E402
from engine import device as devices  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.presets import PRESETS, Preset  # noqa: E402


def pick_preset(dry_run: bool, steps: int, offline: bool = False) -> tuple[Preset, str]:
    """The shortened gpu preset and a line saying which data it trains on."""
    p = PRESETS["gpu"]
    if dry_run:
        return dataclasses.replace(p, n_train=64, source="offline", channels=(8, 16), embed_dim=16, groups=4,
                                   batch_size=16, steps=6, bpd_steps=2), "bundled 5k subset (first 64, dry run)"
    if offline:
        return (dataclasses.replace(p, steps=steps, n_train=5000, source="offline"),
                "bundled 5k subset (--offline: no download tried)")
    try:
        data.load_train(p.n_train, "torchvision")
        return dataclasses.replace(p, steps=steps), "full MNIST (torchvision), 60000 images"
    except UserError:
        return (dataclasses.replace(p, steps=steps, n_train=5000, source="offline"),
                "bundled 5k subset (full MNIST could not be downloaded)")


def check(dry_run: bool, steps: int, queries: int, offline: bool = False) -> list[tuple[str, str]]:
    from engine.bpd import run_bpd
    from engine.likelihood import bits_per_dim
    from engine.metagrad import metagradient
    from engine.store import load_run
    p, data_line = pick_preset(dry_run, steps, offline)
    dev = devices.setup(p)
    rows = [("device", torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"),
            ("torch", torch.__version__ + (f", CUDA {torch.version.cuda}" if dev.type == "cuda" else "")),
            ("data", data_line),
            ("network", f"channels {p.channels}, {sum(x.numel() for x in train.make_model(p, 0).parameters()):,} parameters"),
            ("shortened run", f"{p.steps} Adam steps, batch {p.batch_size}")]
    images, _ = data.load_train(p.n_train, p.source)

    # determinism: two runs bit-identical; a dropped example changes the result
    a = train.train(p, seed=0, images=images)
    devices.synchronize(dev)
    t0 = time.perf_counter()
    b = train.train(p, seed=0, images=images)
    devices.synchronize(dev)
    train_s = time.perf_counter() - t0
    same = all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    w = np.ones(p.n_train, np.float32)
    w[0] = 0
    c = train.train(p, seed=0, weights=w, images=images)
    differs = any(not torch.equal(a.params[k], c.params[k]) for k in a.params)
    rows.append(("determinism", f"{'bit-identical' if same else 'NOT bit-identical'} reruns; "
                                f"dropping one image {'changes' if differs else 'does NOT change'} the parameters"))
    rows.append(("training step", f"{1000 * train_s / p.steps:.1f} ms ({train_s:.2f} s for {p.steps} steps)"))

    # exact BPD per image (RK4 on the preset's grid, exact divergence)
    model = train.make_model(p, 0).to(dev)
    model.load_state_dict(a.model_params)
    x = data.load_test()[0][:2 if dry_run else 4].to(dev)
    with torch.no_grad():
        bits_per_dim(model, x[:1], **p.likelihood_kwargs)  # warm-up (kernels, allocator)
        devices.synchronize(dev)
        t0 = time.perf_counter()
        bpd = bits_per_dim(model, x, **p.likelihood_kwargs)
        devices.synchronize(dev)
    bpd_s = (time.perf_counter() - t0) / len(x)
    rows.append(("exact BPD", f"{bpd_s:.2f} s per image ({p.bpd_steps} RK4 steps; mean {float(bpd.mean()):.3f} bits/dim)"))

    # metagradient: the stored run, then 1 and `queries` batched queries
    with tempfile.TemporaryDirectory() as tmp:
        train.train(p, seed=0, out=Path(tmp) / "run", images=images)
        run = load_run(Path(tmp) / "run")
        # a fresh process (as the replays and precompute jobs are) must replay a stored segment bit for bit
        import subprocess
        s0, s1 = run.checkpoint_steps()[-2:]  # the last stored segment (a run of T >= 2 stores >= 2 states)
        fresh = subprocess.run([sys.executable, "-m", "engine.replay_check", str(run.path), str(s0), str(s1)],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        rows.append(("fresh-process replay", f"steps {s0}-{s1}: {fresh.stdout.strip() or fresh.stderr.strip()[-200:]}"))
        times, grad_s = {}, {}
        for q in (1, queries):
            devices.synchronize(dev)
            t0 = time.perf_counter()
            _, qgrads = run_bpd(run, data.load_test()[0][:q], grad=True)
            devices.synchronize(dev)
            grad_s[q] = time.perf_counter() - t0
            t0 = time.perf_counter()
            gw = metagradient(run, images, qgrads)
            devices.synchronize(dev)
            times[q] = time.perf_counter() - t0
            if not torch.isfinite(gw).all():
                raise RuntimeError("non-finite metagradient")
        rows.append(("BPD gradient w.r.t. parameters", f"{grad_s[1]:.1f} s per query"))
        rows.append(("metagradient, 1 query", f"{times[1]:.1f} s = {times[1] / train_s:.2f} x training"))
        rows.append((f"metagradient, {queries} queries", f"{times[queries]:.1f} s = {times[queries] / times[1]:.2f} x one query"))
    if dev.type == "cuda":
        rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, for a CPU rehearsal")
    ap.add_argument("--offline", action="store_true", help="train on the bundled 5k subset without trying a download")
    ap.add_argument("--steps", type=int, default=200, help="Adam steps of the shortened run")
    ap.add_argument("--queries", type=int, default=8, help="batched queries for the cost ratio")
    ap.add_argument("--out", help="also write the table (markdown) here")
    a = ap.parse_args()
    if a.steps < 1 or a.queries < 1:
        sys.exit("error: --steps and --queries must be at least 1")
    provenance.start()
    t0 = time.time()
    try:
        rows = check(a.dry_run, a.steps, a.queries, a.offline)
    except UserError as e:
        sys.exit(f"error: {e}")
    rows.append(("wall time of this check", f"{time.time() - t0:.0f} s"))
    table = "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    print(table)
    if a.out:
        st = provenance.stamp()
        atomic.save_text(("# GPU check (dry run)\n\n" if a.dry_run else "# GPU check\n\n")
                         + f"`{st['command']}` at commit {st['commit']}\n\n" + table, Path(a.out))


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
