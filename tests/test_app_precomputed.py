"""The Draw page with a precomputed replay (engine.precompute) for the app's run, through AppTest."""

import time

import numpy as np
import pytest

pytest.importorskip("streamlit")
from test_app import _bpd_shown, _new, _stroke_canvas, _until  # noqa: E402  (tests/ is on sys.path)


def test_a_precomputed_replay_answers_without_a_button_and_a_foreign_one_is_refused(app_run):
    # with a representation for the app's run, a drawing's influences come automatically and say
    # how they were made; a damaged representation gets one warning line and the replay button
    from engine.precompute import build, representation as R
    from webapp import service
    build.precompute(app_run, method="lowrank", rank=4, chunk=4)  # small: the page is under test, not the maths
    path = R.folder(app_run) / "lowrank4.npz"
    try:
        at = _new()
        at.run()
        at.session_state["test_canvas"] = _stroke_canvas()
        t0 = time.perf_counter()
        at = _until(at, lambda a: any(m.value.startswith("**Top 16 proponents**") for m in a.markdown))
        waited = time.perf_counter() - t0
        assert len(at.button) == 0  # no button: the influences came on their own
        assert any("precomputed replay `lowrank4`" in c.value for c in at.caption)
        x = service.from_canvas(_stroke_canvas())
        # the engine's answers from one BPD gradient of the drawing: the preview (A B g) and exact MAGIC
        from engine import data
        from engine.bpd import run_bpd
        from engine.metagrad import metagradient
        from engine.precompute.tangents import flatten
        _, grads = run_bpd(app_run, x[None], grad=True)
        want = R.load(app_run, "lowrank4").scores(flatten(grads[0])[None].numpy())
        res = service.jobs().peek(service.attribution_key(app_run, x)).result
        got = res["grad_w"]
        # the page says how long the computation itself took (part of the wait, measured in the worker)
        assert 0 < res["seconds"] <= waited
        assert any(f"Computing it took {res['seconds']:.1f} s." in c.value for c in at.caption)
        # in one line above the lists (the whole account in the expander below it)
        assert any(c.value.startswith(f"**A preview**, computed in {res['seconds']:.1f} s from the precomputed "
                                      "replay `lowrank4`") for c in at.caption)
        assert any(e.label.startswith("How these lists were computed") for e in at.expander)
        # the worker runs torch with another thread count, so the BPD gradient may round differently
        assert np.linalg.norm(got - want[0]) / np.linalg.norm(want[0]) <= 1e-5
        # progressive: the exact replay runs in the background and replaces the preview, saying
        # how many of the top 16 it changed (checked against the engine's exact MAGIC)
        at = _until(at, lambda a: any("has replaced the preview" in c.value for c in a.caption))
        from engine.attribution import top_k
        exact = metagradient(app_run, data.load_train(app_run.preset.n_train, app_run.preset.source)[0], grads).numpy()
        a, b = top_k(want[0], 16), top_k(exact[0], 16)
        changed = 16 - len(set(a["proponents"]) & set(b["proponents"]))
        line = next(c.value for c in at.caption if "has replaced the preview" in c.value)
        assert f"it changed {changed} of the top-16 proponents" in line, (line, changed)
        short = next(c.value for c in at.caption if c.value.startswith("**Exact MAGIC**: this image's own replay"))
        assert f"It changed {changed} of the preview's top-16 proponents" in short, (short, changed)
        # the caption names what the lists now are (the replay, with its time) before what it replaced
        assert line.startswith("Computed by replaying training backwards for this image (exact MAGIC). Computing it took ")
        assert "replaced the preview from the precomputed replay `lowrank4` (computed in " in line
        # the influences particular to this image, once the galleries' digits are in
        service.galleries_job(app_run)
        at = _until(at, lambda a: any("Scores minus their mean over" in c.value for c in a.caption))
        heads = [m.value for m in at.markdown]  # each list under its own heading (16 images: two rows each)
        assert "**16 that help it more** than a typical digit" in heads
        assert "**16 that hurt it more** than a typical digit" in heads
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])  # truncated: never used
        at = _new()
        at.run()
        at.session_state["test_canvas"] = _stroke_canvas()
        at = _until(at, lambda a: _bpd_shown(a) is not None)
        assert len(at.warning) == 1 and "not used" in at.warning[0].value
        # the replay takes over: its button, or its result if an earlier test already replayed this drawing
        replayed = any("replaying training" in c.value for c in at.caption)
        assert replayed or any(b.key == "attribute" for b in at.button)
        assert not any("precomputed replay" in c.value for c in at.caption)
    finally:
        path.unlink(missing_ok=True)


def test_the_first_visit_makes_the_precomputed_replay_in_the_background(app_run, monkeypatch):
    # a run without a representation: the first visit starts making one (a query basis of 4 images here), the sidebar
    # says how far it is, and once it is written the Draw page answers from it without a button
    from engine.precompute import representation as R
    from webapp import replays, service
    monkeypatch.setenv("APP_PRECOMPUTE_RANK", "4")
    assert service.precomputed(app_run)[0] is None
    key = replays.job_key(app_run)
    try:
        at = _new()
        at.run()
        job = service.jobs().peek(key)
        assert job is not None and job.label == "precomputed replay"
        assert service.jobs().wait_all(600)
        assert R.available(app_run) == ["basis4"] and service.precomputed(app_run)[0] == "basis4"
        assert replays.job(app_run) is None  # nothing more to make
        at = _new()
        at.run()
        at.session_state["test_canvas"] = _stroke_canvas()
        at = _until(at, lambda a: any("precomputed replay `basis4`" in c.value for c in a.caption))
        assert not any(b.key == "attribute" for b in at.button)
    finally:
        (R.folder(app_run) / "basis4.npz").unlink(missing_ok=True)


def test_a_shipped_representation_answers_at_once_and_one_for_other_weights_is_made_again(app_run, monkeypatch,
                                                                                          tmp_path):
    # the repository ships the default model's representation: the first visit installs it and a
    # drawing's influences come from it with no button and no precompute; a shipped file made for
    # the same weights rounded by another CPU is checked and used; one made for other weights is
    # refused with one line, and the app makes the representation again itself
    from engine.precompute import build, representation as R, shipped
    from webapp import replays, service
    monkeypatch.setenv("APP_PRECOMPUTE_RANK", "4")
    monkeypatch.setenv("APP_SHIPPED", str(tmp_path / "shipped"))
    build.precompute(app_run, method="basis", rank=4, chunk=4)
    path = R.folder(app_run) / "basis4.npz"
    made = R.load(app_run, "basis4")
    shipped.ship(app_run, "basis4", tmp_path / "shipped")
    path.unlink()
    service._install.cache_clear()
    try:
        at = _new()
        at.run()
        assert service.precomputed(app_run)[0] == "basis4"  # installed: the precompute's, its G in float16
        np.testing.assert_array_equal(R.load(app_run, "basis4").a, made.a)
        assert replays.job(app_run) is None  # nothing to make
        at.session_state["test_canvas"] = _stroke_canvas()
        at = _until(at, lambda a: any(m.value.startswith("**Top 16 proponents**") for m in a.markdown))
        assert len(at.button) == 0 and _bpd_shown(at) is not None
        assert any("precomputed replay `basis4`" in c.value for c in at.caption)
        # what is particular to the image needs no galleries: the basis's own test digits give the mean
        rep = R.load(app_run, "basis4")
        from engine.precompute import basis
        gw_b, idx = service.basis_digits(app_run)
        names = basis.images(4, app_run.seed)[1]
        assert [f"test:{i}" for i in idx] == [names[j] for j in (0, 1, 3)]  # the plain test digits, in order
        np.testing.assert_allclose(gw_b, rep.a[:, [0, 1, 3]].T)
        # a shipped file stamped with other weights whose query gradients are this run's (what the
        # same training rounded by another kind of CPU gives): one gradient is recomputed, the file
        # is used, and the caption says so
        with np.load(tmp_path / "shipped" / "tiny" / "basis4.npz") as f:
            d = {k: f[k] for k in f.files}
        d["weights_sha256"] = np.array("0" * 64)
        np.savez(tmp_path / "shipped" / "tiny" / "basis4.npz", **d)
        path.unlink()
        service._install.cache_clear()
        at = _new()
        at.run()
        assert len(at.warning) == 0 and service.precomputed(app_run)[0] == "basis4"
        at.session_state["test_canvas"] = _stroke_canvas()
        at = _until(at, lambda a: any("made on another kind of CPU" in c.value for c in a.caption))
        assert replays.job(app_run) is None  # nothing to make
        # one whose query gradients are not this run's (G doubled): other weights, refused
        d["ship_scale"] = d["ship_scale"] / 2
        np.savez(tmp_path / "shipped" / "tiny" / "basis4.npz", **d)
        path.unlink()
        service._install.cache_clear()
        at = _new()
        at.run()  # said on arrival (the remade file may land seconds later, before any stroke)
        assert len(at.warning) == 1 and "other final weights" in at.warning[0].value
        assert "made again in the background" in at.warning[0].value
        assert service.jobs().wait_all(600)
        assert path.read_bytes() != (tmp_path / "shipped" / "tiny" / "basis4.npz").read_bytes()
        assert service.precomputed(app_run)[0] == "basis4"  # the remade one passes its checks
        np.testing.assert_array_equal(R.load(app_run, "basis4").a, rep.a)
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".verified.json").unlink(missing_ok=True)


def test_shipped_galleries_are_in_the_memo_at_once_and_any_that_do_not_match_are_computed(app_run, monkeypatch,
                                                                                          tmp_path, caplog):
    # the galleries shipped beside the representation: the galleries job is done the moment it is
    # asked for, with what the app computes (and each digit's attribution is memoized with it); a
    # file for another representation, other digits, or a damaged one is not used (one line in
    # the log) and the galleries are computed in the background as without it
    import logging
    from engine.precompute import build, representation as R
    from webapp import service, shipped_galleries as SG
    monkeypatch.setenv("APP_SHIPPED", str(tmp_path / "shipped"))
    build.precompute(app_run, method="basis", rank=4, chunk=4)
    try:
        def want():
            return service.galleries_computed(app_run, service.gallery_queries(), False, lambda i: None)
        monkeypatch.setenv("APP_GALLERY_QUERIES", "3")
        dest = SG.ship(app_run, tmp_path / "shipped")
        assert dest == tmp_path / "shipped" / "tiny" / "galleries" / "basis4.npz"
        ref = want()
        job = service.galleries_job(app_run)
        assert job.done and job.result["method"] == "precomputed:basis4" and job.result["shipped"] == str(dest)
        np.testing.assert_array_equal(job.result["grad_w"], ref["grad_w"])
        np.testing.assert_array_equal(job.result["bpd"], ref["bpd"])
        x0 = service.test_set()[0][service.gallery_queries()[0]]
        import torch
        hit = service.jobs().memo.get(service.attribution_key(app_run, torch.from_numpy(x0)))
        np.testing.assert_array_equal(hit["grad_w"], ref["grad_w"][0])
        at = _new()  # the page says where they came from
        at.run()
        at.switch_page("views/galleries.py").run()
        assert not at.exception, at.exception
        assert any(f"shipped with its precomputed replay (`{dest}`" in c.value for c in at.caption)
        # other digits than the file's (another APP_GALLERY_QUERIES): computed
        monkeypatch.setenv("APP_GALLERY_QUERIES", "4")
        with caplog.at_level(logging.WARNING, logger="webapp"):
            job = service.galleries_job(app_run)
        assert "made for another queries, images_sha256" in caplog.text, caplog.text
        assert service.jobs().wait_all(600) and job.result is not None
        np.testing.assert_allclose(job.result["grad_w"], want()["grad_w"], rtol=1e-4, atol=1e-7)
        # a file made from another representation (its arrays' checksum differs), then a damaged one
        monkeypatch.setenv("APP_GALLERY_QUERIES", "5")
        SG.ship(app_run, tmp_path / "shipped")
        with np.load(dest) as f:
            d = {k: f[k] for k in f.files}
        np.savez(dest, **{**d, "rep_sha256": np.array("0" * 64)})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="webapp"):
            res, why = SG.load(app_run, "basis4", service.gallery_queries(), tmp_path / "shipped")
            job = service.galleries_job(app_run)
        assert res is None and why.endswith("made for another rep_sha256") and why in caplog.text
        assert service.jobs().wait_all(600) and job.result is not None
        dest.write_bytes(dest.read_bytes()[:100])
        res, why = SG.load(app_run, "basis4", service.gallery_queries(), tmp_path / "shipped")
        assert res is None and "unreadable" in why
        assert SG.load(app_run, "basis9", service.gallery_queries(), tmp_path / "shipped") == (None, None)
    finally:
        (R.folder(app_run) / "basis4.npz").unlink(missing_ok=True)


def test_shipped_galleries_are_made_from_the_representation_a_fresh_clone_installs(app_run, monkeypatch, tmp_path):
    # the run that made the shipped basis holds the precompute's own file (float32), a fresh clone
    # the shipped one decoded (its query gradients rounded to float16): galleries fingerprinted on
    # the former match no fresh clone, so `ship` refuses it and the command installs the shipped
    # form first; what it writes is then used by a fresh clone's run
    from engine.errors import UserError
    from engine.precompute import build, representation as R, shipped
    from webapp import service, shipped_galleries as SG
    root = tmp_path / "shipped"
    monkeypatch.setenv("APP_SHIPPED", str(root))
    monkeypatch.setenv("APP_GALLERY_QUERIES", "3")
    build.precompute(app_run, method="basis", rank=4, chunk=4)
    path = R.folder(app_run) / "basis4.npz"
    try:
        shipped.ship(app_run, "basis4", root)
        own = SG.fingerprint(app_run, "basis4", service.gallery_queries())
        with pytest.raises(UserError, match="precompute's own"):
            SG.ship(app_run, root)
        assert SG.install_as_a_fresh_clone(app_run, root) == [path.with_name("basis4.npz.own")]
        assert R.available(app_run) == ["basis4"]
        installed = SG.fingerprint(app_run, "basis4", service.gallery_queries())
        assert installed["rep_sha256"] != own["rep_sha256"]  # the float16 rounding: other arrays
        assert SG.install_as_a_fresh_clone(app_run, root) == []  # nothing more to move
        SG.ship(app_run, root)
        path.unlink()  # a fresh clone: the shipped file installed into a run without one
        assert shipped.install(app_run, root) == ["basis4"]
        res, why = SG.load(app_run, "basis4", service.gallery_queries(), root)
        assert why is None and res["method"] == "precomputed:basis4"
    finally:
        path.unlink(missing_ok=True)
        path.with_name("basis4.npz.own").unlink(missing_ok=True)
        path.with_suffix(".verified.json").unlink(missing_ok=True)


def test_the_galleries_page_shows_the_basis_digits_while_its_own_are_computed(app_run, monkeypatch):
    # never an empty page: with a query basis, its plain test digits (exact attributions, shipped
    # with the representation) fill the galleries until the galleries' own digits are computed
    from engine.precompute import basis, build, representation as R
    from webapp import service
    monkeypatch.setenv("APP_GALLERY_QUERIES", "48")  # a gallery not made yet: it computes for a while
    build.precompute(app_run, method="basis", rank=4, chunk=4)
    key = service.galleries_key(app_run)
    try:
        at = _new()
        at.run()
        at.switch_page("views/galleries.py").run()
        assert not at.exception, at.exception
        job = service.jobs().peek(key)
        assert job is not None and not job.done
        assert any("Meanwhile: the 3 test digits" in i.value for i in at.info)
        idx = [int(n.split(":")[1]) for n in basis.images(4, app_run.seed)[1] if n.startswith("test:")]
        y = service.test_set()[1]
        assert at.selectbox[0].options == [f"test {i} (a {y[i]})" for i in idx]
        assert any("distinct images fill" in m.value for m in at.markdown)
    finally:
        service.jobs().cancel(key)
        (R.folder(app_run) / "basis4.npz").unlink(missing_ok=True)


def test_the_caption_cites_this_models_own_test_against_retraining(app_run, tmp_path, monkeypatch):
    # the fidelity study was made on another preset; an LDS report of MAGIC through this very
    # representation file on this very run is this model's own evidence and comes first. A report
    # whose scores came from another file (its SHA-256 differs) or another run is not cited.
    import json
    from engine.precompute import representation as R
    from webapp import widgets as W
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))
    (tmp_path / "precompute").mkdir()
    (tmp_path / "precompute" / "fidelity.json").write_text(json.dumps({"preset": "small", "run_digest": "0" * 64, "rows": [
        {"scores": "basis9", "spearman_with_exact": [0.8, 0.9], "top_proponents_shared": [12, 14], "lds": [0.9, 0.9]}]}))
    path = R.folder(app_run) / "basis9.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read: only hashed")
    bank = tmp_path / "lds_this"
    (bank / "reports").mkdir(parents=True)
    (bank / "scores").mkdir()

    def report(method, mean, digest=app_run.digest):
        (bank / "reports" / f"{method}_A.json").write_text(json.dumps({
            "run_digest": digest, "spearman_mean": mean, "spearman_min": mean - 0.05, "queries": [{}] * 8,
            "drop_sets": 50, "frac": 0.01}))

    def scores(sha):
        np.savez(bank / "scores" / "magic_precomputed.npz", representation=np.array("basis9"),
                 representation_sha256=np.array(sha))
    import hashlib
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        report("magic_precomputed", 0.891)
        report("magic", 0.979)
        scores(sha)
        words = W.method_words("precomputed:basis9", app_run)
        assert ("on this model against retraining, LDS 0.89 (lowest 0.84) over 8 test digits and 50 retrainings "
                "without 1% of the data, where exact MAGIC gets 0.98") in words, words
        assert "2 images of the `small` model" in words  # the other model's study still follows
        (tmp_path / "precompute" / "fidelity.json").unlink()  # no study at all: the model's own test still shows
        assert "LDS 0.89 (lowest 0.84)" in W.method_words("precomputed:basis9", app_run)
        scores("f" * 64)  # made from another representation file
        assert "against retraining" not in W.method_words("precomputed:basis9", app_run)
        scores(sha)
        report("magic_precomputed", 0.891, digest="1" * 64)  # made on another run
        assert "against retraining" not in W.method_words("precomputed:basis9", app_run)
    finally:
        path.unlink()


def test_the_caption_gives_the_previews_lds_per_kind_of_image(app_run, tmp_path, monkeypatch):
    # a visitor draws: the fidelity study's LDS on drawn digits is said apart from the test digits'
    # (their mean would hide it), and a report that measured test digits only says just those
    import json
    from webapp import widgets as W
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))
    (tmp_path / "precompute").mkdir()
    names = ["test:1", "test:2", "drawn 1", "drawn 7", "noise"]
    kinds = ["test", "test", "drawn", "drawn", "off-distribution"]
    row = {"scores": "basis9", "spearman_with_exact": [0.8] * 5, "top_proponents_shared": [12] * 5}

    def study(lds_queries, lds):
        (tmp_path / "precompute" / "fidelity.json").write_text(json.dumps({
            "preset": "small", "run_digest": "0" * 64, "queries": names, "kinds": kinds, "lds_queries": lds_queries,
            "rows": [{**row, "lds": lds}]}))
    study(names[:2], [0.7, 0.9])
    words = W.method_words("precomputed:basis9", app_run)
    assert "against retraining, LDS 0.80 on 2 test digits)" in words, words
    study(["test:1", "test:2", "drawn 1", "drawn 7", "noise"], [0.7, 0.9, 0.2, 0.4, 0.5])
    words = W.method_words("precomputed:basis9", app_run)
    assert ("against retraining, LDS 0.80 on 2 test digits, 0.30 on 2 drawn digits, 0.50 on 1 rotated, averaged "
            "or noise images)") in words, words
    study(["test:1", "test:9"], [0.7, 0.9])  # a query the study does not name: all said as test digits
    assert "LDS 0.80 on 2 test digits)" in W.method_words("precomputed:basis9", app_run)
    # the one line above the lists: test and drawn digits only, and only from a study of this very run
    study(["test:1", "test:2", "drawn 1", "drawn 7", "noise"], [0.7, 0.9, 0.2, 0.4, 0.5])
    assert W.headline("precomputed:basis9", app_run, 2.34) == "**A preview**, computed in 2.3 s from the precomputed replay `basis9`."
    mine = json.loads((tmp_path / "precompute" / "fidelity.json").read_text())
    (tmp_path / "precompute" / "fidelity.json").write_text(json.dumps({**mine, "run_digest": app_run.digest}))
    assert W.headline("precomputed:basis9", app_run, 2.34) == (
        "**A preview**, computed in 2.3 s from the precomputed replay `basis9` (against retraining: LDS 0.80 on 2 test "
        "digits, 0.30 on 2 drawn digits).")


def test_the_refined_lists_cite_this_models_partial_replay_studies_at_the_point_reached(app_run, tmp_path,
                                                                                         monkeypatch):
    # while the exact replay runs, the caption gives the LDS that the committed studies of this very
    # run measured for the refined lists at the last point they measured that the replay has reached
    import json
    from webapp import widgets as W
    monkeypatch.setenv("APP_RESULTS", str(tmp_path))

    def study(folder, digest, names=None, scale=1.0):
        rows = [{"scores": "preview (basis9)", "steps": 0, "lds": [0.5 * scale, 0.7 * scale]}]
        for i in (10, 20, 40):
            rows += [{"scores": "partial sum", "steps": i, "lds": [i / 50, i / 50]},
                     {"scores": "progressive", "steps": i, "lds": [scale * (0.6 + i / 200)] * 2}]
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "partial_replay.json").write_text(json.dumps({
            "run_digest": digest, "steps": 40, "queries": [5, 6], "rows": rows,
            **({"query_names": names} if names else {})}))
    words = W.refined_words(15, 40, app_run)
    assert "Not measured on this model against retraining" in words, words
    study("partial_replay_other", "1" * 64)  # another run's study is not this model's
    assert "Not measured on this model" in W.refined_words(15, 40, app_run)
    study("partial_replay_x_drawn", app_run.digest, names=["drawn 1", "drawn 7"], scale=0.5)
    study("partial_replay_x", app_run.digest)
    words = W.refined_words(25, 40, app_run)
    assert ("Measured on this model against retraining, LDS 0.70 on 2 test digits at 50% of the steps (the "
            "preview alone 0.60, exact 0.80); 0.35 on 2 drawn digits at 50% of the steps (the preview alone 0.30, "
            "exact 0.80).") in words, words
    assert "0.65 on 2 test digits at 25% of the steps" in W.refined_words(19, 40, app_run)
    words = W.refined_words(5, 40, app_run)  # before the first point measured: the preview's
    assert "LDS 0.60 on 2 test digits for the preview alone, before the first point measured (25% of the steps; " \
           "exact 0.80)" in words, words


def test_the_verify_page_takes_a_gallery_digits_preview_and_says_how_it_was_made(app_run, monkeypatch):
    # the galleries made from a representation leave each digit's attribution for every page: Verify
    # offers a gallery digit's top-k at once (no button, no replay), from that preview, and says so
    import re
    import torch
    from engine.attribution import attribute_precomputed, predict_removal, top_k
    from engine.precompute import build, representation as R
    from webapp import service
    monkeypatch.setenv("APP_GALLERY_QUERIES", "3")  # a gallery of its own: none made earlier in the session
    build.precompute(app_run, method="lowrank", rank=4, chunk=4)
    try:
        at = _new()
        at.run()
        job = service.galleries_job(app_run)
        assert service.jobs().wait_all(600) and job.result["method"] == "precomputed:lowrank4"
        at.switch_page("views/verify.py").run()
        q = service.gallery_queries()[2]  # not among the 2 digits of the other tests' galleries (exact ones come first)
        assert service.jobs().peek(service.replay_key(app_run, torch.from_numpy(service.test_set()[0][q]))) is None
        at.selectbox(key="ver_query").set_value(f"test {q} (a {service.test_set()[1][q]})").run()
        assert not at.exception, at.exception
        assert not any(b.key == "ver_attr" for b in at.button)  # nothing to compute
        assert any("precomputed replay `lowrank4`" in c.value for c in at.caption)
        x = service.test_set()[0][q]
        gw, bpd = attribute_precomputed(app_run, R.load(app_run, "lowrank4"), torch.from_numpy(x)[None])
        at.slider(key="ver_k").set_value(5).run()
        want = predict_removal(float(bpd[0]), gw[0], top_k(gw[0], 5)["proponents"])
        line = next(m.value for m in at.markdown if "MAGIC predicts" in m.value)
        shown = float(re.search(r"predicts \*\*([0-9.]+)\*\*", line).group(1))
        assert abs(shown - want) <= 1e-4, (line, want)
    finally:
        (R.folder(app_run) / "lowrank4.npz").unlink(missing_ok=True)


def test_a_new_drawing_releases_the_previous_one_s_exact_replay_at_once(app_run, monkeypatch):
    # with an approximate representation a drawing's exact replay starts after its preview; the
    # next drawing releases it at once, before its own preview is in (webapp.jobs.Jobs.release
    # stops it unless another session waits for it)
    from engine.precompute import build, representation as R
    from webapp import service
    build.precompute(app_run, method="lowrank", rank=4, chunk=4)
    released = []
    jobs = service.jobs()
    real = jobs.release
    monkeypatch.setattr(jobs, "release", lambda key, owner: (released.append((key, owner)), real(key, owner)))
    try:
        at = _new()
        at.run()
        at.session_state["test_canvas"] = _stroke_canvas(dx=23)
        at = _until(at, lambda a: "exact_key" in a.session_state)
        me, exact, first = at.session_state["_session_id"], at.session_state["exact_key"], at.session_state["bpd_key"]
        assert me in jobs.peek(exact).owners or jobs.peek(exact).done
        at.session_state["test_canvas"] = _stroke_canvas(dx=-23)
        at.run()
        assert (first, me) in released and (exact, me) in released
        assert "exact_key" not in at.session_state or at.session_state["exact_key"] != exact
    finally:
        (R.folder(app_run) / "lowrank4.npz").unlink(missing_ok=True)


def test_the_verify_page_attributes_a_new_query_from_the_representation_without_a_button(app_run, monkeypatch):
    # a query no gallery has attributed yet: with a representation Verify asks for its preview at
    # once (seconds), as Draw does, and shows MAGIC's prediction from it; no button on the way
    import re
    import torch
    from engine.attribution import attribute_precomputed, predict_removal, top_k
    from engine.precompute import build, representation as R
    from webapp import service
    monkeypatch.setenv("APP_GALLERY_QUERIES", "5")
    build.precompute(app_run, method="lowrank", rank=4, chunk=4)
    try:
        q = service.gallery_queries()[4]  # beyond every gallery the other tests make (at most 3 digits)
        x = service.test_set()[0][q]
        assert service.known_attribution(app_run, torch.from_numpy(x)) is None
        at = _new()
        at.run()
        at.switch_page("views/verify.py").run()
        at.selectbox(key="ver_query").set_value(f"test {q} (a {service.test_set()[1][q]})").run()
        buttons = []
        at = _until(at, lambda a: buttons.extend(b.key for b in a.button) or any("MAGIC predicts" in m.value for m in a.markdown),
                    timeout=120)
        assert "ver_attr" not in buttons
        assert any("precomputed replay `lowrank4`" in c.value for c in at.caption)
        gw, bpd = attribute_precomputed(app_run, R.load(app_run, "lowrank4"), torch.from_numpy(x)[None])
        want = predict_removal(float(bpd[0]), gw[0], top_k(gw[0], 10)["proponents"])
        line = next(m.value for m in at.markdown if "MAGIC predicts" in m.value)
        assert abs(float(re.search(r"predicts \*\*([0-9.]+)\*\*", line).group(1)) - want) <= 1e-4, (line, want)
        assert not any("exact replay of this image is under way" in c.value for c in at.caption)
        # the exact replay for this image running (from the Draw page): the page says it keeps the preview
        from webapp import jobs as J
        running = J.Job(service.replay_key(app_run, torch.from_numpy(x)), "exact replay", stage="training", i=3, n=24)
        with service.jobs()._lock:
            service.jobs()._jobs[running.key] = running
        try:
            at.run()
            assert any("exact replay of this image is under way" in c.value for c in at.caption), \
                [c.value for c in at.caption]
            line = next(m.value for m in at.markdown if "MAGIC predicts" in m.value)
            assert abs(float(re.search(r"predicts \*\*([0-9.]+)\*\*", line).group(1)) - want) <= 1e-4
        finally:
            with service.jobs()._lock:
                service.jobs()._jobs.pop(running.key, None)
    finally:
        (R.folder(app_run) / "lowrank4.npz").unlink(missing_ok=True)


def test_while_the_exact_replay_runs_its_partial_sums_refine_the_preview(app_run, monkeypatch):
    # the replay job passes its partial sum on with every later report (a report overwrites the one
    # before it between two polls) ...
    from engine.attribution import progressive
    from engine.precompute import build, representation as R
    from webapp import jobs as J, service
    x = service.from_canvas(_stroke_canvas(dx=25))
    infos = []
    out = service._attribution(app_run, x, True, infos.append)
    first = next(k for k, i in enumerate(infos) if "partial" in i)
    assert all("partial" in i and i["partial"]["i"] <= i["i"] for i in infos[first:] if i.get("stage") == "training")
    assert max(i["partial"]["i"] for i in infos[first:]) == app_run.preset.steps - 1
    assert not np.allclose(infos[-1]["partial"]["grad_w"], out["grad_w"])  # the last step's part still missing
    # ... and while it runs, the Draw page shows the preview refined by the latest one, and says how far it is
    build.precompute(app_run, method="lowrank", rank=4, chunk=4)
    path = R.folder(app_run) / "lowrank4.npz"
    n, steps = app_run.preset.n_train, app_run.preset.steps
    part = {"grad_w": np.random.default_rng(0).normal(size=n) * np.abs(out["grad_w"]).max(), "i": 10, "n": steps}
    running = J.Job(service.replay_key(app_run, x), "exact replay", stage="training", i=10, n=steps, partial=part)
    monkeypatch.setattr(service, "replay_job", lambda run, x, owner=None: running)
    jobs = service.jobs()
    with jobs._lock:  # what the page's progress bar looks up
        jobs._jobs[running.key] = running
    try:
        at = _new()
        at.run()
        at.session_state["test_canvas"] = _stroke_canvas(dx=25)
        at = _until(at, lambda a: any("Refined as the exact replay goes" in c.value for c in a.caption))
        line = next(c.value for c in at.caption if "Refined as the exact replay goes" in c.value)
        assert f"the last 10 of {steps} training steps (42%)" in line and "precomputed replay `lowrank4`" in line
        assert any(c.value.startswith(f"**The preview refined** by the exact replay's last 10 of {steps} training "
                                      "steps (42%)") for c in at.caption)
        preview = jobs.peek(service.attribution_key(app_run, x)).result["grad_w"]
        gw = progressive(preview, part["grad_w"], 10, app_run.preset)
        from engine.attribution import top_k
        tk = top_k(gw, 16)
        assert any(m.value.startswith(f"**Top 16 proponents** (removing them is predicted to raise the bits/dim by "
                                      f"{-gw[tk['proponents']].sum():.4f})") for m in at.markdown)
        assert at.session_state["partial_shown"] == (running.key, 10)
    finally:
        with jobs._lock:
            jobs._jobs.pop(running.key, None)
        path.unlink(missing_ok=True)


def test_the_apps_precompute_computes_in_its_lanes_worker_with_the_lanes_threads(tmp_path, monkeypatch):
    # webapp.replays makes the app's representation in the background lane's worker: its chunks
    # compute in that very process, on the torch threads the lane's share set (webapp.jobs), not
    # in a pool of their own that would start with every core's threads beside the other lanes
    import os
    import torch
    from engine import training
    from engine.precompute import build, representation as R
    from engine.presets import PRESETS
    from engine.store import load_run
    from webapp import replays
    training.train(PRESETS["tiny"], seed=0, out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    seen = []
    for name in ("_gradient_job", "_reverse_job"):
        real = getattr(build, name)
        monkeypatch.setattr(build, name, lambda *a, _real=real: seen.append((os.getpid(), torch.get_num_threads()))
                            or _real(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the lane's share
    try:
        info = replays._precompute(run, 2, lambda i: None, how="basis")
    finally:
        torch.set_num_threads(threads)
    assert seen == [(os.getpid(), 1)] * 2  # one chunk of each stage, here, on the one thread
    assert info["name"] == "basis2" and R.available(run) == ["basis2"]
