"""Which training images does a diffusion model owe an image to? `streamlit run app.py`.

The router: every page lives in pages/; what they compute lives in webapp/ and engine/.
"""

import os

import streamlit as st

from webapp import service

st.set_page_config(page_title="Which training images?", page_icon="🔢", layout="wide")
page = st.navigation([
    st.Page("pages/draw.py", title="Draw & attribute", default=True),
    st.Page("pages/likelihoods.py", title="Compare likelihoods"),
    st.Page("pages/galleries.py", title="Galleries"),
    st.Page("pages/verify.py", title="Verify"),
])
service.warm_workers()
run = service.load_run()
if run is not None and os.environ.get("APP_PRECOMPUTE", "1") != "0" and not st.session_state.get("_galleries_started"):
    service.galleries_job(run)  # precomputed in the background from the first visit on
    st.session_state["_galleries_started"] = True
st.sidebar.caption(f"Model: `{service.run_dir()}`" + (f" ({run.preset.name}, {run.preset.n_train} training images)"
                                                        if run else " (training...)"))
page.run()
