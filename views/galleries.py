"""Galleries: precomputed attributions of a curated set of test digits, and what they share."""

import numpy as np
import pandas as pd
import streamlit as st

from engine.experiments import figure4
from engine.attribution import top_k
from webapp import service, widgets as W

st.title("Galleries")
run = W.require_run()
train_x, train_y = service.train_set(run.preset.n_train, run.preset.source)
test_x, test_y = service.test_set()
job = service.galleries_job(run)
shipped = job.done and job.result and job.result.get("shipped")
st.caption(f"MAGIC attributions of {len(service.gallery_queries())} test digits on the `{run.preset.name}` model, "
           + (f"shipped with its precomputed replay (`{shipped}`: made by the same computation, and taken because "
              "the run, the representation, the digits and the likelihood settings it was made for are these)."
              if shipped else "computed once in the background and kept."))
res = W.wait_for(job)
if not res:
    # meanwhile, the plain test digits of the query basis: their attributions are exact and came
    # with the representation, so the page is never empty while the galleries compute
    early = service.basis_digits(run)
    if early is None:
        st.stop()
    st.info(f"Meanwhile: the {len(early[1])} test digits of the precomputed replay's basis, whose exact "
            "attributions came with it. The full galleries replace them when they are computed.")
    res = {"grad_w": early[0], "bpd": None, "queries": early[1]}
elif res.get("method"):  # which computation made them: the replay, or the representation and its fidelity
    st.caption("Computed by replaying training backwards for these digits (exact MAGIC)." if res["method"] == "replay"
               else W.method_words(res["method"], run))
gw, queries = np.asarray(res["grad_w"]), [int(q) for q in res["queries"]]
bpd = None if res["bpd"] is None else np.asarray(res["bpd"])
k = st.slider("Top k", 4, 32, 16, key="gal_k")
rep = figure4.analyse(gw, queries, train_x.reshape(len(train_x), -1), train_y,
                      test_x.reshape(len(test_x), -1), test_y, k=k)

classes = sorted({int(test_y[q]) for q in queries})
cls = st.radio("Class", ["all", *classes], horizontal=True, key="gal_class",
               format_func=lambda c: "all digits" if c == "all" else f"{c}s")
shown = [j for j in range(len(queries)) if cls == "all" or test_y[queries[j]] == cls]
if cls != "all":  # the class's mean influence: which training images its digits owe most to
    m = gw[shown].mean(0)
    tm = top_k(m, k)
    st.markdown(f"**Mean influence over the {len(shown)} test {cls}s**: strongest proponents, then opponents")
    W.gallery(tm["proponents"], m, train_x, train_y)
    W.gallery(tm["opponents"], m, train_x, train_y)
pick = st.selectbox("Query", shown, key="gal_query",
                    format_func=lambda j: f"test {queries[j]} (a {test_y[queries[j]]})"
                    + ("" if bpd is None else f": {bpd[j]:.3f} bits/dim"))
c1, c2 = st.columns([1, 3])
c1.image(W.big(test_x[queries[pick]]), caption=f"test {queries[pick]}", width=168)
tk = top_k(gw[pick], k)
with c2:
    st.altair_chart(W.class_histogram(tk, train_y), width="stretch")
st.markdown("**Proponents** (make it more likely)")
W.gallery(tk["proponents"], gw[pick], train_x, train_y)
st.markdown("**Opponents** (make it less likely)")
W.gallery(tk["opponents"], gw[pick], train_x, train_y)

st.subheader("Training images that recur across queries")
f = rep["findings"]
for kind in ("proponents", "opponents"):
    r = f["recurrence"][kind]
    st.markdown(f"{kind.capitalize()}: {r['distinct']} distinct images fill {r['slots']} slots "
                f"(random draws would give about {r['expected_distinct_if_random']:.0f}).")
    rec = r["most_recurrent"]
    if rec:
        cols = st.columns(min(8, len(rec)))
        for col, e in zip(cols, rec):
            col.image(W.big(train_x[e["index"]], 84), caption=f"#{e['index']} · digit {e['label']} · in {e['queries']} queries",
                      width=84)

st.subheader("Per class")
st.caption("Mean MAGIC score of each class's training images, per query (positive: the class opposes the query).")
table = pd.DataFrame([r["class_mean_score"] for r in rep["queries"]], columns=[f"digit {d}" for d in range(10)],
                     index=[f"test {q} (a {test_y[q]})" for q in queries])
st.dataframe(table.style.format("{:+.2e}").background_gradient(cmap="RdYlGn_r", axis=1), width="stretch")
