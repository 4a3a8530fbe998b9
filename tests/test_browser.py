"""End to end in real headless Chromium: the app served by `streamlit run`, driven by Playwright.

Draws a digit with mouse moves on the canvas and waits for its bits/dim and galleries, uploads
a PNG, uploads garbage (a clear error, the app still alive), and visits every page. Screenshots
go to artifacts/browser/. Needs Debian's `chromium` (installed by .ci/run); skipped without it
outside CI, failed without it in CI.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import data

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no chromium on this machine (apt-get install -y chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(env: dict, log) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on a free port with `env` added, once healthy: (process, URL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"the app did not become healthy in 60 s; see {log.name}")


@pytest.fixture(scope="module")
def server(app_run):
    """`streamlit run app.py` on a free port, with the test run and memo of conftest.app_run."""
    assert CHROMIUM, "chromium is missing: .ci/run installs it with apt-get install -y chromium"
    (ROOT / "artifacts").mkdir(exist_ok=True)
    log = open(ROOT / "artifacts" / "streamlit.log", "w")
    proc, url = _serve({}, log)
    yield url
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def page(server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(120_000)
        pg.goto(server)
        yield pg
        browser.close()


BPD = re.compile(r"[0-9.]+ bits/dim: the model would need")


def test_draw_a_digit_and_see_its_bits_per_dim_and_galleries(page):
    page.get_by_role("heading", name="Draw & attribute").wait_for()
    canvas = page.locator("canvas.upper-canvas").first  # fabric.js's event layer (components v2: no iframe)
    canvas.wait_for()
    box = canvas.bounding_box()
    x0, y0 = box["x"] + 70, box["y"] + 60  # a '7': a bar, then the diagonal
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x0 + 7 * i, y0, steps=2)
    for i in range(1, 26):
        page.mouse.move(x0 + 140 - 4 * i, y0 + 7 * i, steps=2)
    page.mouse.up()
    page.get_by_text(BPD).wait_for(timeout=180_000)
    page.screenshot(path=str(SHOTS / "1_drawing_bpd.png"), full_page=True)
    page.get_by_role("button", name=re.compile("Find them")).click()
    page.get_by_text(re.compile("Top 16 proponents")).wait_for(timeout=600_000)
    page.get_by_text(re.compile("Top 16 opponents")).wait_for()
    page.screenshot(path=str(SHOTS / "2_drawing_galleries.png"), full_page=True)


def test_upload_a_png_then_garbage(page, tmp_path):
    page.get_by_text("Upload", exact=True).click()
    x = data.load_test()[0][3][0].numpy()
    png = tmp_path / "three.png"
    Image.fromarray((x * 255).astype(np.uint8)).save(png)
    page.locator('input[type="file"]').set_input_files(str(png))
    page.get_by_text(BPD).wait_for(timeout=180_000)
    page.screenshot(path=str(SHOTS / "3_upload_bpd.png"), full_page=True)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x00\x01 this is not an image")
    page.locator('input[type="file"]').set_input_files(str(garbage))
    page.get_by_text(re.compile(r"garbage\.png: not an image")).wait_for()
    assert page.get_by_text("Traceback").count() == 0
    page.screenshot(path=str(SHOTS / "4_upload_garbage.png"), full_page=True)


def test_every_page_renders(page):
    for i, name in enumerate(["Compare likelihoods", "Galleries", "Verify", "Draw & attribute"]):
        page.get_by_role("link", name=name).click()
        page.get_by_role("heading", name=re.compile(name.split()[0])).first.wait_for()
        if name == "Compare likelihoods":
            page.get_by_text("bits/dim", exact=True).first.wait_for(timeout=180_000)  # the four metrics
        if name == "Galleries":
            page.get_by_text(re.compile("distinct images fill")).first.wait_for(timeout=600_000)
        assert page.get_by_text("Traceback").count() == 0
        page.screenshot(path=str(SHOTS / f"{5 + i}_{name.split()[0].lower()}.png"), full_page=True)


def test_a_link_straight_to_a_page_gets_the_router(page, server):
    """A bookmark or a reload of /galleries runs the router (app.py) first: its four titled pages
    in the sidebar and the model caption. (With the pages in a folder named `pages/`, Streamlit
    ran that file alone on such a link: the sidebar listed the files, app included, and nothing
    of the router ran.)"""
    for path, heading in [("galleries", "Galleries"), ("verify", "Verify"), ("likelihoods", "Compare likelihoods")]:
        page.goto(f"{server}/{path}")
        page.get_by_role("heading", name=heading).first.wait_for()
        page.get_by_text(re.compile(r"^Model: ")).first.wait_for(timeout=30_000)
        nav = page.get_by_test_id("stSidebarNav")
        for title in ("Draw & attribute", "Compare likelihoods", "Galleries", "Verify"):
            assert nav.get_by_role("link", name=title).count() == 1, (path, title)
        assert nav.get_by_role("link", name="app").count() == 0
    page.goto(server)


def _held_locks(cache: Path) -> list[Path]:
    """Memo key locks (cache.memo: flock on DIR/locks/*.lock) that some process holds now."""
    import fcntl
    held = []
    for p in sorted((cache / "locks").glob("*.lock")) if (cache / "locks").is_dir() else []:
        fd = os.open(p, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held.append(p)
        finally:
            os.close(fd)
    return held


def test_sigterm_stops_the_server_within_5_s_while_a_job_runs(app_run, page, tmp_path):
    # a real `streamlit run`, a browser's first visit starting the gallery precompute in a worker
    # process, SIGTERM while that job holds its memo key: the server must exit within 5 s, its
    # workers gone (the key free again), nothing of the job stored (it is computed again later)
    import signal
    cache = tmp_path / "cache"
    log = open(tmp_path / "streamlit.log", "w")
    proc, url = _serve({"APP_CACHE": str(cache), "APP_GALLERY_QUERIES": "16"}, log)
    try:
        ctx = page.context.browser.new_context()  # the module's browser (one Playwright per process)
        pg = ctx.new_page()
        pg.goto(url)
        end = time.time() + 120
        while not _held_locks(cache) and time.time() < end:
            time.sleep(0.2)
        assert _held_locks(cache), "the gallery job never started; see the streamlit log"
        ctx.close()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.time() - t0
        assert took < 5, f"the server took {took:.1f} s to stop"
        time.sleep(1)  # the kernel releases a dead worker's flock at once; allow the reaping
        assert not _held_locks(cache)
        from cache import Memo, make_key
        q = np.array(data.query_indices(16, seed=0))
        key = make_key("galleries", app_run.digest, q, app_run.preset.likelihood_kwargs)
        assert Memo(cache).get(key) is None  # the cut job stored nothing; it is simply computed again later
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_a_drawing_s_influences_come_on_their_own_from_a_shipped_representation(app_run, page, tmp_path):
    # a fresh server whose run gets its representation from the shipped folder at start: a stroke's
    # top proponents and opponents appear with no click, from the representation, and the
    # galleries page fills from it in the background
    from engine.precompute import build, representation as R, shipped
    build.precompute(app_run, method="basis", rank=4, chunk=4)
    shipped.ship(app_run, "basis4", tmp_path / "shipped")
    path = R.folder(app_run) / "basis4.npz"
    path.unlink()
    log = open(tmp_path / "streamlit.log", "w")
    proc, url = _serve({"APP_SHIPPED": str(tmp_path / "shipped"), "APP_PRECOMPUTE_RANK": "4",
                        "APP_CACHE": str(tmp_path / "cache")}, log)
    try:
        ctx = page.context.browser.new_context(viewport={"width": 1400, "height": 2800})
        pg = ctx.new_page()
        pg.set_default_timeout(300_000)
        pg.goto(url)
        canvas = pg.locator("canvas.upper-canvas").first
        canvas.wait_for()
        box = canvas.bounding_box()
        pg.mouse.move(box["x"] + 140, box["y"] + 40)
        pg.mouse.down()
        for i in range(1, 30):
            pg.mouse.move(box["x"] + 140, box["y"] + 40 + 7 * i, steps=2)
        pg.mouse.up()
        pg.get_by_text(re.compile("Top 16 proponents")).wait_for()
        pg.get_by_text(re.compile("Top 16 opponents")).wait_for()
        assert pg.get_by_text(re.compile("precomputed replay basis4")).count() >= 1
        assert pg.get_by_role("button", name=re.compile("Find them")).count() == 0
        assert path.is_file()  # installed from the shipped folder
        pg.screenshot(path=str(SHOTS / "9_draw_from_representation.png"), full_page=True)
        pg.get_by_role("link", name="Galleries").click()
        pg.get_by_text(re.compile("distinct images fill")).first.wait_for()
        assert pg.get_by_text("Traceback").count() == 0
        ctx.close()
    finally:
        proc.terminate()  # as a server is stopped; its workers go with it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        path.unlink(missing_ok=True)
