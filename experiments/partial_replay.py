"""How good is an exact replay that is only partly done? The reverse sweep's partial sum after each
5% of the training steps (engine.metagrad, partial_every), alone and combined with the shipped
preview (engine.attribution.progressive), against the finished replay and against retraining.

    python experiments/partial_replay.py --run runs/cpu [--queries 4] [--drawn] [--rep basis64]
        [--bank results/lds_cpu_positional_x10] [--out results/partial_replay_cpu]

Queries: the first --queries test digits of the bank's LDS queries (their retrains are committed,
so the LDS needs no training); with --drawn instead the drawn digits of the fidelity study (8), since
drawings are what the app's visitors attribute (experiments/precompute_fidelity.py --lds-images
adds their retrains to the bank; else they are retrained here, ~45 min on 2 cores). Per fraction
of the steps: Spearman with the finished replay, the top-16 proponents and opponents it shares with
it, and LDS protocol A (mean over the queries) for the partial sum alone and for the progressive
combination; the preview alone for reference.
Writes partial_replay.{json,md}. One replay of training for all queries (about 15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import atomic, data, provenance  # noqa: E402
from engine.attribution import progressive  # noqa: E402
from engine.bpd import run_bpd  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.metagrad import metagradient  # noqa: E402
from engine.precompute import representation  # noqa: E402
from engine.precompute.tangents import flatten  # noqa: E402
from engine.store import load_run  # noqa: E402
from precompute_fidelity import actual_changes, drawn_digits, lds_of, overlap  # noqa: E402

REPORTS = 20  # a partial sum every 5% of the steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--drawn", action="store_true", help="the fidelity study's drawn digits, not test digits")
    ap.add_argument("--rep", default="basis64")
    ap.add_argument("--bank", default="results/lds_cpu_positional_x10")
    ap.add_argument("--out", default="results/partial_replay_cpu")
    a = ap.parse_args()
    provenance.start()
    try:
        run = load_run(a.run)
        rep = representation.load(run, a.rep)
        with np.load(Path(a.bank) / "scores" / "magic.npz", allow_pickle=False) as z:
            if str(z["run_digest"]) != run.digest:
                raise UserError(f"{a.bank} was made on another run than {a.run}")
            queries = [int(v) for v in z["queries"]][: a.queries]
    except (UserError, OSError, KeyError) as e:
        sys.exit(f"error: {e}")
    T = run.preset.steps
    if a.drawn:
        from engine.experiments.bank import image_key
        drawn = drawn_digits()
        names = list(drawn)
        x = torch.stack([drawn[n] for n in names])
        queries = [image_key(v) for v in x]  # their keys in the bank
        what = f"the fidelity study's drawn digits ({', '.join(names)})"
    else:
        x = torch.from_numpy(np.asarray(data.load_test()[0][queries]))
        what = f"test digits {', '.join(map(str, queries))} (the first of {a.bank}'s LDS queries)"
    bpd, grads = run_bpd(run, x, grad=True)
    preview = rep.scores(torch.stack([flatten(g) for g in grads]).numpy())
    partials: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()

    def cb(info: dict) -> None:
        if "grad_w" in info:
            partials[info["i"]] = info["grad_w"]
            print(f"  {info['i']}/{info['n']} steps replayed ({time.perf_counter() - t0:.0f} s)", flush=True)
    images = data.load_train(run.preset.n_train, run.preset.source)[0]
    exact = metagradient(run, images, grads, callback=cb, partial_every=max(1, T // REPORTS)).numpy().astype(np.float64)
    replay_s = time.perf_counter() - t0
    bank = Path(a.bank)
    # the retrains' actual changes, read once for every row
    drops, actual = actual_changes(run, bank, queries, np.asarray(bpd, dtype=np.float64),
                                   {q: v.numpy() for q, v in zip(queries, x)} if a.drawn else None, jobs=2)

    def measures(s: np.ndarray) -> dict:
        sp = [float(spearmanr(s[i], exact[i])[0]) for i in range(len(queries))]
        ov = [overlap(s[i], exact[i]) for i in range(len(queries))]
        ld = lds_of(s, drops, actual)
        return {"spearman": sp, "top_proponents": [o[0] for o in ov], "top_opponents": [o[1] for o in ov],
                "lds": [float(v) for v in ld]}
    rows = [{"scores": f"preview ({a.rep})", "steps": 0, **measures(preview)}]
    for i in sorted(partials) + [T]:
        s = exact if i == T else partials[i]
        rows.append({"scores": "partial sum", "steps": i, **measures(s)})
        rows.append({"scores": "progressive", "steps": i, **measures(progressive(preview, s, i, run.preset))})
    st = provenance.stamp()
    atomic.save_json({**st, "run": str(run.path), "run_digest": run.digest, "representation": a.rep,
                      "queries": queries, "query_names": names if a.drawn else [f"test:{q}" for q in queries],
                      "bank": str(bank), "steps": T, "replay_seconds": replay_s, "rows": rows},
                     Path(a.out) / "partial_replay.json")
    md = [f"# A partly finished exact replay on `{run.preset.name}` ({run.path}, digest {run.digest[:8]})", "",
          f"`{provenance.command()}` at commit {st['commit']}. Queries: {what}. The replay of {T:,} steps took {replay_s:.0f} s; a partial sum every "
          f"{max(1, T // REPORTS)} steps. 'partial sum': the exact derivative with respect to the weights of the last "
          f"steps replayed; 'progressive': that plus the preview ({a.rep}) scaled by the learning-rate share of the "
          f"steps not replayed yet (engine.attribution.progressive). Means over the queries (min).", "",
          "| scores | steps replayed | Spearman with the finished replay | top-16 proponents shared | top-16 opponents "
          "shared | LDS protocol A |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['scores']} | {r['steps']:,} ({r['steps'] / T:.0%}) | {np.mean(r['spearman']):.3f} "
                  f"({np.min(r['spearman']):.3f}) | {np.mean(r['top_proponents']):.1f} | {np.mean(r['top_opponents']):.1f} "
                  f"| {np.mean(r['lds']):.3f} ({np.min(r['lds']):.3f}) |")
    atomic.save_text("\n".join(md) + "\n", Path(a.out) / "partial_replay.md")
    print("\n".join(md))


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
