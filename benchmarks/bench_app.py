"""App latency on a real model, through Streamlit's AppTest (the script as the server runs it).

    python benchmarks/bench_app.py [--run runs/cpu] [--index 1234]

1. a new image (an MNIST test digit not seen before, empty memo): seconds from the first page
   run until its bits/dim is on the page (the BPD runs in a background job; the page polls it);
2. the same image again in a fresh session: seconds of one page run, now from the memo;
3. a cached page with influences: the Draw page on an image whose attribution is memoized
   (a stand-in score vector, so no attribution is computed here).
The background gallery precompute is off (APP_PRECOMPUTE=0) so that nothing else competes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--index", type=int, default=1234)
    ap.add_argument("--out", help="also write the table here, with the command and commit that made it")
    a = ap.parse_args()
    from engine import provenance
    from engine.errors import UserError
    from engine.store import load_run
    load_run(a.run)  # a missing or broken run: one line here, not the app training one under the benchmark
    if not 0 <= a.index < 10000:
        raise UserError(f"--index must be a test digit, 0..9999, got {a.index}")
    provenance.start()  # the code that runs is the checkout now, not when the table is written
    tmp = tempfile.mkdtemp()
    os.environ.update({"APP_RUN": a.run, "APP_CACHE": tmp, "APP_PRECOMPUTE": "0"})
    from streamlit.testing.v1 import AppTest
    from webapp import service

    def session():
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        at.radio(key="source").set_value("MNIST test image").run()
        return at

    def shown(at):
        return any("bits/dim**" in m.value for m in at.markdown)

    import torch
    run = service.load_run()
    x = service.test_set()[0][a.index]

    def quiet():
        # with an approximate representation the page also starts the exact replay (minutes) once
        # the preview is shown: stopped, so that it does not compete with the next measurement
        service.jobs().cancel(service.replay_key(run, torch.from_numpy(x)))

    at = session()
    t0 = time.perf_counter()
    at.number_input(key="test_index").set_value(a.index).run()
    while not shown(at):
        time.sleep(1.0)  # the page's own progress fragment reruns once a second
        at.run()
    new = time.perf_counter() - t0
    quiet()
    at = session()
    at.number_input(key="test_index").set_value(a.index)
    t0 = time.perf_counter()
    at.run()
    cached = time.perf_counter() - t0
    assert shown(at)
    quiet()
    rep, _ = service.precomputed(run)  # the representation the page answers from, if any
    service.jobs().memo.set(service.attribution_key(run, torch.from_numpy(x)),
                            {"grad_w": np.random.default_rng(0).normal(size=run.preset.n_train), "bpd": 4.0,
                             "method": f"precomputed:{rep}" if rep else "replay"})
    at = session()
    at.number_input(key="test_index").set_value(a.index)
    t0 = time.perf_counter()
    at.run()
    gal = time.perf_counter() - t0
    assert any("Top 16 proponents" in m.value for m in at.markdown)
    quiet()
    service.jobs().shutdown()  # the worker processes
    lines = [f"bench_app: {a.run} ({run.preset.name}, {run.preset.steps} steps, digest {run.digest[:12]}, "
             f"representation {rep or 'none'}), AppTest, seconds",
             f"new image, until its bits/dim is shown      {new:7.2f}",
             f"same image, fresh session (memo hit)        {cached:7.2f}",
             f"memoized image with its influences          {gal:7.2f}"]
    print("\n".join(lines))
    if a.out:
        provenance.save_table(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
