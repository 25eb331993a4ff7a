"""Several visitors at once: one run at a time, the others wait in line (and see their place) or are told
the queue is full; nothing errors, and the server's memory comes back to where it started."""
from __future__ import annotations

import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402

import app  # noqa: E402
from rss import rss_mb, settle  # noqa: E402
from gzq.ui import runner  # noqa: E402

pytestmark = pytest.mark.slow

SMALLEST = dict(checkpoint=None, labelled_zip=None, preset="quick CPU", steps=6, num_images=16, epochs=1,
                finetune="kd")       # the queue is under test, not the fine-tuning stage
VISITORS = 5
MAX_QUEUE = 2
RSS_MARGIN_MB = 150


@pytest.fixture(scope="module")
def server():
    demo = app.create_ui(max_queue=MAX_QUEUE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def visit(url: str, downloads: Path) -> dict:
    """One visitor: submit the smallest run, watch the line, report how it ended."""
    client = Client(url, verbose=False, download_files=tempfile.mkdtemp(dir=downloads))
    job = client.submit(**SMALLEST, api_name="/run")
    ranks = set()
    while not job.done():
        st = job.status()
        if st.code == Status.IN_QUEUE and st.rank is not None:
            ranks.add(st.rank)
        time.sleep(0.05)
    try:
        final = job.result(timeout=5)
    except QueueError as e:
        return dict(outcome="queue full", message=str(e), ranks=ranks)
    return dict(outcome="done" if final[0].startswith("**Done**") else "other", message=final[0], ranks=ranks)


def test_concurrent_visitors_queue_and_memory_returns(server, tmp_path):
    # warm-up: the first run loads kernels, the dataset and caches that stay for the life of the process
    assert visit(server, tmp_path)["outcome"] == "done"
    start = settle()
    kept_before = set(runner.RUNS_ROOT.glob("gzq_run_*"))

    peak = start
    for _ in range(2):  # two waves, so a per-run leak would show
        with ThreadPoolExecutor(VISITORS) as pool:
            futures = [pool.submit(visit, server, tmp_path) for _ in range(VISITORS)]
            while not all(f.done() for f in futures):
                peak = max(peak, rss_mb())
                time.sleep(0.1)
            results = [f.result() for f in futures]
        outcomes = [r["outcome"] for r in results]
        assert set(outcomes) <= {"done", "queue full"}, results
        assert outcomes.count("done") >= 1
        assert outcomes.count("queue full") >= 1, "more visitors than the line holds: some are told it is full"
        assert all("Queue is full" in r["message"] for r in results if r["outcome"] == "queue full")
        waited = [r for r in results if r["outcome"] == "done" and r["ranks"]]
        assert waited, "visitors who waited saw their place in line"

    end = settle()
    print(f"RSS: start {start:.0f} MB, peak {peak:.0f} MB, end {end:.0f} MB")
    assert end - start < RSS_MARGIN_MB, f"RSS grew from {start:.0f} to {end:.0f} MB (peak {peak:.0f})"
    assert not runner.RUNNER.active_sessions(), "no run left going"
    leftovers = [p for p in runner.RUNS_ROOT.glob("gzq_run_*") if p not in kept_before]
    assert len(leftovers) <= runner.KEEP_RUNS and not list(runner.RUNS_ROOT.glob("gzq_run_*/*.partial"))
    assert len(set(runner.RUNS_ROOT.glob("gzq_run_*"))) <= runner.KEEP_RUNS + len(kept_before)
