"""The one door to a model's likelihood: the exact BPD of queries, and on request its gradient
with respect to the final parameters.

Every caller (the CLI, the attribution, LDS references and retrains, Figure 2, the baselines,
the app) goes through `bpd`, which owns the device and determinism (engine.device), the dtype
(the preset's) and the batching (one image per likelihood call, all of its tangents in as few
network calls as engine.likelihood's default batches allow: batching images only added memory
traffic when measured on 2 CPU cores; see engine.likelihood.TANGENT_BATCH).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from engine import device as devices
from engine.likelihood import bits_per_dim, bits_per_dim_and_grad
from engine.presets import Preset
from engine.training import make_model


def model_for(preset: Preset, seed: int, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The preset's score network with `params`, on the preset's device, in eval mode."""
    dev = devices.setup(preset)
    m = make_model(preset, seed)
    m.load_state_dict({k: v.detach().cpu() for k, v in params.items()}, strict=True)
    return m.to(dev).eval()


def bpd(preset: Preset, seed: int, params: dict[str, torch.Tensor], x: torch.Tensor, *, grad: bool = False,
        callback: Optional[Callable[[dict], None]] = None
        ) -> tuple[np.ndarray, Optional[list[dict[str, torch.Tensor]]]]:
    """Exact BPD of queries under the model (preset, seed, params).

    Args:
        x: (Q, 1, 28, 28) images in [0, 1].
        grad: also return each query's d BPD / d theta (a dict by parameter name, on the CPU).
        callback: gets {"query": j, "i", "n"} after each ODE function evaluation of query j.
    Returns:
        bpd (Q,) float64, and the Q gradient dicts (None unless grad).
    """
    model = model_for(preset, seed, params)
    dev = next(model.parameters()).device
    names = [n for n, _ in model.named_parameters()]
    out, grads = [], [] if grad else None
    for j in range(len(x)):
        cb = None if callback is None else (lambda info, j=j: callback({"query": j, **info}))
        xj = x[j: j + 1].to(dev, preset.torch_dtype)
        if grad:
            # two phases, no checkpoint recomputation (engine.likelihood.log_likelihood_and_grad)
            b, g = bits_per_dim_and_grad(model, xj, list(model.parameters()), **preset.likelihood_kwargs, callback=cb)
            grads.append({n: gi.detach().cpu() for n, gi in zip(names, g)})
        else:
            with torch.no_grad():
                b = bits_per_dim(model, xj, **preset.likelihood_kwargs, callback=cb)
        out.append(float(b.detach()[0]))
    return np.array(out, dtype=np.float64), grads


def run_bpd(run, x: torch.Tensor, **kwargs) -> tuple[np.ndarray, Optional[list[dict[str, torch.Tensor]]]]:
    """`bpd` under a finished run's final model (engine.store.Run)."""
    return bpd(run.preset, run.seed, run.load_final().model_params, x, **kwargs)
