"""One device policy for every process that trains, replays or computes a likelihood.

The preset decides the device (a CUDA preset falls back to the CPU where there is no GPU) and
the dtype; `setup` also turns on deterministic kernels for that device. Every entry point that
touches the model goes through here (engine.training, engine.metagrad, engine.bpd), so a fresh
process that replays a stored segment uses the same kernels as the one that trained it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

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


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit
_allocator_tuned = False


def tune_allocator() -> bool:
    """Keep freed tensor memory in this process's heap instead of returning it to the kernel.

    On the CPU, PyTorch takes every tensor from malloc, and glibc serves blocks above its mmap
    threshold (128 KiB at first, raised as blocks are freed) with a fresh mmap that free()
    unmaps, and trims the heap's top back to the kernel (8 vmapped adjoints' activations are tens
    of MB on `cpu`): each replay step then page-faults its working set in again, zeroed by the
    kernel (measured: ~90,000 faults/s per replay process on `cpu`, 13% of its CPU time in the
    kernel). Raising the mmap threshold to its ceiling and never trimming the heap makes 6-15x
    fewer faults (test); the 8-query pullback is 1.06x (`cpu`, 1 thread) to 1.08-1.17x (`small`,
    2 threads) faster in one process (results/bench_pullback*.txt), and 690-711 ms against
    781-905 ms on `cpu` across fresh processes. It is what PyTorch's CPU tuning guide gets from
    jemalloc/tcmalloc, without a preload. The arithmetic is unchanged (PyTorch aligns its CPU
    buffers to 64 bytes either way), so results are bit for bit those of the default allocator.
    glibc only; elsewhere, and when the user set any MALLOC_*_ variable, it does nothing.
    Returns whether it applied the settings.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 << 20)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _allocator_tuned = ok
    return ok


def setup(preset: Preset) -> torch.device:
    """Resolve the preset's device and make this process deterministic on it; returns the device."""
    dev = resolve(preset)
    set_deterministic(dev)
    tune_allocator()
    return dev


def default_jobs(preset: Preset) -> int:
    """Worker processes for independent jobs (retrains, query chunks): one per core on the CPU,
    one per GPU on a GPU (several processes sharing one GPU only queue on it)."""
    if resolve(preset).type == "cuda":
        return max(1, torch.cuda.device_count())
    return max(1, os.cpu_count() or 1)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a timer read after
    it measures the work; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
