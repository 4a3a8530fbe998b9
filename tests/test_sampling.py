"""Samplers against Gaussian data, whose exact score makes the target distribution known."""

import pytest
import torch

from engine import sde
from engine.sampling import sample


# pc at a small signal-to-noise ratio: unadjusted Langevin inflates the variance of the narrowest
# directions by about 1 / (1 - e / 2v) for a step e, which at the default snr 0.16 is 18% in the
# std of this anisotropic Gaussian's narrowest pixel (measured); at 0.02 it is 6%, within the
# tolerance, while a corrector that steps against the score gives 45%
@pytest.mark.parametrize("method,steps,kw", [("sde", 400, {}), ("pc", 200, {"snr": 0.02}), ("ode", 24, {})])
def test_samplers_reproduce_gaussian_data(gaussian, method, steps, kw):
    score = lambda x, t: gaussian.score(x.double(), t.double()).float()  # noqa: E731
    x = sample(score, (4000, 1, 8, 8), method=method, n_steps=steps, seed=0, **kw).double().reshape(4000, -1)
    want_std = torch.sqrt(torch.exp(2 * gaussian.log_s) + sde.marginal_std(torch.tensor(sde.EPS, dtype=torch.float64)) ** 2)
    # 4000 samples: standard errors are std/63 for the mean and std/89 for the std.
    assert ((x.mean(0) - gaussian.mu).abs() / want_std).max() < 0.07
    assert ((x.std(0) / want_std) - 1).abs().max() < 0.08


def test_sampling_is_seeded(gaussian):
    score = lambda x, t: gaussian.score(x.double(), t.double()).float()  # noqa: E731
    a = sample(score, (3, 1, 8, 8), n_steps=50, seed=1)
    b = sample(score, (3, 1, 8, 8), n_steps=50, seed=1)
    c = sample(score, (3, 1, 8, 8), n_steps=50, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_app_samples_with_the_run_s_own_noise_scale(tmp_path):
    # A run trained with another sigma and t_eps than the engine's defaults: the app's "Generate a
    # sample" must draw the same digit as `python -m engine sample` (which takes both from the
    # run's preset), not one integrated on the default noise scale.
    import dataclasses

    from engine import data, training
    from engine.presets import PRESETS
    from engine.store import load_run
    from webapp.service import _sample
    preset = dataclasses.replace(PRESETS["tiny"], sigma=10.0, t_eps=1e-3)
    training.train(preset, seed=0, out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    want = sample(run.model(), (1, 1, 28, 28), method="ode", seed=3, sigma=10.0, eps=1e-3)
    got = _sample(run, 3, lambda d: None)["x"]
    assert got.shape == (1, 28, 28)
    assert torch.equal(torch.from_numpy(got), data.quantize(want.clamp(0, 1))[0])
