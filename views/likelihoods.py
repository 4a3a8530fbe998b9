"""Compare likelihoods: digits against rotated digits, averages of digits and uniform noise."""

import altair as alt
import pandas as pd
import streamlit as st
import torch

from engine.experiments.figure2 import WRITEUP_VALUES
from webapp import experiments, service, widgets as W

NAMES = {"original": "MNIST test digits", "rotated": "rotated", "averaged": "averages of digits", "noise": "uniform noise"}

st.title("Compare likelihoods")
run = W.require_run()

# the committed report made on this very run (a report of another model would mislead)
r = W.run_report(run, "figure2/figure2.json")
if r is not None:
    df = pd.DataFrame([{"group": NAMES[g], "bits/dim": v} for g in r["groups"] for v in r["bpd"][g]])
    writeup = pd.DataFrame([{"group": NAMES[g], "bits/dim": v} for g, v in WRITEUP_VALUES.items()])
    order = [NAMES[g] for g in WRITEUP_VALUES]
    dots = alt.Chart(df).mark_tick(opacity=0.6, thickness=2, size=30).encode(
        x=alt.X("bits/dim:Q", scale=alt.Scale(zero=False)), y=alt.Y("group:N", sort=order, title=None),
        color=alt.Color("group:N", sort=order, legend=None), tooltip=["group", alt.Tooltip("bits/dim:Q", format=".3f")])
    marks = alt.Chart(writeup).mark_point(shape="diamond", size=140, color="black", filled=True).encode(
        x="bits/dim:Q", y=alt.Y("group:N", sort=order), tooltip=["group", "bits/dim"])
    st.altair_chart((dots + marks).properties(height=230), width="stretch")
    st.caption(f"{r['n_per_group']} images per group on the `{r['preset']}` model (rotation {r['angle']:.0f} deg, "
               f"averages of {r['k_avg']}); black diamonds: the values the seed write-up reports. "
               "Lower bits/dim = more likely.")
else:
    st.info(f"No Figure 2 report for this model (`{run.preset.name}`, config {run.digest[:12]}) yet: "
            "`make report` writes results/figure2/ for it.")

st.subheader("One digit, four ways")
c = st.columns(3)
i = int(c[0].number_input("Test image index", 0, 9999, 0, key="cmp_index"))
angle = float(c[1].slider("Rotation (degrees)", 0, 180, 90, key="cmp_angle"))
k_avg = int(c[2].slider("Digits in the average", 2, 8, 4, key="cmp_k"))
x = torch.from_numpy(service.test_set()[0][i])
cols = st.columns(4)
for col, (name, img) in zip(cols, experiments.variants(x, angle, k_avg, seed=i).items()):
    with col:
        st.image(W.big(img), caption=NAMES[name], width=168)
        res = W.wait_for(service.bpd_job(run, img))
        if res:
            st.metric("bits/dim", f"{res['bpd']:.3f}")
