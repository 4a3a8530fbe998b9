"""Which training images does a diffusion model owe an image to? `streamlit run app.py`.

The router: every page lives in views/; what they compute lives in webapp/ and engine/. (Not in
pages/: Streamlit runs a file in a folder so named on its own when a link or a reload goes
straight to it, without this router: no sidebar titles, no shipped representation, no workers.)
"""

import os

import streamlit as st

from webapp import replays, service

st.set_page_config(page_title="Which training images?", page_icon="🔢", layout="wide")
page = st.navigation([
    st.Page("views/draw.py", title="Draw & attribute", default=True),
    st.Page("views/likelihoods.py", title="Compare likelihoods"),
    st.Page("views/galleries.py", title="Galleries"),
    st.Page("views/verify.py", title="Verify"),
])
problem = service.settings_problem()
if problem:  # a mistyped environment variable: one line, before anything starts on the wrong setting
    st.error(f"The app cannot start: {problem}. Fix it in the environment and restart.")
    st.stop()
service.warm_workers()
retired = service.retire_outdated()  # an older version's default model: set aside, trained anew
if retired:
    st.sidebar.info(retired)
run = service.load_run()
if run is not None:
    service.install_shipped(run)  # the default model's representation ships with the repository
if run is not None and os.environ.get("APP_PRECOMPUTE", "1") != "0" and not st.session_state.get("_galleries_started"):
    # in the background from the first visit on, one after the other: the precomputed replay
    # (when the run has none), then the galleries (from it)
    with st.spinner("Checking the precomputed replay against this model's weights..."):
        service.precomputed(run)  # instant, except once on another kind of CPU than the file's (about 20 s)
    replays.job(run)
    service.galleries_job(run)
    st.session_state["_galleries_started"] = True
st.sidebar.caption(f"Model: `{service.run_dir()}`" + (f" ({run.preset.name}, {run.preset.n_train} training images)"
                                                        if run else " (training...)"))
if run is not None:
    rj = service.jobs().peek(replays.job_key(run)) if replays.rank() > 0 else None
    if rj is not None and not rj.done:
        left = replays.time_left(rj)
        st.sidebar.caption(f"Precomputed replay: {rj.i}/{rj.n or '?'} chunks" + (f", {left}" if left else "")
                           + "; until then influences come from a replay of training.")
page.run()
