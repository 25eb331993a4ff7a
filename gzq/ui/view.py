"""What the page shows about a run, folded from its events, and the pure functions that render it.

Plain data and strings: no Gradio here, so the translation from events to text, tables and HTML is
testable without a server.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..events import Done, Message, Preview, Progress, StageStarted, Stopped

STAGE_LABELS = {"load": "Loading model", "synthesis": "Synthesising images", "calibration": "Measuring value ranges",
                "reconstruct": "Fitting the small models block by block", "finetune": "Training the small models",
                "evaluate": "Evaluating", "save": "Saving results"}
#: share of the whole run each stage takes, for the overall progress bar
STAGE_SPANS = {"load": (0.0, 0.05), "synthesis": (0.05, 0.80), "calibration": (0.80, 0.82),
               "reconstruct": (0.82, 0.95), "finetune": (0.82, 0.95), "evaluate": (0.95, 0.98), "save": (0.98, 1.0)}
THUMB_SIDE = 112          # gallery thumbnails: larger images are scaled down to this side
MANY_CLASSES = 10         # above this many classes the gallery offers a per-class view
ALL_CLASSES = "All classes"


@dataclass
class RunView:
    """One run as the page sees it."""
    device: str = ""
    stage: str = "idle"
    step: int = 0
    total: int = 0
    eta: float | None = None
    started: float = field(default_factory=time.monotonic)
    estimate: float | None = None            # seconds the whole run was estimated to take
    losses: dict[str, float] = field(default_factory=dict)
    losses_step: int = 0                     # the synthesis step the loss terms are from
    bn_steps: list[int] = field(default_factory=list)
    bn_total: list[float] = field(default_factory=list)
    bn_layers: list[list[float]] = field(default_factory=list)     # (steps, layers)
    kl: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    finetune_offset: int | None = None       # x position where fine-tuning starts on the KL plot
    recon: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)   # per student: step, error
    recon_blocks: list[tuple[int, str]] = field(default_factory=list)   # (first step, unit) of block reconstruction
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
            self.note(STAGE_LABELS.get(ev.stage, ev.stage) + (f": {ev.message}" if ev.message else ""))
        elif isinstance(ev, Progress):
            self.stage, self.step, self.total, self.eta = ev.stage, ev.step, ev.total_steps, ev.eta
            if ev.stage == "reconstruct":
                self._add_recon(ev)
            elif ev.losses:
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
            self.note(ev.text)
        elif isinstance(ev, Stopped):
            self.stage, self.stopped_at = "stopped", (ev.stage, ev.step)
            self.note(f"stopped during {ev.stage} at step {ev.step}")
        elif isinstance(ev, Done):
            self.stage, self.report, self.out_dir = "done", ev.report, ev.out_dir
            self.note("done")

    def _add_recon(self, ev: Progress) -> None:
        if ev.block and (not self.recon_blocks or self.recon_blocks[-1][1] != ev.block):
            self.recon_blocks.append((ev.step, ev.block))
        for name, v in ev.losses.items():
            xs, ys = self.recon.setdefault(name, ([], []))
            xs.append(ev.step)
            ys.append(float(v))

    def note(self, text: str) -> None:
        self.log.append(f"[{self.elapsed():5.1f}s] {text}")

    def fail(self, message: str) -> None:
        self.error = message
        self.note(f"could not run: {message}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
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
    """One line: stage, step, time so far and left (or the outcome once the run has ended)."""
    if view.error:
        return f"**Could not run.** {view.error}"
    if view.stage == "idle":
        return f"**Ready.** Runs on {view.device}."
    if view.stage == "waiting":
        return f"**Waiting** for the previous run to finish stopping · {format_seconds(view.elapsed())} elapsed"
    if view.stage == "done":
        return f"**Done** in {format_seconds(view.elapsed())} on {view.device}. Your download is below."
    if view.stage == "stopped":
        st, step = view.stopped_at or ("?", 0)
        return (f"**Stopped** during {STAGE_LABELS.get(st, st).lower()} at step {step}; nothing was saved. "
                "Ready for the next run.")
    label = STAGE_LABELS.get(view.stage, view.stage)
    step = f" · step {view.step}/{view.total}" if view.total else ""
    left = ""
    if view.eta is not None and view.total:
        left = f" · ~{format_seconds(view.eta)} left in this stage"
    elif view.estimate:
        left = f" · about {format_seconds(max(view.estimate - view.elapsed(), 0))} left of the estimate"
    return f"**{label}**{step} · {format_seconds(view.elapsed())} elapsed{left}"


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


# ------------------------------------------------------------------------------------------ the gallery

def _data_uri(img: np.ndarray) -> str:
    """A thumbnail as a data URI: small images as PNG (the browser enlarges them pixel-sharp), large ones
    scaled down to THUMB_SIDE and sent as JPEG."""
    im = Image.fromarray(img)
    buf = io.BytesIO()
    if max(im.size) <= THUMB_SIDE:
        im.save(buf, "PNG")
        mime = "png"
    else:
        im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
        im.save(buf, "JPEG", quality=85)
        mime = "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class GalleryItems:
    """Every synthetic image of a preview as a thumbnail, with its class."""
    uris: list[str]
    labels: list[int]
    class_names: list[str] | None
    step: int = 0

    def name(self, y: int) -> str:
        return self.class_names[y] if self.class_names and 0 <= y < len(self.class_names) else f"class {y}"

    def classes(self) -> list[str]:
        """Choices of the per-class view: all, then each class present (in class order)."""
        return [ALL_CLASSES] + [self.name(y) for y in sorted(set(self.labels))]


def gallery_items(images: np.ndarray, labels: list[int], class_names: list[str] | None, step: int = 0) -> GalleryItems:
    """Thumbnails of (N, H, W, C) uint8 images, in class order (stable), so one class's images sit together."""
    imgs = np.asarray(images)
    if imgs.shape[-1] == 1:
        imgs = imgs[..., 0]                                 # (N, H, W)
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    return GalleryItems([_data_uri(imgs[i]) for i in order], [int(labels[i]) for i in order], class_names, step)


def gallery_html(items: GalleryItems | None, only: str | None = None, note: str = "") -> str:
    """All images as a grid of thumbnails, each with its class written under it (not over it)."""
    if items is None or not items.uris:
        note = html.escape(note or "The synthetic images appear here as they form.")
        return f'<div class="gzq-gallery-empty">{note}</div>'
    pairs = [(u, items.name(y)) for u, y in zip(items.uris, items.labels)]
    if only and only != ALL_CLASSES:
        pairs = [(u, n) for u, n in pairs if n == only]
    figs = "".join(f'<figure><img src="{u}" alt="synthetic image of {html.escape(n)}" loading="lazy">'
                   f'<figcaption title="{html.escape(n)}">{html.escape(n)}</figcaption></figure>' for u, n in pairs)
    shown = f"{len(pairs)} of {len(items.uris)}" if len(pairs) != len(items.uris) else f"all {len(pairs)}"
    head = (f'<div class="gzq-gallery-head">{shown} images{f" · step {items.step}" if items.step else ""} · '
            "short runs leave them noisy: what matters is that they carry the statistics the model learned</div>")
    return f'{head}<div class="gzq-grid">{figs}</div>'


def saved_gallery(out_dir: str | Path) -> GalleryItems | None:
    """The gallery of a finished run, from its images/ folder (labels.json names each file's class)."""
    folder = Path(out_dir) / "images"
    index = folder / "labels.json"
    if not index.exists():
        return None
    rows = json.loads(index.read_text())
    names: dict[int, str] = {r["label"]: r["class_name"] for r in rows if r.get("class_name")}
    class_names = [names.get(i, f"class {i}") for i in range(max(names) + 1)] if names else None
    images = np.stack([np.asarray(Image.open(folder / r["file"])) for r in rows])
    if images.ndim == 3:
        images = images[..., None]
    return gallery_items(images, [r["label"] for r in rows], class_names)


# ----------------------------------------------------------------------------------- results and files

RESULT_COLUMNS = ["Model", "Bits", "Agreement %", "Accuracy %", "File size", "Smaller"]


def _file_bytes(row: dict, out_dir: Path | None) -> int | None:
    """Size of a row's ONNX download as it is on disk (the file the user gets), else None."""
    info = (row.get("files") or {}).get("onnx") or {}
    if out_dir is not None and info.get("path") and (out_dir / info["path"]).is_file():
        return (out_dir / info["path"]).stat().st_size
    return info.get("bytes")


def results_frame(report: dict | None, out_dir: str | Path | None = None) -> pd.DataFrame:
    """The original model vs each quantized one, in words a non-specialist reads.

    Agreement: how often the quantized model picks the same class as the original on fresh synthetic
    images. Accuracy: on real labelled images (only when there are some). File size: the ONNX download.
    """
    cols = [c for c in RESULT_COLUMNS if c != "Accuracy %"]
    if not report:
        return pd.DataFrame(columns=cols)
    out = Path(out_dir) if out_dir else None
    t = report["teacher"]
    has_real = t.get("accuracy") is not None or any(s.get("accuracy") is not None for s in report["students"])
    t_bytes = _file_bytes(t, out)
    rows = [{"Model": f"original {t.get('architecture', t.get('name'))}", "Bits": "32",
             "Agreement %": 100.0, "Accuracy %": t.get("accuracy"),
             "File size": format_bytes(t_bytes or t.get("size_bytes")), "Smaller": "1×"}]
    for s in report["students"]:
        s_bytes = _file_bytes(s, out)
        ratio = (t_bytes or t.get("size_bytes") or 0) / s_bytes if s_bytes else None
        bits = f"{s['w_bits']}" if s["w_bits"] == s["a_bits"] else f"{s['w_bits']}/{s['a_bits']}"
        rows.append({"Model": f"quantized {s['name']}", "Bits": bits, "Agreement %": s["agreement"],
                     "Accuracy %": s.get("accuracy"), "File size": format_bytes(s_bytes or s.get("size_bytes")),
                     "Smaller": f"{ratio:.1f}×" if ratio else "—"})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS if has_real else cols)


def technical_markdown(report: dict | None) -> str:
    """The numbers behind the table for specialists: protocol, KL, in-memory size, synthesis health, timings."""
    if not report:
        return ""
    lines = ["| student | protocol | KL to original | agreement % | real accuracy % | weights in memory |",
             "|---|---|---|---|---|---|"]
    for s in report["students"]:
        acc = "—" if s.get("accuracy") is None else s["accuracy"]
        lines.append(f"| {s['name']} | {s['protocol']} | {s['kl']} | {s['agreement']} | {acc} | "
                     f"{format_bytes(s.get('size_bytes'))} |")
    health = (report.get("synthesis") or {}).get("health") or {}
    if health:
        lines.append("\nSynthesis health: " + ", ".join(f"{k} {v}" for k, v in health.items()))
    timings = report.get("timings") or {}
    if timings:
        lines.append("\nTime per stage: " + ", ".join(f"{k} {format_seconds(v)}" for k, v in timings.items()))
    return "\n".join(lines)


#: one line per kind of file a run writes: (how its name ends, what it is)
FILE_NOTES: list[tuple[str, str]] = [
    ("_int.safetensors", "Integer weights with their scales and zero points, for your own runtime."),
    ("_int.json", "Layout of the integer-weights file: bits, scales and layer names."),
    ("teacher_fp32.onnx", "The original model as ONNX in 32-bit floats, to compare against."),
    (".onnx", "The quantized model as ONNX; runs in onnxruntime without this project."),
    (".safetensors", "Training checkpoint (float weights and step sizes); rebuild it in Python with "
                     "gzq.checkpoint.load_student."),
    ("report.json", "Every number of this run: settings, accuracy, timings, versions."),
    ("config.json", "The settings of this run, to repeat it with the command line."),
    ("synthetic_images.zip", "The synthetic images (PNG) with their class labels."),
    (".json", "What the training checkpoint of the same name needs to be rebuilt."),
]


def file_note(name: str) -> str:
    return next((note for end, note in FILE_NOTES if name.endswith(end)), "")


def run_files(out_dir: str | Path | None) -> list[str]:
    """Every download of a finished run: report, config, synthetic images (zipped here once), each
    student's files, and the original model's ONNX."""
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
    files += sorted(out.glob("*.onnx"))
    return [str(p) for p in files if p.exists()]


def primary_download(report: dict | None, out_dir: str | Path | None) -> Path | None:
    """The file most people want: the first student's ONNX (falls back to its checkpoint if export failed)."""
    if not report or not out_dir or not report.get("students"):
        return None
    out = Path(out_dir)
    row = report["students"][0]
    info = (row.get("files") or {}).get("onnx") or {}
    if info.get("path") and (out / info["path"]).is_file():
        return out / info["path"]
    fallback = out / "students" / f"{row['name']}.safetensors"
    return fallback if fallback.is_file() else None


def file_url(path: str | Path) -> str:
    """Where the page downloads a run's file (run folders are served as Gradio static paths)."""
    return "gradio_api/file=" + str(Path(path).resolve())


def downloads_html(report: dict | None, out_dir: str | Path | None) -> str:
    """Warnings of the run, then one big download link with the file's real size."""
    if not report:
        return ""
    parts = []
    warnings = list(report.get("warnings") or [])
    if warnings:
        items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
        parts.append(f'<div class="gzq-warnings" role="alert"><strong>Check these before you use the '
                     f'result:</strong><ul>{items}</ul></div>')
    path = primary_download(report, out_dir)
    if path is not None:
        size = path.stat().st_size
        what = ("Quantized model (ONNX, runs in onnxruntime)" if path.suffix == ".onnx"
                else "Quantized model (PyTorch checkpoint; the ONNX export failed, see the report)")
        parts.append(f'<a class="gzq-primary" id="gzq-primary-download" href="{html.escape(file_url(path))}" '
                     f'download="{html.escape(path.name)}" data-bytes="{size}">'
                     f'<span class="gzq-primary-what">Download: {what}</span>'
                     f'<span class="gzq-primary-file">{html.escape(path.name)} · '
                     f'<span class="gzq-size">{format_bytes(size)}</span></span></a>')
    return "".join(parts)


def files_html(files: list[str]) -> str:
    """Every file of the run, one per row: name (a download link), what it is, size."""
    if not files:
        return ""
    rows = []
    for f in files:
        p = Path(f)
        rows.append(f'<li><a href="{html.escape(file_url(p))}" download="{html.escape(p.name)}">'
                    f'{html.escape(p.name)}</a> <span class="gzq-file-size">{format_bytes(p.stat().st_size)}</span>'
                    f'<div class="gzq-file-note">{html.escape(file_note(p.name))}</div></li>')
    return f'<ul class="gzq-files">{"".join(rows)}</ul>'
