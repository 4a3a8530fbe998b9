"""Every page of the app through Streamlit's AppTest, on a `tiny` model.

The canvas is a custom component that AppTest cannot draw on: the page reads
st.session_state["test_canvas"] instead (see webapp.widgets.canvas). Numbers the pages show
are checked against the engine called directly.
"""

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import data, images
from engine.likelihood import bits_per_dim
from test_data import _huge_png_header  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402


def _new():
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)


def _until(at, cond, timeout=300.0):
    """Rerun the script (the pages poll background jobs) until cond(at) holds."""
    end = time.time() + timeout
    while True:
        at.run()
        assert not at.exception, at.exception
        if cond(at):
            return at
        if time.time() > end:
            raise AssertionError(f"timed out; markdown: {[m.value for m in at.markdown]}; errors: {[e.value for e in at.error]}")
        time.sleep(0.5)


def _bpd_shown(at):
    for m in at.markdown:
        hit = re.match(r"\*\*([0-9.]+) bits/dim\*\*", m.value)
        if hit:
            return float(hit.group(1))
    return None


def _engine_bpd(run, x):
    with torch.no_grad():
        return float(bits_per_dim(run.model(), x[None], **run.preset.likelihood_kwargs)[0])


def _stroke_canvas(dx: int = 0):
    """A 280x280 RGBA canvas like the component returns: black background, a white '7' (its foot
    moved by dx pixels: another drawing, which no other test has attributed)."""
    img = Image.new("RGBA", (280, 280), (0, 0, 0, 255))
    from PIL import ImageDraw
    d = ImageDraw.Draw(img)
    d.line([(70, 60), (210, 60), (120 + dx, 230)], fill=(255, 255, 255, 255), width=20)
    return np.asarray(img).copy()


def test_draw_page_bpd_and_attribution_of_a_drawing(app_run):
    at = _new()
    at.run()
    assert not at.exception
    # a drawing of its own: the memo is shared by the session's tests, and one that already holds
    # this drawing's exact replay shows it without the button
    at.session_state["test_canvas"] = _stroke_canvas(dx=-30)
    at = _until(at, lambda a: _bpd_shown(a) is not None)
    from webapp import service
    x = service.from_canvas(_stroke_canvas(dx=-30))
    assert _bpd_shown(at) == pytest.approx(_engine_bpd(app_run, x), abs=1e-3)
    at.button(key="attribute").click()
    at = _until(at, lambda a: any(m.value.startswith("**Top 16 proponents**") for m in a.markdown))
    text = " ".join(m.value for m in at.markdown)
    raise_by = float(re.search(r"raise the bits/dim by (-?[0-9.]+)", text).group(1))
    lower_by = float(re.search(r"lower the bits/dim by (-?[0-9.]+)", text).group(1))
    assert raise_by > 0 and lower_by > 0  # the sign convention: proponents negative, opponents positive
    assert len(at.get("vega_lite_chart")) == 1  # the class histogram


def test_upload_a_png_then_garbage(app_run):
    at = _new()
    at.run()
    at.radio(key="source").set_value("Upload").run()
    x = data.load_test()[0][3]
    buf = io.BytesIO()
    Image.fromarray((x[0].numpy() * 255).astype(np.uint8)).save(buf, format="PNG")
    at.file_uploader(key="upload").upload("three.png", buf.getvalue(), "image/png")
    at = _until(at, lambda a: _bpd_shown(a) is not None)
    assert _bpd_shown(at) == pytest.approx(_engine_bpd(app_run, images.preprocess_image(buf.getvalue())), abs=1e-3)
    at.file_uploader(key="upload").upload("garbage.png", b"\x00not an image at all", "image/png")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "\n" not in at.error[0].value and "garbage.png" in at.error[0].value
    at.radio(key="source").set_value("MNIST test image").run()  # still usable
    at.number_input(key="test_index").set_value(7)
    at = _until(at, lambda a: _bpd_shown(a) is not None)
    assert _bpd_shown(at) == pytest.approx(_engine_bpd(app_run, data.load_test()[0][7]), abs=1e-3)
    assert not at.error


def _sample_quality_report(folder: Path, digest: str, confident: int, strict: int) -> None:
    """A sample-quality report as experiments/sample_quality.py writes it, one run's ODE row."""
    row = {"run_digest": digest, "sampler": "ode", "confident": confident, "share": confident / 64,
           "strict": {"confident": strict, "share": strict / 64}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sample_quality.json").write_text(json.dumps(
        {"n": 64, "test_digits": {"share": 0.922, "strict_share": 0.953}, "runs": [row]}))


def test_generate_a_sample(app_run, tmp_path, monkeypatch):
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))
    _sample_quality_report(tmp_path / "sample_quality", "another run", 50, 40)
    _sample_quality_report(tmp_path / "sample_quality_this", app_run.digest, 13, 3)
    at = _new()
    at.run()
    at.radio(key="source").set_value("Generate a sample").run()
    at.button(key="generate").click()
    at = _until(at, lambda a: _bpd_shown(a) is not None)
    x = torch.from_numpy(at.session_state["sample"])
    assert x.shape == (1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert _bpd_shown(at) == pytest.approx(_engine_bpd(app_run, x), abs=1e-3)
    # what the committed report measured on this very model's samples, not another's
    said = [c.value for c in at.caption if "digit classifier" in c.value]
    assert len(said) == 1 and "read 13 as digits" in said[0] and "; a stricter one" in said[0] and " 3 (95%)" in said[0]
    assert "sample_quality_this" in said[0]


def test_sample_quality_words_only_from_a_sound_report_on_this_run(app_run, tmp_path, monkeypatch):
    from webapp import widgets as W
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))
    assert W.sample_quality_words(app_run) is None  # no report
    _sample_quality_report(tmp_path / "sample_quality", "another run", 50, 40)
    assert W.sample_quality_words(app_run) is None  # none on this run
    (tmp_path / "sample_quality_damaged").mkdir()
    (tmp_path / "sample_quality_damaged" / "sample_quality.json").write_text('{"runs": [{"run_digest": 3}]')
    (tmp_path / "sample_quality_old").mkdir()
    (tmp_path / "sample_quality_old" / "sample_quality.json").write_text(
        json.dumps({"n": 64, "runs": [{"run_digest": app_run.digest, "sampler": "ode"}]}))  # fields missing
    assert W.sample_quality_words(app_run) is None
    _sample_quality_report(tmp_path / "sample_quality_this", app_run.digest, 7, 1)
    words = W.sample_quality_words(app_run)
    assert "read 7 as digits" in words and "(of real test digits 92%)" in words and " 1 (95%)" in words


def test_compare_page_four_variants(app_run, tiny_figure2, tmp_path, monkeypatch):
    # a Figure 2 report is shown only for the model it was made on (the shared reports were made
    # on a `tiny` run of the same config and seed as the app's: the same model)
    import shutil
    _, reports, folders = tiny_figure2
    assert reports["test"]["run_digest"] == app_run.digest
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))
    at = _new()
    at.run()
    at.switch_page("views/likelihoods.py")
    at.run()
    assert len(at.get("vega_lite_chart")) == 0 and "No Figure 2 report for this model" in at.info[0].value
    # a report made on another config, where the page looks first, and this model's in a variant's folder
    shutil.copytree(folders["test"], tmp_path / "figure2_this_model")
    (tmp_path / "figure2").mkdir()
    other = json.loads((tmp_path / "figure2_this_model" / "figure2.json").read_text())
    (tmp_path / "figure2" / "figure2.json").write_text(json.dumps({**other, "run_digest": "0" * 64, "groups": {}}))
    at = _new()
    at.run()
    at.switch_page("views/likelihoods.py")
    at = _until(at, lambda a: len(a.metric) == 4)
    from webapp import experiments, service
    x = torch.from_numpy(service.test_set()[0][0])
    shown = [float(m.value) for m in at.metric]
    want = [_engine_bpd(app_run, v) for v in experiments.variants(x, 90.0, 4, seed=0).values()]
    assert shown == pytest.approx(want, abs=1e-3)
    assert len(at.get("vega_lite_chart")) == 1  # the Figure 2 distributions
    # a report on the model's training digits, in a folder the page would find first: it is shown
    # second, under its own heading, and never in place of the test-digit report
    shutil.copytree(folders["train"], tmp_path / "figure2_seen")
    seen = reports["train"]
    mine = json.loads((tmp_path / "figure2_this_model" / "figure2.json").read_text())
    at = _new()
    at.run()
    at.switch_page("views/likelihoods.py")
    at.run()
    assert len(at.get("vega_lite_chart")) == 2
    gaps = [c.value for c in at.caption if "Rotation gap" in c.value]
    assert [f"{r['rotation_gap']['mean']:+.3f}" in g for r, g in zip((mine, seen), gaps)] == [True, True]
    assert any("digits the model trained on" in m.value for m in at.markdown)


def test_galleries_page(app_run):
    at = _new()
    at.run()
    at.switch_page("views/galleries.py")
    at = _until(at, lambda a: len(a.selectbox) == 1, timeout=900)
    text = " ".join(m.value for m in at.markdown)
    assert "distinct images fill" in text
    assert len(at.dataframe) == 1
    # it says which computation made them (no representation here: the replay)
    assert any("replaying training backwards for these digits" in c.value for c in at.caption)
    # browsable by class: one class's digits only, with their mean influence
    from webapp import service
    q = service.gallery_queries()
    y = service.test_set()[1]
    c = int(y[q[0]])
    at.radio(key="gal_class").set_value(c).run()
    assert [at.selectbox[0].options] and all(f"(a {c})" in o for o in at.selectbox[0].options)
    assert any(m.value.startswith(f"**Mean influence over the {sum(int(y[i]) == c for i in q)} test {c}s") for m in at.markdown)


def test_verify_page_retrains_and_the_sign_holds(app_run, tmp_path, monkeypatch):
    # a comparison report as `compare` writes it (its JSON and Markdown), for the chart
    from engine.experiments import comparison
    rows = [{"method": m, "protocol": p, "n_train": 64, "drop_sets": 4, "drop_size": 1, "alpha": 0.5, "seeds": 2,
             "spearman_mean": v, "spearman_std": 0.1, "spearman_min": v - 0.1, "score_seconds": 1.0,
             "per_query": [v - 0.05, v + 0.05], "queries_list": [0, 1]}
            for m, v in (("magic", 0.9), ("trak", 0.2)) for p in ("A", "B")]
    report = {"preset": "tiny", "run_digest": "x", "queries": [0, 1], "rows": rows, "literature": []}
    (tmp_path / "comparison.json").write_text(json.dumps(report))
    (tmp_path / "comparison.md").write_text(comparison.markdown(report))
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))
    at = _new()
    at.run()
    at.switch_page("views/verify.py")
    at = _until(at, lambda a: len(a.radio) == 1, timeout=900)  # the gallery query's attribution is ready
    # the comparison with the baselines is charted, its table one click away
    assert len(at.get("vega_lite_chart")) == 1
    # the comparison's table in its expander (the other one holds how the scores were computed)
    assert sum("comparison" in e.label.lower() or "table" in e.label.lower() for e in at.expander) == 1
    assert any(e.label.startswith("How these scores were computed") for e in at.expander)
    assert any(c.value.startswith("**Exact MAGIC**: this image's own replay of training") for c in at.caption)
    assert any("MAGIC against the baselines" in h.value for h in at.subheader)
    at.slider(key="ver_k").set_value(8)
    at.run()
    at.button(key="ver_go").click()
    at = _until(at, lambda a: len(a.success) == 1)
    s = at.success[0].value
    actual = float(re.search(r"change ([+-][0-9.]+);", s).group(1))
    predicted = float(re.search(r"predicted ([+-][0-9.]+)\)", s).group(1))
    assert predicted > 0 and actual > 0  # removing the top proponents raises the bits/dim


def test_verify_names_whose_evidence_it_shows_this_models_first(app_run, tmp_path, monkeypatch):
    # a study of another configuration of the same preset is never shown as this model's
    for folder, digest, mean in (("lds_a_other", "0" * 64, 0.5), ("lds_b_this", app_run.digest, 0.9)):
        (tmp_path / folder / "reports").mkdir(parents=True)
        (tmp_path / folder / "reports" / "magic_A.json").write_text(json.dumps({
            "preset": "tiny", "run_digest": digest, "queries": [1, 2], "drop_sets": 8, "drop_size": 1,
            "spearman_mean": mean, "spearman_min": mean - 0.1}))
    # and the comparison with the baselines: this model's when one was made on it, else the main one, named
    rows = [{"method": "magic", "protocol": "A", "per_query": [v, v], "queries_list": [1, 2]} for v in (0.9,)]
    (tmp_path / "comparison.json").write_text(json.dumps({"preset": "small", "run_digest": "1" * 64, "rows": rows}))
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))

    def verify_page():
        at = _new()
        at.run()
        at.switch_page("views/verify.py").run()
        assert not at.exception, at.exception
        return at
    at = verify_page()
    lines = [m.value for m in at.markdown if "random drop-sets" in m.value]
    assert len(lines) == 2
    assert lines[0].startswith("`tiny`, this model: 2 test queries") and "**0.900**" in lines[0]
    assert lines[1].startswith("`tiny`, another configuration (`lds_a_other`), not this model:")
    assert any(h.value == "MAGIC against the baselines, `small`, not this model" for h in at.subheader)
    (tmp_path / "comparison_tiny.json").write_text(json.dumps({"preset": "tiny", "run_digest": app_run.digest,
                                                               "rows": rows}))
    (tmp_path / "comparison_tiny.md").write_text("the tiny table")
    at = verify_page()
    assert any(h.value == "MAGIC against the baselines, this model" for h in at.subheader)
    table = next(e for e in at.expander if e.label.startswith("The table"))
    assert len(at.get("vega_lite_chart")) == 1 and table.markdown[0].value == "the tiny table"


def test_verify_skips_a_damaged_or_foreign_report_in_one_line(app_run, tmp_path, monkeypatch):
    good = {"preset": "tiny", "run_digest": app_run.digest, "queries": [1, 2], "drop_sets": 8, "drop_size": 1,
            "spearman_mean": 0.9, "spearman_min": 0.8}
    for folder, text in (("lds_good", json.dumps(good)), ("lds_torn", json.dumps(good)[:40]),
                         ("lds_foreign", json.dumps({"preset": "tiny", "spearman_mean": "high"})),
                         ("lds_list", "[1, 2]")):
        (tmp_path / folder / "reports").mkdir(parents=True)
        (tmp_path / folder / "reports" / "magic_A.json").write_text(text)
    (tmp_path / "comparison.json").write_text('{"rows": [{"method": "magic"')  # torn
    (tmp_path / "comparison_tiny.json").write_text(json.dumps({"run_digest": app_run.digest, "rows": [{"method": 3}]}))
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))
    at = _new()
    at.run()
    at.switch_page("views/verify.py").run()
    assert not at.exception, at.exception
    lines = [m.value for m in at.markdown if "random drop-sets" in m.value]
    assert len(lines) == 1 and "**0.900**" in lines[0]  # the good report is still shown
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert all(f"lds_{n}" in warnings[0] for n in ("torn", "foreign", "list")) and "lds_good" not in warnings[0]
    assert "comparison.json" in warnings[1] and "comparison_tiny.json" in warnings[1]
    assert any("No comparison yet" in i.value for i in at.info)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


BAD_UPLOADS = {
    "truncated.png": (_png(np.full((40, 40), 200, np.uint8))[:60], "damaged or truncated"),
    "white.png": (_png(np.full((40, 40), 255, np.uint8)), "no digit found"),
    "huge.png": (_huge_png_header(20000, 20000), "too large"),
    "nan.npy": (_npy(np.full((28, 28), np.nan)), "NaN"),
    "shape.npy": (_npy(np.zeros((3, 28, 28))), "expected shape (28, 28)"),
    "range.npy": (_npy(np.full((28, 28), 2.0)), "must lie in [0, 1]"),
}


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_every_bad_upload_gets_one_clear_line(app_run, name):
    blob, words = BAD_UPLOADS[name]
    at = _new()
    at.run()
    at.radio(key="source").set_value("Upload").run()
    at.file_uploader(key="upload").upload(name, blob, "application/octet-stream")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "\n" not in at.error[0].value
    assert name in at.error[0].value and words in at.error[0].value, at.error[0].value
    assert _bpd_shown(at) is None


def test_an_empty_canvas_asks_for_a_drawing(app_run):
    at = _new()
    at.session_state["test_canvas"] = np.zeros((280, 280, 4), np.uint8)  # transparent, untouched
    at.run()
    assert not at.exception and not at.error
    assert any("Draw a digit" in i.value for i in at.info)


def _record_releases(monkeypatch):
    """The app's job table, and the list its release(key, owner) calls are recorded in (they still release)."""
    from webapp import service
    released = []
    jobs = service.jobs()
    real = jobs.release
    monkeypatch.setattr(jobs, "release", lambda key, owner: (released.append((key, owner)), real(key, owner)))
    return jobs, released


def test_moving_on_to_another_image_releases_the_previous_one_s_computation(app_run, monkeypatch):
    # a visitor clicking through test digits waits for the last one's computation, not for each
    # one passed on the way: each new image releases the previous one's job for this session
    # (webapp.jobs.Jobs.release stops it when no other session waits for it; tests/test_jobs.py)
    jobs, released = _record_releases(monkeypatch)
    at = _new()
    at.run()
    at.radio(key="source").set_value("MNIST test image").run()
    me, first = at.session_state["_session_id"], at.session_state["bpd_key"]
    assert me in jobs.peek(first).owners or jobs.peek(first).done
    at.number_input(key="test_index").set_value(1).run()
    second = at.session_state["bpd_key"]
    assert second != first and released == [(first, me)]
    at.number_input(key="test_index").set_value(1).run()  # the same image again: nothing released
    assert released == [(first, me)]
    # the Compare page's four columns likewise, each for itself
    at.switch_page("views/likelihoods.py").run()
    before = {k: at.session_state[k] for k in ("cmp_original", "cmp_rotated", "cmp_averaged", "cmp_noise")}
    at.number_input(key="cmp_index").set_value(3).run()
    got = {key for key, owner in released[1:] if owner == me}
    assert got == {v for k, v in before.items() if v != at.session_state[k]} and len(got) >= 3


def test_a_replay_asked_for_by_the_button_stops_when_its_visitor_moves_on(app_run, monkeypatch):
    # without a representation "Find them" starts minutes of replay: it belongs to the visitor who
    # asked, and another image releases it like the BPD's job (it used to run to its end regardless)
    jobs, released = _record_releases(monkeypatch)
    at = _new()
    at.run()
    at.session_state["test_canvas"] = _stroke_canvas(dx=35)  # a drawing no other test attributes
    at = _until(at, lambda a: _bpd_shown(a) is not None)
    at.button(key="attribute").click().run()
    me, asked = at.session_state["_session_id"], at.session_state["find_key"]
    job = jobs.peek(asked)
    assert job.done or me in job.owners
    at.radio(key="source").set_value("MNIST test image").run()
    assert (asked, me) in released and "find_key" not in at.session_state
    assert jobs.peek(asked) is None or jobs.peek(asked).done  # cancelled (it leaves the table), unless it had finished
    # the Verify page's button likewise
    from webapp import service
    at.session_state["query"] = service.from_canvas(_stroke_canvas(dx=45)).numpy()  # as Draw leaves it, a new drawing
    at.switch_page("views/verify.py").run()
    at.selectbox(key="ver_query").set_value("the image from Draw & attribute").run()
    at.button(key="ver_attr").click().run()
    asked = at.session_state["ver_key"]
    at.selectbox(key="ver_query").set_value(at.selectbox(key="ver_query").options[1]).run()
    assert (asked, me) in released and "ver_key" not in at.session_state


def test_a_minutes_long_job_s_progress_refreshes_every_5_s_a_short_one_s_every_second(monkeypatch):
    # each refresh is a rerun in the server and a redraw in the browser: a replay's ten minutes of
    # progress need not take that CPU from it every second; a drawing's seconds-long job does
    from webapp import widgets as W
    from webapp.jobs import Job
    seen = []
    monkeypatch.setattr(W, "_progress", lambda key: seen.append((key, "1 s")))
    monkeypatch.setattr(W, "_progress_slow", lambda key: seen.append((key, "5 s")))
    for lane in ("interactive", "requested", "background"):
        assert W.wait_for(Job(lane, "a job", lane=lane)) is None
    assert seen == [("interactive", "1 s"), ("requested", "5 s"), ("background", "5 s")]


def test_an_earlier_version_s_default_run_is_set_aside_and_a_user_s_own_is_not(tmp_path, monkeypatch):
    # after an update that changes the default preset, a server started on the old runs/cpu (the
    # Docker volume, `streamlit run app.py`) trains the current model instead of serving the old
    # one against a shipped representation made for the new one; a user's own run is left alone
    import dataclasses
    import shutil
    from engine import training as train
    from engine.presets import PRESETS
    from engine.store import load_run
    from webapp import service
    tiny, out = PRESETS["tiny"], tmp_path / "run"
    monkeypatch.setenv("APP_RUN", str(out))
    monkeypatch.setenv("APP_PRESET", "tiny")

    def retire():
        service.retire_outdated.cache_clear()
        try:
            return service.retire_outdated()
        finally:
            service.retire_outdated.cache_clear()
    assert retire() is None  # no run yet
    for kept in (dict(seed=1), dict(seed=0), dict(seed=0, weights=np.r_[0.0, np.ones(tiny.n_train - 1)])):
        train.train(tiny, out=out, **kept)  # a user's seed or weights, or the current default itself
        assert retire() is None and load_run(out).final_exists()
        shutil.rmtree(out)
    train.train(dataclasses.replace(tiny, steps=tiny.steps - 4), seed=0, out=out)  # tiny as an earlier version made it
    old = load_run(out).digest
    said = retire()
    assert said is not None and f"(steps {tiny.steps - 4}, now {tiny.steps})" in said and f"run.{old[:8]}" in said
    assert not out.exists() and load_run(tmp_path / f"run.{old[:8]}").digest == old


@pytest.mark.parametrize("name, value", [("APP_GALLERY_QUERIES", "abc"), ("APP_WORKERS", "-1"),
                                         ("APP_CACHE_GB", "nan"), ("APP_CACHE_GB", "inf"),
                                         ("APP_PRECOMPUTE_METHOD", "exact")])
def test_a_mistyped_setting_is_one_line_and_nothing_starts(app_run, name, value, monkeypatch):
    from webapp import service
    started = []
    monkeypatch.setattr(service, "warm_workers", lambda: started.append("workers"))
    monkeypatch.setenv(name, value)
    at = _new()
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and name in at.error[0].value and value in at.error[0].value
    assert started == [] and not at.markdown  # stopped before the workers, the model and the page
    monkeypatch.delenv(name)
    assert service.settings_problem() is None  # the suite's own settings are sound
