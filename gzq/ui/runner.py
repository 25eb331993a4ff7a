"""The runner: one run at a time in a worker thread of its own, a stop that reaches inside a pass, and
the finished run folders kept for download.

The page's event handler only pumps the worker's events to the browser, so it answers at once, keeps the
elapsed time ticking while a model loads, and can be cancelled by Gradio without abandoning a half-run
computation: the worker holds the model and its memory, checks the stop flag inside every forward and
backward pass (gzq.pipeline.StopHooks), and frees everything in `finally` whoever stopped it.
ZeroGPU (Spaces): `spaces.GPU` wraps the run only where `spaces` imports; the run then executes in the
GPU worker process, where a stop flag cannot reach, so a stop there closes the event stream instead.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..config import RunConfig
from ..events import Done, Stopped
from ..pipeline import iter_run
from ..presets import resolve_device

try:  # ZeroGPU on Spaces; absent everywhere else
    import spaces  # type: ignore
except ImportError:
    spaces = None

log = logging.getLogger(__name__)

RUNS_ROOT = Path(os.environ.get("GZQ_RUNS_DIR") or Path(tempfile.gettempdir()) / "gzq_app_runs")
KEEP_RUNS = int(os.environ.get("GZQ_KEEP_RUNS", "6"))          # finished run folders kept for download
ZEROGPU_SECONDS = int(os.environ.get("GZQ_ZEROGPU_SECONDS", "120"))
ON_ZEROGPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
#: what the page says about the presets on ZeroGPU (fit_zerogpu)
ZEROGPU_NOTE = (f"On this Space a run gets at most {ZEROGPU_SECONDS} s of GPU time: Quick try fits; Standard and "
                "Paper scale are shrunk to fit it (fewer images and steps, measured on the GPU), so they do not reach "
                "their full budget. For the full presets run the app on your own GPU, or the command line.")


def fit_zerogpu(cfg: RunConfig, seconds: float = ZEROGPU_SECONDS) -> RunConfig:
    """A run that ends within one ZeroGPU call: the time budget capped at 3/4 of the call's duration (the rest
    is for loading, evaluating and writing), so the budget fit (gzq.budget), measured on the GPU inside the
    call, shrinks the images and steps of a longer preset."""
    cap = 0.75 * seconds
    if cfg.time_budget_s is None or cfg.time_budget_s > cap:
        cfg = dataclasses.replace(cfg, time_budget_s=cap)
    return cfg


def device_label(device: torch.device | None = None) -> str:
    """Human description of where runs go, e.g. 'CUDA GPU (NVIDIA H100)' or 'CPU (2 threads)'."""
    device = device or resolve_device("auto")
    if device.type == "cuda":
        try:
            return f"CUDA GPU ({torch.cuda.get_device_name(device)})"
        except Exception:  # ZeroGPU: the GPU appears only inside @spaces.GPU
            return "CUDA GPU"
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n != 1 else ''})"


def _device_events(cfg_dict: dict, out_dir: str) -> Iterator:
    """iter_run in the ZeroGPU worker (inputs and events are pickled across; a stop flag cannot be)."""
    yield from iter_run(RunConfig.from_dict(cfg_dict), out_dir)


if spaces is not None:
    _device_events = spaces.GPU(duration=ZEROGPU_SECONDS)(_device_events)


def free_memory() -> None:
    """Collect the run's objects and hand the freed heap back to the OS, as a long-lived server must."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass
class RunHandle:
    """One session's run: the flag Stop sets, the worker's events, and the signal that it has wound down.

    Events on the queue are ("event", ev), ("error", message), ("started", None) and, last, ("end", None).
    """
    session: str
    work: Path
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    done: bool = False


class Runner:
    """Runs one job at a time; a new job waits until the previous one has let go of the device."""

    def __init__(self, keep: int = KEEP_RUNS):
        self.keep = keep
        self._device = threading.Lock()              # held by the worker that is computing
        self._lock = threading.Lock()                # guards the two collections below
        self._handles: dict[str, RunHandle] = {}     # session -> its current run
        self._kept: deque[Path] = deque()            # finished run folders, oldest first

    # --- starting and stopping
    def start(self, cfg: RunConfig, session: str, cleanup: list[Path] = ()) -> RunHandle:
        """Start `cfg` in a worker thread; its events arrive on the handle's queue. `cleanup`: folders
        (an extracted upload) removed once the run has wound down."""
        RUNS_ROOT.mkdir(parents=True, exist_ok=True)
        handle = RunHandle(session, Path(tempfile.mkdtemp(prefix="gzq_run_", dir=RUNS_ROOT)))
        with self._lock:
            old = self._handles.get(session)
            if old is not None:
                old.stop.set()
            self._handles[session] = handle
        threading.Thread(target=self._work, args=(handle, cfg, list(cleanup)), name=f"gzq-run-{session[:8]}",
                         daemon=True).start()
        return handle

    def stop(self, session: str | None, wait: float = 0.0) -> RunHandle | None:
        """Set the session's stop flag; wait up to `wait` s for its run to wind down. Returns its handle."""
        with self._lock:
            handle = self._handles.get(session or "")
        if handle is not None:
            handle.stop.set()
            handle.finished.wait(wait)
        return handle

    def busy(self, session: str | None) -> bool:
        """Whether this session still has a run computing or winding down."""
        with self._lock:
            handle = self._handles.get(session or "")
        return handle is not None and not handle.finished.is_set()

    def active_sessions(self) -> list[str]:
        with self._lock:
            return [s for s, h in self._handles.items() if not h.finished.is_set()]

    def _work(self, handle: RunHandle, cfg: RunConfig, cleanup: list[Path]) -> None:
        events = None
        try:
            with self._device:
                if handle.stop.is_set():
                    handle.events.put(("event", Stopped("load", 0)))
                    return
                handle.events.put(("started", None))
                try:
                    events = (_device_events(fit_zerogpu(cfg).to_dict(), str(handle.work / "run")) if ON_ZEROGPU
                              else iter_run(cfg, handle.work / "run", handle.stop))
                    for ev in events:
                        if isinstance(ev, Done):
                            handle.done = True
                        handle.events.put(("event", ev))
                        if handle.stop.is_set() and ON_ZEROGPU:
                            handle.events.put(("event", Stopped("synthesis", 0)))
                            break
                except ValueError as e:  # bad input: unknown model, no BatchNorm, checkpoint that does not fit...
                    log.info("run refused: %s", e)
                    handle.events.put(("error", str(e)))
                except Exception as e:  # anything else: a message, never a traceback; the log keeps the details
                    log.exception("run failed")
                    first = str(e).splitlines()[0][:300] if str(e) else ""
                    handle.events.put(("error", f"the run failed ({type(e).__name__}: {first})"))
                finally:
                    if events is not None and hasattr(events, "close"):
                        events.close()  # iter_run's own finally: hooks removed, .partial folder deleted
                    events = None
                    free_memory()
        finally:
            for folder in cleanup:
                shutil.rmtree(folder, ignore_errors=True)
            if handle.done:
                self._remember(handle.work)
            else:
                shutil.rmtree(handle.work, ignore_errors=True)
            with self._lock:
                if self._handles.get(handle.session) is handle:
                    del self._handles[handle.session]
            handle.finished.set()
            handle.events.put(("end", None))

    # --- finished runs
    def _remember(self, folder: Path) -> None:
        """Keep the last `keep` finished runs on disk for download; delete older ones."""
        with self._lock:
            self._kept.append(folder)
            while len(self._kept) > self.keep:
                shutil.rmtree(self._kept.popleft(), ignore_errors=True)

    def find_kept(self, token: str | None) -> Path | None:
        """The run folder of a token a browser kept (the folder's name), if the server still keeps it."""
        with self._lock:
            for folder in self._kept:
                if token and folder.name == token and (folder / "run" / "report.json").exists():
                    return folder / "run"
        return None

    def kept(self) -> list[Path]:
        with self._lock:
            return list(self._kept)

    def remove_kept(self) -> None:
        with self._lock:
            while self._kept:
                shutil.rmtree(self._kept.popleft(), ignore_errors=True)


RUNNER = Runner()
atexit.register(RUNNER.remove_kept)  # finished runs are kept for download while the server lives; not after
