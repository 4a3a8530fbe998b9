"""The TRAK family on the diffusion model, through the `traker` package.

TRAK (Park et al. 2023) scores training example i for a target x by

    tau_i = phi_i^T (Phi^T Phi + lambda I)^{-1} phi_x,     phi = P^T grad_theta f / sqrt(p),

where f is an output function, P a (p, k) Gaussian projection and Phi the (n, k) matrix of the
training examples' features, all at the final parameters. With the Gauss-Newton Hessian
Phi^T Phi, influence-function reasoning gives d f(x)/d w_i ~ -tau_i when f is the training
loss; so in grad_w's sign convention (a proponent lowers the BPD: negative score) every variant
here returns -tau. Only ranks matter for the LDS: traker rescales (Phi^T Phi + lambda I)^{-1} by
its mean absolute entry, so the scores' magnitude is not a BPD change.

Variants (training-example feature / target feature):
  trak   denoising loss / denoising loss, each averaged over S fixed (t, z) draws with t evenly
         spaced in [t_eps, 1] (the loss-based TRAK "at several timesteps" of the diffusion papers)
  dtrak  ||s(t) score||^2 / the same (D-TRAK's squared-norm output; Zheng et al. 2023)
  ltrak  denoising loss / the exact BPD (likelihood-TRAK: the target MAGIC differentiates,
         without the training dynamics)

traker computes the per-example gradients (torch.func), the projection (its CPU
BasicProjector), the kernel and the scores. Two small adapters are ours: the damping lambda is
set relative to the kernel's mean non-zero eigenvalue once the features exist (an absolute
lambda would depend on the preset's gradient scale), and ltrak's target gradients come from
engine.likelihood through a precomputed-gradient computer (the exact BPD runs forward-mode
derivatives in checkpoints, which torch.func.grad under vmap cannot wrap).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.func import functional_call

from engine import sde
from engine.store import Run

VARIANTS = ("trak", "dtrak", "ltrak")


def fixed_draws(n: int, n_times: int, t_eps: float, seed: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Times t (S,) evenly spaced in [t_eps, 1] and noise z (n, S, 1, 28, 28), fixed by (seed, stream)."""
    t = t_eps + (1 - t_eps) * (torch.arange(n_times, dtype=torch.float32) + 0.5) / n_times
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 17, stream]).generate_state(1)[0]))
    return t, torch.randn(n, n_times, 1, 28, 28, generator=g)


def _output_class():
    from trak.modelout_functions import AbstractModelOutput

    class DiffusionOutput(AbstractModelOutput):
        """f(x) = mean over the fixed draws of the denoising loss ("loss") or of ||s(t) score||^2 ("sqnorm")."""

        def __init__(self, kind: str, t: torch.Tensor) -> None:
            self.kind, self.t = kind, t

        def get_output(self, model, weights, buffers, x, z):  # under vmap: x (1, 28, 28), z (S, 1, 28, 28)
            std = sde.marginal_std(self.t, model.sigma)[:, None, None, None]
            out = std * functional_call(model, (weights, buffers), (x[None] + std * z, self.t))
            return ((out + z if self.kind == "loss" else out) ** 2).sum((1, 2, 3)).mean()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)  # the output is the loss itself: Q = 1

    return DiffusionOutput


def _precomputed_class():
    from trak.gradient_computers import AbstractGradientComputer

    class Precomputed(AbstractGradientComputer):
        """Hands traker per-target gradients computed elsewhere; the batch is (indices,)."""

        def __init__(self, grads: torch.Tensor) -> None:
            self.grads = grads

        def load_model_params(self, model) -> None:
            pass

        def compute_per_sample_grad(self, batch):
            return self.grads[batch[0]]

        def compute_loss_grad(self, batch):
            return torch.ones(len(batch[0]), 1)

    return Precomputed


def trak_scores(run: Run, images: torch.Tensor, x: torch.Tensor, variant: str = "trak", *,
                proj_dim: int = 2048, n_times: int = 10, damping: float = 0.01, batch: int = 50,
                target_grads: Optional[torch.Tensor] = None, target_stream: int = 1,
                ensemble: Sequence[torch.nn.Module] = (),
                callback: Optional[Callable[[dict], None]] = None) -> np.ndarray:
    """Scores (Q, n) in grad_w's sign convention for queries x (Q, 1, 28, 28) against the
    training images (n, 1, 28, 28), on the run's final model (and `ensemble`'s).

    ensemble: further models of the same architecture trained independently on the same
    images (other seeds); traker featurizes and scores each and averages, as TRAK's authors do.

    proj_dim: k, the projection's dimension; n_times: S, draws of (t, z) per image;
    damping: lambda as a fraction of the mean non-zero eigenvalue of Phi^T Phi;
    target_grads: (Q, p) gradients of the target output for "ltrak" (default: exact BPD);
    target_stream: the noise stream of the targets' draws (0 gives target q the draws of
    training image q: a training image then scores itself exactly as it was featurized).
    callback gets {"stage": "features", "i", "n"} per batch of training images (and model).
    """
    from trak import TRAKer
    import trak.traker as _tt
    if variant not in VARIANTS:
        raise ValueError(f"unknown TRAK variant {variant!r}")
    _tt.tqdm = lambda it, **kw: it  # traker's progress bars would interleave with ours
    cb = callback or (lambda info: None)
    model = run.model().eval()
    p = run.preset
    n, q = images.shape[0], x.shape[0]
    t, z_train = fixed_draws(n, n_times, p.t_eps, run.seed, 0)
    _, z_target = fixed_draws(q, n_times, p.t_eps, run.seed, target_stream)
    task = _output_class()("sqnorm" if variant == "dtrak" else "loss", t)
    if variant == "ltrak" and target_grads is None:
        target_grads = bpd_param_grads(run, x)
    models = [model, *(m.eval() for m in ensemble)]
    if variant == "ltrak" and len(models) > 1:
        raise ValueError("ltrak's target gradients are one model's; it has no ensemble here")
    with tempfile.TemporaryDirectory(prefix="trak-") as tmp:
        tr = TRAKer(model=model, task=task, train_set_size=n, save_dir=tmp, device="cpu", proj_dim=proj_dim,
                    use_half_precision=False, projector_seed=run.seed, logging_level=logging.WARNING)
        scale = 0.0
        for m_id, m in enumerate(models):
            tr.load_checkpoint(m.state_dict(), model_id=m_id)
            for s in range(0, n, batch):
                e = min(n, s + batch)
                tr.featurize(batch=(images[s:e].float(), z_train[s:e]), num_samples=e - s)
                cb({"stage": "features", "i": m_id * n + e, "n": len(models) * n})
            feats = torch.as_tensor(np.asarray(tr.saver.current_store["grads"]), dtype=torch.float64)
            scale += float((feats ** 2).sum()) / len(models)
        # trace(Phi^T Phi) / rank, averaged over models: the mean non-zero eigenvalue, so
        # `damping` is scale-free
        tr.score_computer.lambda_reg = damping * scale / min(n, tr.proj_dim)
        tr.finalize_features()
        for m_id, m in enumerate(models):
            if tr.projector.num_blocks == 1:
                # traker 0.3.2 frees the projection matrix in finalize_features and regenerates it
                # only when there are several blocks (proj_dim > 100): rebuild it for scoring
                tr.projector.generate_sketch_matrix(tr.projector.generator_states[0])
            tr.start_scoring_checkpoint(exp_name="q", checkpoint=m.state_dict(), model_id=m_id, num_targets=q)
            if variant == "ltrak":
                tr.gradient_computer = _precomputed_class()(target_grads.float())
                tr.score(batch=(torch.arange(q),), num_samples=q)
            else:
                tr.score(batch=(x.float(), z_target), num_samples=q)
        tau = np.asarray(tr.finalize_scores(exp_name="q"), dtype=np.float64).T  # (Q, n)
    return -tau


def bpd_param_grads(run: Run, x: torch.Tensor, callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """(Q, p) gradients of each query's exact BPD w.r.t. the final parameters, flattened in
    named_parameters order (traker's order)."""
    from engine.bpd import run_bpd
    from engine.precompute.tangents import flatten
    _, grads = run_bpd(run, x, grad=True, callback=callback)
    return torch.stack([flatten(d) for d in grads])


def per_example_grads(run: Run, images: torch.Tensor, variant: str, n_times: int = 10, stream: int = 0) -> torch.Tensor:
    """(n, p) unprojected gradients of the variant's output function, by plain autograd one image
    at a time: the reference the tests compare traker's result with."""
    model = run.model().eval()
    p = run.preset
    t, z = fixed_draws(images.shape[0], n_times, p.t_eps, run.seed, stream)
    task = _output_class()("sqnorm" if variant == "dtrak" else "loss", t)
    params = dict(model.named_parameters())
    rows = []
    for i in range(images.shape[0]):
        f = task.get_output(model, params, dict(model.named_buffers()), images[i].float(), z[i])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, list(params.values()))]))
    return torch.stack(rows)


def exact_scores(g_train: torch.Tensor, g_target: torch.Tensor, damping: float = 0.01) -> np.ndarray:
    """The same formula without projection, in kernel form (Woodbury):
    -tau = -(G G^T + lambda I)^{-1} G g_x, lambda = damping * trace(G G^T) / min(n, p).
    g_train (n, p), g_target (Q, p) -> (Q, n)."""
    g = g_train.double()
    n, p = g.shape
    k = g @ g.T
    lam = damping * float(torch.trace(k)) / min(n, p)
    tau = torch.linalg.solve(k + lam * torch.eye(n, dtype=k.dtype), g @ g_target.double().T)  # (n, Q)
    return -tau.T.numpy()
