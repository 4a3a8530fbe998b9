"""MAGIC attribution scores: grad_w[i] = d BPD(x; theta_T(w)) / d w_i at w = 1.

Sign convention (DESIGN.md): removing a set S predicts BPD(1) - sum_{i in S} grad_w[i].
A proponent (makes x more likely; removing it raises the BPD) has grad_w[i] < 0; an
opponent (removing it lowers the BPD) has grad_w[i] > 0.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine import data
from engine.likelihood import bits_per_dim
from engine.metagrad import metagradient
from engine.store import Run


def bpd_and_param_grads(run: Run, x: torch.Tensor, callback: Optional[Callable[[dict], None]] = None
                        ) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    """Exact BPD of each query (Q, 1, 28, 28) and its gradient w.r.t. the final parameters."""
    model = run.model()
    p = run.preset
    names = [n for n, _ in model.named_parameters()]
    bpds, grads = [], []
    for i in range(len(x)):
        b = bits_per_dim(model, x[i: i + 1].to(p.torch_dtype), **p.likelihood_kwargs, callback=callback)
        g = torch.autograd.grad(b.sum(), list(model.parameters()), allow_unused=True)
        bpds.append(float(b.detach()))
        grads.append({n: (gi if gi is not None else torch.zeros_like(pi)).detach()
                      for n, gi, pi in zip(names, g, model.parameters())})
    return np.array(bpds), grads


def attribute(run: Run, x: torch.Tensor, callback: Optional[Callable[[dict], None]] = None, *,
              scheme: str = "sqrt", k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """grad_w (Q, n) and BPD (Q,) for queries x (Q, 1, 28, 28); all Q share one backward sweep.

    callback gets {"stage": "bpd"|"training", "i", "n"}; scheme and k go to engine.metagrad.
    """
    images, _ = data.load_train(run.preset.n_train, run.preset.source)
    bpd, qgrads = bpd_and_param_grads(run, x, callback=lambda i: callback and callback({"stage": "bpd", **i}))
    gw = metagradient(run, images, qgrads, scheme=scheme, k=k,
                      callback=lambda i: callback and callback({"stage": "training", **i}))
    return gw.numpy().astype(np.float64), bpd


def predict_removal(bpd: float, grad_w: np.ndarray, removed: Sequence[int]) -> float:
    """Predicted BPD after training without `removed`: BPD(1) - sum_{i in S} grad_w[i]."""
    return float(bpd - grad_w[np.asarray(removed, dtype=np.int64)].sum())


def top_k(grad_w: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Indices of the k strongest proponents (most negative grad_w) and opponents (most positive)."""
    order = np.argsort(grad_w, kind="stable")
    return {"proponents": order[:k], "opponents": order[::-1][:k]}
