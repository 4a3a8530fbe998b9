"""How well does a precomputed representation reproduce exact MAGIC? A study on one run.

    python experiments/precompute_fidelity.py --run runs/small --reps lowrank64 \
        [--ranks 4,8,16,32,64] [--bank results/lds_small] [--out results/precompute] \
        [--n-test 16] [--exact-from results/lds_small/scores/magic.npz]

Queries: 16 test digits (the first 8 are the LDS queries of the committed retraining bank; none
is among the digits any basis was built from), 8 digits drawn with strokes by this script and
preprocessed like the app's canvas, and 4 off-distribution images (two test digits rotated by 90
degrees, an average of 4 test digits, uniform noise). For each: the exact grad_w (a batched
replay of training, kept in RUN/fidelity/exact*.npz with the BPD gradients; queries added later are
replayed on their own) against the
representation's A (B g), truncated to each rank (the first K directions of a rank-K' range
finder are a rank-K range finder; the first K images of a query basis are a K-image basis, refitted):
Spearman over all training images, and how many of the
top-16 proponents and top-16 opponents are shared. LDS protocol A on the bank's queries against
its committed retrains, next to exact MAGIC's on the same retrains. Writes fidelity.json,
fidelity.md and fidelity.png, with the command and commit that made them.

--exact-from takes the exact grad_w of the test digits that a committed `compare` bank already
scored with MAGIC on this run (its scores/magic.npz) instead of replaying training for them again
(on a large run the replay is the study's whole cost: ~5 min a query on `cpu`); their BPD is
recomputed here and must agree, so scores of other images or weights are refused. --n-test 8
keeps the test digits to the bank's 8 LDS queries.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import atomic, data, images, provenance  # noqa: E402
from engine.files import load_or_compute  # noqa: E402
from engine.store import load_run  # noqa: E402

TOP = 16


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 30) -> list:
    """Points along an elliptic arc on the canvas (y down), from angle a0 to a1 in degrees."""
    a = np.radians(np.linspace(a0, a1, n))
    return [(cx + rx * np.cos(t), cy + ry * np.sin(t)) for t in a]


def drawn_digits() -> dict[str, torch.Tensor]:
    """Eight digits drawn as white strokes on a 280x280 black canvas, preprocessed like a drawing
    (the first four since the study began; 2, 3, 6 and 9 added so that the drawn digits' LDS rests
    on more than four drawings, and on curves as well as straight strokes)."""
    from PIL import Image, ImageDraw
    strokes = {"drawn 1": [[(150, 40), (140, 240)]],
               "drawn 7": [[(60, 50), (220, 50), (120, 240)]],
               "drawn 4": [[(170, 240), (170, 40), (60, 170), (220, 170)]],
               "drawn 0": [[(140 + 70 * np.sin(a), 140 - 100 * np.cos(a)) for a in np.linspace(0, 2 * np.pi, 40)]],
               "drawn 2": [_arc(140, 95, 60, 50, 200, 360) + [(200, 100), (75, 240), (215, 240)]],
               "drawn 3": [_arc(135, 90, 60, 45, 210, 450) + _arc(135, 185, 65, 52, 270, 510)],
               "drawn 6": [[(185, 45), (120, 100)] + _arc(140, 185, 58, 52, 200, 560)],
               "drawn 9": [_arc(140, 95, 58, 50, 0, 360) + [(198, 95), (185, 245)]]}
    out = {}
    for name, lines in strokes.items():
        img = Image.new("RGBA", (280, 280), (0, 0, 0, 255))
        d = ImageDraw.Draw(img)
        for line in lines:
            d.line(line, fill=(255, 255, 255, 255), width=20, joint="curve")
        out[name] = images.preprocess_array(images.to_gray(img), name)
    return out


def queries(n_test: int = 16) -> dict[str, torch.Tensor]:
    from engine.methods import magic_mean
    test_x, _ = data.load_test()
    used = set(data.query_indices(magic_mean.N_DIGITS, magic_mean.SEED))
    idx = [i for i in data.query_indices(n_test + len(used), 0) if i not in used][:n_test]
    q = {f"test:{i}": test_x[i] for i in idx}
    q.update(drawn_digits())
    extra = [i for i in data.query_indices(200, 99) if i not in used and i not in idx]
    q["rotated test:%d" % extra[0]] = data.rotate(test_x[extra[0]], 90)
    q["rotated test:%d" % extra[1]] = data.rotate(test_x[extra[1]], 90)
    q["average of 4"] = data.average(test_x[extra[2:6]])
    q["noise"] = data.uniform_noise(1, torch.Generator().manual_seed(0))[0]
    return q


def exact(run, names: list[str], x: torch.Tensor, work: Path) -> dict:
    """Exact grad_w (Q, n), BPD (Q,) and flat BPD gradients g (Q, P), with the seconds of the
    replays that made them and how many there were ("batches"). Kept in work/exact*.npz: a query
    that a file there holds (made on this run, same name, same pixels) is taken from it, and the
    others are replayed together (one batched replay of training) into a file of their own, so a
    query added to the study costs only its own replay."""
    from engine.bpd import run_bpd
    from engine.metagrad import metagradient
    from engine.precompute.tangents import flatten

    found: dict[int, tuple] = {}
    seconds, batches = 0.0, 0
    for path in sorted(work.glob("exact*.npz")):
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["run_digest"]) != run.digest:
                    continue
                took = False
                for j, n in enumerate(str(v) for v in z["names"]):
                    i = names.index(n) if n in names else None
                    if i is not None and i not in found and np.array_equal(z["x"][j], x[i].numpy()):
                        found[i] = (z["grad_w"][j], z["bpd"][j], z["g"][j])
                        took = True
                if took:
                    seconds, batches = seconds + float(z["seconds"]), batches + 1
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue  # unreadable: its queries are replayed again
    rest = [i for i in range(len(names)) if i not in found]
    if rest:
        xr = x[rest]

        def compute() -> dict:
            t0 = time.perf_counter()
            bpd, grads = run_bpd(run, xr, grad=True)
            gw = metagradient(run, data.load_train(run.preset.n_train, run.preset.source)[0], grads)
            return {"grad_w": gw.numpy().astype(np.float64), "bpd": bpd,
                    "g": torch.stack([flatten(g) for g in grads]).numpy(), "seconds": time.perf_counter() - t0}
        rnames = [names[i] for i in rest]
        tag = hashlib.sha256("\n".join(rnames).encode() + xr.numpy().tobytes()).hexdigest()[:12]
        part = load_or_compute(work / f"exact-{tag}.npz", {"run_digest": run.digest, "names": np.array(rnames),
                                                           "x": xr.numpy()},
                               compute, what=f"exact MAGIC of {len(rest)} queries")
        for j, i in enumerate(rest):
            found[i] = (part["grad_w"][j], part["bpd"][j], part["g"][j])
        seconds, batches = seconds + float(part["seconds"]), batches + 1
    order = range(len(names))
    return {"grad_w": np.stack([found[i][0] for i in order]).astype(np.float64),
            "bpd": np.array([found[i][1] for i in order], np.float64),
            "g": np.stack([found[i][2] for i in order]), "seconds": seconds, "batches": batches}


def reused_exact(run, names: list[str], x: torch.Tensor, path: Path) -> dict:
    """The exact grad_w (R, n), BPD (R,) and flat BPD gradients g (R, P) of the test digits among
    `names` that a bank's MAGIC scores file (made on this run) holds, and their positions
    ("index", R). The BPD is recomputed with its gradient and checked against the file's."""
    from engine.bpd import run_bpd
    from engine.errors import UserError
    from engine.precompute.tangents import flatten
    try:
        with np.load(path, allow_pickle=False) as z:
            digest, qs, scores, bpd = str(z["run_digest"]), [int(v) for v in z["queries"]], z["scores"], z["bpd"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"--exact-from {path}: not a readable MAGIC scores file ({type(e).__name__})") from None
    if digest != run.digest:
        raise UserError(f"--exact-from {path}: made on run {digest[:12]}, not on this run ({run.digest[:12]})")
    index = [i for i, n in enumerate(names) if n.startswith("test:") and int(n[5:]) in qs]
    if not index:
        return {"index": []}
    rows = [qs.index(int(names[i][5:])) for i in index]
    mine, grads = run_bpd(run, x[index], grad=True)
    off = np.abs(np.asarray(mine, dtype=np.float64) - bpd[rows]).max()
    if off > 1e-3:  # the file's scores belong to other images or another likelihood grid
        raise UserError(f"--exact-from {path}: its BPDs differ from this run's by up to {off:.4f} bits/dim")
    return {"index": index, "grad_w": scores[rows].astype(np.float64), "bpd": bpd[rows].astype(np.float64),
            "g": torch.stack([flatten(gr) for gr in grads]).numpy()}


def overlap(a: np.ndarray, b: np.ndarray, k: int = TOP) -> tuple[int, int]:
    """Shared members of the top-k proponents and of the top-k opponents of two score vectors."""
    pa, pb = np.argsort(a, kind="stable"), np.argsort(b, kind="stable")
    return len(set(pa[:k]) & set(pb[:k])), len(set(pa[::-1][:k]) & set(pb[::-1][:k]))


def actual_changes(run, bank_dir: Path, bank_queries: list, bpd: np.ndarray, images: dict | None = None,
                   jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(the protocol-A drop-sets (S, d), and the actual BPD change (Q, S) of each bank query (a test
    index, or an image key of `images`) under the committed bank's retrains without each; retrained
    once more for queries the bank lacks)."""
    from engine.executor import LocalExecutor
    from engine.experiments import bank, protocols
    plan = protocols.plan("A", run.preset.n_train, 50, frac=0.01, seed=0)
    actual = bank.retrained(run, bank_dir, bank_queries, plan.drops, 1, protocol="A", settings=plan.settings,
                            executor=LocalExecutor(jobs), images=images,
                            callback=lambda i: i["i"] < i["n"] and print(f"  bank: {i['i']}/{i['n']} retrains",
                                                                         flush=True))[0] - bpd[:, None]
    return plan.drops, actual


def lds_of(scores: np.ndarray, drops: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman per query (Q,) of the change that `scores` (Q, n) predict for each drop-set against
    the `actual` change (Q, S) (`actual_changes`)."""
    from scipy.stats import spearmanr
    from engine.experiments import stats
    pred = stats.predicted_changes(scores, drops)
    return np.array([spearmanr(pred[i], actual[i])[0] for i in range(len(actual))])


def lds(run, bank_dir: Path, bank_queries: list, scores: np.ndarray, bpd: np.ndarray, images: dict | None = None,
        jobs: int = 1) -> np.ndarray:
    """Spearman per bank query (a test index, or an image key of `images`) of predicted vs actual
    change on the committed protocol-A bank (retrained once more for queries it lacks)."""
    return lds_of(scores, *actual_changes(run, bank_dir, bank_queries, bpd, images, jobs))


def main() -> None:
    from engine.precompute import representation as R
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/small")
    ap.add_argument("--reps", default="lowrank64", help="representations of the run to study, comma-separated")
    ap.add_argument("--ranks", default="4,8,16,32,64")
    ap.add_argument("--bank", default="results/lds_small")
    ap.add_argument("--out", default="results/precompute")
    ap.add_argument("--lds-images", action="store_true",
                    help="LDS also on the drawn and off-distribution queries (retrains the bank once for those it lacks: "
                         "~45 min on 2 cores, resumable)")
    ap.add_argument("--jobs", type=int, default=2, help="retrains in parallel (with --lds-images)")
    ap.add_argument("--n-test", type=int, default=16, help="test digits among the queries (at least 8: the bank's)")
    ap.add_argument("--exact-from", help="a bank's scores/magic.npz on this run: its test digits' exact MAGIC, "
                                         "instead of replaying training for them")
    a = ap.parse_args()
    from engine.errors import UserError
    if a.n_test < 8:
        raise SystemExit("error: --n-test must be at least 8 (the LDS is measured on the bank's 8 test queries)")
    try:
        if min(int(k) for k in a.ranks.split(",")) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: --ranks takes comma-separated positive integers, got {a.ranks!r}") from None
    provenance.start()
    try:
        run = load_run(a.run)
        from engine.precompute import shipped
        shipped.install(run)  # the repository's representation of this config, if it ships one (the default's)
        q = queries(a.n_test)
        names = list(q)
        x = torch.stack([q[k] for k in names])
        reused = reused_exact(run, names, x, Path(a.exact_from)) if a.exact_from else {"index": []}
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    rest = [i for i in range(len(names)) if i not in reused["index"]]
    gw = np.zeros((len(names), run.preset.n_train))
    bpd = np.zeros(len(names))
    g = None
    exact_seconds, exact_batches = 0.0, 0
    for index, part in ((reused["index"], reused),
                        (rest, exact(run, [names[i] for i in rest], x[rest], run.path / "fidelity") if rest else None)):
        if not index:
            continue
        gw[index], bpd[index] = part["grad_w"], part["bpd"]
        g = np.zeros((len(names), part["g"].shape[1]), np.float32) if g is None else g
        g[index] = part["g"]
        exact_seconds += float(part.get("seconds", 0.0))
        exact_batches += int(part.get("batches", 0))
    kinds = ["test" if n.startswith("test:") else "drawn" if n.startswith("drawn") else "off-distribution" for n in names]
    # LDS on the bank's 8 test queries, and with --lds-images on the drawn and off-distribution ones
    from engine.experiments.bank import image_key
    sel = list(range(8)) + ([i for i, k in enumerate(kinds) if k != "test"] if a.lds_images else [])
    keys = [int(names[i][5:]) if kinds[i] == "test" else image_key(x[i]) for i in sel]
    imgs = {k: x[i].numpy() for k, i in zip(keys, sel) if isinstance(k, str)}
    bank_q = keys

    def L(scores: np.ndarray) -> list:
        return lds(run, Path(a.bank), keys, scores[sel], bpd[sel], imgs, a.jobs).tolist()
    rows = [{"scores": "exact MAGIC (replay)", "rank": None, **_metrics(gw, gw, kinds), "lds": L(gw)}]
    mean_path = run.path / "methods" / "magic_mean.npz"
    if mean_path.is_file():  # the query-agnostic reference, if it was prepared for this run
        from engine import methods
        from engine.methods import magic_mean
        s = methods.get("magic_mean").score(run, x).scores
        rows.append({"scores": f"query-agnostic mean of {magic_mean.N_DIGITS} digits", "rank": None, **_metrics(s, gw, kinds),
                     "lds": L(s)})
    for name in [r for r in a.reps.split(",") if r]:
        rep = R.load(run, name)
        full = rep.b.shape[0]
        ranks = sorted({int(k) for k in a.ranks.split(",") if int(k) < full} | {full}) if rep.a is not None else [full]
        for k in ranks:
            if rep.method == "basis":
                from engine.precompute.basis import truncate
                sub = truncate(rep, k) if k < rep.b.shape[0] else rep
            else:
                sub = R.Representation(name, rep.method, None if rep.a is None else rep.a[:, :k], rep.b[:k], rep.info)
            s = sub.scores(g)
            rows.append({"scores": f"{name} truncated to rank {k}" if k < rep.b.shape[0] else name, "rank": k, "rep": name,
                         **_metrics(s, gw, kinds), "lds": L(s),
                         "precompute_seconds": rep.info.get("seconds"), "bytes_full": rep.info["bytes"]})
    rng = np.random.default_rng(0)
    s = rng.standard_normal(gw.shape)
    rows.append({"scores": "random", "rank": None, **_metrics(s, gw, kinds),
                 "lds": L(s)})
    report = {**provenance.stamp(), "run": str(run.path), "preset": run.preset.name,
              "run_digest": run.digest, "queries": names, "kinds": kinds, "bpd": bpd.tolist(),
              "exact_seconds": exact_seconds, "exact_batches": exact_batches, "exact_replayed": [names[i] for i in rest],
              "exact_from": a.exact_from, "exact_reused": [names[i] for i in reused["index"]],
              "train_seconds": run.train_seconds(), "bank_queries": bank_q, "lds_queries": [names[i] for i in sel],
              "rows": rows}
    out = Path(a.out)
    atomic.save_json(report, out / "fidelity.json")
    atomic.save_text(_markdown(report), out / "fidelity.md")
    atomic.save_bytes(_plot(report), out / "fidelity.png")
    print(_markdown(report))


def _metrics(s: np.ndarray, gw: np.ndarray, kinds: list[str]) -> dict:
    from scipy.stats import spearmanr
    rho = [float(spearmanr(s[i], gw[i])[0]) for i in range(len(gw))]
    ov = [overlap(s[i], gw[i]) for i in range(len(gw))]
    return {"spearman_with_exact": rho, "top_proponents_shared": [o[0] for o in ov],
            "top_opponents_shared": [o[1] for o in ov]}


def _markdown(r: dict) -> str:
    kinds = np.array(r["kinds"])
    split = len(r.get("lds_queries", [])) > 8  # LDS on the 8 test queries, then the drawn and off-distribution ones
    kind_of = dict(zip(r["queries"], r["kinds"]))
    lds_kinds = np.array([kind_of.get(q, "test") for q in r.get("lds_queries", [])])
    shown = [k for k in ("test", "drawn", "off-distribution") if (lds_kinds == k).any()]
    lines = [f"# Precomputed representations against exact MAGIC on `{r['preset']}`", "",
             f"`{r['command']}` at commit {r['commit']}; {len(r['queries'])} queries: "
             f"{(kinds == 'test').sum()} test digits, {(kinds == 'drawn').sum()} drawn, "
             f"{(kinds == 'off-distribution').sum()} off-distribution (rotated, averaged, noise). "
             f"LDS: protocol A on the committed bank's retrains (50 drop-sets of 1%), for "
             f"{len(r.get('lds_queries', r['bank_queries']))} queries: "
             f"{', '.join(r.get('lds_queries', [f'test:{q}' for q in r['bank_queries']]))}.", "",
             "| scores | Spearman with exact: test / drawn / off-dist. (min) | top-16 proponents shared (min) | "
             "top-16 opponents shared (min) | LDS mean (min)" + (": " + " / ".join(
                 {"test": "test", "drawn": "drawn", "off-distribution": "off-dist."}[k] for k in shown) if split else "") +
             " | precompute: compute, size |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        rho = np.array(row["spearman_with_exact"])
        parts = " / ".join(f"{rho[kinds == k].mean():.3f}" for k in ("test", "drawn", "off-distribution"))
        p, o = np.array(row["top_proponents_shared"]), np.array(row["top_opponents_shared"])
        l = np.array(row["lds"])
        ld = (" / ".join(f"{l[lds_kinds == k].mean():.3f} ({l[lds_kinds == k].min():.3f})" for k in shown) if split
              else f"{l.mean():.3f} ({l.min():.3f})")
        cost = ""
        if row["scores"] == "exact MAGIC (replay)":
            replayed = r.get("exact_replayed", r["queries"])
            batches = r.get("exact_batches", 1)  # (older reports: one replay)
            cost = (f"none (the replay: {r['exact_seconds']:,.0f} s for {'these' if len(replayed) == len(r['queries']) else 'the'} "
                    f"{len(replayed)} queries " + ("at once" if batches == 1 else f"in {batches} batched replays"))
            if r.get("exact_reused"):
                cost += f"; the {len(r['exact_reused'])} test digits' from `{r['exact_from']}`"
            cost += ")"
        elif row.get("precompute_seconds") and row["scores"] == row.get("rep"):  # a truncation costs what its whole did
            # no ratio to the run's training time: that was measured when the run was trained, under
            # other load than the chunks (one report divided by a contended 773 s and said 51x where
            # benchmarks/bench_precompute.py, timing both in one process, says 603x)
            cost = f"{row['precompute_seconds']:,.0f} s (against training: bench_precompute), {row['bytes_full'] / 2**20:.1f} MiB"
        lines.append(f"| {row['scores']} | {parts} ({rho.min():.3f}) | {p.mean():.1f} ({p.min()}) | "
                     f"{o.mean():.1f} ({o.min()}) | {ld} | {cost} |")
    return "\n".join(lines) + "\n"


def _plot(r: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranked = [row for row in r["rows"] if row["rank"] is not None]
    ks = [row["rank"] for row in ranked]
    reps = list(dict.fromkeys(row.get("rep", "") for row in ranked))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    series = [("spearman_with_exact", "Spearman with exact grad_w"), ("top_proponents_shared", "top-16 proponents shared"),
              ("lds", "LDS protocol A (bank queries)")]
    for ax, (key, title) in zip(axes, series):
        for rep in reps:  # one curve per representation (its nested truncations)
            mine = [row for row in ranked if row.get("rep", "") == rep]
            line, = ax.plot([row["rank"] for row in mine], [np.mean(row[key]) for row in mine], "o-", label=f"{rep} mean")
            ax.plot([row["rank"] for row in mine], [np.min(row[key]) for row in mine], "s--", color=line.get_color(),
                    label=f"{rep} min")
        for row in r["rows"]:
            if row["rank"] is None:
                ax.axhline(np.mean(row[key]), lw=0.8, ls=":", color="gray")
                ax.text(ks[0] if ks else 1, np.mean(row[key]), row["scores"], fontsize=6, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank K")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    from engine.experiments.plots import png_bytes
    return png_bytes(fig)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
