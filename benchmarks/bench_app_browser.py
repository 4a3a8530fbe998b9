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


def engine_seconds(run_dir: str, x) -> tuple[float, float]:
    """(seconds, bits/dim) of one image's exact BPD in this process on all cores."""
    import torch
    from engine.likelihood import bits_per_dim
    from engine.store import load_run
    run = load_run(run_dir)
    model, p = run.model(), run.preset
    t0 = time.perf_counter()
    with torch.no_grad():
        v = float(bits_per_dim(model, x[None], **p.likelihood_kwargs)[0])
    return time.perf_counter() - t0, v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/cpu")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--first-index", type=int, default=4321)
    ap.add_argument("--out")
    a = ap.parse_args()
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from engine import data, images
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    tmp = Path(tempfile.mkdtemp())
    test_x = data.load_test()[0]
    idx = [a.first_index + 7 * i for i in range(a.n)]
    pngs = []
    for i in idx:
        pngs.append(tmp / f"test_{i}.png")
        Image.fromarray((test_x[i][0].numpy() * 255).round().astype(np.uint8)).save(pngs[-1])
    # The engine's own BPD of each image, as the app preprocesses it: the value to wait for on the
    # page, and the floor for the app's latency (measured before the server starts).
    eng, want = [], []
    for f in pngs:
        t, v = engine_seconds(a.run, images.preprocess_image(f.read_bytes(), f.name))
        eng.append(t)
        want.append(v)
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
            for f, v in zip(pngs + pngs[:1], want + want[:1]):
                t0 = time.perf_counter()
                page.locator('input[type="file"]').set_input_files(str(f))
                # The value itself identifies this image's result (the previous image's text
                # may stay on the page while the new one is computed).
                try:
                    page.get_by_text(f"{v:.3f} bits/dim").wait_for()
                except Exception:
                    page.screenshot(path=str(tmp / "timeout.png"), full_page=True)
                    raise RuntimeError(f"no bits/dim for {f.name} (screenshot: {tmp / 'timeout.png'})")
                times.append(time.perf_counter() - t0)
                print(f"{f.name}: {times[-1]:.2f} s", flush=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    eng = float(np.mean(eng[1:] if len(eng) > 1 else eng))  # the first call pays one-time costs
    lines = [f"# bench_app_browser: {a.run}, streamlit + headless Chromium, seconds from upload to bits/dim on the page"]
    rows = [(f"new image {i + 1} (test {j})", f"{t:7.2f}") for i, (j, t) in enumerate(zip(idx, times))]
    rows += [("first image again (memo hit)", f"{times[-1]:7.2f}"),
             ("engine alone, mean per image, in-process", f"{eng:7.2f}"),
             ("app / engine (new images, mean)", f"{np.mean(times[:-1]) / eng:7.2f}x")]
    lines += [f"{label:42s}{value}" for label, value in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        from engine import atomic
        atomic.save_text(text + "\n", Path(a.out))


if __name__ == "__main__":
    main()
