"""The score network's exact-likelihood path against an earlier commit's, in one process.

    python benchmarks/bench_engine_ab.py --run runs/cpu --against 609dee9 [--repeats 5] [--digit 0] [--out FILE]

The exact BPD of one test digit with its parameter gradient (engine.likelihood.bits_per_dim_and_grad,
what a drawing's influences wait for), through engine/model.py as it is and as it was at --against
(`git show REV:engine/model.py`, loaded with the run's weights; the rest of the engine is today's),
interleaved A, B, A, B, ... so that this machine's drift (runs of the same code here differ by up to
30%) falls on both alike. Prints min and median of --repeats each, their ratios, both BPDs and the
gradients' relative distance (the float32 sums run in another order).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine import data, likelihood as L, sde  # noqa: E402


def model_at(rev: str, like: torch.nn.Module, preset) -> torch.nn.Module:
    """The ScoreNet of engine/model.py at git revision `rev`, with the parameters of `like`."""
    source = subprocess.run(["git", "show", f"{rev}:engine/model.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model_{rev}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"model_{rev}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    # the run's sigma and maps, as engine.training.make_model builds it; a revision older than
    # an option the run uses cannot hold its weights, which is said in one line
    params = inspect.signature(module.ScoreNet).parameters
    kwargs = {}
    for name, value, default in (("sigma", preset.sigma, sde.SIGMA), ("positional", preset.positional, 0.0)):
        if name in params:
            kwargs[name] = value
        elif value != default:
            raise SystemExit(f"engine/model.py at {rev} has no `{name}`, which the run's preset uses ({name}={value})")
    old = module.ScoreNet(preset.channels, preset.embed_dim, preset.groups, **kwargs)
    old.load_state_dict(like.state_dict())
    return old.to(next(like.parameters()).device).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--against", required=True, help="the git revision whose engine/model.py is the baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--digit", type=int, default=0, help="test-set index of the image")
    ap.add_argument("--out", help="also write the table here, with the command and commit that made it")
    a = ap.parse_args()
    from engine import provenance
    from engine.store import load_run
    provenance.start()
    run = load_run(a.run)
    now = run.model("cpu")
    before = model_at(a.against, now, run.preset)
    x = data.load_test()[0][a.digit: a.digit + 1]
    kw = run.preset.likelihood_kwargs
    seconds: dict[str, list[float]] = {"now": [], a.against: []}
    results = {}
    for i in range(a.repeats + 1):  # the first round warms both up and is not counted
        for name, model in (("now", now), (a.against, before)):
            t0 = time.perf_counter()
            results[name] = L.bits_per_dim_and_grad(model, x, list(model.parameters()), **kw)
            if i:
                seconds[name].append(time.perf_counter() - t0)
    (b_now, g_now), (b_old, g_old) = results["now"], results[a.against]
    flat_now, flat_old = (torch.cat([g.flatten() for g in gs]) for gs in (g_now, g_old))
    stats = {k: (min(v), sorted(v)[len(v) // 2]) for k, v in seconds.items()}
    lines = [f"Exact BPD with its parameter gradient, test digit {a.digit}, run {a.run} (preset {run.preset.name}, "
             f"digest {run.digest[:12]}), on {provenance.machine()}, {torch.get_num_threads()} threads; "
             f"engine/model.py now against {a.against}, interleaved, {a.repeats} repeats each",
             f"{'engine/model.py':20s} {'min s':>8s} {'median s':>9s}"]
    lines += [f"{k:20s} {mn:8.2f} {md:9.2f}" for k, (mn, md) in stats.items()]
    lines += [f"{a.against} / now: {stats[a.against][0] / stats['now'][0]:.2f}x (min), "
              f"{stats[a.against][1] / stats['now'][1]:.2f}x (median)",
              f"BPD now {b_now.item():.7f}, at {a.against} {b_old.item():.7f}; gradients "
              f"{((flat_now - flat_old).norm() / flat_old.norm()).item():.1e} apart (relative L2)"]
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
