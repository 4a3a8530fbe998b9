"""The CLI's commands on a run: train, bpd, sample, attribute, precompute (engine.cli parses).

Each takes the parsed arguments and returns what the CLI prints (JSON with --json); progress
bars go to stderr through the engine's callback convention; errors are UserErrors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine import data, images
from engine.errors import UserError


def _progress(total: Optional[int], desc: str, quiet: bool = False):
    """A tqdm bar on stderr fed by the engine's callback={...} convention."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet or not sys.stderr.isatty(), leave=False)

    def callback(info: dict) -> None:
        bar.update(1)
        if "loss" in info:
            bar.set_postfix(loss=f"{info['loss']:.1f}")
    return bar, callback


def cmd_train(a) -> dict:
    from engine import training as train
    from engine.presets import get_preset
    preset = get_preset(a.preset)
    if a.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {a.seed}")
    images, _ = data.load_train(preset.n_train, preset.source)
    n = images.shape[0]
    weights = None
    if a.weights:
        try:
            weights = np.load(a.weights, allow_pickle=False)
        except Exception as e:
            raise UserError(f"{a.weights}: not a readable .npy array ({type(e).__name__})") from None
    if a.drop:
        weights = np.ones(n, dtype=np.float32) if weights is None else np.array(weights, dtype=np.float32)
        weights[_read_indices(a.drop, n)] = 0.0
    if getattr(a, "replace_other", False):
        from engine.store import set_aside_other
        aside = set_aside_other(Path(a.out), preset, a.seed, train.check_weights(weights, n).numpy())
        if aside is not None:
            print(f"{a.out} held a run of another config; moved it to {aside}", file=sys.stderr)
    bar, cb = _progress(preset.steps, f"train {preset.name}", a.json)
    state = train.train(preset, seed=a.seed, weights=weights, out=Path(a.out), images=images, callback=cb)
    bar.close()
    from engine.store import load_run
    run = load_run(a.out)
    losses = run.losses()
    return {"run": str(a.out), "preset": preset.name, "seed": a.seed, "steps": state.step,
            "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "seconds": run.train_seconds()}


def _read_indices(path: str, n: int) -> np.ndarray:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__})") from None
    try:
        idx = np.array([int(tok) for tok in text.replace(",", " ").split()], dtype=np.int64)
    except ValueError:
        raise UserError(f"{path}: expected whitespace-separated integer indices") from None
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise UserError(f"{path}: indices must lie in 0..{n - 1}")
    return idx


def load_inputs(specs: list[str]) -> torch.Tensor:
    """Every INPUT, validated before any computation: (Q, 1, 28, 28)."""
    return torch.stack([images.load_input(s) for s in specs])


def cmd_bpd(a):
    from engine.bpd import run_bpd
    from engine.store import load_run
    run = load_run(a.run)
    x = load_inputs(a.inputs)
    bar, cb = _progress(4 * run.preset.bpd_steps * len(x), "bits/dim", a.json)
    bpd, _ = run_bpd(run, x, callback=cb)
    bar.close()
    return [{"input": s, "bpd": float(b)} for s, b in zip(a.inputs, bpd)]


def cmd_sample(a) -> dict:
    from engine import atomic
    from engine.sampling import sample
    from engine.store import load_run
    run = load_run(a.run)
    if not 1 <= a.n <= 1024:
        raise UserError("--n must be between 1 and 1024")
    if a.steps is not None and a.steps < 1:
        raise UserError("--steps must be at least 1")
    if Path(a.out).suffix.lower() not in (".png", ".npy"):
        raise UserError(f"--out must end in .png (a grid) or .npy (the array), got {a.out}")
    model = run.model()
    steps = a.steps or (32 if a.method == "ode" else 500)
    bar, cb = _progress(steps * (4 if a.method == "ode" else 1), "sample", a.json)
    x = sample(model, (a.n, 1, 28, 28), method=a.method, n_steps=steps, seed=a.seed,
               sigma=run.preset.sigma, eps=run.preset.t_eps, callback=cb)
    bar.close()
    x = data.quantize(x.clamp(0, 1))
    out = Path(a.out)
    if out.suffix.lower() == ".npy":
        atomic.save_npy(x.squeeze(1).numpy(), out)
    else:
        atomic.save_bytes(_grid_png(x), out)
    return {"out": str(out), "n": a.n, "method": a.method, "seed": a.seed}


def _grid_png(x: torch.Tensor) -> bytes:
    import io
    from PIL import Image
    from torchvision.utils import make_grid
    g = make_grid(x, nrow=int(np.ceil(np.sqrt(len(x)))), padding=2, pad_value=0.5)
    buf = io.BytesIO()
    Image.fromarray((g[0].numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _default_jobs(a, run) -> None:
    """--jobs left out: engine.device's choice for the run's preset (cores, or GPUs)."""
    if a.jobs is None:
        from engine import device
        a.jobs = device.default_jobs(run.preset)


def _check_executor_args(a) -> None:
    if a.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if a.address and a.executor != "ray":
        raise UserError("--address is for --executor ray")


def cmd_attribute(a) -> dict:
    from engine import atomic
    from engine.attribution import attribute_auto, top_k
    from engine.store import load_run
    run = load_run(a.run)
    x = load_inputs(a.inputs)
    if not a.out.endswith(".npz"):
        raise UserError("--out must end in .npz")
    if a.top < 0:
        raise UserError("--top must be 0 or more")
    if a.scheme == "kary" and a.k < 2:
        raise UserError("--k must be at least 2 for the k-ary scheme")
    if a.chunk < 1:
        raise UserError("--chunk must be at least 1")
    _check_executor_args(a)
    from engine.precompute import representation
    if (a.executor == "local" and a.jobs == 1) or (not a.replay and representation.default(run) is not None):
        bar, cb = _progress(None, "attribute", a.json)
        # the precomputed representation when the run has one (--jobs is then moot), else one batched replay
        grad_w, bpd, method = attribute_auto(run, x, callback=cb, replay=a.replay, scheme=a.scheme, k=a.k)
    else:
        from engine.attribution import attribute_many
        from engine.executor import make_executor
        bar, _ = _progress(-(-len(x) // a.chunk), "query chunks", a.json)

        def cb(info: dict) -> None:
            bar.n = info["i"]
            bar.refresh()
        grad_w, bpd = attribute_many(run, x, Path(a.out + ".parts"), make_executor(a.executor, jobs=a.jobs, address=a.address),
                                     chunk=a.chunk, scheme=a.scheme, k=a.k, callback=cb)
        method = "replay"
    bar.close()
    atomic.save_npz(Path(a.out), grad_w=grad_w, bpd=bpd, inputs=np.array(a.inputs), method=np.array(method))
    result = {"out": a.out, "method": method, "queries": []}
    for i, spec in enumerate(a.inputs):
        q = {"input": spec, "bpd": float(bpd[i])}
        if a.top:
            tk = top_k(grad_w[i], a.top)
            q["proponents"] = [{"index": int(j), "grad_w": float(grad_w[i, j])} for j in tk["proponents"]]
            q["opponents"] = [{"index": int(j), "grad_w": float(grad_w[i, j])} for j in tk["opponents"]]
        result["queries"].append(q)
    return result


def cmd_precompute(a) -> dict:
    from engine.executor import make_executor
    from engine.precompute.build import precompute
    from engine.store import load_run
    run = load_run(a.run)
    _default_jobs(a, run)
    _check_executor_args(a)
    bar, _ = _progress(None, "precompute chunks", a.json)

    def cb(info: dict) -> None:
        bar.set_description(f"precompute: {info['stage']} chunks")
        bar.total, bar.n = info["n"], info["i"]
        bar.refresh()
    info = precompute(run, method=a.method, rank=a.rank, init=a.init, chunk=a.chunk,
                      executor=make_executor(a.executor, jobs=a.jobs, address=a.address), callback=cb)
    bar.close()
    if getattr(a, "ship", False):
        from engine.precompute import shipped
        info["shipped"] = str(shipped.ship(run, info["name"]))
    return info
