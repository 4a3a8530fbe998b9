"""A moving average of the iterates as the model's weights (Preset.ema): the running average is
the closed-form weighted sum, survives a resume bit for bit, and the metagradient and the
forward tangents carry it exactly (against unrolled autograd; against float64 retraining in
test_metagrad.py)."""

import dataclasses

import pytest
import torch

from engine import data, training as train
from engine.errors import UserError
from engine.metagrad import metagradient
from engine.precompute.tangents import flatten, forward_tangents
from engine.presets import PRESETS, digest
from engine.store import load_run

EMA = dataclasses.replace(PRESETS["tiny"], ema=0.8)


def test_ema_enters_the_config_only_when_used():
    base = PRESETS["small"]  # a preset that uses neither
    assert "ema" not in base.to_dict()  # runs made before the field keep their digest
    assert "positional" not in base.to_dict()  # the same for the positional maps
    assert digest(dataclasses.replace(base, positional=3.0).to_dict()) != digest(base.to_dict())
    assert dataclasses.replace(base, ema=0.9).to_dict()["ema"] == 0.9
    assert digest(dataclasses.replace(base, ema=0.9).to_dict()) != digest(base.to_dict())
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match="ema must be in"):
            dataclasses.replace(base, ema=bad)
    c = EMA.ema_weights()
    assert c.shape == (EMA.steps,) and abs(c.sum().item() - 1) < 1e-12 and c[-1] == c.max()
    assert PRESETS["tiny"].ema_weights().tolist() == [0.0] * (EMA.steps - 1) + [1.0]


def test_running_average_equals_the_weighted_sum_of_iterates():
    images, _ = data.load_train(EMA.n_train)
    w = torch.ones(EMA.n_train)
    model = train.make_model(EMA, 0)
    s = train.init_state(model, ema=True)
    iterates = []
    for _ in range(EMA.steps):
        s = train.train_step(model, s, images, w, 0, EMA)[0]
        iterates.append(s.params)
    c = EMA.ema_weights()
    for n in s.params:
        want = sum(c[k].item() * iterates[k][n].double() for k in range(EMA.steps))
        torch.testing.assert_close(s.ema[n].double(), want, rtol=1e-5, atol=1e-6)
    final = train.train(EMA, seed=0)
    assert all(torch.equal(final.ema[n], s.ema[n]) for n in s.ema)
    assert final.model_params is final.ema


def test_resume_keeps_the_average_bit_for_bit(tmp_path):
    whole = train.train(EMA, seed=0, out=tmp_path / "a")
    (tmp_path / "a" / "final.pt").unlink()  # resumes from the last stored state
    resumed = train.train(EMA, seed=0, out=tmp_path / "a")
    assert all(torch.equal(whole.ema[n], resumed.ema[n]) for n in whole.ema)
    assert torch.equal(flatten(load_run(tmp_path / "a").load_final().model_params), flatten(whole.ema))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    train.train(EMA, seed=0, out=out)
    return load_run(out)


def _query(run, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in run.load_final().model_params.items()}


def test_metagradient_equals_unrolled_autograd_through_the_average(run):
    images, _ = data.load_train(EMA.n_train)
    c_q = _query(run, 0)
    got = metagradient(run, images, [c_q])[0]
    both = metagradient(run, images, [c_q, _query(run, 1)])[0]  # the vmapped pullback
    w = torch.ones(EMA.n_train, requires_grad=True)
    model = train.make_model(EMA, 0)
    s = train.init_state(model)
    s.params = {n: p.requires_grad_(True) for n, p in s.params.items()}
    c, phi = EMA.ema_weights(), 0.0
    for k in range(EMA.steps):
        s, _ = train.train_step(model, s, images, w, 0, EMA, create_graph=True)
        phi = phi + c[k].item() * sum((c_q[n] * s.params[n]).sum() for n in c_q)
    want = torch.autograd.grad(phi, w, retain_graph=True)[0]
    assert ((got - want).norm() / want.norm()).item() <= 1e-4
    assert ((both - want).norm() / want.norm()).item() <= 1e-4
    # the average is not the last iterate: its metagradient differs 50x beyond the tolerance
    # above (measured 1.1%: the learning rate decays to 0, so the last iterates are close)
    last = torch.autograd.grad(sum((c_q[n] * s.params[n]).sum() for n in c_q), w)[0]
    assert ((last - want).norm() / want.norm()).item() >= 5e-3


def test_forward_tangents_are_the_transpose_of_the_metagradient(run):
    images, _ = data.load_train(EMA.n_train)
    q = _query(run, 2)
    omega = torch.randn(2, EMA.n_train, generator=torch.Generator().manual_seed(3))
    jw = forward_tangents(run, images, omega)  # (2, P): J omega
    lhs = jw @ flatten(q)
    rhs = omega @ metagradient(run, images, [q])[0]
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-5)
