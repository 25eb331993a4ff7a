"""The page in a real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, at a laptop's
1280x800 and a phone's 390x844, as a new user meets it: an error is in view within 3 s of Run; a quick run
shows images and plots and ends with one download whose shown size is the file's size; results survive a
reload; no table header breaks inside a word on the phone; Stop on a slow model gives the page back within
5 s, the next Run starts on its first click and the server's memory comes back. Screenshots of both
viewports go to GZQ_SCREENSHOT_DIR (the README's come from GZQ_SCREENSHOT_DIR=assets)."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

import app
from rss import settle
from gzq.ui import estimate, form, runner
from gzq.ui.view import format_bytes

CHROMIUM = os.environ.get("GZQ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("GZQ_SCREENSHOT_DIR", Path(tempfile.gettempdir()) / "gzq_screenshots"))
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
RSS_MARGIN_MB = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
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
    # a warm server: the first page's run-time estimate is measured (create_ui starts it) before visitors come
    estimate.estimate(form.build_config("default", preset=form.default_preset(False)))
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                 args=CHROMIUM_ARGS)
    try:
        yield browser, f"http://127.0.0.1:{port}/"
    finally:
        browser.close()
        pw.stop()
        demo.close()


@pytest.fixture(scope="module")
def context(server):
    """One visitor's browser (one localStorage: the last run is remembered across pages)."""
    browser, _ = server
    ctx = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    yield ctx
    ctx.close()


def open_page(server, context, viewport):
    _, url = server
    page = context.new_page()
    page.set_viewport_size(viewport)
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#gzq-run").wait_for()
    page.wait_for_function("!document.querySelector('#gzq-run').disabled")
    return page


def set_model(page, name: str) -> None:
    box = page.locator("#gzq-model input")
    box.fill(name)
    box.press("Enter")
    page.locator("#gzq-status").click()  # leave the box so the value is committed


def in_viewport(page, selector: str) -> bool:
    return page.evaluate("""(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
        return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight && r.left >= 0
            && r.right <= window.innerWidth; }""", selector)


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
def test_error_after_run_is_in_view_within_3_s(server, context, viewport):
    page = open_page(server, context, viewport)
    set_model(page, "resnet_nonexistent")
    page.locator("#gzq-run").scroll_into_view_if_needed()
    t0 = time.monotonic()
    page.locator("#gzq-run").click()
    page.locator("#gzq-status", has_text="Could not run").wait_for(timeout=3_000)
    assert time.monotonic() - t0 < 3.0
    assert "unknown model 'resnet_nonexistent'" in page.locator("#gzq-status").inner_text()
    assert in_viewport(page, "#gzq-status"), "the error is next to Run, on screen"
    page.locator("#gzq-details").get_by_text("Run details").click()
    log = page.locator("#gzq-log textarea").input_value()
    assert "could not run: unknown model" in log.splitlines()[-1]  # the log ends with the reason, not 'Loading'
    page.wait_for_function("!document.querySelector('#gzq-run').disabled", timeout=3_000)
    page.close()


def test_quick_run_shows_images_plots_and_one_download_of_its_real_size(server, context, tmp_path):
    page = open_page(server, context, DESKTOP)
    assert in_viewport(page, "#gzq-run"), "Run is on the first screen"
    page.locator("#gzq-estimate", has_text="Estimated time").wait_for(timeout=120_000)
    page.locator("#gzq-run").click()
    # while synthesis runs: images in the gallery, both plots drawn by plotly, Stop enabled
    page.locator("#gzq-status", has_text="Synthesising images").wait_for(timeout=120_000)
    page.locator("#gzq-gallery figure img").first.wait_for()
    page.locator("#gzq-bn-plot .js-plotly-plot").wait_for()
    assert "Done" not in page.locator("#gzq-status").inner_text(), "images must appear while the run is going"
    assert page.locator("#gzq-stop").is_enabled() and not page.locator("#gzq-run").is_enabled()
    page.locator("#gzq-kl-plot .js-plotly-plot").wait_for()
    page.locator("#gzq-status", has_text="Done").wait_for(timeout=300_000)
    page.locator("#gzq-results", has_text="quantized w4a4").wait_for()
    # every image, its label under it (not over it)
    assert page.locator("#gzq-gallery figure img").count() == 64
    img = page.locator("#gzq-gallery figure img").first.bounding_box()
    cap = page.locator("#gzq-gallery figcaption").first.bounding_box()
    assert cap["y"] >= img["y"] + img["height"] - 1 and img["width"] >= 90
    # two traces: every BN layer's line in one (sent as typed arrays, split at gaps), and the mean
    assert page.locator("#gzq-bn-plot .scatterlayer .trace").count() == 2
    layer_lines = page.locator("#gzq-bn-plot .scatterlayer .trace").first.locator("path.js-line").count()
    assert layer_lines > 2, f"one line per BN layer, got {layer_lines}"
    # the one primary download: its size as shown is the size of the file it downloads
    link = page.locator("#gzq-primary-download")
    shown = link.locator(".gzq-size").inner_text()
    with page.expect_download() as dl:
        link.click()
    path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(path)
    assert path.suffix == ".onnx" and shown == format_bytes(path.stat().st_size)
    assert int(link.get_attribute("data-bytes")) == path.stat().st_size
    import onnx
    onnx.checker.check_model(str(path))
    # the other files under "All files", each with a line saying what it is, none with a delete button
    page.locator("#gzq-all-files").get_by_text("All files").click()
    notes = page.locator("#gzq-files-list .gzq-file-note")
    notes.first.wait_for()                        # the accordion renders its list after the click
    assert notes.count() >= 8 and all(n.strip() for n in notes.all_inner_texts())
    assert page.locator("#gzq-results-section button[aria-label*='emove'], #gzq-results-section .label-clear-button"
                        ).count() == 0
    assert page.locator("#gzq-run").is_enabled()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "screenshot.png"), full_page=True)
    page.close()


def test_results_survive_a_reload_and_phone_headers_do_not_break_words(server, context):
    page = open_page(server, context, PHONE)   # a new page in the same browser: the last run comes back
    page.locator("#gzq-status", has_text="Results of your last run").wait_for(timeout=60_000)
    page.locator("#gzq-results", has_text="quantized w4a4").wait_for()
    assert page.locator("#gzq-primary-download").is_visible()
    assert page.locator("#gzq-gallery figure img").count() == 64
    broken = page.evaluate("""() => { const bad = [];
        for (const th of document.querySelectorAll('#gzq-results th')) {
          const walk = document.createTreeWalker(th, NodeFilter.SHOW_TEXT); let node;
          while ((node = walk.nextNode())) { const re = /\\S+/g; let m;
            while ((m = re.exec(node.textContent))) {
              const r = document.createRange(); r.setStart(node, m.index); r.setEnd(node, m.index + m[0].length);
              const tops = new Set(Array.from(r.getClientRects()).filter(x => x.width > 0).map(x => Math.round(x.top)));
              if (tops.size > 1) bad.push(m[0]); } } }
        return bad; }""")
    headers = page.locator("#gzq-results th").all_inner_texts()
    assert any("Agreement" in h for h in headers), headers
    assert broken == [], f"header words broken across lines: {broken}"
    name = page.locator("#gzq-primary-download .gzq-primary-file").inner_text()
    assert "w4a4.onnx" in name, "the download's name is shown whole"
    assert in_viewport(page, "#gzq-run") or page.evaluate(
        "document.querySelector('#gzq-run').getBoundingClientRect().top < 1.2 * window.innerHeight"), \
        "Run is on the phone's first screen"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "screenshot_phone.png"), full_page=True)
    page.close()


def test_stop_on_a_slow_model_gives_the_page_back_within_5_s(server, context):
    page = open_page(server, context, DESKTOP)
    base = settle()
    set_model(page, "resnet50")                         # 224x224 input: one CPU step takes seconds
    page.locator("#gzq-advanced").get_by_text("Advanced").first.click()
    page.locator("#gzq-random-weights input").check()
    page.locator("#gzq-num_images input").fill("8")     # keeps the test's memory and wait modest; still a slow step
    page.locator("#gzq-run").click()
    page.locator("#gzq-status", has_text="Synthesising images").wait_for(timeout=300_000)
    time.sleep(2.0)                                     # in the middle of a forward or backward pass
    t0 = time.monotonic()
    page.locator("#gzq-stop").click()
    page.locator("#gzq-status", has_text="Stopped").wait_for(timeout=5_000)
    page.wait_for_function("!document.querySelector('#gzq-run').disabled", timeout=5_000)
    idle = time.monotonic() - t0
    assert idle < 5.0, f"the page was idle {idle:.1f} s after Stop"
    assert not page.locator("#gzq-stop").is_enabled() and not runner.RUNNER.active_sessions()
    time.sleep(1.0)  # no late progress update may overwrite the idle page
    assert "Stopped" in page.locator("#gzq-status").inner_text()
    after = settle()
    print(f"RSS: idle {base:.0f} MB, after Stop {after:.0f} MB")
    assert after - base < RSS_MARGIN_MB, f"RSS {after:.0f} MB after Stop vs {base:.0f} MB idle"
    assert not list(runner.RUNS_ROOT.glob("gzq_run_*/run.partial")), "the stopped run left nothing behind"
    # Run works on the first click: a quick run on the bundled model starts at once and finishes
    set_model(page, "default")
    page.locator("#gzq-num_images input").fill("16")
    page.locator("#gzq-steps input").fill("8")
    page.locator("#gzq-finetune").get_by_label("kd", exact=True).check()    # the fast fine-tuning stage
    page.locator("#gzq-run").click()
    page.locator("#gzq-status", has_text="elapsed").wait_for(timeout=5_000)
    page.locator("#gzq-status", has_text="Done").wait_for(timeout=300_000)
    page.close()
