"""Compare likelihoods: digits against rotated digits, averages of digits and uniform noise."""

import altair as alt
import pandas as pd
import streamlit as st
import torch

from engine.experiments.figure2 import WRITEUP_VALUES
from webapp import experiments, service, widgets as W

NAMES = {"original": "MNIST test digits", "rotated": "rotated", "averaged": "averages of digits", "noise": "uniform noise"}


def show_report(r: dict, names: dict) -> None:
    """The per-image BPDs of a Figure 2 report, with the seed write-up's means as diamonds."""
    df = pd.DataFrame([{"group": names[g], "bits/dim": v} for g in r["groups"] for v in r["bpd"][g]])
    writeup = pd.DataFrame([{"group": names[g], "bits/dim": v} for g, v in WRITEUP_VALUES.items()])
    order = [names[g] for g in WRITEUP_VALUES]
    # Streamlit's theme cuts axis labels at 100 px ("MNIST training di…")
    y = alt.Y("group:N", sort=order, title=None, axis=alt.Axis(labelLimit=220))
    dots = alt.Chart(df).mark_tick(opacity=0.6, thickness=2, size=30).encode(
        x=alt.X("bits/dim:Q", scale=alt.Scale(zero=False)), y=y,
        color=alt.Color("group:N", sort=order, legend=None), tooltip=["group", alt.Tooltip("bits/dim:Q", format=".3f")])
    marks = alt.Chart(writeup).mark_point(shape="diamond", size=140, color="black", filled=True).encode(
        x="bits/dim:Q", y=alt.Y("group:N", sort=order), tooltip=["group", "bits/dim"])
    st.altair_chart((dots + marks).properties(height=230), width="stretch")
    gap = r.get("rotation_gap")
    gap_words = "" if gap is None else f" Rotation gap (rotated minus original, per digit): {gap['mean']:+.3f} ± {gap['stderr']:.3f}."
    st.caption(f"{r['n_per_group']} images per group on the `{r['preset']}` model (rotation {r['angle']:.0f} deg, "
               f"averages of {r['k_avg']}); black diamonds: the values the seed write-up reports. "
               f"Lower bits/dim = more likely.{gap_words}")


st.title("Compare likelihoods")
run = W.require_run()

# the committed reports made on this very run (a report of another model would mislead)
r = W.figure2_report(run)
if r is not None:
    show_report(r, NAMES)
else:
    st.info(f"No Figure 2 report for this model (`{run.preset.name}`, config {run.digest[:12]}) yet: "
            "`make report` writes results/figure2/ for it.")
seen = W.figure2_report(run, images="train")
if seen is not None:
    st.markdown("**The same on digits the model trained on**, as the seed write-up measured its Figure 2 "
                "(held-out test digits, above, ask more of the model):")
    show_report(seen, {**NAMES, "original": "MNIST training digits"})

st.subheader("One digit, four ways")
c = st.columns(3)
i = int(c[0].number_input("Test image index", 0, 9999, 0, key="cmp_index"))
angle = float(c[1].slider("Rotation (degrees)", 0, 180, 90, key="cmp_angle"))
k_avg = int(c[2].slider("Digits in the average", 2, 8, 4, key="cmp_k"))
x = torch.from_numpy(service.test_set()[0][i])
cols = st.columns(4)
captions = {"original": f"test digit {i}", "rotated": f"rotated {angle:.0f} deg",
            "averaged": f"average of {k_avg} test digits", "noise": "uniform noise"}
for col, (name, img) in zip(cols, experiments.variants(x, angle, k_avg, seed=i).items()):
    with col:
        st.image(W.big(img), caption=captions[name], width=168)
        # another index, angle or k releases this column's previous BPD (clicking through digits
        # waits for the last one's, not for every one passed on the way)
        res = W.wait_for(W.follow(f"cmp_{name}", service.bpd_job(run, img, owner=W.session_id())))
        if res:
            st.metric("bits/dim", f"{res['bpd']:.3f}")
