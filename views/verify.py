"""Verify: remove training images, retrain, and compare the actual change with MAGIC's prediction."""

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
import torch

from engine.attribution import predict_removal, top_k
from webapp import experiments, service, widgets as W


def whose(r: dict, folder: Path, run) -> str:
    """How a committed LDS report is named on the page: this very model's, or another
    configuration's (its folder), so that a study of another configuration of the same preset is
    never read as this model's."""
    if r.get("run_digest") == run.digest:
        return f"`{r['preset']}`, this model"
    if r.get("preset") == run.preset.name:
        return f"`{r['preset']}`, another configuration (`{folder.name}`), not this model"
    return f"`{r['preset']}`"


def _is_lds(r) -> bool:
    """Whether a parsed report has what the LDS line needs (a damaged or foreign file does not)."""
    return (isinstance(r, dict) and isinstance(r.get("queries"), list) and isinstance(r.get("preset"), str)
            and all(isinstance(r.get(f), (int, float)) for f in ("drop_sets", "drop_size", "spearman_mean", "spearman_min")))


def _is_comparison(r) -> bool:
    """Whether a parsed comparison report has rows the chart can draw."""
    try:
        return bool(r["rows"]) and all(isinstance(row["method"], str) and isinstance(row["protocol"], str)
                                       and len(row["queries_list"]) == len(row["per_query"])
                                       and all(isinstance(v, (int, float)) for v in row["per_query"]) for row in r["rows"])
    except (KeyError, TypeError):
        return False


def _usable(reports: dict, ok, what: str, name) -> dict:
    """The reports that `ok` accepts; the others are named (by `name(key)`) in one warning."""
    bad = sorted(name(k) for k, r in reports.items() if not ok(r))
    if bad:
        st.warning(f"Not shown, not {what} (damaged or of another format): {', '.join(bad)}.")
    return {k: r for k, r in reports.items() if ok(r)}


def evidence(run) -> None:
    """The committed evidence: MAGIC's LDS scatter plots (this model's first) and its comparison
    with the baselines."""
    st.subheader("Linear datamodeling score (protocol A)")
    results = W.results_dir()
    # reports/magic_A.json since the method registry; lds.json in folders made before it
    found = {f.parent.parent: f for f in results.glob("lds_*/reports/magic_A.json")}
    for folder in results.glob("lds_*"):
        if folder not in found and (folder / "lds.json").is_file():
            found[folder] = folder / "lds.json"
    # a damaged or foreign file is named in one line, and the other reports are still shown
    reports = _usable({k: W.report(f) for k, f in found.items()}, _is_lds, "an LDS report",
                      lambda k: str(found[k].relative_to(results)))
    for k in sorted(reports, key=lambda k: (reports[k].get("run_digest") != run.digest, str(k))):
        f, r = found[k], reports[k]
        st.markdown(f"{whose(r, k, run)}: {len(r['queries'])} test queries, {r['drop_sets']} random drop-sets of "
                    f"{r['drop_size']} training images, each retrained: mean Spearman **{r['spearman_mean']:.3f}** "
                    f"(lowest {r['spearman_min']:.3f}).")
        png = f.with_suffix(".png")
        if png.is_file():
            st.image(str(png))
    # this model's comparison (results/comparison_<variant>.json made on its digest), else the main one
    comps = _usable({c: W.report(c) for c in sorted(results.glob("comparison*.json"))}, _is_comparison,
                    "a comparison report", lambda c: c.name)
    comp = next((c for c, r in comps.items() if r.get("run_digest") == run.digest), results / "comparison.json")
    if comp not in comps:
        st.subheader("MAGIC against the baselines")
        st.info("No comparison yet: `python -m engine compare --run runs/small --out results/lds_small` writes it.")
        return
    r = comps[comp]
    st.subheader("MAGIC against the baselines, " + ("this model" if r.get("run_digest") == run.digest
                                                    else f"`{r.get('preset', 'another')}`, not this model"))
    rows = [{"method": row["method"], "protocol": f"protocol {row['protocol']}", "query": q, "Spearman": v}
            for row in r["rows"] for q, v in zip(row["queries_list"], row["per_query"])]
    df = pd.DataFrame(rows)
    order = list(dict.fromkeys(df["method"]))
    base = alt.Chart(df).encode(x=alt.X("method:N", sort=order, title=None), xOffset="protocol:N",
                                color=alt.Color("protocol:N", title=None))
    bars = base.mark_bar(opacity=0.75).encode(y=alt.Y("mean(Spearman):Q", scale=alt.Scale(domain=[-1, 1]),
                                                        title="Spearman ρ (mean over queries)"))
    dots = base.mark_circle(size=18, color="black").encode(y="Spearman:Q", tooltip=["method", "protocol", "query", alt.Tooltip("Spearman:Q", format=".3f")])
    st.altair_chart((bars + dots).properties(height=280), width="stretch")
    st.caption("Bars: mean Spearman between predicted and actual BPD change over the test queries; dots: "
               "each query. Protocol A: 1% drop-sets, one seed; protocol B: half-size subsets, seeds averaged "
               "(the table below also scores each seed alone: MAGIC predicts its own run's seed). "
               "All methods are scored on the same retrained models.")
    md = comp.with_suffix(".md")
    if md.is_file():
        with st.expander("The table, with each seed alone, costs and published values"):
            st.markdown(md.read_text())


st.title("Verify by retraining")
run = W.require_run()
test_x, test_y = service.test_set()

choices = {}
if "query" in st.session_state:
    choices["the image from Draw & attribute"] = st.session_state["query"]
for q in service.gallery_queries():
    choices[f"test {q} (a {test_y[q]})"] = test_x[q]
name = st.selectbox("Query", list(choices), key="ver_query")
x = torch.from_numpy(np.asarray(choices[name], dtype=np.float32))
st.image(W.big(x, 112), width=112)

W.let_go("ver_key", keep=service.attribution_key(run, x))  # another query: the previous one's computation
job = service.known_attribution(run, x)
if job is None and service.precomputed(run)[0] is not None:
    # from a representation an attribution takes seconds: asked for at once, as on the Draw page
    # (another query releases it: webapp.jobs.Jobs.release)
    job = W.follow("ver_key", service.attribution_job(run, x, owner=W.session_id()))
if job is None:
    st.info("This image has no attribution yet.")
    if st.button("Compute its attribution", key="ver_attr"):
        job = W.follow("ver_key", service.attribution_job(run, x, owner=W.session_id()))
res = W.wait_for(job) if job is not None else None
if not res:
    evidence(run)
    st.stop()
gw, bpd, method = np.asarray(res["grad_w"]), float(res["bpd"]), str(res.get("method", "replay"))
# as on the Draw page: one line saying what the scores are, the whole account on request
st.caption(W.headline(method, run, res.get("seconds")))
with st.expander("How these scores were computed, and measured against retraining"):
    st.caption(W.method_words(method, run, res.get("seconds")))
if method.startswith("precomputed:") and method != "precomputed:exact":
    exact = service.jobs().peek(service.replay_key(run, x))
    if exact is not None and not exact.done and not exact.error:
        # the Draw page refines its lists as the replay goes; here the chosen images must stay put
        # while a retraining without them runs, so the preview stays until the exact scores land
        st.caption("The exact replay of this image is under way (the Draw page started it): this page keeps "
                   "the preview's scores until it lands, so that the images chosen below stay put; it shows the "
                   "exact ones when you come back after it has landed.")
c = st.columns(2)
what = c[0].radio("Remove", ["top-k proponents", "top-k opponents", "k random images"], key="ver_what")
k = int(c[1].slider("k", 1, 50, 10, key="ver_k"))
if what == "k random images":
    drop = np.random.default_rng(int(st.number_input("random seed", 0, 10**6, 0, key="ver_seed"))).choice(len(gw), k, replace=False)
else:
    drop = top_k(gw, k)["proponents" if "proponents" in what else "opponents"]
predicted = predict_removal(bpd, gw, drop)
st.markdown(f"Now **{bpd:.4f}** bits/dim; MAGIC predicts **{predicted:.4f}** after removing these {k} "
            f"(change {predicted - bpd:+.4f}).")
if st.button("Retrain without them (same seed, in the background)", key="ver_go"):
    job = experiments.retrain_job(run, x, drop, label=f"retraining without {k} images")
else:
    job = service.jobs().peek(experiments.retrain_key(run, x, drop))
if job is not None:
    out = W.wait_for(job)
    if out:
        st.success(f"Actual after retraining: **{out['bpd']:.4f}** bits/dim (change {out['bpd'] - bpd:+.4f}; "
                   f"predicted {predicted - bpd:+.4f}).")

evidence(run)
