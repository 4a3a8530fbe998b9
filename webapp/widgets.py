"""Streamlit pieces the pages share: the run gate, job progress, image galleries, charts."""

from __future__ import annotations

import functools
import html
import os
from pathlib import Path
from typing import Callable, Optional

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from engine.store import Run
from webapp import service


def require_run() -> Run:
    """The app's finished run; otherwise show training progress and stop the page here."""
    run = service.load_run()
    if run is not None:
        return run
    job = service.train_job()
    st.info(f"First start: training the `{service.preset_name()}` model into `{service.run_dir()}` "
            "(about a minute on 2 cores; it is kept for later starts).")
    wait_for(job)
    st.stop()


def session_id() -> str:
    """This visitor's session, as the owner of the jobs its pages ask for (webapp.jobs.Jobs.release)."""
    if "_session_id" not in st.session_state:
        import uuid
        st.session_state["_session_id"] = uuid.uuid4().hex
    return st.session_state["_session_id"]


def follow(slot: str, job):
    """Record `job` as what this session's `slot` (a place on a page that shows one image's
    computation) waits for now, releasing the job it waited for before when that was another:
    a visitor who moves on to another image no longer waits for the previous one's computation,
    which stops unless another session waits for it too. Returns `job`."""
    let_go(slot, keep=job.key)
    st.session_state[slot] = job.key
    return job


def let_go(slot: str, keep: Optional[str] = None) -> None:
    """Release the job this session's `slot` waited for unless it is `keep` (the key of what the
    slot shows now): for a page whose visitor moved on to another image without asking for its
    computation yet."""
    old = st.session_state.get(slot)
    if old and old != keep:
        service.jobs().release(st.session_state.pop(slot), session_id())


def wait_for(job) -> Optional[dict]:
    """A finished job's result; an error line if it failed; else a live progress bar (None),
    refreshed every second for a job a page waits on (seconds long: the page shows its result
    within a second of the end) and every 5 s for the minutes-long ones of the other lanes (each
    refresh is a rerun in the server and a redraw in the browser, which take CPU from the job)."""
    if job.error:
        st.error(f"{job.label or 'computation'} failed: {job.error}")
        return None
    if job.done:
        return job.result
    (_progress if job.lane == "interactive" else _progress_slow)(job.key)
    return None


@st.fragment(run_every=1.0)
def _progress(key: str) -> None:
    _show_progress(key)


@st.fragment(run_every=5.0)
def _progress_slow(key: str) -> None:
    _show_progress(key)


def _show_progress(key: str) -> None:
    job = service.jobs().peek(key)
    if job is None or job.done:  # finished, or cancelled (the page then asks again)
        st.rerun()  # the whole page, now with the result
    if job.partial is not None and st.session_state.get("partial_shown") != (key, job.partial["i"]):
        st.rerun()  # a replay's newer partial sum: the Draw page refines its lists with it
    frac = job.fraction
    text = f"{job.label}: {job.stage}" + (f" {job.i}/{job.n}" if job.n else "")
    st.progress(frac if frac is not None else 0.0, text=html.escape(text))


def canvas(key: str) -> Optional[np.ndarray]:
    """The drawing canvas's RGBA pixels (H, W, 4), or None. Tests put an array in
    st.session_state["test_canvas"] instead of drawing."""
    if "test_canvas" in st.session_state:
        return st.session_state["test_canvas"]
    from streamlit_drawable_canvas import st_canvas
    res = st_canvas(stroke_width=20, stroke_color="#FFFFFF", background_color="#000000", height=280, width=280,
                    drawing_mode="freedraw", key=key, update_streamlit=True, return_image_data=True)
    return None if res is None else res.image_data


def to_image(x) -> np.ndarray:
    """(1, 28, 28) or (28, 28) in [0, 1] -> (28, 28) uint8 for st.image."""
    a = np.asarray(x, dtype=np.float64).reshape(28, 28)
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def big(x, size: int = 168) -> np.ndarray:
    """Nearest-neighbour upscaling, so 28x28 pixels stay crisp."""
    r = size // 28
    return np.kron(to_image(x), np.ones((r, r), np.uint8))


def results_dir() -> Path:
    """Where the committed reports are: results/ beside the app, or APP_RESULTS (tests), read at each
    call so that a page never keeps the folder of an earlier import."""
    return Path(os.environ.get("APP_RESULTS") or Path(__file__).resolve().parent.parent / "results")


def report(relpath: str | Path) -> Optional[dict]:
    """A committed JSON report under results/ (APP_RESULTS elsewhere), or None when it is missing,
    damaged or not a JSON object (an absolute path is taken as is)."""
    import json
    try:
        r = json.loads((results_dir() / relpath).read_text())
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) else None


def run_report(run: Run, relpath: str, where: Callable[[dict], bool] = lambda r: True) -> Optional[dict]:
    """A committed JSON report under results/ (APP_RESULTS elsewhere), if it was made on this very run
    (and `where` accepts it).

    "figure2/figure2.json" is looked for there first, then in the report folders named after it
    (results/figure2_<variant>/figure2.json), which hold the reports of other configurations:
    whichever was made on this run's digest.
    """
    r = report(relpath)
    if r is not None and r.get("run_digest") == run.digest and where(r):
        return r
    head, _, rest = relpath.partition("/")
    for path in sorted(results_dir().glob(f"{head}_*/{rest}")) if rest else []:
        r = report(path)
        if r is not None and r.get("run_digest") == run.digest and where(r):
            return r
    return None


def figure2_report(run: Run, images: str = "test") -> Optional[dict]:
    """The committed Figure 2 report made on this very run, on test digits or on its training
    digits (reports made before the choice existed are on test digits)."""
    return run_report(run, "figure2/figure2.json", where=lambda r: r.get("images", "test") == images)


def figure2_means(run: Run) -> Optional[dict]:
    """{group: mean BPD} of the committed Figure 2 report on test digits, if made on this very run."""
    r = figure2_report(run)
    return None if r is None else {g: v["mean"] for g, v in r["groups"].items()}


def sample_quality_words(run: Run, sampler: str = "ode") -> Optional[str]:
    """How digit-like this very run's samples are, in words, from the committed sample-quality
    reports (results/sample_quality*/sample_quality.json, experiments/sample_quality.py) made on
    its digest with `sampler` (the app's "Generate" draws with the probability-flow ODE, as the
    reports' "ode"); None when there is none, or only damaged ones."""
    paths = [results_dir() / "sample_quality/sample_quality.json",
             *sorted(results_dir().glob("sample_quality_*/sample_quality.json"))]
    for path in paths:
        r = report(path)
        try:
            rows = [row for row in r["runs"] if row["run_digest"] == run.digest and row["sampler"] == sampler]
            if not rows:
                continue
            row, n, ceiling = rows[0], int(r["n"]), r["test_digits"]
            words = (f"How digit-like are this model's samples? Of {n} drawn this way, a digit classifier read "
                     f"{int(row['confident'])} as digits with confidence >= 0.9 (of real test digits "
                     f"{float(ceiling['share']):.0%})")
            if "strict" in row:
                words += (f"; a stricter one, trained also on images that are no digit, "
                          f"{int(row['strict']['confident'])} ({float(ceiling['strict_share']):.0%})")
            return words + f": results/{path.parent.name}/sample_quality.md."
        except (TypeError, KeyError, ValueError):
            continue  # a damaged or older report says nothing rather than something wrong
    return None


def bpd_words(bpd: float, means: Optional[dict] = None) -> str:
    """What a BPD means; `means` ({group: mean}) from this model's Figure 2 report, if it has one."""
    ref = "" if not means else (f": on this model test digits average {means['original']:.2f} and uniform "
                                f"noise {means['noise']:.2f} (its Figure 2 report)")
    return (f"**{bpd:.3f} bits/dim**: the model would need {bpd:.2f} bits per pixel to encode this image "
            f"(a raw 8-bit image takes 8), i.e. its likelihood is 2^-{784 * bpd:,.0f}. Lower means more "
            f"likely{ref}.")


def _fidelity(run: Run, name: str) -> tuple[Optional[dict], Optional[str]]:
    """(the row of results/precompute/fidelity.json for representation `name`, and the preset it
    was measured on when that is not this very run's config, else None)."""
    r, other = run_report(run, "precompute/fidelity.json"), None
    if r is None:  # the study on another preset (it says which) is still the best evidence there is
        r = report("precompute/fidelity.json")
        if r is None:
            return None, None
        other = str(r.get("preset", "another"))
    row = next((row for row in r.get("rows", []) if row.get("scores") == name), None)
    return (None, None) if row is None else ({**row, "lds_by_kind": _lds_by_kind(r, row)}, other)


def _lds_by_kind(r: dict, row: dict) -> dict[str, list[float]]:
    """A fidelity row's LDS values by kind of query ("test", "drawn", "off-distribution"), from the
    report's LDS queries (names as in its "queries", kinds in its "kinds"); all "test" in a report
    made before the study could measure the LDS on other images."""
    lds = [float(v) for v in row.get("lds", [])]
    names = r.get("lds_queries")
    kind = dict(zip(r.get("queries", []), r.get("kinds", [])))
    if not names or len(names) != len(lds) or any(n not in kind for n in names):
        return {"test": lds}
    out: dict[str, list[float]] = {}
    for n, v in zip(names, lds):
        out.setdefault(kind[n], []).append(v)
    return out


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, kept per (path, size, mtime): the page asks on every rerun."""
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _against_retraining(run: Run, name: str) -> Optional[tuple[dict, Optional[dict]]]:
    """(the committed LDS report of MAGIC through representation `name` on this very run, and exact
    MAGIC's on the same retrains, if there is one), from results/lds_*/reports/; else None.

    Only a report whose scores came from this very file counts (the bank's
    scores/magic_precomputed.npz records the representation's name and SHA-256): another
    representation of the same run says nothing about this one.
    """
    from engine.precompute import representation
    path = representation.folder(run) / f"{name}.npz"
    try:
        st_ = path.stat()
        sha = _sha256(str(path), st_.st_size, st_.st_mtime_ns)
    except OSError:
        return None
    for rep in sorted(results_dir().glob("lds_*/reports/magic_precomputed_A.json")):
        r = report(rep)
        if r is None or r.get("run_digest") != run.digest:
            continue
        try:
            with np.load(rep.parent.parent / "scores" / "magic_precomputed.npz", allow_pickle=False) as z:
                made_from = (str(z["representation"]), str(z["representation_sha256"]))
        except (OSError, KeyError, ValueError):
            continue
        if made_from == (name, sha):
            exact = report(rep.parent / "magic_A.json")
            return r, (exact if exact is not None and exact.get("run_digest") == run.digest else None)
    return None


def _lds_words(by_kind: dict[str, list[float]]) -> str:
    """"LDS 0.64 on 8 test digits, 0.51 on 4 drawn digits, ...": each kind of query its own mean
    (a visitor's drawing is not a test digit, and the preview's agreement differs between them)."""
    what = {"test": "test digits", "drawn": "drawn digits", "off-distribution": "rotated, averaged or noise images"}
    parts = [f"{np.mean(v):.2f} on {len(v)} {what.get(k, k)}" for k, v in by_kind.items() if v]
    return "LDS " + ", ".join(parts) if parts else "LDS not measured"


def method_words(method: str, run: Optional[Run] = None, seconds: Optional[float] = None) -> str:
    """How an attribution was computed, for the page, with the representation's measured fidelity
    and, when known, how long the computation itself took."""
    took = "" if seconds is None else f" Computing it took {seconds:.1f} s."
    if method == "replay":
        return "Computed by replaying training backwards for this image (exact MAGIC)." + took
    name = method.split(":", 1)[1]
    if name == "exact":
        return "Computed from the precomputed replay `exact` (J itself: equal to exact MAGIC up to rounding)." + took
    row, other = _fidelity(run, name) if run is not None else (None, None)
    where = "images of this model" if other is None else f"images of the `{other}` model, with the same method"
    measured = ("its measured agreement with the exact replay is in RESULTS.md, 'Precomputed replays'" if row is None else
                f"measured on {len(row['spearman_with_exact'])} {where}: Spearman "
                f"{np.mean(row['spearman_with_exact']):.2f} with exact MAGIC, "
                f"{np.mean(row['top_proponents_shared']):.1f} of the top-16 proponents shared; against "
                f"retraining, " + _lds_words(row["lds_by_kind"]))
    lds = _against_retraining(run, name) if run is not None and (row is None or other is not None) else None
    if lds is not None:  # no study on this model: its own test against retraining comes first
        r, exact = lds
        vs = "" if exact is None else f", where exact MAGIC gets {exact['spearman_mean']:.2f}"
        measured = (f"on this model against retraining, LDS {r['spearman_mean']:.2f} (lowest "
                    f"{r['spearman_min']:.2f}) over {len(r['queries'])} test digits and {r['drop_sets']} "
                    f"retrainings without {r['frac']:.0%} of the data{vs}; " + measured)
    what = ("exact MAGIC of the query's part in a basis of replayed images" if name.startswith("basis")
            else "a low-rank approximation of exact MAGIC")
    verified = service.precomputed_verified(run) if run is not None else None
    other_cpu = "" if verified is None or verified.startswith("the run's") else f" The file was {verified}."
    return f"Computed from the precomputed replay `{name}` ({what}; {measured})." + other_cpu + took


def headline(method: str, run: Optional[Run] = None, seconds: Optional[float] = None) -> str:
    """One short line above the lists: what they are (exact MAGIC, or a preview from a
    representation with its LDS against retraining on test and drawn digits, and on how many: a
    handful of drawn digits is said as such) and how long the computation took. The whole account
    (`method_words` and the rest) goes in an expander below it."""
    took = "" if seconds is None else f", computed in {seconds:.1f} s"
    if method == "replay":
        return f"**Exact MAGIC**: this image's own replay of training{took}."
    name = method.split(":", 1)[1]
    # the time before the file's name: a comma right after a code span reads as " ," (the page pads code)
    if name == "exact":
        return f"**Exact MAGIC**{took} from the precomputed replay `{name}`."
    row, other = _fidelity(run, name) if run is not None else (None, None)
    what = {"test": "test digits", "drawn": "drawn digits"}
    parts = [] if row is None or other is not None else [
        f"{np.mean(v):.2f} on {len(v)} {what[k]}" for k, v in row["lds_by_kind"].items() if k in what and v]
    lds = f" (against retraining: LDS {', '.join(parts)})" if parts else ""
    return f"**A preview**{took} from the precomputed replay `{name}`{lds}."


def changed_in_top(preview: np.ndarray, exact: np.ndarray, k: int = 16) -> dict[str, int]:
    """How many of the preview's top-k proponents and opponents (n,) the exact scores (n,) replace."""
    from engine.attribution import top_k
    a, b = top_k(preview, k), top_k(exact, k)
    return {s: k - len(set(a[s]) & set(b[s])) for s in ("proponents", "opponents")}


def replaced_words(preview: np.ndarray, exact: np.ndarray, method: str, run: Optional[Run] = None,
                   seconds: Optional[float] = None, k: int = 16) -> str:
    """What the exact replay replaced: the preview's representation (`method`, "precomputed:<name>"),
    its time, how its file was checked when not by the run's checksum, and how many of its top-k
    the replay changed."""
    changed = changed_in_top(preview, exact, k)
    about = [] if seconds is None else [f"computed in {seconds:.1f} s"]
    verified = service.precomputed_verified(run) if run is not None else None
    if verified is not None and not verified.startswith("the run's"):
        about.append(f"its file {verified}")
    about = f" ({'; '.join(about)})" if about else ""
    return (f"It has replaced the preview from the precomputed replay `{method.split(':', 1)[1]}`{about}: "
            f"it changed {changed['proponents']} of the top-{k} proponents and {changed['opponents']} of the "
            f"top-{k} opponents.")


def _partial_studies(run: Run) -> list[dict]:
    """The committed studies of a partly finished replay (experiments/partial_replay.py,
    results/partial_replay*/partial_replay.json) made on this very run: test digits first."""
    found = [report(f) for f in sorted(results_dir().glob("partial_replay*/partial_replay.json"))]
    found = [r for r in found if isinstance(r, dict) and r.get("run_digest") == run.digest and r.get("rows")]
    return sorted(found, key=lambda r: not all(str(n).startswith("test:") for n in r.get("query_names", ["test:"])))


def _measured_at(r: dict, done: int) -> Optional[str]:
    """"0.69 on 4 test digits at 25% of the steps (the preview alone 0.60, exact 0.98)": the LDS of
    the progressive lists at the last point the study measured that the replay has reached."""
    try:
        steps = int(r["steps"])
        prog = [row for row in r["rows"] if row["scores"] == "progressive" and int(row["steps"]) <= done]
        preview = next(row for row in r["rows"] if str(row["scores"]).startswith("preview"))
        final = next(row for row in r["rows"] if row["scores"] == "partial sum" and int(row["steps"]) == steps)
        names = r.get("query_names") or [f"test:{q}" for q in r["queries"]]
        kind = "test digits" if all(str(n).startswith("test:") for n in names) else "drawn digits"
        if not prog:  # not yet at the first point measured: what the lists are closest to is the preview
            first = min(int(row["steps"]) for row in r["rows"] if row["scores"] == "progressive")
            return (f"{np.mean(preview['lds']):.2f} on {len(names)} {kind} for the preview alone, before the first "
                    f"point measured ({first / steps:.0%} of the steps; exact {np.mean(final['lds']):.2f})")
        at = max(prog, key=lambda row: int(row["steps"]))
        return (f"{np.mean(at['lds']):.2f} on {len(names)} {kind} at {int(at['steps']) / steps:.0%} of the steps "
                f"(the preview alone {np.mean(preview['lds']):.2f}, exact {np.mean(final['lds']):.2f})")
    except (KeyError, TypeError, ValueError, StopIteration):
        return None  # a damaged or older report: not cited


def refined_words(done: int, steps: int, run: Optional[Run] = None) -> str:
    """What the lists are while the exact replay is under way (engine.attribution.progressive),
    with what the committed studies of this very run measured of such lists at this point."""
    measured = [m for m in (_measured_at(r, done) for r in (_partial_studies(run) if run is not None else [])) if m]
    how = ("Measured on this model against retraining, LDS " + "; ".join(measured) + ". " if measured else
           "Not measured on this model against retraining (experiments/partial_replay.py). ")
    return (f"Refined as the exact replay goes: it has gone back through the last {done:,} of {steps:,} training "
            f"steps ({done / steps:.0%}), whose exact contributions these lists add to the preview's share of the "
            f"steps still to go (by learning rate). " + how + "The exact replay replaces them when it lands.")


def influences(gw: np.ndarray, k: int, train_x: np.ndarray, train_y: np.ndarray) -> None:
    """Top-k proponents and opponents of one image, with the class histogram."""
    from engine.attribution import top_k
    tk = top_k(gw, k)
    st.markdown(f"**Top {k} proponents** (removing them is predicted to raise the bits/dim by "
                f"{-gw[tk['proponents']].sum():.4f})")
    gallery(tk["proponents"], gw, train_x, train_y)
    st.markdown(f"**Top {k} opponents** (removing them is predicted to lower the bits/dim by "
                f"{gw[tk['opponents']].sum():.4f})")
    gallery(tk["opponents"], gw, train_x, train_y)
    st.altair_chart(class_histogram(tk, train_y), width="stretch")


def particular(gw: np.ndarray, k: int, mean: Optional[tuple[np.ndarray, int]], train_x: np.ndarray,
               train_y: np.ndarray) -> None:
    """The influences particular to this image: its scores minus the mean over the gallery's test
    digits (the same training images top most images' lists)."""
    from engine.attribution import top_k
    st.markdown("**Particular to this image**")
    if mean is None:
        st.caption("Its influences minus the typical ones appear here once the galleries' test digits are computed.")
        return
    m, count = mean
    d = gw - m
    tk = top_k(d, k)
    st.caption(f"Scores minus their mean over {count} test digits: the training images that help or hurt this "
               "image more than they do a typical digit.")
    # each list under its own heading: at k > 8 a list takes more than one row of images
    st.markdown(f"**{k} that help it more** than a typical digit")
    gallery(tk["proponents"], d, train_x, train_y)
    st.markdown(f"**{k} that hurt it more** than a typical digit")
    gallery(tk["opponents"], d, train_x, train_y)


def gallery(indices: np.ndarray, scores: np.ndarray, train_x: np.ndarray, train_y: np.ndarray, per_row: int = 8) -> None:
    """Training images with their index, label and MAGIC score."""
    for start in range(0, len(indices), per_row):
        cols = st.columns(per_row)
        for col, j in zip(cols, indices[start: start + per_row]):
            col.image(big(train_x[j], 84), caption=f"#{j} · digit {train_y[j]} · {scores[j]:+.2e}", width=84)


def class_histogram(kinds: dict[str, np.ndarray], train_y: np.ndarray) -> alt.Chart:
    """Class counts of each gallery (e.g. proponents, opponents), side by side."""
    rows = [{"gallery": name, "digit": str(d), "count": int((train_y[idx] == d).sum())}
            for name, idx in kinds.items() for d in range(10)]
    return alt.Chart(pd.DataFrame(rows)).mark_bar().encode(
        x=alt.X("digit:N", title="digit"), y=alt.Y("count:Q"), color=alt.Color("gallery:N", scale=alt.Scale(
            domain=["proponents", "opponents"], range=["#2e8b57", "#c0392b"])),
        xOffset="gallery:N", tooltip=["gallery", "digit", "count"]).properties(height=220)
