"""Command line: `python -m engine COMMAND ...` (see DESIGN.md's contracts).

Human text on stdout (JSON with --json), progress bars on stderr, and for every error a
one-line reason on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine import data
from engine.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


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
    return torch.stack([data.load_input(s) for s in specs])


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
    model = run.model()
    steps = a.steps or (500 if a.method == "sde" else 32)
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
    return info


def _lds_queries(a) -> list[int]:
    if a.query_index:
        try:
            return [int(v) for v in a.query_index.split(",")]
        except ValueError:
            raise UserError(f"--query-index must be comma-separated integers, got {a.query_index!r}") from None
    if a.queries < 1:
        raise UserError("--queries must be at least 1")
    return data.query_indices(a.queries, a.seed)


def _methods(spec: str) -> list[str]:
    from engine import methods
    known = methods.names()
    names = known if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise UserError(f"--method: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(known)} or all")
    return names


def _lds_callback(a):
    """Progress bars for run_lds's stages; returns (callback, close)."""
    bars: dict = {}

    def cb(info: dict) -> None:
        stage = info.get("stage", "")
        if stage not in bars:
            for b in bars.values():
                b[0].close()
            total = info.get("n") if stage in ("retrain", "features") else None
            bars[stage] = _progress(total, {"retrain": "retrains", "training": "metagradient",
                                            "features": "TRAK features"}.get(stage, "bits/dim"), a.json)
        bar = bars[stage][0]
        if stage in ("retrain", "features"):
            bar.n = info["i"]
            bar.refresh()
        else:
            bar.update(1)

    def close() -> None:
        for b in bars.values():
            b[0].close()
        bars.clear()
    return cb, close


def cmd_lds(a) -> dict:
    from engine.executor import make_executor
    from engine.experiments.lds import run_lds
    from engine.store import load_run
    run = load_run(a.run)
    queries = _lds_queries(a)
    methods = _methods(a.method)
    _default_jobs(a, run)
    _check_executor_args(a)
    k = a.drop_sets or (50 if a.protocol == "A" else 16)
    executor = make_executor(a.executor, jobs=a.jobs, address=a.address)
    cb, close = _lds_callback(a)
    reports = []
    for m in methods:
        reports.append(run_lds(run, Path(a.out), queries, method=m, protocol=a.protocol, k=k, frac=a.frac,
                               alpha=a.alpha, seeds=a.seeds, seed=a.seed, executor=executor, callback=cb))
        close()
    return {"out": a.out, "reports": [{k: v for k, v in r.items() if k != "queries"} | {
        "per_query": [{k: q[k] for k in ("query", "label", "bpd", "spearman", "pearson")} for q in r["queries"]]}
        for r in reports]}


def cmd_compare(a) -> dict:
    from engine.executor import make_executor
    from engine.experiments import comparison
    from engine.store import load_run
    run = load_run(a.run)
    queries = _lds_queries(a)
    methods = _methods(a.method)
    _default_jobs(a, run)
    _check_executor_args(a)
    executor = make_executor(a.executor, jobs=a.jobs, address=a.address)
    cb, close = _lds_callback(a)
    protocols = [p.strip() for p in a.protocols.split(",") if p.strip()]
    if not protocols or any(p not in ("A", "B") for p in protocols):
        raise UserError(f"--protocols must be A, B or A,B, got {a.protocols!r}")
    table = comparison.run_comparison(run, Path(a.out), Path(a.report), queries, methods=methods, protocols=protocols,
                                   k_a=a.drop_sets, k_b=a.subsets, seeds=a.seeds, seed=a.seed,
                                   executor=executor, callback=cb)
    close()
    return {"report": a.report, "table": table}


def cmd_figure4(a) -> dict:
    from engine.experiments import figure4
    from engine.store import load_run
    run = load_run(a.run)
    try:
        with np.load(a.scores, allow_pickle=False) as f:
            grad_w = f["grad_w"] if "grad_w" in f.files else f["scores"]
            if "queries" in f:
                queries = [int(q) for q in f["queries"]]
            else:
                specs = [str(s) for s in f["inputs"]]
                if not all(s.startswith("test:") for s in specs):
                    raise UserError(f"{a.scores}: figure4 needs test-set queries (inputs written as test:I)")
                queries = [int(s[5:]) for s in specs]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{a.scores}: not a scores file of `attribute` or `lds` ({type(e).__name__})") from None
    if grad_w.shape != (len(queries), run.preset.n_train):
        raise UserError(f"{a.scores}: grad_w has shape {grad_w.shape}, expected ({len(queries)}, {run.preset.n_train}) for this run")
    rep = figure4.run_figure4(run, grad_w, queries, Path(a.out), k=a.k)
    return {"out": a.out, "findings": rep["findings"]}


def cmd_figure2(a) -> dict:
    from engine.experiments import figure2
    from engine.store import load_run
    run = load_run(a.run)
    bar, cb = _progress(4 * a.n, "figure2 images", a.json)
    report = figure2.run_figure2(run, Path(a.out), n=a.n, angle=a.angle, k_avg=a.k_avg, seed=a.seed, callback=cb)
    bar.close()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine", description="Exact-likelihood data attribution for a VE-SDE diffusion model on MNIST.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a preset into a run directory (resumes if interrupted)")
    t.add_argument("--preset", required=True, help="tiny | small | cpu | gpu")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weights", help=".npy of per-example loss weights, shape (n,)")
    t.add_argument("--drop", help="text file of training indices to drop (weight 0)")

    b = sub.add_parser("bpd", help="exact bits/dim of images")
    b.add_argument("--run", required=True)
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, .npy (28x28 in [0,1]) or test:I")

    s = sub.add_parser("sample", help="generate digits")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help=".png grid or .npy array")
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--method", choices=["sde", "ode"], default="sde")
    s.add_argument("--steps", type=int)

    at = sub.add_parser("attribute", help="MAGIC scores d BPD / d w_i for every training image")
    at.add_argument("--run", required=True)
    at.add_argument("inputs", nargs="+", metavar="INPUT")
    at.add_argument("--out", required=True, help="SCORES.npz with grad_w (Q, n) and bpd (Q,)")
    at.add_argument("--top", type=int, default=0, help="also list the K strongest proponents and opponents")
    at.add_argument("--scheme", choices=["sqrt", "segment", "kary"], default="sqrt",
                    help="how training states are recomputed: stored sqrt(T) checkpoints (segment: also keep a segment's step graphs, one pass of training less, more memory), or k-ary recursion from step 0")
    at.add_argument("--k", type=int, default=4, help="parts per level of the k-ary scheme")
    at.add_argument("--replay", action="store_true",
                    help="replay training even if the run has a precomputed representation (python -m engine precompute)")
    at.add_argument("--jobs", type=int, default=1,
                    help="with more than 1, queries are split in --chunk sized jobs on that many local processes")
    at.add_argument("--chunk", type=int, default=8, help="queries per job when jobs are used (one batched sweep each)")

    pc = sub.add_parser("precompute", help="precompute the run's metagradient replay once for every later query")
    pc.add_argument("--run", required=True)
    pc.add_argument("--method", choices=["exact", "lowrank"], default="lowrank",
                    help="exact: J itself, one forward tangent per training image; lowrank: a rank-K range finder")
    pc.add_argument("--rank", type=int, default=32, help="lowrank: K, the number of directions")
    pc.add_argument("--init", choices=["random", "queries"], default="random",
                    help="lowrank: Gaussian directions, or the MAGIC attributions of fixed test digits")
    pc.add_argument("--chunk", type=int, default=8, help="directions per job (one resumable chunk each)")
    pc.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per core, or per GPU)")

    ld = sub.add_parser("lds", help="predicted BPD changes of an attribution method against actual retraining")
    ld.add_argument("--method", default="magic",
                    help="an attribution method (magic by default; see engine.methods), a comma-separated list, or all")
    ld.add_argument("--protocol", choices=["A", "B"], default="A",
                    help="A: drop-sets of --frac, one seed; B: subsets keeping --alpha, --seeds seeds averaged")
    ld.add_argument("--drop-sets", type=int, default=None, help="number of drop-sets (protocol B: subsets); default 50 (B: 16)")
    ld.add_argument("--frac", type=float, default=0.01, help="protocol A: fraction of the training set in each drop-set")
    ld.add_argument("--alpha", type=float, default=0.5, help="protocol B: fraction of the training set each subset keeps")
    ld.add_argument("--seeds", type=int, default=2, help="protocol B: training seeds averaged per subset")
    cp = sub.add_parser("compare", help="LDS of MAGIC and every baseline on protocols A and B: results/comparison.md/json/png")
    cp.add_argument("--method", default="all", help="methods to compare (default all)")
    cp.add_argument("--drop-sets", type=int, default=50, help="protocol A drop-sets")
    cp.add_argument("--subsets", type=int, default=16, help="protocol B subsets")
    cp.add_argument("--seeds", type=int, default=2, help="protocol B seeds per subset")
    cp.add_argument("--report", default="results/comparison", help="path stem of the .md, .json and .png written")
    cp.add_argument("--protocols", default="A,B", help="A, B or A,B (default)")
    for sp in (ld, cp):
        sp.add_argument("--run", required=True)
        sp.add_argument("--out", required=True, help="folder for the scores, the resumable retrains and the reports")
        sp.add_argument("--queries", type=int, default=8, help="number of test queries (a fixed random sample)")
        sp.add_argument("--query-index", help="comma-separated test indices instead of --queries")
        sp.add_argument("--seed", type=int, default=0, help="seed of the query sample and of the drop-sets")
        sp.add_argument("--jobs", type=int, default=None,
                        help="parallel retraining processes (default: one per core, or per GPU for a GPU preset)")
    for sp in (at, pc, ld, cp):
        sp.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="where jobs run: local processes, or a Ray cluster (pip install -r requirements-ray.txt)")
        sp.add_argument("--address", help="Ray cluster address (e.g. auto, or ray://host:10001); default: start a local one")

    f = sub.add_parser("figure2", help="BPD of test digits vs rotated, averaged and noise images")
    f.add_argument("--run", required=True)
    f.add_argument("--out", default="results/figure2", help="folder for figure2.json/.md/.png")
    f.add_argument("--n", type=int, default=50, help="images per group")
    f.add_argument("--angle", type=float, default=90.0)
    f.add_argument("--k-avg", type=int, default=4, help="digits per average")
    f.add_argument("--seed", type=int, default=0)

    f4 = sub.add_parser("figure4", help="top proponents and opponents of test queries: galleries, classes, recurrence")
    f4.add_argument("--run", required=True)
    f4.add_argument("--scores", required=True, help="scores .npz of `attribute` (test:I inputs) or of `lds` (OUT/scores/METHOD.npz)")
    f4.add_argument("--out", default="results/figure4")
    f4.add_argument("--k", type=int, default=16)

    for sp in (t, b, s, at, pc, ld, cp, f, f4):
        sp.add_argument("--json", action="store_true", help="JSON on stdout")
    return p


COMMANDS = {"train": cmd_train, "bpd": cmd_bpd, "sample": cmd_sample, "attribute": cmd_attribute,
            "precompute": cmd_precompute, "lds": cmd_lds, "compare": cmd_compare, "figure2": cmd_figure2,
            "figure4": cmd_figure4}


def _human(cmd: str, result) -> str:
    if cmd == "bpd":
        return "\n".join(f"{r['bpd']:8.4f} bits/dim  {r['input']}" for r in result)
    if cmd == "figure2":
        return result["table"]
    if cmd == "figure4":
        return (Path(result["out"]) / "figure4.md").read_text()
    if cmd == "lds":
        lines = []
        for r in result["reports"]:
            what = (f"{r['drop_sets']} drop-sets of {r['drop_size']} images" if r["protocol"] == "A" else
                    f"{r['drop_sets']} subsets of {r['n_train'] - r['drop_size']} images x {r['seeds']} seeds")
            lines.append(f"{r['method']}: LDS protocol {r['protocol']} on {r['preset']}, {what}")
            lines += [f"  test {q['query']:5d} (digit {q['label']}): Spearman {q['spearman']:.3f}" for q in r["per_query"]]
            lines.append(f"  mean Spearman {r['spearman_mean']:.3f}, min {r['spearman_min']:.3f}")
            if r.get("spearman_by_seed"):
                lines.append("  each seed alone: " + ", ".join(f"seed {x['seed']} {x['mean']:.3f}" for x in r["spearman_by_seed"])
                             + ("" if r.get("seed_agreement") is None else
                                f"; seeds agree with each other at {r['seed_agreement']:.3f}"))
        lines.append(f"(wrote {result['out']})")
        return "\n".join(lines)
    if cmd == "compare":
        return result["table"] + f"\n(wrote {result['report']}.md, .json, .png)"
    if cmd == "precompute":
        return (f"wrote {result['path']}: {result['method']} representation of rank {result['rank']}, "
                f"{result['bytes'] / 2**20:.1f} MiB; {result['seconds']:.0f} s of compute in {result['chunks']} chunks"
                + (f" ({result['times_training']:.1f}x training)" if result.get("times_training") else ""))
    if cmd == "attribute":
        lines = [f"wrote {result['out']} ({result['method']})"]
        for q in result["queries"]:
            lines.append(f"{q['input']}: {q['bpd']:.4f} bits/dim")
            for kind in ("proponents", "opponents"):
                if kind in q:
                    lines.append(f"  {kind}: " + " ".join(str(e["index"]) for e in q[kind]))
        return "\n".join(lines)
    return "\n".join(f"{k}: {v}" for k, v in result.items())


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM (`kill`, a job scheduler's stop) raises KeyboardInterrupt like
    Ctrl-C, so that worker processes are stopped and the exit is clean; the default would end
    this process at once and leave its workers running their jobs. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def _notes_to_stderr() -> None:
    """The engine says why it recomputes a kept result (engine.files); show that on stderr."""
    log = logging.getLogger("engine")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("note: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)


def main(argv: Optional[list[str]] = None) -> int:
    _notes_to_stderr()
    try:
        a = build_parser().parse_args(argv)
        with sigterm_as_interrupt():
            result = COMMANDS[a.cmd](a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if a.json else _human(a.cmd, result))
    return 0
