"""Resident memory of the test process, which hosts the app's server in the app's load and browser tests."""
from __future__ import annotations

import gc
import time

import pytest

from gzq.ui import runner


def rss_mb() -> float:
    """Resident memory of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this system")


def settle() -> float:
    """RSS once freed objects are collected and the heap is handed back, as the server does after a run."""
    for _ in range(3):
        gc.collect()
        time.sleep(0.3)
    runner.free_memory()
    return rss_mb()
