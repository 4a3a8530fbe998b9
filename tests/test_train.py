"""Training is a pure, replayable function of (seed, weights); runs resume bit-identically."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from engine import store, training as train
from engine.errors import UserError
from engine.presets import PRESETS

TINY = PRESETS["tiny"]


def _equal(a: train.TrainState, b: train.TrainState) -> bool:
    return all(torch.equal(a.params[n], b.params[n]) and torch.equal(a.m[n], b.m[n]) and torch.equal(a.v[n], b.v[n])
               for n in a.params)


def test_same_seed_bit_identical_other_seed_or_zero_weight_different():
    a = train.train(TINY, seed=0)
    b = train.train(TINY, seed=0)
    assert _equal(a, b)
    c = train.train(TINY, seed=1)
    assert not any(torch.equal(a.params[n], c.params[n]) for n in a.params if a.params[n].numel() > 1)
    w = np.ones(TINY.n_train, dtype=np.float32)
    w[3] = 0.0
    d = train.train(TINY, seed=0, weights=w)
    assert not _equal(a, d)


def test_zero_weight_means_the_example_never_touches_training():
    # Replacing a dropped example's pixels must not change anything: weight 0 is removal.
    from engine import data
    images, _ = data.load_train(TINY.n_train)
    w = np.ones(TINY.n_train, dtype=np.float32)
    w[5] = 0.0
    a = train.train(TINY, seed=0, weights=w, images=images)
    other = images.clone()
    other[5] = torch.rand(1, 28, 28)
    b = train.train(TINY, seed=0, weights=w, images=other)
    assert _equal(a, b)


def test_batches_cover_each_epoch_once_and_noise_is_per_step():
    n, bs = TINY.n_train, TINY.batch_size
    seen = torch.cat([train.batch_indices(k, 0, n, bs) for k in range(n // bs)])
    assert sorted(seen.tolist()) == list(range(n))
    assert not torch.equal(train.step_noise(0, 0, 4, 1e-5)[1], train.step_noise(1, 0, 4, 1e-5)[1])
    assert torch.equal(train.step_noise(7, 3, 4, 1e-5)[1], train.step_noise(7, 3, 4, 1e-5)[1])


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [train.lr_at(k, TINY) for k in range(TINY.steps)]
    peak = int(np.argmax(lrs))
    assert all(np.diff(lrs[: peak + 1]) > 0) and all(np.diff(lrs[peak:]) < 0)
    assert lrs[peak] == pytest.approx(TINY.lr) and 0 < lrs[-1] < TINY.lr / 10


def test_interrupted_run_resumes_bit_identical(tmp_path):
    full = train.train(TINY, seed=0, out=tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_at_13(info):
        if info["step"] == 13:
            raise Stop

    with pytest.raises(Stop):
        train.train(TINY, seed=0, out=tmp_path / "cut", callback=stop_at_13)
    assert not (tmp_path / "cut" / "final.pt").exists()
    with pytest.raises(UserError, match="unfinished"):
        store.load_run(tmp_path / "cut")
    resumed = train.train(TINY, seed=0, out=tmp_path / "cut")
    assert _equal(full, resumed)
    run = store.load_run(tmp_path / "cut")
    assert run.losses() == store.load_run(tmp_path / "full").losses()
    assert run.checkpoint_steps() == list(range(0, TINY.steps, TINY.ckpt_every))
    assert _equal(run.load_final(), full)


def test_stored_checkpoints_replay_to_the_final_state(tmp_path):
    final = train.train(TINY, seed=0, out=tmp_path / "r")
    run = store.load_run(tmp_path / "r")
    from engine import data
    images, _ = data.load_train(TINY.n_train)
    state, _ = run.load_checkpoint(run.checkpoint_steps()[-1])
    model = train.make_model(TINY, 0)
    while state.step < TINY.steps:
        state, _ = train.train_step(model, state, images, torch.ones(TINY.n_train), 0, TINY)
    assert _equal(state, final)


def test_a_fresh_process_replays_a_stored_segment_bit_for_bit(tmp_path):
    # the metagradient's replay and the precompute's jobs run in other processes than training
    import subprocess
    import sys
    from pathlib import Path
    train.train(TINY, seed=0, out=tmp_path / "r")
    run = store.load_run(tmp_path / "r")
    start, end = run.checkpoint_steps()[1:3]
    out = subprocess.run([sys.executable, "-m", "engine.replay_check", str(run.path), str(start), str(end)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "bit-identical"


def test_run_directory_of_another_config_is_refused(tmp_path):
    train.train(TINY, seed=0, out=tmp_path / "r")
    with pytest.raises(UserError, match=r"another config \(preset tiny with seed 0, not 1\)"):
        train.train(TINY, seed=1, out=tmp_path / "r")
    # a preset whose settings changed since the run was made (a new version's default) says which
    with pytest.raises(UserError, match=r"\(preset tiny with steps 24, not 30\); choose another --out"):
        train.train(dataclasses.replace(TINY, steps=30), seed=0, out=tmp_path / "r")
    # a checkpoint copied in from another config is detected too
    train.train(TINY, seed=2, out=tmp_path / "s")
    shutil.copy(tmp_path / "s" / "final.pt", tmp_path / "r" / "final.pt")
    with pytest.raises(UserError, match="another config"):
        store.load_run(tmp_path / "r")


def test_bad_weights_are_refused():
    for w, msg in [(np.ones(3), "shape"), (np.full(TINY.n_train, np.nan), "finite"), (-np.ones(TINY.n_train), ">= 0")]:
        with pytest.raises(UserError, match=msg):
            train.train(TINY, seed=0, weights=w)


def test_a_variant_of_a_preset_is_labelled_with_what_differs():
    import dataclasses
    from engine.presets import PRESETS, label
    cpu = PRESETS["cpu"]
    assert label(cpu) == "`cpu`"
    assert label(dataclasses.replace(cpu, steps=1234, lr=1e-3)) == "`cpu` with steps=1234, lr=0.001"
    assert label(dataclasses.replace(cpu, name="mine")) == "`mine` (not a named preset)"


def test_positional_from_is_in_the_config_only_when_used():
    # runs made before positional_from existed keep their digest; a later level is another config
    from engine.presets import digest
    cpu = PRESETS["cpu"]
    assert "positional_from" not in cpu.to_dict()
    coarse = dataclasses.replace(cpu, positional_from=2)
    assert coarse.to_dict()["positional_from"] == 2 and digest(coarse.to_dict()) != digest(cpu.to_dict())
    with pytest.raises(UserError, match="positional_from"):
        dataclasses.replace(cpu, positional_from=3)  # cpu has 3 levels, 0 to 2
    with pytest.raises(UserError, match="needs positional maps"):
        dataclasses.replace(cpu, positional=0.0, positional_from=1)  # the same net as no maps, another digest
