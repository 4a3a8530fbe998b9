import math
import sys
import warnings

import pytest
import torch

from engine import sde

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")

_MAIN = sys.modules["__main__"]


@pytest.fixture(autouse=True)
def _restore_main():
    """AppTest leaves the app script installed as __main__; a process spawned later (a test's
    own multiprocessing) would re-import it and run the app in the child."""
    yield
    sys.modules["__main__"] = _MAIN


class GaussianData:
    """Data x ~ N(mu, diag(S^2)): under the VE SDE p_t = N(mu, diag(S^2 + s(t)^2)), so the score,
    the probability-flow map and the likelihood our ODE computes are all closed form."""

    def __init__(self, mu: torch.Tensor, log_s: torch.Tensor):
        self.mu, self.log_s = mu, log_s  # (D,) each

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        var = torch.exp(2 * self.log_s)[None] + sde.marginal_std(t)[:, None] ** 2
        return (-(x.reshape(x.shape[0], -1) - self.mu) / var).reshape(x.shape)

    def ode_log_likelihood(self, x: torch.Tensor, eps: float = sde.EPS) -> torch.Tensor:
        """log N(x(1); 0, s(1)^2 I) + log|det dx(1)/dx(eps)|: what the PF-ODE computes, exactly.
        The flow map is x(t) - mu = (x - mu) sqrt((S^2 + s(t)^2) / (S^2 + s(eps)^2))."""
        s2 = torch.exp(2 * self.log_s)
        one = torch.tensor(1.0, dtype=x.dtype)
        r = torch.sqrt((s2 + sde.marginal_std(one) ** 2) / (s2 + sde.marginal_std(one * eps) ** 2))
        x1 = self.mu + (x.reshape(x.shape[0], -1) - self.mu) * r
        return sde.prior_logp(x1) + torch.log(r).sum()

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        return self.mu + torch.exp(self.log_s) * torch.randn(n, self.mu.numel(), generator=g, dtype=self.mu.dtype)


@pytest.fixture
def gaussian():
    g = torch.Generator().manual_seed(0)
    d = 64
    mu = 0.5 * torch.rand(d, generator=g, dtype=torch.float64)
    log_s = torch.log(0.05 + 0.25 * torch.rand(d, generator=g, dtype=torch.float64))
    return GaussianData(mu, log_s)


BITS = 1 / (64 * math.log(2))


@pytest.fixture(scope="session")
def app_run(tmp_path_factory):
    """A finished `tiny` run and an empty memo for the app; the app's environment points at them."""
    import os
    from engine import training as train
    from engine.presets import PRESETS
    from engine.store import load_run
    from webapp import service
    root = tmp_path_factory.mktemp("app")
    train.train(PRESETS["tiny"], seed=0, out=root / "run")
    env = {"APP_RUN": str(root / "run"), "APP_CACHE": str(root / "cache"), "APP_PRESET": "tiny",
           "APP_GALLERY_QUERIES": "2", "APP_PRECOMPUTE_RANK": "0", "APP_SHIPPED": str(root / "shipped")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    service.jobs.cache_clear()
    service.warm_workers.cache_clear()
    yield load_run(root / "run")
    service.jobs().wait_all(900)  # no torch work may outlive the session
    service.jobs().shutdown()  # the worker processes
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    service.jobs.cache_clear()
    service.warm_workers.cache_clear()


@pytest.fixture(scope="session")
def tiny_figure2(tmp_path_factory):
    """A `tiny` run (seed 0) and its Figure 2 reports on 2 test digits and on 2 of its training
    digits, made once for every test that reads one (each costs 8 BPDs): (run, {"test": report
    dict, "train": ...}, {"test": folder, "train": ...})."""
    from engine import training as train
    from engine.experiments import figure2
    from engine.presets import PRESETS
    from engine.store import load_run
    root = tmp_path_factory.mktemp("figure2")
    train.train(PRESETS["tiny"], seed=0, out=root / "run")
    run = load_run(root / "run")
    folders = {im: root / im for im in ("test", "train")}
    reports = {im: figure2.run_figure2(run, folders[im], n=2, images=im) for im in folders}
    return run, reports, folders
