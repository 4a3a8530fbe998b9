"""One device policy for every process that trains, replays or computes a likelihood.

The preset decides the device (a CUDA preset falls back to the CPU where there is no GPU) and
the dtype; `setup` also turns on deterministic kernels for that device. Every entry point that
touches the model goes through here (engine.training, engine.metagrad, engine.bpd), so a fresh
process that replays a stored segment uses the same kernels as the one that trained it.
"""

from __future__ import annotations

import os

import torch

from engine.presets import Preset


def resolve(preset: Preset) -> torch.device:
    """The preset's device; a CUDA preset falls back to the CPU where there is no GPU."""
    return torch.device(preset.device if preset.device != "cuda" or torch.cuda.is_available() else "cpu")


def set_deterministic(device: torch.device | str) -> None:
    """fp32 everywhere (TF32 off) and deterministic kernels: bit-identical reruns on one machine."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if str(device).startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


def setup(preset: Preset) -> torch.device:
    """Resolve the preset's device and make this process deterministic on it; returns the device."""
    dev = resolve(preset)
    set_deterministic(dev)
    return dev


def default_jobs(preset: Preset) -> int:
    """Worker processes for independent jobs (retrains, query chunks): one per core on the CPU,
    one per GPU on a GPU (several processes sharing one GPU only queue on it)."""
    if resolve(preset).type == "cuda":
        return max(1, torch.cuda.device_count())
    return max(1, os.cpu_count() or 1)
