"""The app as a visitor meets it on a fresh clone: `make app`'s training, the server's start, then
drawings whose influences must appear on their own. Driven by headless Chromium (Playwright)
against `streamlit run`.

    python benchmarks/bench_app_browser.py [--preset cpu] [--run DIR] [--strokes 3] [--uploads 2]
        [--picks 5] [--out results/bench_app_browser.txt] [--shots results/app] [--no-exact]

Without --run it does what `make app` does on a fresh clone, after the install: trains the preset
into an empty folder (`python -m engine train`, timed), then serves the app on it with its defaults
(the shipped representation installed at start and checked against the new weights; the galleries
computed in the background). With --run it serves a copy of that run without its representations.
Then: seconds from the end of each stroke on the canvas until the new drawing's top proponents and
opponents are on the page (each stroke makes a new image), which computation made them (the
caption), seconds from the last stroke until the exact replay's first partial sum refines the
preview and until the exact replay has replaced it (on a fresh start, beside the galleries' computation
unless they are shipped for the run, as for the default) and how much CPU the server process itself
used meanwhile (in cores: CPU seconds per second; its workers not counted), and the browser, and seconds from each upload of an unseen test digit until its bits/dim is on the page
(then one upload again: a memo hit), and seconds from picking the last of --picks test digits,
typed into the Draw page's index box one a second as a visitor clicking through them would, until
that digit's influences are on the page (influences count as on the page once the whole page shows
that image: no section left over from the previous one, every picture loaded, not just the captions);
screenshots of every page go to --shots, each taken once the page has settled so. Ratios are against
the engine's own BPD with its gradient in this process (the floor of a precomputed attribution).
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

TOP = re.compile(r"Top 16 proponents \(removing them")


def engine_seconds(run_dir: str, x) -> tuple[float, float]:
    """(seconds, bits/dim) of one image's exact BPD with its gradient in this process."""
    from engine.bpd import run_bpd
    from engine.store import load_run
    run = load_run(run_dir)
    t0 = time.perf_counter()
    b, _ = run_bpd(run, x[None], grad=True)
    return time.perf_counter() - t0, float(b[0])


def _bpd(run_dir: str, x) -> float:
    from engine.bpd import run_bpd
    from engine.store import load_run
    return float(run_bpd(load_run(run_dir), x[None])[0][0])


def _stroke(page, i: int) -> None:
    """The i-th stroke of a drawing: a '7' first, then a crossbar, then a foot."""
    box = page.locator("canvas.upper-canvas").first.bounding_box()
    x0, y0 = box["x"], box["y"]
    paths = [[(70 + 7 * j, 60) for j in range(21)] + [(210 - 4 * j, 60 + 7 * j) for j in range(1, 26)],
             [(110 + 6 * j, 150) for j in range(15)],
             [(90 + 5 * j, 235) for j in range(12)]]
    pts = paths[i % len(paths)]
    page.mouse.move(x0 + pts[0][0], y0 + pts[0][1])
    page.mouse.down()
    for x, y in pts[1:]:
        page.mouse.move(x0 + x, y0 + y, steps=2)
    page.mouse.up()


def _top_text(page) -> str:
    loc = page.get_by_text(TOP)
    return loc.first.inner_text() if loc.count() else ""


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (NaN where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _browser_cpu_seconds() -> float:
    """CPU seconds used so far by every Chromium process alive now (the headless browser's)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text.split("(", 1)[1].startswith("chromium)"):
            total += _cpu_seconds(int(stat.parent.name))
    return total


def _made_by(page) -> str:
    """The computation the Draw page names for the influences it shows, from the line above them
    ("A preview from the precomputed replay basis64", "Exact MAGIC: this image's own replay of training")."""
    return re.split(r" \(|\. ", re.sub(r", computed in [0-9.]+ s", "", _headline(page)))[0].rstrip(".")


def _headline(page) -> str:
    """The Draw page's one line above the lists, saying what they are."""
    # the caption's whole text (its bold opening is an element of its own, which get_by_text would find)
    return page.get_by_test_id("stCaptionContainer").filter(
        has_text=re.compile(r"^(A preview|The preview refined|Exact MAGIC)")).first.inner_text()


def _fresh(page, text) -> bool:
    """Whether `text` is on the page in an element of the current script run (Streamlit leaves the
    previous run's elements up, marked stale, until the new run replaces or drops them)."""
    loc = page.get_by_text(text)
    return any(loc.nth(k).evaluate("e => e.closest('[data-stale]')?.getAttribute('data-stale') === 'false'")
               for k in range(loc.count()))


def _settled(page, timeout: float = 120.0) -> None:
    """Wait until the page shows one script run whole: no element left over from the previous run
    (Streamlit keeps those up, marked stale, until the new run rewrites or drops them: the top of a
    page can be the new image's while its lower sections are still the last one's) and every image
    showing its current picture (a rerun's text comes at once and its pictures after; until one has
    loaded, Chromium keeps the picture the element had before, under the new caption)."""
    t = time.perf_counter()
    while not page.evaluate("() => !document.querySelector('[data-stale=\"true\"]')"
                            " && Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"):
        if time.perf_counter() - t > timeout:
            raise RuntimeError(f"the page still updating {timeout:.0f} s later")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--run", help="serve a copy of this finished run instead of training the preset afresh")
    ap.add_argument("--strokes", type=int, default=3)
    ap.add_argument("--uploads", type=int, default=2)
    ap.add_argument("--first-index", type=int, default=4321)
    ap.add_argument("--picks", type=int, default=5, help="test digits picked one a second on the Draw page")
    ap.add_argument("--out")
    ap.add_argument("--shots", default="results/app")
    ap.add_argument("--no-exact", dest="exact", action="store_false",
                    help="do not wait for the last drawing's exact replay (it runs beside the galleries)")
    a = ap.parse_args()
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from engine import data, images, provenance
    from engine.errors import UserError
    from engine.presets import get_preset
    from engine.store import load_run
    # checked before a browser or server starts: one line for an unknown preset or a missing run
    get_preset(a.preset)
    if a.run:
        load_run(a.run)
    if min(a.strokes, a.uploads, a.picks) < 0:
        raise UserError("--strokes, --uploads and --picks must be 0 or more")
    provenance.start()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    tmp = Path(tempfile.mkdtemp())
    run_dir = tmp / "run"
    rows = []
    t0 = time.perf_counter()
    if a.run:
        shutil.copytree(a.run, run_dir, ignore=shutil.ignore_patterns("precomputed", "fidelity", "methods"))
        train_s = None
    else:  # make app's first command on a fresh clone
        subprocess.run([sys.executable, "-m", "engine", "train", "--preset", a.preset, "--out", str(run_dir)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        train_s = time.perf_counter() - t0
        rows.append(("training the model (make app's first step)", f"{train_s:7.1f}"))
    test_x = data.load_test()[0]
    idx = [a.first_index + 7 * i for i in range(a.uploads)]
    pngs, want, eng = [], [], []
    for i in idx:  # the BPD to wait for on the page (no gradient here: it is timed after the browser session)
        pngs.append(tmp / f"test_{i}.png")
        Image.fromarray((test_x[i][0].numpy() * 255).round().astype(np.uint8)).save(pngs[-1])
        want.append(_bpd(str(run_dir), images.preprocess_image(pngs[-1].read_bytes(), pngs[-1].name)))
    setup_s = time.perf_counter() - t0 - (train_s or 0.0)  # not part of a fresh start: left out of its total
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "APP_RUN": str(run_dir), "APP_CACHE": str(tmp / "cache")}
    t_serve = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=open(tmp / "streamlit.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    shots = Path(a.shots)
    shots.mkdir(parents=True, exist_ok=True)
    made_by = []
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 2800})  # tall: streamlit scrolls inside the page
            page.set_default_timeout(600_000)
            page.goto(url)
            page.locator("canvas.upper-canvas").first.wait_for()
            rows.append(("server start until the canvas is on the page", f"{time.perf_counter() - t_serve:7.1f}"))
            first = None
            for i in range(a.strokes):
                old = _top_text(page)
                _stroke(page, i)
                t1 = time.perf_counter()
                while True:  # the new drawing's lists: a different 'Top 16 proponents' line
                    now = _top_text(page)
                    if now and now != old:
                        break
                    if time.perf_counter() - t1 > 900:
                        page.screenshot(path=str(tmp / "timeout.png"), full_page=True)
                        raise RuntimeError(f"no influences 900 s after stroke {i + 1} (screenshot: {tmp / 'timeout.png'})")
                    time.sleep(0.1)
                _settled(page)  # the influences are on the page when the whole page is this drawing's
                dt = time.perf_counter() - t1
                first = first if first is not None else time.perf_counter() - t0 - setup_s
                cap = _headline(page)
                made_by.append(_made_by(page))
                rows.append((f"stroke {i + 1}: end of stroke until its influences", f"{dt:7.1f}"))
                took = re.search(r"computed in ([0-9.]+) s", cap)  # the job's own time, in its worker
                if took:
                    rows.append((f"stroke {i + 1}: of which computing, in the app's worker", f"{float(took[1]):7.1f}"))
                print(f"stroke {i + 1}: {dt:.1f} s ({made_by[-1]}; computing {took[1] if took else '?'} s)", flush=True)
                if i == 0:
                    page.screenshot(path=str(shots / "1_draw_influences.png"), full_page=True)
            if a.strokes and a.exact:  # progressive: the last drawing's exact replay replaces its preview
                cpu0, browser0 = _cpu_seconds(proc.pid), _browser_cpu_seconds()
                # on the way: the preview refined by the replay's first partial sum (5% of its steps)
                page.get_by_text("The preview refined by the exact replay").first.wait_for(timeout=1_800_000)
                rows.append(("last stroke: until the replay's first partial sum refines it",
                             f"{time.perf_counter() - t1:7.1f}"))
                _settled(page)
                page.screenshot(path=str(shots / "1a_draw_refined.png"), full_page=True)
                page.get_by_text(re.compile(r"^Exact MAGIC.* It changed")).first.wait_for(timeout=1_800_000)
                dt = time.perf_counter() - t1
                rows.append(("last stroke: until the exact replay replaces its preview", f"{dt:7.1f}"))
                # the server process itself (not its workers) while the page shows the replay's progress
                rows.append(("  the server's own CPU meanwhile, in cores", f"{(_cpu_seconds(proc.pid) - cpu0) / dt:7.3f}"))
                rows.append(("  the browser's CPU meanwhile, in cores", f"{(_browser_cpu_seconds() - browser0) / dt:7.3f}"))
                print(f"exact replay in place {dt:.1f} s after the last stroke", flush=True)
                _settled(page)
                page.screenshot(path=str(shots / "1b_draw_exact.png"), full_page=True)
            if first is not None:
                rows.append(((("start of training" if train_s is not None else "server start")
                              + " until the first drawing's influences"), f"{first:7.1f}"))
            page.get_by_text("Upload", exact=True).click()
            times = []
            for f, v in zip(pngs + pngs[:1], want + want[:1]):
                t1 = time.perf_counter()
                page.locator('input[type="file"]').set_input_files(str(f))
                page.get_by_text(f"{v:.3f} bits/dim").wait_for()
                times.append(time.perf_counter() - t1)
            for j, (i, t) in enumerate(zip(idx, times)):
                rows.append((f"upload {j + 1} (test {i}): until its bits/dim", f"{t:7.1f}"))
            if times:
                rows.append(("upload 1 again (memo hit)", f"{times[-1]:7.2f}"))
            t1 = time.perf_counter()  # the last upload's influences (a memo hit), as a visitor sees them
            while pngs and not _fresh(page, TOP):
                if time.perf_counter() - t1 > 900:
                    raise RuntimeError("no influences 900 s after the last upload")
                time.sleep(0.1)
            _settled(page)
            page.screenshot(path=str(shots / "2_upload.png"), full_page=True)
            if a.picks:  # a visitor clicking through test digits: only the last one's influences are wanted
                page.get_by_text("MNIST test image", exact=True).click()
                box = page.get_by_label("Test image index (0-9999)")
                picks = [a.first_index + 1000 + 7 * j for j in range(a.picks)]  # digits no other stage asked for
                for j, i in enumerate(picks):
                    if j:
                        time.sleep(1.0)
                    box.fill(str(i))
                    box.press("Enter")
                t1 = time.perf_counter()
                while not (_fresh(page, f"MNIST test image {picks[-1]}: a") and _fresh(page, TOP)):
                    if time.perf_counter() - t1 > 900:
                        raise RuntimeError(f"no influences 900 s after picking test digit {picks[-1]}")
                    time.sleep(0.1)
                _settled(page)
                dt = time.perf_counter() - t1
                made_by.append(_made_by(page))
                rows.append((f"{a.picks} test digits picked 1 s apart: the last one until its influences", f"{dt:7.1f}"))
                print(f"picks: the last digit's influences {dt:.1f} s after it was picked", flush=True)
            for k, name in enumerate(["Compare likelihoods", "Galleries", "Verify"]):
                page.get_by_role("link", name=name).click()
                page.get_by_role("heading", name=re.compile(name.split()[0])).first.wait_for()
                time.sleep(8)  # what a visitor sees after a few seconds (the galleries may still be computing)
                _settled(page)
                page.screenshot(path=str(shots / f"{3 + k}_{name.split()[0].lower()}.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    for f in pngs:  # the engine's own time for what the page computes, alone on the machine now
        eng.append(engine_seconds(str(run_dir), images.preprocess_image(f.read_bytes(), f.name))[0])
    strokes = [float(v) for label, v in rows if label.endswith("until its influences")]
    worker = [float(v) for label, v in rows if label.endswith("in the app's worker")]
    if eng:  # timed on the uploads' test digits: none with --uploads 0
        e = float(np.mean(eng[1:] if len(eng) > 1 else eng))  # the first call pays one-time costs
        rows.append(("engine alone: BPD with its gradient, in-process", f"{e:7.1f}"))
        if strokes:
            rows.append(("app / engine (strokes, mean)", f"{np.mean(strokes) / e:7.2f}x"))
        if worker:  # how much of that is the computation itself slowed (a browser on the same cores) or the page
            rows.append(("app's worker / engine (strokes, mean)", f"{np.mean(worker) / e:7.2f}x"))
    lines = [provenance.header(),
             f"# the {a.preset} preset " + ("trained afresh" if not a.run else f"from a copy of {a.run}")
             + f"; influences made by: {', '.join(sorted(set(made_by))) or 'none'}; seconds",
             f"# measured on {provenance.machine()}"]
    lines += [f"{label:58s}{value}" for label, value in rows]
    from engine import atomic
    atomic.print_report(lines, a.out)


if __name__ == "__main__":
    from engine.errors import run_script
    run_script(main)
