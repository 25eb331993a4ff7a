"""The page in a real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright: a quick run shows
the images and both plots as they form and ends with results (screenshot saved), and Stop on a second run
brings the page back to idle with nothing left on disk."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

import app

CHROMIUM = os.environ.get("GZQ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# The README's assets/screenshot.png comes from GZQ_SCREENSHOT=assets/screenshot.png pytest tests/test_app_browser.py
SCREENSHOT = Path(os.environ.get("GZQ_SCREENSHOT", Path(tempfile.gettempdir()) / "gzq_screenshot.png"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the Debian chromium is used, "
                    "no `playwright install`)")
    demo = app.create_ui()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=app.CSS, quiet=True)
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                 args=CHROMIUM_ARGS)
    try:
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.locator("#gzq-run").wait_for()
        yield pg
    finally:
        browser.close()
        pw.stop()
        demo.close()


def test_quick_run_shows_images_plots_and_results(page):
    page.locator("#gzq-run").click()
    # while synthesis runs: images in the gallery, both plots drawn by plotly, Stop enabled
    page.locator("#gzq-status", has_text="Synthesising images").wait_for()
    page.locator("#gzq-gallery img").first.wait_for()
    page.locator("#gzq-bn-plot .js-plotly-plot").wait_for()
    assert "Done" not in page.locator("#gzq-status").inner_text(), "images must appear while the run is going"
    assert page.locator("#gzq-stop").is_enabled() and not page.locator("#gzq-run").is_enabled()
    page.locator("#gzq-kl-plot .js-plotly-plot").wait_for()
    # the end: results table and downloads
    page.locator("#gzq-status", has_text="Done").wait_for(timeout=180_000)
    page.locator("#gzq-results", has_text="student w4a4").wait_for()
    page.locator("#gzq-files", has_text="safetensors").wait_for()  # the name and suffix are separate spans
    assert "w4a4" in page.locator("#gzq-files").inner_text()
    assert page.locator("#gzq-gallery img").count() >= 8
    assert page.locator("#gzq-bn-plot .scatterlayer .trace").count() > 2  # per-layer traces + the mean
    assert page.locator("#gzq-run").is_enabled()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_stop_returns_the_page_to_idle(page):
    before = set(Path(tempfile.gettempdir()).glob("gzq_run_*"))
    page.get_by_label("standard").check()  # ~300 steps: long enough to stop in the middle
    page.locator("#gzq-run").click()
    page.locator("#gzq-status", has_text="Synthesising images").wait_for()
    page.locator("#gzq-stop").click()
    page.locator("#gzq-status", has_text="Stopped").wait_for(timeout=30_000)
    page.wait_for_function("!document.querySelector('#gzq-run').disabled", timeout=30_000)
    assert not page.locator("#gzq-stop").is_enabled()
    time.sleep(1.0)  # no late progress update may overwrite the idle page
    assert "Stopped" in page.locator("#gzq-status").inner_text()
    assert page.locator("#gzq-run").is_enabled()
    # the stopped run's folder is gone once its generator has been closed
    deadline = time.monotonic() + 30
    while set(Path(tempfile.gettempdir()).glob("gzq_run_*")) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(Path(tempfile.gettempdir()).glob("gzq_run_*")) - before
    assert not app._RUNS, "the session's stop flag is released"
    # the page is usable again: a new (quick) run starts and finishes
    page.get_by_label("quick CPU").check()
    page.locator("#gzq-run").click()
    page.locator("#gzq-status", has_text="Done").wait_for(timeout=180_000)
