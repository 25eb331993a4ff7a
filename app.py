"""GZQ web app: data-free quantization of timm CNNs (GZNQ), live in the browser.

A thin Gradio shell over `gzq.pipeline.iter_run`: it builds a RunConfig from the form, renders the run's
event stream (images as they form, the BN-statistic likelihood, one KL curve per student) and offers the
results for download. No maths here: `RunView` folds events into plain state, and pure functions turn that
state into figures, rows and status strings, so the translation is testable without a server.

    python app.py [--host 0.0.0.0] [--port 7860] [--share]

Hugging Face Spaces (ZeroGPU included) runs `app.py`; `spaces.GPU` is applied only where `spaces` imports.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from gzq.config import QuantSpec, RunConfig
from gzq.data import IMAGE_EXTENSIONS
from gzq.events import Done, Message, Preview, Progress, StageStarted, Stopped
from gzq.models import POPULAR_BN_MODELS
from gzq.pipeline import iter_run, make_config, resolve_device

try:  # ZeroGPU on Spaces; absent everywhere else
    import spaces  # type: ignore
except ImportError:
    spaces = None

log = logging.getLogger("gzq.app")

# --------------------------------------------------------------------------------------------- settings

DEFAULT_MODEL_LABEL = "default: bundled ResNet-18 trained on Fashion-MNIST (28x28 grey, 10 classes)"

#: UI preset -> (library preset, section overrides). "quick CPU" fits a 2-core CPU in ~15 s on the default model.
UI_PRESETS: dict[str, tuple[str, dict]] = {
    "quick CPU": ("cpu", dict(synth=dict(num_images=64, holdout_images=8, batch_size=64, steps=40, warmup_steps=15),
                              train=dict(epochs=3), eval=dict(max_real_images=2000))),
    "standard": ("cpu", {}),
    "paper-scale GPU": ("gpu", {}),
}
PROTOCOLS = [("all layers at target bits (GDFQ / SynQ)", "all_layers"),
             ("first conv and last linear at 8 bit (BRECQ / Genie)", "first_last_8bit")]
STAGE_LABELS = {"load": "Loading model", "synthesis": "Synthesising images", "calibration": "Calibrating quantizers",
                "finetune": "Fine-tuning students", "evaluate": "Evaluating", "save": "Saving results"}
#: share of the whole run each stage takes, for the overall progress bar
STAGE_SPANS = {"load": (0.0, 0.05), "synthesis": (0.05, 0.80), "calibration": (0.80, 0.82),
               "finetune": (0.82, 0.95), "evaluate": (0.95, 0.98), "save": (0.98, 1.0)}

UI_INTERVAL_S = 0.5        # at most this often: status, plots, losses
GALLERY_INTERVAL_S = 1.0   # at most this often: the image gallery
GALLERY_MAX_IMAGES = 32
PLOT_MAX_POINTS = 400      # per trace; longer histories are strided
MAX_ZIP_BYTES = int(os.environ.get("GZQ_MAX_ZIP_MB", "200")) * 2**20   # uncompressed labelled-data zip
MAX_ZIP_FILES = 20_000
KEEP_RUNS = int(os.environ.get("GZQ_KEEP_RUNS", "6"))                 # finished run folders kept for download
MAX_QUEUE = int(os.environ.get("GZQ_MAX_QUEUE", "8"))
ZEROGPU_SECONDS = int(os.environ.get("GZQ_ZEROGPU_SECONDS", "120"))
ON_ZEROGPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")

CSS = """
#gzq-progress .gzq-bar { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
#gzq-progress .gzq-fill { height: 100%; background: var(--color-accent); transition: width .4s; }
#gzq-progress .gzq-caption { font-size: .85em; opacity: .8; }
#gzq-gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(76px, 1fr)) !important; }
"""

STOP_WAIT_S = 30.0         # how long Stop waits for the run to wind down before answering


@dataclass
class _RunHandle:
    """One session's running job: the flag Stop sets, and the signal that the run has fully wound down."""
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


_RUNS: dict[str, _RunHandle] = {}         # session hash -> that session's running job
_RECENT_RUNS: deque[Path] = deque()       # finished run folders, oldest first
_RUNS_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------ device and config

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


def default_preset() -> str:
    return "standard" if resolve_device("auto").type == "cuda" else "quick CPU"


def preset_config(preset: str) -> RunConfig:
    """The RunConfig a UI preset stands for, before any advanced overrides."""
    if preset not in UI_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(UI_PRESETS)}")
    lib_preset, overrides = UI_PRESETS[preset]
    return make_config(lib_preset, **overrides)


def preset_fields(preset: str) -> dict[str, Any]:
    """Values the advanced section shows for a preset (what Run will use unless edited)."""
    cfg = preset_config(preset)
    s = cfg.synth
    return dict(steps=s.steps, num_images=s.num_images, epochs=cfg.train.epochs, num_students=s.num_students,
                seed=cfg.seed, lambda_bn=s.lambda_bn, lambda_ce=s.lambda_ce, lambda_adv=s.lambda_adv,
                lambda_tv=s.lambda_tv, lambda_l2=s.lambda_l2, bn_loss=s.bn_loss.value, image_param=s.image_param.value)


def _as_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if value is None or value == "":
        raise ValueError(f"{name} is empty; give a whole number")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not f.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value}")
    v = int(f)
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")
    return v


def parse_students(w_bits, a_bits, protocol: str, extra: str | None) -> list[QuantSpec]:
    """The main student (w_bits/a_bits) then the extra ones ('w8a8, w3a3'), all with one protocol, no repeats."""
    main = QuantSpec(w_bits=_as_int("weight bits", w_bits, 2, 8), a_bits=_as_int("activation bits", a_bits, 2, 8),
                     protocol=protocol or "all_layers")
    out = [main]
    for tok in (extra or "").replace(";", ",").replace(" ", ",").split(","):
        if tok.strip():
            spec = QuantSpec.parse(tok, protocol=main.protocol)
            if spec.name not in {s.name for s in out}:
                out.append(spec)
    return out


def build_config(model: str | None, checkpoint: str | None = None, num_classes=None, in_chans=None,
                 pretrained: bool = False, w_bits=4, a_bits=4, protocol: str = "all_layers",
                 extra_students: str | None = "", preset: str = "quick CPU", steps=None, num_images=None,
                 epochs=None, num_students=None, seed=None, lambda_bn=None, lambda_ce=None, lambda_adv=None,
                 lambda_tv=None, lambda_l2=None, bn_loss=None, image_param=None, data_dir: str | None = None,
                 device: str = "auto") -> RunConfig:
    """The RunConfig for the form's values. Raises ValueError with a message meant for the user.

    Advanced values left empty take the preset's. When the image count or steps differ from the preset,
    the hold-out share, batch size and warm-up are scaled with them so the preset's proportions hold.
    """
    name = (model or "").strip()
    if name == DEFAULT_MODEL_LABEL:
        name = "default"
    if not name:
        raise ValueError("pick a model: the bundled default, one of the listed timm CNNs, or type a timm name")
    base = preset_config(preset)
    s = base.synth
    synth: dict[str, Any] = dict(num_images=s.num_images, holdout_images=s.holdout_images, batch_size=s.batch_size,
                                 steps=s.steps, warmup_steps=s.warmup_steps)
    if num_images not in (None, "") and _as_int("image count", num_images, 2) != s.num_images:
        n = _as_int("image count", num_images, 2)
        synth.update(num_images=n, holdout_images=min(max(1, round(n * s.holdout_images / s.num_images)), n - 2),
                     batch_size=min(s.batch_size, n))
    if steps not in (None, "") and _as_int("steps", steps, 1) != s.steps:
        n = _as_int("steps", steps, 1)
        synth.update(steps=n, warmup_steps=round(n * s.warmup_steps / max(s.steps, 1)))
    for key, val in dict(lambda_bn=lambda_bn, lambda_ce=lambda_ce, lambda_adv=lambda_adv, lambda_tv=lambda_tv,
                         lambda_l2=lambda_l2).items():
        if val not in (None, ""):
            synth[key] = float(val)
    if num_students not in (None, ""):
        synth["num_students"] = _as_int("number of students", num_students, 0, 16)
    if bn_loss:
        synth["bn_loss"] = bn_loss
    if image_param:
        synth["image_param"] = image_param
    train = {"epochs": _as_int("fine-tune epochs", epochs, 0)} if epochs not in (None, "") else {}
    model_spec: dict[str, Any] = dict(name=name, checkpoint=checkpoint or None, pretrained=bool(pretrained))
    if num_classes not in (None, "", 0):
        model_spec["num_classes"] = _as_int("number of classes", num_classes, 1)
    if in_chans not in (None, "", 0):
        model_spec["in_chans"] = _as_int("input channels", in_chans, 1, 4)
    eval_section = {"data": data_dir, "max_real_images": None} if data_dir else {}
    lib_preset, overrides = UI_PRESETS[preset]
    return make_config(lib_preset, device=device, model=model_spec,
                       students=parse_students(w_bits, a_bits, protocol, extra_students),
                       synth=synth, train={**overrides.get("train", {}), **train},
                       eval={**overrides.get("eval", {}), **eval_section},
                       seed=_as_int("seed", seed, 0) if seed not in (None, "") else base.seed)


# ------------------------------------------------------------------------------------- labelled-data zip

def extract_image_folder_zip(zip_path: str | Path, dest: str | Path, max_bytes: int = MAX_ZIP_BYTES,
                             max_files: int = MAX_ZIP_FILES) -> Path:
    """Extract an ImageFolder zip (<class>/<image>, optionally under one top folder) safely; return its root.

    Refuses what is not a zip, absolute or '..' paths, links, more than `max_files` entries or
    `max_bytes` uncompressed (counted while writing, so a lying header cannot get past), and zips
    without class folders holding images. Raises ValueError with a message for the user.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not zipfile.is_zipfile(zip_path):
        raise ValueError(f"labelled data {zip_path.name!r} is not a zip file; upload a .zip of an image folder "
                         "(one sub-folder per class)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > max_files:
                raise ValueError(f"labelled data zip has {len(infos)} entries; at most {max_files} are accepted")
            if sum(i.file_size for i in infos) > max_bytes:
                raise ValueError(f"labelled data zip unpacks to more than {max_bytes // 2**20} MB; "
                                 "upload a smaller sample")
            written = 0
            for info in infos:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                    raise ValueError(f"labelled data zip has an unsafe path {info.filename!r}; refusing to extract")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ValueError(f"labelled data zip contains a link {info.filename!r}; refusing to extract")
                if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
                    continue
                target = dest.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ValueError(f"labelled data zip unpacks to more than {max_bytes // 2**20} MB; "
                                             "upload a smaller sample")
                        dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise ValueError(f"labelled data zip is corrupt ({e})") from None
    return find_image_folder_root(dest)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def find_image_folder_root(root: Path) -> Path:
    """The folder whose sub-folders are classes: `root` itself, or the single folder a zip wrapped it in."""
    for _ in range(3):
        subdirs = [d for d in root.iterdir() if d.is_dir()]
        with_images = [d for d in subdirs if any(_is_image(p) for p in d.rglob("*"))]
        loose = [p for p in root.iterdir() if _is_image(p)]
        if len(subdirs) == 1 and not loose and not any(_is_image(p) for p in subdirs[0].iterdir()):
            root = subdirs[0]  # zip of the folder itself: descend
            continue
        if with_images and not loose:
            return root
        break
    raise ValueError("labelled data zip is not an image folder: expected one sub-folder per class with images "
                     f"inside (e.g. cat/001.png, dog/002.jpg; {', '.join(IMAGE_EXTENSIONS)})")


# ---------------------------------------------------------------------------------- events -> view state

@dataclass
class RunView:
    """What the page shows about one run, folded from its events. Plain data; no Gradio in here."""
    device: str = ""
    stage: str = "idle"
    step: int = 0
    total: int = 0
    eta: float | None = None
    started: float = field(default_factory=time.monotonic)
    losses: dict[str, float] = field(default_factory=dict)
    losses_step: int = 0                     # the synthesis step the loss terms are from
    bn_steps: list[int] = field(default_factory=list)
    bn_total: list[float] = field(default_factory=list)
    bn_layers: list[list[float]] = field(default_factory=list)     # (steps, layers)
    kl: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    finetune_offset: int | None = None       # x position where fine-tuning starts on the KL plot
    synth_steps_done: int = 0
    preview: Preview | None = None
    preview_version: int = 0
    log: list[str] = field(default_factory=list)
    report: dict | None = None
    out_dir: str | None = None
    stopped_at: tuple[str, int] | None = None
    error: str | None = None

    def update(self, ev) -> None:
        if isinstance(ev, StageStarted):
            self.stage, self.step, self.total, self.eta = ev.stage, 0, ev.total_steps, None
            if ev.stage == "finetune":
                self.finetune_offset = self.synth_steps_done
            self.log.append(f"[{self.elapsed():5.1f}s] {STAGE_LABELS.get(ev.stage, ev.stage)}"
                            + (f": {ev.message}" if ev.message else ""))
        elif isinstance(ev, Progress):
            self.stage, self.step, self.total, self.eta = ev.stage, ev.step, ev.total_steps, ev.eta
            if ev.losses:
                self.losses, self.losses_step = dict(ev.losses), ev.step
            if ev.stage == "synthesis":
                self.synth_steps_done = ev.step
            if ev.bn_log_likelihood is not None:
                self.bn_steps.append(ev.step)
                self.bn_total.append(float(ev.bn_log_likelihood))
                self.bn_layers.append([float(v) for v in ev.layer_log_likelihood or []])
            x = ev.step if ev.stage == "synthesis" else (self.finetune_offset or 0) + ev.step
            for name, v in ev.student_kl.items():
                xs, ys = self.kl.setdefault(name, ([], []))
                xs.append(x)
                ys.append(float(v))
        elif isinstance(ev, Preview):
            self.preview, self.preview_version = ev, self.preview_version + 1
        elif isinstance(ev, Message):
            self.log.append(f"[{self.elapsed():5.1f}s] {ev.text}")
        elif isinstance(ev, Stopped):
            self.stage, self.stopped_at = "stopped", (ev.stage, ev.step)
            self.log.append(f"[{self.elapsed():5.1f}s] stopped during {ev.stage} at step {ev.step}")
        elif isinstance(ev, Done):
            self.stage, self.report, self.out_dir = "done", ev.report, ev.out_dir
            self.log.append(f"[{self.elapsed():5.1f}s] done")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = max(0, int(round(s)))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def overall_fraction(view: RunView) -> float:
    """0..1 over the whole run, from the stage and the step within it."""
    if view.stage == "done":
        return 1.0
    lo, hi = STAGE_SPANS.get(view.stage, (0.0, 0.0))
    within = view.step / view.total if view.total else 0.0
    return lo + (hi - lo) * min(max(within, 0.0), 1.0)


def status_markdown(view: RunView) -> str:
    """One line: stage, step, device, time left (or the outcome once the run has ended)."""
    if view.error:
        return f"**Could not run.** {view.error}"
    if view.stage == "idle":
        return f"**Ready.** Runs on {view.device}."
    if view.stage == "done":
        return f"**Done** in {format_seconds(view.elapsed())} on {view.device}. Results and downloads are below."
    if view.stage == "stopped":
        st, step = view.stopped_at or ("?", 0)
        return f"**Stopped** during {STAGE_LABELS.get(st, st).lower()} at step {step}; nothing was saved. Ready."
    label = STAGE_LABELS.get(view.stage, view.stage)
    step = f" · step {view.step}/{view.total}" if view.total else ""
    left = f" · ~{format_seconds(view.eta)} left in this stage" if view.eta is not None and view.total else ""
    return f"**{label}**{step} · {view.device}{left} · {format_seconds(view.elapsed())} elapsed"


def progress_html(view: RunView) -> str:
    pct = 100.0 * overall_fraction(view)
    return (f'<div class="gzq-bar" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div class="gzq-fill" style="width:{pct:.1f}%"></div></div>'
            f'<div class="gzq-caption">{pct:.0f}%</div>')


def losses_markdown(view: RunView) -> str:
    if not view.losses:
        return "Loss terms appear once synthesis starts."
    names = {"bn": "BN (−log-likelihood)", "ce": "cross-entropy", "kl_ens": "ensemble KL (adversarial)",
             "total": "total"}
    rows = "\n".join(f"| {names.get(k, k)} | {v:.4g} |" for k, v in view.losses.items())
    return f"| loss term (synthesis step {view.losses_step}) | value |\n|---|---|\n{rows}"


def _stride(n: int) -> int:
    return max(1, math.ceil(n / PLOT_MAX_POINTS))


def _empty_figure(title: str, note: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, template="plotly_white", height=320, margin=dict(l=50, r=20, t=50, b=40),
                      annotations=[dict(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)],
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def bn_figure(view: RunView) -> go.Figure:
    """BN-statistic log-likelihood over synthesis steps: the mean (bold) and each BN layer (thin)."""
    title = "BatchNorm-statistic log-likelihood"
    if not view.bn_steps:
        return _empty_figure(title, "appears when synthesis starts")
    k = _stride(len(view.bn_steps))
    xs = view.bn_steps[::k]
    fig = go.Figure()
    n_layers = min((len(r) for r in view.bn_layers), default=0)
    for j in range(n_layers):
        fig.add_trace(go.Scatter(x=xs, y=[r[j] for r in view.bn_layers[::k]], mode="lines", name=f"BN layer {j + 1}",
                                 line=dict(width=1), opacity=0.35, legendgroup="layers",
                                 showlegend=j == 0, legendgrouptitle_text=None))
    if n_layers:
        fig.data[0].name = f"per layer ({n_layers})"
    fig.add_trace(go.Scatter(x=xs, y=view.bn_total[::k], mode="lines", name="mean over layers",
                             line=dict(width=3, color="#d62728")))
    fig.update_layout(title=title, template="plotly_white", height=320, margin=dict(l=50, r=20, t=50, b=40),
                      xaxis_title="synthesis step", yaxis_title="log-likelihood per channel",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def kl_figure(view: RunView) -> go.Figure:
    """KL(teacher || student) per student over synthesis then fine-tuning steps (log scale once the values
    span a decade or more)."""
    title = "Each student's KL to the teacher"
    if not view.kl:
        return _empty_figure(title, "appears once the students join (after the warm-up)")
    fig = go.Figure()
    values = [y for _, ys in view.kl.values() for y in ys if y > 0]
    span = max(values) / min(values) if values else 1.0
    for name, (xs, ys) in view.kl.items():
        k = _stride(len(xs))
        fig.add_trace(go.Scatter(x=xs[::k], y=[max(y, 1e-8) for y in ys[::k]], mode="lines+markers",
                                 marker=dict(size=3), name=name))
    if view.finetune_offset is not None:
        fig.add_vline(x=view.finetune_offset + 0.5, line_dash="dash", line_color="grey",
                      annotation_text="fine-tune", annotation_position="top right")
    fig.update_layout(title=title, template="plotly_white", height=320, margin=dict(l=50, r=20, t=50, b=40),
                      xaxis_title="step (synthesis, then fine-tuning)", yaxis_title="KL(teacher ‖ student)",
                      yaxis=dict(type="log") if span >= 10 else dict(type="linear"),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def gallery_items(view: RunView, max_images: int = GALLERY_MAX_IMAGES,
                  min_side: int = 96) -> list[tuple[np.ndarray, str]]:
    """The latest preview as (image (H, W) or (H, W, 3) uint8, caption) pairs; images smaller than
    `min_side` are enlarged by a whole factor (nearest neighbour) so their pixels stay sharp in the browser."""
    p = view.preview
    if p is None:
        return []
    imgs = np.asarray(p.images[:max_images])            # (N, H, W, C) uint8
    if imgs.shape[-1] == 1:
        imgs = imgs[..., 0]                              # (N, H, W)
    f = max(1, min_side // imgs.shape[1])
    if f > 1:
        imgs = imgs.repeat(f, axis=1).repeat(f, axis=2)
    names = p.class_names
    return [(img, names[y] if names and 0 <= y < len(names) else f"class {y}")
            for img, y in zip(imgs, p.labels[:max_images])]


RESULT_COLUMNS = ["model", "W/A bits", "protocol", "agreement (%)", "KL", "real accuracy (%)", "size",
                  "compression"]


def results_frame(report: dict | None) -> pd.DataFrame:
    """Teacher vs each student. The real-accuracy column is there only when labelled data was used."""
    if not report:
        return pd.DataFrame(columns=[c for c in RESULT_COLUMNS if c != "real accuracy (%)"])
    t = report["teacher"]
    has_real = t.get("accuracy") is not None or any(s.get("accuracy") is not None for s in report["students"])
    rows = [{"model": f"teacher {t.get('architecture', t.get('name'))} (FP32)", "W/A bits": "32/32",
             "protocol": "—", "agreement (%)": 100.0, "KL": 0.0,
             "real accuracy (%)": t.get("accuracy"), "size": format_bytes(t.get("size_bytes")),
             "compression": "1.0×"}]
    for s in report["students"]:
        ratio = t["size_bytes"] / s["size_bytes"] if s.get("size_bytes") and t.get("size_bytes") else None
        rows.append({"model": f"student {s['name']}", "W/A bits": f"{s['w_bits']}/{s['a_bits']}",
                     "protocol": s["protocol"], "agreement (%)": s["agreement"],
                     "KL": s["kl"], "real accuracy (%)": s.get("accuracy"),
                     "size": format_bytes(s.get("size_bytes")),
                     "compression": f"{ratio:.1f}×" if ratio else "—"})
    cols = RESULT_COLUMNS if has_real else [c for c in RESULT_COLUMNS if c != "real accuracy (%)"]
    return pd.DataFrame(rows, columns=cols)


def run_files(out_dir: str | Path | None) -> list[str]:
    """Downloads of a finished run: report, config, synthetic images (zip), every file of every student
    (weights .safetensors with the .json that rebuilds them, integer weights and ONNX where exported)."""
    if not out_dir or not Path(out_dir).is_dir():
        return []
    out = Path(out_dir)
    files = [out / "report.json", out / "config.json"]
    images = out / "images"
    if images.is_dir():
        archive = out / "synthetic_images.zip"
        if not archive.exists():
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for p in sorted(images.iterdir()):
                    zf.write(p, f"synthetic_images/{p.name}")
        files.append(archive)
    students = out / "students"
    if students.is_dir():
        files += sorted(p for p in students.iterdir() if p.is_file())
    files += sorted(p for p in out.glob("*.onnx"))
    return [str(p) for p in files if p.exists()]


# ------------------------------------------------------------------------------------ running a job

def _device_events(cfg_dict: dict, out_dir: str) -> Iterator:
    """iter_run in the ZeroGPU worker (inputs and events are pickled across; a stop flag cannot be)."""
    yield from iter_run(RunConfig.from_dict(cfg_dict), out_dir)


if spaces is not None:
    _device_events = spaces.GPU(duration=ZEROGPU_SECONDS)(_device_events)


def _events(cfg: RunConfig, out_dir: Path, stop: threading.Event) -> Iterator:
    if ON_ZEROGPU:
        return _device_events(cfg.to_dict(), str(out_dir))
    return iter_run(cfg, out_dir, stop)


def _remember_run(folder: Path) -> None:
    """Keep the last KEEP_RUNS finished runs on disk for download; delete older ones."""
    with _RUNS_LOCK:
        _RECENT_RUNS.append(folder)
        while len(_RECENT_RUNS) > KEEP_RUNS:
            shutil.rmtree(_RECENT_RUNS.popleft(), ignore_errors=True)


@atexit.register
def _remove_recent_runs() -> None:
    """Finished runs are kept for download while the server lives; not after."""
    with _RUNS_LOCK:
        while _RECENT_RUNS:
            shutil.rmtree(_RECENT_RUNS.popleft(), ignore_errors=True)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_gallery(view: RunView, folder: Path) -> list[tuple[str, str]]:
    """Write the latest preview's gallery images as PNG files and return (path, caption) pairs.

    Files with names unique to the preview, rather than arrays: Gradio caches arrays under a hash of their
    bytes and rewrites that file in place, so two visitors whose runs draw the same images (same seed)
    could read a half-written file. A copy of a file is cached atomically.
    """
    from PIL import Image
    items = gallery_items(view)
    if not items:
        return []
    for old in folder.glob("v*"):  # earlier previews: Gradio has its own copy by now
        shutil.rmtree(old, ignore_errors=True)
    out = folder / f"v{view.preview_version:05d}"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, caption) in enumerate(items):
        path = out / f"{i:02d}.png"
        Image.fromarray(img).save(path)
        paths.append((str(path), caption))
    return paths


def _update(view: RunView, gallery: list | None = None, *, plots=False, results=False, running=True) -> tuple:
    """One yield for the run event's outputs; components not given are left as they are (gr.skip)."""
    skip = gr.skip()
    return (
        status_markdown(view),
        progress_html(view),
        gallery if gallery is not None else skip,
        bn_figure(view) if plots else skip,
        kl_figure(view) if plots else skip,
        losses_markdown(view) if plots else skip,
        "\n".join(view.log[-200:]),
        results_frame(view.report) if results else skip,
        run_files(view.out_dir) if results else skip,
        gr.update(interactive=not running),
        gr.update(interactive=running),
    )


def run_gzq(model, checkpoint, num_classes, in_chans, pretrained, w_bits, a_bits, protocol, extra_students, preset,
            steps, num_images, epochs, num_students, seed, lambda_bn, lambda_ce, lambda_adv, lambda_tv, lambda_l2,
            bn_loss, image_param, labelled_zip, request: gr.Request = None):
    """Run GZNQ for the form's settings and stream the page's updates.

    Every run writes to a fresh temp folder, removed unless the run finishes; Stop (a per-session flag,
    plus Gradio's cancel) ends it within one step, and `finally` frees the pipeline either way.
    """
    session = getattr(request, "session_hash", None) or f"anon-{id(threading.current_thread())}"
    handle = _RunHandle()
    stop = handle.stop
    _RUNS[session] = handle
    view = RunView(device=device_label())
    work = Path(tempfile.mkdtemp(prefix="gzq_run_"))
    previews = work / "preview"
    events = None
    keep = False
    try:
        view.stage = "load"
        yield (status_markdown(view), progress_html(view), [], bn_figure(view), kl_figure(view),
               losses_markdown(view), "", results_frame(None), [], gr.update(interactive=False),
               gr.update(interactive=True))
        try:
            data_dir = str(extract_image_folder_zip(labelled_zip, work / "data")) if labelled_zip else None
            cfg = build_config(model, checkpoint, num_classes, in_chans, pretrained, w_bits, a_bits, protocol,
                               extra_students, preset, steps, num_images, epochs, num_students, seed, lambda_bn,
                               lambda_ce, lambda_adv, lambda_tv, lambda_l2, bn_loss, image_param, data_dir)
            if cfg.model.name != "default" and not cfg.model.checkpoint and not cfg.model.pretrained:
                view.log.append(f"note: {cfg.model.name} has no weights (no checkpoint, pretrained off): "
                                "the images will mirror a randomly initialised network")
            events = _events(cfg, work / "run", stop)
            last_ui = last_gallery = 0.0
            shown_version = 0
            for ev in events:
                view.update(ev)
                now = time.monotonic()
                if isinstance(ev, Done):
                    keep = True
                    yield _update(view, save_gallery(view, previews), plots=True, results=True, running=False)
                elif isinstance(ev, Stopped):
                    yield _update(view, save_gallery(view, previews), plots=True, running=False)
                elif isinstance(ev, (StageStarted, Message)) or now - last_ui >= UI_INTERVAL_S:
                    gallery = view.preview_version != shown_version and (
                        now - last_gallery >= GALLERY_INTERVAL_S or view.stage != "synthesis")
                    if gallery:
                        shown_version, last_gallery = view.preview_version, now
                    last_ui = now
                    yield _update(view, save_gallery(view, previews) if gallery else None, plots=True)
            if view.stage not in ("done", "stopped"):  # the stream ended without Done: stopped by the flag
                view.stage, view.stopped_at = "stopped", view.stopped_at or (view.stage, view.step)
                yield _update(view, save_gallery(view, previews), plots=True, running=False)
        except ValueError as e:  # bad input: unknown model, no BatchNorm, checkpoint that does not fit, bad zip...
            view.error = str(e)
            log.info("run refused: %s", e)
            yield _update(view, running=False)
        except Exception as e:  # anything else: a message, never a traceback; the log keeps the details
            log.exception("run failed")
            view.error = f"the run failed ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
            yield _update(view, running=False)
    finally:
        stop.set()
        if events is not None and hasattr(events, "close"):
            events.close()  # runs iter_run's own finally: hooks removed, .partial folder deleted
        if keep:
            shutil.rmtree(work / "data", ignore_errors=True)
            _remember_run(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        del view, events
        _free_memory()
        if _RUNS.get(session) is handle:
            del _RUNS[session]
        handle.finished.set()


def stop_gzq(request: gr.Request = None):
    """Set this session's stop flag (the run ends within one step), wait until the run has wound down
    (hooks removed, folder deleted), then show the idle state.

    Answering only after the run's last update keeps a late progress update from overwriting the idle
    page; Gradio's cancel (wired to the same click) also drops the job if it is still waiting in line.
    """
    session = getattr(request, "session_hash", None)
    handle = _RUNS.get(session) if session else None
    if handle is None:
        return ("**Ready.** No run was going.", progress_html(RunView()), gr.update(interactive=True),
                gr.update(interactive=False))
    handle.stop.set()
    handle.finished.wait(STOP_WAIT_S)
    return ("**Stopped**; nothing was saved. Ready for the next run.", progress_html(RunView()),
            gr.update(interactive=True), gr.update(interactive=False))


def release_session(request: gr.Request = None) -> None:
    """A visitor left the page: stop their run so the next one in line gets the device."""
    handle = _RUNS.get(getattr(request, "session_hash", None) or "")
    if handle is not None:
        handle.stop.set()


def apply_preset(preset: str):
    f = preset_fields(preset)
    return [f[k] for k in ADVANCED_KEYS]


ADVANCED_KEYS = ["steps", "num_images", "epochs", "num_students", "seed", "lambda_bn", "lambda_ce", "lambda_adv",
                 "lambda_tv", "lambda_l2", "bn_loss", "image_param"]


# --------------------------------------------------------------------------------------------- the page

INTRO = """
# GZQ: quantize an image classifier without its data

Pick a timm CNN (or the bundled Fashion-MNIST model, or your own checkpoint) and a bit-width, then press **Run**.
With no training data, the app synthesises images from the model's own BatchNorm statistics
(Generative Zero-shot Network Quantization, He et al. 2021), trains quantized copies of the model on them and
shows it live. At the end, download the quantized students, the synthetic images and a report.
"""


def create_ui(max_queue: int = MAX_QUEUE) -> gr.Blocks:
    """The Blocks of the app, queue configured (one run at a time; at most `max_queue` waiting)."""
    dev = device_label()
    preset0 = default_preset()
    f0 = preset_fields(preset0)
    with gr.Blocks(title="GZQ: data-free quantization", delete_cache=(3600, 7200)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"**Device:** {dev}" + (" · ZeroGPU" if ON_ZEROGPU else ""), elem_id="gzq-device")
        with gr.Row():
            with gr.Column(scale=1, min_width=340):
                model = gr.Dropdown(choices=[(DEFAULT_MODEL_LABEL, "default")] + [(n, n) for n in POPULAR_BN_MODELS],
                                    value="default", allow_custom_value=True, label="Model",
                                    info="the bundled default, a popular timm CNN with BatchNorm, "
                                         "or type any timm name", elem_id="gzq-model")
                pretrained = gr.Checkbox(value=False, label="Download the timm model's pretrained weights (needs "
                                                             "network; not for the default or an upload)")
                with gr.Accordion("Your own checkpoint", open=False):
                    checkpoint = gr.File(label="Checkpoint (.safetensors, or a PyTorch state dict .pt/.pth)",
                                         file_types=[".safetensors", ".pt", ".pth", ".bin", ".ckpt"], type="filepath")
                    gr.Markdown("Choose or type its timm architecture above. A PyTorch file is read with "
                                "`weights_only=True`.")
                    with gr.Row():
                        num_classes = gr.Number(value=0, precision=0, label="classes (0 = timm default)")
                        in_chans = gr.Number(value=0, precision=0, label="input channels (0 = default)")
                with gr.Row():
                    w_bits = gr.Slider(2, 8, value=4, step=1, label="Weight bits")
                    a_bits = gr.Slider(2, 8, value=4, step=1, label="Activation bits")
                extra = gr.Textbox(value="", label="Extra students (same synthesis)", placeholder="e.g. w8a8, w3a3",
                                   info="other bit-widths trained on the same images; comma-separated w<bits>a<bits>")
                protocol = gr.Radio(PROTOCOLS, value="all_layers", label="Protocol")
                preset = gr.Radio(list(UI_PRESETS), value=preset0, label="Preset",
                                  info="quick CPU ≈ 15 s, standard ≈ 1.5 min on a CPU (default model); "
                                       "paper-scale wants a GPU")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        steps = gr.Number(value=f0["steps"], precision=0, label="synthesis steps")
                        num_images = gr.Number(value=f0["num_images"], precision=0, label="synthetic images")
                        epochs = gr.Number(value=f0["epochs"], precision=0, label="fine-tune epochs")
                    with gr.Row():
                        num_students = gr.Number(value=f0["num_students"], precision=0,
                                                 label="students in the ensemble (0 = one per bit-width)")
                        seed = gr.Number(value=f0["seed"], precision=0, label="seed")
                    with gr.Row():
                        lambda_bn = gr.Number(value=f0["lambda_bn"], label="λ BN")
                        lambda_ce = gr.Number(value=f0["lambda_ce"], label="λ CE")
                        lambda_adv = gr.Number(value=f0["lambda_adv"], label="λ adversarial")
                        lambda_tv = gr.Number(value=f0["lambda_tv"], label="λ TV")
                        lambda_l2 = gr.Number(value=f0["lambda_l2"], label="λ L2")
                    with gr.Row():
                        bn_loss = gr.Radio(["likelihood", "mse"], value=f0["bn_loss"], label="BN loss")
                        image_param = gr.Radio(["reparam", "pixel"], value=f0["image_param"], label="images")
                labelled = gr.File(label="Optional: labelled images for real accuracy (.zip of class folders)",
                                   file_types=[".zip"], type="filepath")
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="gzq-run")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="gzq-stop")
            with gr.Column(scale=2):
                status = gr.Markdown(status_markdown(RunView(device=dev)), elem_id="gzq-status")
                progress = gr.HTML(progress_html(RunView()), elem_id="gzq-progress")
                gallery = gr.Gallery(label="Synthesized images", columns=8, height=300, object_fit="contain",
                                     elem_id="gzq-gallery")
                with gr.Row():
                    bn_plot = gr.Plot(label="BN-statistic log-likelihood", elem_id="gzq-bn-plot")
                    kl_plot = gr.Plot(label="Student KL to teacher", elem_id="gzq-kl-plot")
                losses = gr.Markdown(losses_markdown(RunView()), elem_id="gzq-losses")
                run_log = gr.Textbox(label="Run log", lines=4, max_lines=10, interactive=False, elem_id="gzq-log")
        results = gr.Dataframe(value=results_frame(None), label="Results: teacher vs students", wrap=True,
                               interactive=False, elem_id="gzq-results")
        files = gr.File(label="Downloads: student weights (.safetensors + the .json that rebuilds them; ONNX and "
                              "integer weights where exported), synthetic images, report",
                        file_count="multiple", interactive=False, elem_id="gzq-files")

        advanced = [steps, num_images, epochs, num_students, seed, lambda_bn, lambda_ce, lambda_adv, lambda_tv,
                    lambda_l2, bn_loss, image_param]
        preset.change(apply_preset, preset, advanced, queue=False, api_visibility="private")
        inputs = [model, checkpoint, num_classes, in_chans, pretrained, w_bits, a_bits, protocol, extra, preset,
                  *advanced, labelled]
        outputs = [status, progress, gallery, bn_plot, kl_plot, losses, run_log, results, files, run_btn, stop_btn]
        run_event = run_btn.click(run_gzq, inputs, outputs, api_name="run", concurrency_limit=1,
                                  concurrency_id="gzq-run", show_progress="full", show_progress_on=[status])
        stop_btn.click(stop_gzq, None, [status, progress, run_btn, stop_btn], api_name="stop", queue=False,
                       cancels=[run_event])
        demo.unload(release_session)
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="GZQ web app")
    ap.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    ap.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    ap.add_argument("--share", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    create_ui().launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                       theme=gr.themes.Soft())


if __name__ == "__main__":
    main()
