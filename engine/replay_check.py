"""Does a fresh process replay a stored segment of a run bit for bit? (the device policy's check)

    python -m engine.replay_check RUN START END    -> prints "bit-identical" or "DIFFERENT", exit 0/1

Loads the stored state before step START, replays training to step END under engine.device's
settings, and compares every tensor of (theta, m, v), and of the moving average if the run keeps
one, with the stored state before END. The metagradient's replay and the precompute's jobs run
in other processes than training, on the same kernels only if this holds.
"""

from __future__ import annotations

import sys

import torch


def replays_bit_for_bit(run_path: str, start: int, end: int) -> bool:
    from engine import data, device, store, training
    run = store.load_run(run_path)
    p = run.preset
    dev = device.setup(p)
    state = run.load_checkpoint(start)[0].map(lambda x: x.to(dev))
    images = data.load_train(p.n_train, p.source)[0].to(dev, p.torch_dtype)
    w = torch.from_numpy(run.weights()).to(dev, p.torch_dtype)
    model = training.make_model(p, run.seed).to(dev)
    while state.step < end:
        state = training.train_step(model, state, images, w, run.seed, p)[0]
    want = run.load_checkpoint(end)[0]
    pairs = ((state.params, want.params), (state.m, want.m), (state.v, want.v))
    if want.ema is not None:
        pairs += ((state.ema, want.ema),)
    return all(torch.equal(a.cpu(), b) for got, exp in pairs for a, b in zip(got.values(), exp.values()))


if __name__ == "__main__":
    ok = replays_bit_for_bit(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print("bit-identical" if ok else "DIFFERENT")
    sys.exit(0 if ok else 1)
