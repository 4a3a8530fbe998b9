"""A new image's bits/dim as a user sees it: the app served by `streamlit run`, driven by
headless Chromium (Playwright), against the engine's own BPD time in this process.

    python benchmarks/bench_app_browser.py [--run runs/cpu] [--n 3] [--out results/bench_app_browser.txt]

Uploads n PNGs of test digits the cache has never seen, one after another, and times each from
the upload until its bits/dim is on the page; then uploads the first again (a memo hit). The
server starts with an empty cache and without the gallery precompute, so nothing else competes.
Unlike benchmarks/bench_app.py (AppTest, which reruns the whole page on every poll), only the
progress fragment reruns here, as in a real browser.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BPD = re.compile(r"[0-9.]+ bits/dim: the model would need")


def engine_seconds(run_dir: str, x) -> float:
    """The exact BPD of one image, in this process on all cores: the floor for the app."""
    import torch
    from engine.likelihood import bits_per_dim
    from engine.store import load_run
    run = load_run(run_dir)
    model, p = run.model(), run.preset
    t0 = time.perf_counter()
    with torch.no_grad():
        bits_per_dim(model, x[None], **p.likelihood_kwargs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--first-index", type=int, default=4321)
    ap.add_argument("--out")
    a = ap.parse_args()
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from engine import data
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    tmp = Path(tempfile.mkdtemp())
    test_x = data.load_test()[0]
    idx = [a.first_index + 7 * i for i in range(a.n)]
    pngs = []
    for i in idx:
        pngs.append(tmp / f"test_{i}.png")
        Image.fromarray((test_x[i][0].numpy() * 255).round().astype(np.uint8)).save(pngs[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "APP_RUN": a.run, "APP_CACHE": str(tmp / "cache"), "APP_PRECOMPUTE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=open(tmp / "streamlit.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    times = []
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.get_by_role("heading", name="Draw & attribute").wait_for()
            page.get_by_text("Upload", exact=True).click()
            time.sleep(5)  # let the server finish starting its worker processes
            for f in pngs + pngs[:1]:
                had = page.get_by_text(BPD).count() > 0
                t0 = time.perf_counter()
                page.locator('input[type="file"]').set_input_files(str(f))
                if had:
                    page.get_by_text(BPD).wait_for(state="detached")
                page.get_by_text(BPD).wait_for()
                times.append(time.perf_counter() - t0)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    eng = engine_seconds(a.run, data.preprocess_image(pngs[0].read_bytes(), pngs[0].name))  # as the app sees it
    lines = [f"# bench_app_browser: {a.run}, streamlit + headless Chromium, seconds from upload to bits/dim on the page"]
    lines += [f"new image {i + 1} (test {j})                 {t:7.2f}" for i, (j, t) in enumerate(zip(idx, times))]
    lines += [f"first image again (memo hit)           {times[-1]:7.2f}",
              f"engine alone, same image, in-process    {eng:7.2f}",
              f"app / engine (new images, mean)         {np.mean(times[:-1]) / eng:7.2f}x"]
    text = "\n".join(lines)
    print(text)
    if a.out:
        from engine import atomic
        atomic.save_text(text + "\n", Path(a.out))


if __name__ == "__main__":
    main()
