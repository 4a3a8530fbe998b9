"""Precomputed replays on `tiny`: the exact representation equals the per-query replay, a
low-rank one is exact on its own span, building resumes chunk by chunk, and every foreign,
stale or damaged file is refused with one line."""

import json
import shutil

import numpy as np
import pytest
import torch

from engine import cli, data, training as train
from engine.errors import UserError
from engine.metagrad import metagradient
from engine.precompute import build, representation as R
from engine.precompute.tangents import flat_to_dicts, flatten
from engine.presets import PRESETS
from engine.store import load_run

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    train.train(TINY, seed=0, out=out)
    r = load_run(out)
    build.precompute(r, method="exact", chunk=32)
    return r


def _random_queries(run, q: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([flatten({n: torch.randn(p.shape, generator=g) for n, p in run.load_final().params.items()})
                        for _ in range(q)])


def test_exact_representation_equals_the_per_query_replay(run):
    g = _random_queries(run, 3, seed=1)  # three random linear query functionals <g, theta_T>
    images = data.load_train(TINY.n_train)[0]
    want = metagradient(run, images, flat_to_dicts(g, run.load_final().params)).numpy()
    got = R.load(run, "exact").scores(g.numpy())
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4


def test_cli_attribute_uses_the_representation_and_matches_replay(run, tmp_path, capsys):
    args = ["attribute", "--run", str(run.path), "test:3", "test:11", "--json"]
    assert cli.main(args + ["--out", str(tmp_path / "pre.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "precomputed:exact"
    assert cli.main(args + ["--out", str(tmp_path / "rep.npz"), "--replay"]) == 0
    pre, rep = np.load(tmp_path / "pre.npz"), np.load(tmp_path / "rep.npz")
    assert str(pre["method"]) == "precomputed:exact" and str(rep["method"]) == "replay"
    assert pre["grad_w"].shape == rep["grad_w"].shape == (2, TINY.n_train)
    assert np.linalg.norm(pre["grad_w"] - rep["grad_w"]) / np.linalg.norm(rep["grad_w"]) <= 1e-4
    np.testing.assert_array_equal(pre["bpd"], rep["bpd"])


def test_lowrank_is_exact_on_its_span_and_resumes_by_chunk(run):
    info = build.precompute(run, method="lowrank", rank=8, chunk=4)
    rep = R.load(run, info["name"])
    assert rep.a.shape == (TINY.n_train, 8) and rep.b.shape[0] == 8
    # a query gradient inside the span of B's rows is represented exactly: J^T Q c = A c
    g = torch.from_numpy(rep.b.T @ np.random.default_rng(0).standard_normal(8)).float()[None]
    want = metagradient(run, data.load_train(TINY.n_train)[0], flat_to_dicts(g, run.load_final().params)).numpy()
    got = rep.scores(g.numpy())
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4
    # resume: a lost chunk and a truncated one are recomputed, the others are not
    parts = R.folder(run) / "lowrank8.parts"
    (parts / "fwd_0001.npz").unlink()
    blob = (parts / "rev_0000.npz").read_bytes()
    (parts / "rev_0000.npz").write_bytes(blob[: len(blob) // 2])
    (R.folder(run) / "lowrank8.npz").unlink()
    stages = []
    build.precompute(run, method="lowrank", rank=8, chunk=4, callback=lambda i: stages.append((i["stage"], i["i"])))
    assert stages == [("forward", 1), ("forward", 2), ("reverse", 1), ("reverse", 2)]
    again = R.load(run, "lowrank8")
    np.testing.assert_allclose(again.a, rep.a, rtol=1e-5, atol=1e-7 * np.abs(rep.a).max())


def test_a_query_basis_is_exact_on_its_images_and_resumes_by_chunk(run):
    # checked against the exact representation J^T (itself checked against the replay above)
    from engine.precompute import basis
    info = build.precompute(run, method="basis", rank=4, chunk=3)
    rep, exact = R.load(run, info["name"]), R.load(run, "exact")
    assert info["name"] == "basis4" and rep.a.shape == (TINY.n_train, 4) and rep.b.shape[0] == 4
    _, names = basis.images(8, run.seed)
    assert names[2].startswith("rotated") and names[4].startswith("average") and names[7] == "noise"
    # the file names its images; a plain test digit's column of A is that digit's exact attribution
    assert rep.info["images"] == names[:4] and basis.digit_columns(rep) == [0, 1, 3]
    x0 = basis.images(1, run.seed)[0]
    from engine.attribution import attribute
    want0, _ = attribute(run, x0)
    assert np.linalg.norm(rep.a[:, 0] - want0[0]) / np.linalg.norm(want0[0]) <= 1e-4
    parts = R.folder(run) / "basis4.parts"
    with np.load(parts / "grad_0001.npz") as f:
        g = f["g"]  # the BPD gradient of basis image 3 (chunks of 3: images 0-2, then 3)
    # a basis image's own query is (nearly) exact: its gradient lies in the basis (ridge 1e-4)
    want = exact.scores(g)
    assert np.linalg.norm(rep.scores(g) - want) / np.linalg.norm(want) <= 1e-3
    # a query outside the basis keeps its projection only: the error is its part outside the span
    q = _random_queries(run, 1, seed=5).numpy()
    assert np.linalg.norm(rep.scores(q) - exact.scores(q)) / np.linalg.norm(exact.scores(q)) > 0.1
    # resume: a lost gradient chunk is recomputed, and only it
    (parts / "grad_0001.npz").unlink()
    (R.folder(run) / "basis4.npz").unlink()
    stages = []
    build.precompute(run, method="basis", rank=4, chunk=3, callback=lambda i: stages.append((i["stage"], i["i"])))
    assert stages == [("gradients", 1), ("gradients", 2), ("reverse", 2)]
    np.testing.assert_allclose(R.load(run, "basis4").a, rep.a, rtol=1e-5, atol=1e-7 * np.abs(rep.a).max())


def test_a_reverse_chunk_killed_mid_replay_resumes_from_its_sweep_state(run):
    build.precompute(run, method="basis", rank=4, chunk=3)
    parts = R.folder(run) / "basis4.parts"
    with np.load(parts / "rev_0001.npz") as f:
        want, want_s = f["v"], float(f["seconds"])
    with np.load(parts / "grad_0001.npz") as f:
        adj = flat_to_dicts(torch.from_numpy(f["g"]), run.load_final().model_params)
    # the chunk's job killed in the middle of its replay: its sweep state is on disk
    (parts / "rev_0001.npz").unlink()
    (R.folder(run) / "basis4.npz").unlink()
    from engine.metagrad import resume_path
    sweep = resume_path(parts / "rev_0001.npz")

    def kill(info):
        if info["i"] == TINY.steps // 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        metagradient(run, data.load_train(TINY.n_train)[0], adj, resume=sweep, callback=kill)
    with np.load(sweep) as f:
        state = {k: f[k] for k in f.files}
    assert 0 < int(state["done"]) < TINY.steps
    # mark the state (the job runs in another process): the chunk's seconds add the state's own
    # only when the job resumes from it
    np.savez(sweep, **{**state, "seconds": np.array(1e6)})
    build.precompute(run, method="basis", rank=4, chunk=3)
    with np.load(parts / "rev_0001.npz") as f:
        np.testing.assert_array_equal(f["v"], want)
        assert 1e6 < float(f["seconds"]) < 1e6 + want_s * 10
    assert not sweep.exists()  # the finished chunk's state is removed


def test_foreign_stale_or_damaged_representations_are_refused(run, tmp_path, capsys):
    src = R.folder(run) / "exact.npz"
    # another config (tiny, seed 1): its digest differs
    train.train(TINY, seed=1, out=tmp_path / "other")
    other = load_run(tmp_path / "other")
    R.folder(other).mkdir()
    shutil.copy(src, R.folder(other) / "exact.npz")
    with pytest.raises(UserError, match="another run or config"):
        R.load(other, "exact")
    assert cli.main(["attribute", "--run", str(other.path), "test:0", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not (tmp_path / "s.npz").exists()
    # the same config whose final weights changed since the precompute
    shutil.copytree(run.path, tmp_path / "copy", ignore=shutil.ignore_patterns("*.parts"))
    d = torch.load(tmp_path / "copy" / "final.pt", weights_only=True)
    d["params"] = {k: v + 1e-3 for k, v in d["params"].items()}
    torch.save(d, tmp_path / "copy" / "final.pt")
    with pytest.raises(UserError, match="other final weights"):
        R.load(load_run(tmp_path / "copy"), "exact")
    # a truncated file
    blob = src.read_bytes()
    (R.folder(other) / "exact.npz").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(UserError, match="corrupt"):
        R.load(other, "exact")
    # bad arguments
    for kw in ({"method": "nope"}, {"method": "lowrank", "rank": 0}, {"method": "lowrank", "rank": 10**6},
               {"method": "basis", "rank": 2, "init": "queries"}):
        with pytest.raises(UserError):
            build.precompute(run, **kw)


def _rounded_copy(run, dest, rel: float):
    """A copy of the run whose final weights moved by `rel` (relative, entry by entry): what another
    CPU's float rounding does to the same training (measured on `cpu`, AVX-512 against AVX2:
    3.7e-7 relative L2) when rel is small, another training when it is large."""
    shutil.copytree(run.path, dest, ignore=shutil.ignore_patterns("*.parts", "*.verified.json"))
    d = torch.load(dest / "final.pt", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    d["params"] = {k: v * (1 + rel * torch.randn(v.shape, generator=gen)) for k, v in d["params"].items()}
    torch.save(d, dest / "final.pt")
    return load_run(dest)


def test_a_query_basis_from_another_cpu_is_checked_by_its_query_gradient(run, tmp_path, monkeypatch):
    # the same training rounded by another CPU has another weights checksum; a query basis holds its
    # images' gradients, so the first is recomputed under the run's weights and compared
    import engine.bpd
    build.precompute(run, method="basis", rank=4, chunk=3)
    want = R.load(run, "basis4")
    assert want.info["verified"] == "the run's weights checksum"
    near = _rounded_copy(run, tmp_path / "near", 4e-7)
    assert R.weights_checksum(near.load_final().model_params) != R.weights_checksum(run.load_final().model_params)
    got = R.load(near, "basis4")
    assert got.info["verified"].startswith("made on another kind of CPU")
    np.testing.assert_array_equal(got.a, want.a)
    memo = json.loads((R.folder(near) / "basis4.verified.json").read_text())
    assert 0 < memo["relative_l2"] <= R.GRADIENT_TOL / 10 and memo["image"] == want.info["images"][0]
    # kept: the next load recomputes nothing
    monkeypatch.setattr(engine.bpd, "run_bpd", lambda *a, **k: pytest.fail("recomputed a checked gradient"))
    assert R.load(near, "basis4").info["verified"] == got.info["verified"]
    monkeypatch.undo()
    # representations that hold no query gradients cannot be checked that way: refused as before
    with pytest.raises(UserError, match="other final weights"):
        R.load(near, "exact")
    # another training (weights 1e-2 apart) is refused, and stays refused
    far = _rounded_copy(run, tmp_path / "far", 1e-2)
    for _ in range(2):
        with pytest.raises(UserError, match="other final weights"):
            R.load(far, "basis4")
    assert json.loads((R.folder(far) / "basis4.verified.json").read_text())["relative_l2"] > R.GRADIENT_TOL


def test_the_default_representation_and_names_by_init(tmp_path):
    # exact first; else a query basis (highest K); else the highest rank, at equal rank the random
    # basis; a queries-initialised range finder has its own name (never overwrites a random one's chunks)
    from types import SimpleNamespace
    from engine.precompute import representation as R
    run = SimpleNamespace(path=tmp_path)
    folder = R.folder(run)
    folder.mkdir()
    assert R.default(run) is None
    for names, want in ((["lowrank8", "lowrank16-queries"], "lowrank16-queries"),
                        (["lowrank16"], "lowrank16"), (["lowrank32-queries"], "lowrank32-queries"),
                        (["basis8"], "basis8"), (["basis4"], "basis8"), (["exact"], "exact")):
        for n in names:
            (folder / f"{n}.npz").write_bytes(b"")
        assert R.default(run) == want


def test_cached_scores_follow_the_representation_they_came_from(tmp_path):
    # compare's cached scores (engine.experiments.lds) carry the method's cache_key: scores made from
    # one representation are recomputed when the run's default representation becomes another
    from types import SimpleNamespace
    from engine import methods
    from engine.experiments import lds
    from engine.methods.base import Scores
    run = SimpleNamespace(path=tmp_path, digest="d" * 64)
    R.folder(run).mkdir()
    m = methods.get("magic_precomputed")
    calls = []

    class Counting(type(m)):
        def prepare(self, run, callback=None):
            pass

        def score(self, run, x, callback=None):
            calls.append(R.default(run))
            return Scores(np.full((len(x), 3), float(len(calls))))

    method, x = Counting(), torch.zeros(2, 1, 28, 28)
    (R.folder(run) / "lowrank64.npz").write_bytes(b"range finder")
    first = lds.method_scores(run, tmp_path / "out", method, [0, 1], x)["scores"]
    again = lds.method_scores(run, tmp_path / "out", method, [0, 1], x)["scores"]
    (R.folder(run) / "basis64.npz").write_bytes(b"query basis")       # now the default
    third = lds.method_scores(run, tmp_path / "out", method, [0, 1], x)["scores"]
    (R.folder(run) / "basis64.npz").write_bytes(b"query basis, remade")  # same name, new content
    fourth = lds.method_scores(run, tmp_path / "out", method, [0, 1], x)["scores"]
    assert calls == ["lowrank64", "basis64", "basis64"]
    np.testing.assert_array_equal(first, again)
    assert third[0, 0] == 2 and fourth[0, 0] == 3


def test_a_shipped_representation_is_installed_only_for_its_config(run, tmp_path, monkeypatch):
    # shipped/<preset>/ holds a representation made by `precompute --ship`; a fresh clone trains
    # the same config again, bit for bit, and the shipped file then passes every check at load
    from engine.precompute import shipped
    root = tmp_path / "shipped"
    assert shipped.ship(run, "exact", root) == root / "tiny" / "exact.npz"
    train.train(TINY, seed=0, out=tmp_path / "fresh")
    fresh = load_run(tmp_path / "fresh")
    assert shipped.install(fresh, root) == ["exact"]
    np.testing.assert_array_equal(R.load(fresh, "exact").b, R.load(run, "exact").b)
    assert shipped.install(fresh, root) == []  # it has one of that name now
    # `compare --method magic_precomputed` scores from the shipped file, not from a new precompute
    from engine import methods
    shutil.copytree(fresh.path, tmp_path / "fresh2", ignore=shutil.ignore_patterns("precomputed"))  # same weights, no training
    fresh2 = load_run(tmp_path / "fresh2")
    monkeypatch.setattr(shipped, "ROOT", root)
    methods.get("magic_precomputed").prepare(fresh2)
    assert R.available(fresh2) == ["exact"]
    # another config of the same preset (seed 1): left alone
    train.train(TINY, seed=1, out=tmp_path / "other")
    assert shipped.install(load_run(tmp_path / "other"), root) == [] and not R.available(load_run(tmp_path / "other"))
    # a damaged run representation is never shipped
    (R.folder(fresh) / "exact.npz").write_bytes(b"half a file")
    with pytest.raises(UserError, match="corrupt"):
        shipped.ship(fresh, "exact", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_a_shipped_query_basis_is_half_the_bytes_and_installs_as_the_same_representation(run, tmp_path):
    # a query basis ships its images' query gradients in float16 (the repository's 20 MB): what a
    # fresh clone installs is the precompute's representation up to that rounding, checked as any
    from engine.precompute import shipped
    build.precompute(run, method="basis", rank=4, chunk=3)
    want = R.load(run, "basis4")
    root = tmp_path / "shipped"
    path = shipped.ship(run, "basis4", root)
    with np.load(path) as f:
        assert "b" not in f.files and f["ship_g16"].dtype == np.float16
    assert path.stat().st_size < 0.6 * (R.folder(run) / "basis4.npz").stat().st_size
    before = path.stat().st_mtime_ns
    shipped.ship(run, "basis4", root)
    assert path.stat().st_mtime_ns == before  # the same arrays: not rewritten

    def fresh(name):
        shutil.copytree(run.path, tmp_path / name, ignore=shutil.ignore_patterns("precomputed"))
        return load_run(tmp_path / name)
    clone = fresh("clone")
    assert shipped.install(clone, root) == ["basis4"]
    got = R.load(clone, "basis4")
    assert got.info["verified"] == "the run's weights checksum"
    # the installed copy is marked: shipping it back changes nothing, and it is never taken for the precompute's
    with np.load(R.folder(clone) / "basis4.npz") as installed, np.load(R.folder(run) / "basis4.npz") as own:
        assert shipped.installed_from_shipped(dict(installed)) and not shipped.installed_from_shipped(dict(own))
    assert shipped.ship(clone, "basis4", root) == path and path.stat().st_mtime_ns == before
    np.testing.assert_array_equal(got.a, want.a)
    gram = lambda r: r.extra["gram"] @ r.b.astype(np.float64)  # noqa: E731  (G = M B, the basis's gradients)
    rel = np.linalg.norm(gram(got) - gram(want), axis=1) / np.linalg.norm(gram(want), axis=1)
    assert (rel > 0).any() and (rel < 5e-4).all()  # float16: 2^-11 per entry
    g = np.concatenate([_random_queries(run, 3, 1).double().numpy(), gram(want)[:2]])  # outside and in the span
    s_want, s_got = want.scores(g), got.scores(g)
    assert (np.linalg.norm(s_got - s_want, axis=1) / np.linalg.norm(s_want, axis=1) < 1e-3).all()
    # a shipped basis that cannot be decoded is installed as it is and refused at load with one line
    with np.load(path) as f:
        d = {k: f[k] for k in f.files if k != "ship_scale"}
    np.savez(path, **d)
    broken = fresh("broken")
    assert shipped.install(broken, root) == ["basis4"]
    with pytest.raises(UserError, match="corrupt"):
        R.load(broken, "basis4")


def test_the_fidelity_study_reuses_a_banks_exact_magic_only_for_this_run_and_these_images(run, tmp_path):
    # experiments/precompute_fidelity.py --exact-from: the test digits a bank already scored with
    # MAGIC on this run are not replayed again; their BPD gradients are recomputed and their BPDs
    # must agree with the file's, so scores of other images or other weights are refused
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    from precompute_fidelity import reused_exact
    from engine import methods
    test_x, _ = data.load_test()
    qs = [5768, 3960]
    s = methods.get("magic").score(run, test_x[qs])  # what `compare` keeps in scores/magic.npz

    def bank_file(digest=run.digest, bpd=s.bpd):
        f = tmp_path / "magic.npz"
        np.savez(f, scores=s.scores, bpd=np.asarray(bpd), run_digest=np.array(digest), queries=np.array(qs))
        return f
    names = ["test:3960", "drawn 1", "test:5768"]
    x = torch.stack([test_x[3960], torch.zeros(1, 28, 28), test_x[5768]])
    got = reused_exact(run, names, x, bank_file())
    assert got["index"] == [0, 2]  # the drawn digit is not in the bank: replayed by the study
    np.testing.assert_array_equal(got["grad_w"], np.asarray(s.scores)[[1, 0]])
    # the BPD gradients are those of these images, in this order: through the exact J (checked
    # against the replay above) they give the bank's MAGIC scores of the same names
    want = np.asarray(s.scores)[[1, 0]]
    assert np.linalg.norm(R.load(run, "exact").scores(got["g"]) - want) / np.linalg.norm(want) <= 1e-4
    with pytest.raises(UserError, match="not on this run"):
        reused_exact(run, names, x, bank_file(digest="0" * 64))
    with pytest.raises(UserError, match="BPDs differ"):  # scores of other images under these names
        reused_exact(run, names[2:], x[2:], bank_file(bpd=np.asarray(s.bpd) + 0.01))  # one digit: one gradient
    (tmp_path / "damaged.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match="not a readable MAGIC scores file"):
        reused_exact(run, names, x, tmp_path / "damaged.npz")


def test_the_fidelity_study_replays_only_the_queries_its_files_lack(run, tmp_path, monkeypatch):
    # experiments/precompute_fidelity.py keeps each batched replay in RUN/fidelity/exact*.npz: a
    # query added to the study is replayed alone, the others are read back, and the result equals
    # one replay of all of them; a file's query is used only for the same pixels under its name
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    from precompute_fidelity import exact
    from engine import metagrad
    test_x, _ = data.load_test()
    names, x = ["test:11", "test:12", "test:13"], test_x[[11, 12, 13]]
    whole = exact(run, names, x, tmp_path / "whole")
    assert whole["batches"] == 1
    work = tmp_path / "work"
    first = exact(run, names[:2], x[:2], work)
    replayed, real = [], metagrad.metagradient
    monkeypatch.setattr(metagrad, "metagradient",
                        lambda r, imgs, grads, **kw: replayed.append(len(grads)) or real(r, imgs, grads, **kw))
    both = exact(run, names, x, work)
    assert replayed == [1] and both["batches"] == 2 and len(list(work.glob("exact*.npz"))) == 2
    np.testing.assert_array_equal(both["grad_w"][:2], first["grad_w"])
    for k in ("grad_w", "bpd", "g"):
        np.testing.assert_allclose(both[k], whole[k], rtol=1e-4, atol=1e-6 * np.abs(whole[k]).max())
    assert abs(both["seconds"] - float(first["seconds"]) - float(exact(run, names[2:], x[2:], work)["seconds"])) < 1e-9
    replayed.clear()
    assert exact(run, names, x, work)["batches"] == 2 and replayed == []  # everything read back
    # other pixels under the same names (the drawings redrawn): all three replayed again
    other = exact(run, names, x.flip(-1), work)
    assert replayed == [3] and not np.allclose(other["grad_w"], whole["grad_w"])
    # a damaged file is skipped: its query is replayed, nothing else
    replayed.clear()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "exact.npz").write_bytes(b"PK\x03\x04 not a zip")
    exact(run, names[:1], x[:1], damaged)
    assert replayed == [1]
