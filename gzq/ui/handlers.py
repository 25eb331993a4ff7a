"""Event handlers: form values in, page updates out, both as dicts keyed by name.

`layout.py` maps the names to components (inputs through `inputs_kwargs`, outputs as
{component: value}); here every update is a plain dict, so the translation is testable without a server.
A name missing from an update leaves its component as it is.
"""
from __future__ import annotations

import json
import logging
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from ..data import extract_image_folder_zip
from .estimate import estimate
from .figures import bn_figure, kl_figure, recon_figure
from .form import check_form
from .runner import RUNNER, device_label
from .view import (ALL_CLASSES, MANY_CLASSES, GalleryItems, RunView, downloads_html, files_html, gallery_html,
                   gallery_items, losses_markdown, progress_html, results_frame, run_files, saved_gallery,
                   status_markdown, technical_markdown)

log = logging.getLogger(__name__)

#: the form's values, by the names the run event takes them (also its API parameter names)
FORM_KEYS = ["model", "pretrained", "random_weights", "checkpoint", "num_classes", "in_chans", "w_bits", "a_bits",
             "extra_students", "protocol", "fuse_branches", "preset", "steps", "num_images", "epochs", "finetune",
             "shift", "num_students", "seed", "lambda_bn", "lambda_ce", "lambda_adv", "lambda_tv", "lambda_l2",
             "bn_loss", "image_param", "labelled_zip"]
#: what the run event updates, in the order API clients receive it (buttons and browser state are not sent)
RUN_OUTPUTS = ["status", "progress", "gallery", "class_filter", "bn_plot", "kl_plot", "recon_plot", "losses",
               "log", "results_section", "downloads", "results", "technical", "files_list", "files", "run", "stop",
               "last_run"]
#: the outputs API clients receive, in order (layout containers and buttons are not sent)
API_OUTPUTS = [n for n in RUN_OUTPUTS if n not in ("results_section", "run", "stop")]

POLL_S = 0.5               # the page hears from a run at least this often (the elapsed time keeps moving)
GALLERY_INTERVAL_S = 1.0   # at most this often: the image gallery
PLOT_INTERVAL_S = 1.0      # and the plots (building a plotly figure takes tens of ms of the run's CPU)
STOP_WAIT_S = 4.0          # how long Stop waits for the run to wind down before answering

_GALLERIES: dict[str, GalleryItems] = {}   # session -> the images its gallery shows (for the per-class view)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _buttons(running: bool) -> dict[str, Any]:
    return {"run": gr.update(interactive=not running), "stop": gr.update(interactive=running)}


def _gallery(session: str, items: GalleryItems | None, note: str = "") -> dict[str, Any]:
    if items is None:
        _GALLERIES.pop(session, None)
        return {"gallery": gallery_html(None, note=note), "class_filter": gr.update(visible=False)}
    _GALLERIES[session] = items
    many = len(set(items.labels)) > MANY_CLASSES
    return {"gallery": gallery_html(items),
            "class_filter": gr.update(choices=items.classes(), value=ALL_CLASSES, visible=many)}


def _live(view: RunView, plots: bool = True) -> dict[str, Any]:
    """The live part of the page; without `plots` the three figures are left as they are."""
    out = {"status": status_markdown(view), "progress": progress_html(view), "losses": losses_markdown(view),
           "log": "\n".join(view.log[-200:])}
    if plots:
        out.update(bn_plot=bn_figure(view), kl_plot=kl_figure(view), recon_plot=recon_figure(view))
    return out


def results_updates(report: dict, out_dir: str | Path, session: str) -> dict[str, Any]:
    """The results part of the page for a finished run folder."""
    files = run_files(out_dir)
    return {"results_section": gr.update(visible=True), "downloads": downloads_html(report, out_dir),
            "results": results_frame(report, out_dir), "technical": technical_markdown(report),
            "files_list": files_html(files), "files": files}


def no_results() -> dict[str, Any]:
    return {"results_section": gr.update(visible=False), "downloads": "", "results": results_frame(None),
            "technical": "", "files_list": "", "files": None}


def run_updates(values: dict[str, Any], session: str) -> Iterator[dict[str, Any]]:
    """Start a run for the form's values and stream the page's updates until it has ended.

    The run computes in the runner's worker thread; this generator only relays its events, at least
    every POLL_S seconds. Closed early (Gradio's cancel, the page left), it sets the stop flag.
    """
    view = RunView(device=device_label(), stage="waiting" if RUNNER.active_sessions() else "load")
    cleanup: list[Path] = []
    try:   # what needs no model load is refused before anything else reaches the page
        data_dir = None
        if values.get("labelled_zip"):
            cleanup.append(Path(tempfile.mkdtemp(prefix="gzq_data_")))
            data_dir = str(extract_image_folder_zip(values["labelled_zip"], cleanup[-1]))
        cfg = check_form(values, data_dir)
    except ValueError as e:
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        view.fail(str(e))
        gr.Warning(f"Could not run: {e}")
        yield {**refused(view), **_gallery(session, None), **no_results()}
        return
    yield {**_live(view), **_gallery(session, None), **no_results(), **_buttons(True)}
    if values.get("random_weights") and cfg.model.name != "default" and not cfg.model.checkpoint:
        view.note(f"{cfg.model.name} runs with random weights, as asked: for testing only")
    handle = RUNNER.start(cfg, session, cleanup)
    try:
        last_gallery, last_plots, plotted_stage, shown_version, ended = 0.0, 0.0, None, 0, False
        while not ended:
            try:
                messages = [handle.events.get(timeout=POLL_S)]
            except queue.Empty:
                yield {"status": status_markdown(view)}   # loading or a long step: the clock still moves
                continue
            while True:
                try:
                    messages.append(handle.events.get_nowait())
                except queue.Empty:
                    break
            for kind, payload in messages:
                if kind == "started":
                    view.stage = "load"
                elif kind == "event":
                    view.update(payload)
                elif kind == "error":
                    view.fail(payload)
                elif kind == "end":
                    ended = True
            if ended:
                break
            now = time.monotonic()
            plots = now - last_plots >= PLOT_INTERVAL_S or view.stage != plotted_stage
            if plots:
                last_plots, plotted_stage = now, view.stage
            update = _live(view, plots)
            if view.preview_version != shown_version and (now - last_gallery >= GALLERY_INTERVAL_S
                                                          or view.stage != "synthesis"):
                p = view.preview
                update.update(_gallery(session, gallery_items(p.images, p.labels, p.class_names, p.step)))
                shown_version, last_gallery = view.preview_version, now
            yield update
        final = {**_live(view), **_buttons(False)}
        if view.preview is not None and view.preview_version != shown_version:
            p = view.preview
            final.update(_gallery(session, gallery_items(p.images, p.labels, p.class_names, p.step)))
        if view.error:
            gr.Warning(f"Could not run: {view.error}")
            final["progress"] = progress_html(RunView())
        elif view.stage == "done" and view.report is not None and view.out_dir:
            final.update(results_updates(view.report, view.out_dir, session), last_run=handle.work.name)
        elif view.stage != "done":  # the stream ended without Done: stopped
            if view.stage != "stopped":
                view.stage, view.stopped_at = "stopped", view.stopped_at or (view.stage, view.step)
            final.update(status=status_markdown(view), progress=progress_html(RunView()))
        yield final
    finally:
        handle.stop.set()  # a no-op once the run has ended; otherwise it stops within one layer


def refused(view: RunView) -> dict[str, Any]:
    """The page for a run refused before it started: the reason next to Run, in the log, Run on again."""
    return {"status": status_markdown(view), "progress": progress_html(RunView()), "log": "\n".join(view.log),
            **_buttons(False)}


def arm_updates(values: dict[str, Any]) -> dict[str, Any]:
    """The instant answer to a click on Run (outside the queue): Run off and Stop on, or the reason the
    form cannot run, without waiting for the queued run to say the same."""
    try:
        check_form({**values, "labelled_zip": None})
    except ValueError as e:
        view = RunView()
        view.fail(str(e))
        return refused(view)
    return {"status": "**Starting…**", **_buttons(True)}


def stop_updates(session: str) -> dict[str, Any]:
    """Stop this session's run and answer once it has wound down (or say it is still stopping, Run off:
    the timer turns Run back on when the server can take a run)."""
    handle = RUNNER.stop(session, wait=STOP_WAIT_S)
    if handle is None or handle.finished.is_set():
        return {"status": "**Stopped**; nothing was saved. Ready for the next run.",
                "progress": progress_html(RunView()), **_buttons(False), "timer": gr.Timer(active=False)}
    return {"status": "**Stopping**: the run is letting go of its memory…", "run": gr.update(interactive=False),
            "stop": gr.update(interactive=False), "timer": gr.Timer(active=True)}


def poll_updates(session: str) -> dict[str, Any]:
    """Timer tick after a slow stop: Run comes back as soon as this session's run has wound down."""
    if RUNNER.busy(session):
        return {}
    return {"status": "**Stopped**; nothing was saved. Ready for the next run.", **_buttons(False),
            "timer": gr.Timer(active=False)}


def restore_updates(token: str | None, session: str) -> dict[str, Any]:
    """On page load: the results of this browser's last run, if the server still keeps its folder."""
    folder = RUNNER.find_kept(token)
    if folder is None:
        return {}
    report = json.loads((folder / "report.json").read_text())
    out = {"status": "**Results of your last run** are below (kept on the server until newer runs replace "
                     "them).", **results_updates(report, folder, session)}
    view = RunView(stage="done")
    out["progress"] = progress_html(view)   # the live plots are not kept; their numbers are in the report
    out.update(_gallery(session, saved_gallery(folder)))
    return out


def class_updates(choice: str | None, session: str) -> dict[str, Any]:
    return {"gallery": gallery_html(_GALLERIES.get(session), only=choice)}


def estimate_markdown(values: dict[str, Any]) -> str:
    """The line under the form: how long this run will take on this device (measured), or why it cannot run."""
    try:
        cfg = check_form({**values, "labelled_zip": None})
        est = estimate(cfg)
    except ValueError as e:
        return f"⚠️ {e}"
    except Exception as e:  # an estimate is a nicety; the run itself reports real errors
        log.warning("estimate failed: %s", e)
        return ""
    extra = " plus the weights download" if cfg.model.pretrained and not cfg.model.checkpoint else ""
    return f"**Estimated time** on {device_label()}: {est.text}{extra}."


def release_session(session: str) -> None:
    """A visitor left the page: stop their run so the next one in line gets the device."""
    RUNNER.stop(session)
    _GALLERIES.pop(session, None)


__all__ = ["FORM_KEYS", "RUN_OUTPUTS", "API_OUTPUTS", "run_updates", "stop_updates", "poll_updates",
           "restore_updates", "class_updates", "estimate_markdown", "release_session", "results_updates"]
