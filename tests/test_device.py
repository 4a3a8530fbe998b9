"""One device policy (engine.device) for every process that trains, replays or computes a BPD:
each entry point asks it, so a fresh `attribute` or `lds` process uses the run's device and
deterministic kernels, and a GPU run gets one worker per GPU rather than one per CPU core."""

import dataclasses

import torch

from engine import bpd as B, data, device, training as train
from engine.metagrad import metagradient
from engine.presets import PRESETS
from engine.store import load_run

TINY = dataclasses.replace(PRESETS["tiny"], steps=4)


def test_every_entry_point_asks_the_device_policy(tmp_path, monkeypatch):
    train.train(TINY, seed=0, out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    asked = []
    real = device.set_deterministic
    monkeypatch.setattr(device, "set_deterministic", lambda dev: (asked.append(str(dev)), real(dev)))
    x = data.load_test()[0][:1]
    run.model()
    assert asked == ["cpu"], "loading the run's model must set the device policy up"
    _, grads = B.bpd(run.preset, run.seed, run.load_final().params, x, grad=True)
    n = len(asked)
    assert n >= 2
    metagradient(run, data.load_train(TINY.n_train)[0], grads)
    assert len(asked) > n, "a replay in a fresh process must set the device policy up"
    train.train(TINY, seed=1, out=tmp_path / "other")
    assert len(asked) > n + 1, "training must set the device policy up"


def test_a_gpu_preset_gets_one_worker_per_gpu_and_falls_back_to_the_cpu(monkeypatch):
    gpu = dataclasses.replace(TINY, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device.resolve(gpu).type == "cuda"
    assert device.default_jobs(gpu) == 1  # not one process per CPU core queueing on one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve(gpu).type == "cpu"
    assert device.default_jobs(gpu) == max(1, __import__("os").cpu_count() or 1)
