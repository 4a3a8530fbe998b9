"""Streamlit pieces the pages share: the run gate, job progress, image galleries, charts."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Optional

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


def wait_for(job) -> Optional[dict]:
    """A finished job's result; an error line if it failed; else a live progress bar (None)."""
    if job.error:
        st.error(f"{job.label or 'computation'} failed: {job.error}")
        return None
    if job.done:
        return job.result
    _progress(job.key)
    return None


@st.fragment(run_every=1.0)
def _progress(key: str) -> None:
    job = service.jobs().peek(key)
    if job is None or job.done:  # finished, or cancelled (the page then asks again)
        st.rerun()  # the whole page, now with the result
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


def figure2_means(run: Run) -> Optional[dict]:
    """{group: mean BPD} of the committed Figure 2 report if it was made on this very run."""
    import json
    path = Path(os.environ.get("APP_RESULTS") or Path(__file__).resolve().parent.parent / "results") / "figure2" / "figure2.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if r.get("run_digest") != run.digest:
        return None
    return {g: v["mean"] for g, v in r["groups"].items()}


def bpd_words(bpd: float, means: Optional[dict] = None) -> str:
    """What a BPD means; `means` ({group: mean}) from this model's Figure 2 report, if it has one."""
    ref = "" if not means else (f": on this model test digits average {means['original']:.2f} and uniform "
                                f"noise {means['noise']:.2f} (its Figure 2 report)")
    return (f"**{bpd:.3f} bits/dim**: the model would need {bpd:.2f} bits per pixel to encode this image "
            f"(a raw 8-bit image takes 8), i.e. its likelihood is 2^-{784 * bpd:,.0f}. Lower means more "
            f"likely{ref}.")


def method_words(method: str) -> str:
    """How an attribution was computed, for the page."""
    if method == "replay":
        return "Computed by replaying training backwards for this image (exact MAGIC)."
    name = method.split(":", 1)[1]
    if name == "exact":
        return "Computed from the precomputed replay `exact` (J itself: equal to exact MAGIC up to rounding)."
    return (f"Computed from the precomputed replay `{name}` (a low-rank approximation of exact MAGIC; its "
            "measured agreement with the exact replay is in RESULTS.md, 'Precomputed replays').")


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
