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


from engine.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine", description="Exact-likelihood data attribution for a VE-SDE diffusion model on MNIST.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a preset into a run directory (resumes if interrupted)")
    t.add_argument("--preset", required=True, help="tiny | small | cpu | gpu")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weights", help=".npy of per-example loss weights, shape (n,)")
    t.add_argument("--drop", help="text file of training indices to drop (weight 0)")
    t.add_argument("--replace-other", action="store_true",
                   help="if --out holds a run of another config (an earlier version of the preset), move it to OUT.<its digest> and train anew")

    b = sub.add_parser("bpd", help="exact bits/dim of images")
    b.add_argument("--run", required=True)
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, .npy (28x28 in [0,1]) or test:I")

    s = sub.add_parser("sample", help="generate digits")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help=".png grid or .npy array")
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--method", choices=["ode", "pc", "sde"], default="ode",
                   help="ode (default, as the app): the probability-flow ODE, 32 RK4 steps; pc: reverse diffusion with a "
                        "Langevin corrector; sde: reverse diffusion alone (500 steps each); on the cpu default ode and pc "
                        "give the most digits a classifier is sure of (results/sample_quality)")
    s.add_argument("--steps", type=int, help="sampler steps (default 32 for ode, 500 for pc and sde)")

    at = sub.add_parser("attribute", help="MAGIC scores d BPD / d w_i for every training image")
    at.add_argument("--run", required=True)
    at.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, .npy (28x28 in [0,1]) or test:I")
    at.add_argument("--out", required=True, help="SCORES.npz with grad_w (Q, n) and bpd (Q,)")
    at.add_argument("--top", type=int, default=0, help="also list the K strongest proponents and opponents")
    at.add_argument("--scheme", choices=["sqrt", "segment", "kary"], default="sqrt",
                    help="how training states are recomputed: stored sqrt(T) checkpoints; segment: the same, keeping a segment's "
                         "step graphs (one pass of training less: 0.80x the time of one query on the cpu default, for 7 GB; "
                         "equal to sqrt to ~1e-6, not bit for bit); or k-ary recursion from step 0")
    at.add_argument("--k", type=int, default=4, help="parts per level of the k-ary scheme")
    at.add_argument("--replay", action="store_true",
                    help="replay training even if the run has a precomputed representation (python -m engine precompute)")
    at.add_argument("--jobs", type=int, default=1,
                    help="with more than 1, queries are split in --chunk sized jobs on that many local processes")
    at.add_argument("--chunk", type=int, default=8, help="queries per job when jobs are used (one batched sweep each)")

    pc = sub.add_parser("precompute", help="precompute the run's metagradient replay once for every later query")
    pc.add_argument("--run", required=True)
    pc.add_argument("--method", choices=["basis", "exact", "lowrank"], default="basis",
                    help="basis (default, what the app ships): the replayed BPD gradients of K fixed images, a query "
                         "fitted in them; exact: J itself, one forward tangent per training image; lowrank: a rank-K "
                         "range finder (far less faithful than a basis of the same K, results/precompute/fidelity.md)")
    pc.add_argument("--rank", type=int, default=64, help="lowrank, basis: K, the number of directions or images")
    pc.add_argument("--init", choices=["random", "queries"], default="random",
                    help="lowrank: Gaussian directions, or the MAGIC attributions of fixed test digits")
    pc.add_argument("--chunk", type=int, default=8, help="directions per job (one resumable chunk each)")
    pc.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per core, or per GPU)")
    pc.add_argument("--ship", action="store_true",
                    help="then copy it to shipped/<preset>/ in the repository, for the app's first start")

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

    f = sub.add_parser("figure2", help="BPD of digits vs rotated, averaged and noise images")
    f.add_argument("--run", required=True)
    f.add_argument("--out", default="results/figure2", help="folder for figure2.json/.md/.png")
    f.add_argument("--n", type=int, default=50, help="images per group")
    f.add_argument("--angle", type=float, default=90.0)
    f.add_argument("--k-avg", type=int, default=4, help="digits per average")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--images", choices=["test", "train"], default="test",
                   help="digits from the MNIST test set (held out), or from the run's training images (the seed's protocol)")

    f4 = sub.add_parser("figure4", help="top proponents and opponents of test queries: galleries, classes, recurrence")
    f4.add_argument("--run", required=True)
    f4.add_argument("--scores", required=True, help="scores .npz of `attribute` (test:I inputs) or of `lds` (OUT/scores/METHOD.npz)")
    f4.add_argument("--out", default="results/figure4")
    f4.add_argument("--k", type=int, default=16)

    for sp in (t, b, s, at, pc, ld, cp, f, f4):
        sp.add_argument("--json", action="store_true", help="JSON on stdout")
    return p


def _commands() -> dict:
    from engine import commands as c
    from engine.experiments import commands as e
    return {"train": c.cmd_train, "bpd": c.cmd_bpd, "sample": c.cmd_sample, "attribute": c.cmd_attribute,
            "precompute": c.cmd_precompute, "lds": e.cmd_lds, "compare": e.cmd_compare, "figure2": e.cmd_figure2,
            "figure4": e.cmd_figure4}


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
                + (f" ({result['times_training']:.1f}x training)" if result.get("times_training") else "")
                + (f"; shipped as {result['shipped']}" if result.get("shipped") else ""))
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
    from engine import provenance
    provenance.start()  # results files name the code that ran, not the checkout when they are written
    try:
        a = build_parser().parse_args(argv)
        with sigterm_as_interrupt():
            result = _commands()[a.cmd](a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2) if a.json else _human(a.cmd, result))
    return 0
