"""The whole GZNQ run as one generator of events: load -> synthesise (+ students) -> fine-tune -> evaluate -> save.

What the app, the CLI and the tests call. A run writes one folder: config.json, report.json, images/,
students/. It is written to `<out>.partial` and renamed when complete, so a stopped or failed run
leaves nothing half-written behind.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import FlipMode, ModelSpec, QuantSpec, RunConfig, SynthConfig, TrainConfig
from .budget import estimate, fit_budget, measure_costs
from .distill import iter_distill
from .evaluate import agreement, load_labelled_data, mean_kl, predict_logits, top1
from .events import Done, Message, Progress, StageStarted, Stopped
from .models import Teacher, load_teacher
from .quant.convert import calibrate_, create_student, fold_bn_, model_size_bytes
from .reconstruct import iter_reconstruct, recon_settings
from .synthesis import SynthResult, augment, flip_check, flips_are_valid, iter_synthesize, jitter_pixels

log = logging.getLogger(__name__)

# Presets: what fits a 2-core CPU in a few minutes on the bundled model, and a GPU budget near the paper's.
# time_budget_s caps the run: on a costlier model the images and steps shrink to fit (gzq.budget).
PRESETS: dict[str, dict] = {
    "cpu": dict(synth=dict(num_images=256, holdout_images=32, batch_size=96, steps=300, warmup_steps=100),
                train=dict(epochs=40, batch_size=64), time_budget_s=600),
    "gpu": dict(synth=dict(num_images=1024, holdout_images=128, batch_size=256, steps=2000, warmup_steps=500),
                train=dict(epochs=100, batch_size=128), time_budget_s=3600),
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def make_config(preset: str | None = None, device: str = "auto", **sections) -> RunConfig:
    """A RunConfig from a preset ("cpu", "gpu", or None = chosen by device) with section overrides.

    Args:
        sections: model=ModelSpec|dict, students=[QuantSpec|str], synth=dict, train=dict, eval=dict, seed=int.
    """
    if preset is None:
        preset = "gpu" if resolve_device(device).type == "cuda" else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = copy.deepcopy(PRESETS[preset])
    d = RunConfig().to_dict()
    d["synth"].update(base["synth"])
    d["train"].update(base["train"])
    d["time_budget_s"] = base.get("time_budget_s")
    for key, val in sections.items():
        if val is None:
            continue
        if key == "students":
            d[key] = [QuantSpec.parse(v).to_dict() if isinstance(v, str) else
                      (v.to_dict() if isinstance(v, QuantSpec) else v) for v in val]
        elif key == "model":
            d[key] = val.to_dict() if isinstance(val, ModelSpec) else {**d[key], **val}
        elif isinstance(val, dict):
            d[key].update(val)
        else:
            d[key] = val
    d["device"], d["preset"] = device, preset
    return RunConfig.from_dict(d)


def student_names(cfg: RunConfig) -> list[tuple[str, QuantSpec]]:
    """The M students: the requested configurations, then extra seeds of the first one up to num_students."""
    out = [(s.name, s) for s in cfg.students]
    extra = max(cfg.synth.num_students - len(out), 0)
    out += [(f"{cfg.students[0].name}_s{i + 1}", cfg.students[0]) for i in range(extra)]
    return out


def _versions() -> dict[str, str]:
    import timm
    v = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        from importlib.metadata import version
        v["gzq"] = version("gzq")
    except Exception:
        v["gzq"] = "source"
    return v


def save_student(path: Path, student: torch.nn.Module, spec: QuantSpec, teacher: Teacher) -> None:
    """Student weights (BN-folded float weights, step sizes, zero points) + the spec needed to rebuild it."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}, str(path))
    meta = {"quant_spec": spec.to_dict(), "teacher": teacher.data_config(), "teacher_name": teacher.name}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def load_student(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, QuantSpec, dict]:
    """Rebuild a saved student exactly: architecture from timm, BN folded, quantizers, then the saved tensors."""
    import timm
    from safetensors.torch import load_file
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    spec = QuantSpec.from_dict(meta["quant_spec"])
    dc = meta["teacher"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dc["model_kwargs"].items()}
    model = timm.create_model(dc["architecture"], pretrained=False, **kwargs).eval()
    example = torch.zeros(1, *dc["input_size"])
    student = create_student(model, spec, example, dc.get("classifier"))
    student.load_state_dict(load_file(str(path)))
    return student.to(device).eval().requires_grad_(False), spec, dc


def estimate_run(cfg: RunConfig):
    """What a run of `cfg` will take on its device, measured before it starts (gzq.budget): loads the teacher,
    builds the students, times one step of each stage and, when cfg.time_budget_s is set, fits the budget.

    Returns:
        a gzq.budget.RunEstimate (.seconds, .per_stage, .text, .budget); .per_stage["load"] is the time this
        call spent loading, which the run itself spends again.
    """
    device = resolve_device(cfg.device)
    t = time.perf_counter()
    teacher = load_teacher(cfg.model, device)
    example = torch.zeros(2, *teacher.input_size, device=device)
    students = {n: create_student(teacher.model, s, example, teacher.classifier) for n, s in student_names(cfg)}
    labelled = load_labelled_data(teacher, cfg.eval)
    load_s = time.perf_counter() - t
    costs = measure_costs(teacher, students, cfg, device)
    n_real = len(labelled[1]) if labelled else 0
    if cfg.time_budget_s is not None:
        _, est = fit_budget(cfg, costs, len(students), cfg.time_budget_s, n_real)
    else:
        est = estimate(cfg, costs, len(students), n_real)
    est.per_stage = {"load": load_s, **est.per_stage}
    est.seconds += load_s
    return est


def iter_run(cfg: RunConfig, out_dir: str | Path | None = None,
             stop: Callable[[], bool] | threading.Event | None = None,
             synth_source: Callable[[Teacher, torch.device], SynthResult] | None = None) -> Iterator:
    """Run GZNQ end to end, yielding events; the last one is Done(report) (or Stopped).

    The stop flag is checked every step and, through StopHooks, inside every forward and backward pass,
    so a stop is honoured within one layer even where one step takes a minute (a large model on a CPU).
    synth_source replaces synthesis with a given image set (the benchmarks' real-data and noise baselines).
    """
    stop_fn = stop.is_set if isinstance(stop, threading.Event) else (stop or (lambda: False))
    where = ["load", 0]   # the stage and step a stop inside a pass is reported at
    stopped = False
    run = _iter_run(cfg, out_dir, stop_fn, synth_source)
    try:
        for ev in run:
            if isinstance(ev, StageStarted):
                where = [ev.stage, 0]
            elif isinstance(ev, Progress):
                where = [ev.stage, ev.step]
            yield ev
    except RunStopped:
        stopped = True    # yielded below, outside the except: its traceback holds the aborted pass's tensors
    finally:
        run.close()
    if stopped:
        yield Stopped(*where)


def _iter_run(cfg: RunConfig, out_dir: str | Path | None, stop_fn: Callable[[], bool],
              synth_source: Callable[[Teacher, torch.device], SynthResult] | None) -> Iterator:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    final = Path(out_dir) if out_dir else None
    partial = final.with_name(final.name + ".partial") if final else None
    if final is not None and final.exists() and (not final.is_dir() or (any(final.iterdir())
                                                                        and not (final / "config.json").exists())):
        raise ValueError(f"output folder {final} exists and is not a GZQ run folder; choose a new --out")
    if partial is not None:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    finished = False
    students: dict = {}
    stop_hooks = None
    try:
        t = time.perf_counter()
        yield StageStarted("load", 0, f"loading {cfg.model.name} on {device}")
        teacher = load_teacher(cfg.model, device)
        example = torch.zeros(2, *teacher.input_size, device=device)
        specs = dict(student_names(cfg))
        for n, s in specs.items():
            check_stop(stop_fn)
            students[n] = create_student(teacher.model, s, example, teacher.classifier)
        check_stop(stop_fn)
        methods = {n: cfg.train.method_for(specs[n]) for n in students}
        reference = None
        if any(m.recon for m in methods.values()):   # the float network in the students' shape (BN folded): what
            reference = copy.deepcopy(teacher.model).requires_grad_(False)    # block reconstruction matches
            fold_bn_(reference, example)
        labelled = load_labelled_data(teacher, cfg.eval)
        stop_hooks = StopHooks(stop_fn, teacher.model, reference, *students.values())  # after the copies: not copied
        timings["load"] = time.perf_counter() - t
        yield Message(f"teacher {teacher.architecture} ({teacher.num_classes} classes, input {teacher.input_size}) "
                      f"on {device}; students: {', '.join(students)}"
                      + (f"; labelled data: {labelled[2]}" if labelled else "; no labelled data"))

        t = time.perf_counter()
        costs = measure_costs(teacher, students, cfg, device)
        n_real = len(labelled[1]) if labelled else 0
        if cfg.time_budget_s is not None and synth_source is None:
            fitted, est = fit_budget(cfg, costs, len(students), cfg.time_budget_s, n_real)
            cfg = dataclasses.replace(fitted, time_budget_s=None)   # the saved config reproduces this budget
        else:
            est = estimate(cfg, costs, len(students), n_real)
        timings["estimate"] = time.perf_counter() - t
        budget = dict(estimate_s=round(est.seconds, 1), per_stage_s={k: round(v, 1) for k, v in est.per_stage.items()},
                      scale=round(est.scale, 3), **est.budget)
        yield Message(f"estimated time: {est.text}")

        t = time.perf_counter()
        calib = dict(method=cfg.students[0].act_init.value, percentile=cfg.students[0].act_percentile)
        seeds = {n for n in students if n not in {s.name for s in cfg.students}}
        if synth_source is not None:
            yield StageStarted("synthesis", 0, "images from a given source")
            synth = synth_source(teacher, device)
            synth.jitter = jitter_pixels(cfg.synth.jitter, teacher.input_size)
            synth.flip = cfg.synth.flip == FlipMode.ON
            if cfg.synth.flip == FlipMode.AUTO:
                with torch.no_grad():
                    synth.flip_check = flip_check(teacher.model, synth.images, synth.images.labels)
                synth.flip = flips_are_valid(synth.flip_check)
        else:
            initial = ({n: copy.deepcopy(s.state_dict()) for n, s in students.items()}
                       if cfg.synth.adversarial and not cfg.synth.keep_students else None)
            synth = yield from iter_synthesize(teacher, students, cfg.synth, device, cfg.seed, stop_fn, calib, seeds)
            if initial is not None:   # the adversaries have shaped the images; fine-tuning starts afresh
                # extra seeds of a configuration would now train into copies of it: they end with synthesis
                students = {n: s for n, s in students.items() if n not in seeds}
                specs = {n: specs[n] for n in students}
                for n, s in students.items():
                    s.load_state_dict(initial[n])
                synth.students_calibrated = False
        timings["synthesis"] = time.perf_counter() - t
        if synth_source is None and synth.steps_done < cfg.synth.steps:
            return
        if not synth.students_calibrated:
            t = time.perf_counter()
            yield StageStarted("calibration", 0)
            with torch.no_grad():
                batches = [synth.images(i.to(device), noise=False) for i in torch.split(synth.train_idx, 64)]
            for n, s in students.items():
                calibrate_(s, batches, specs[n].act_init.value, specs[n].act_percentile)
            timings["calibration"] = time.perf_counter() - t

        jitter = jitter_pixels(cfg.synth.jitter, teacher.input_size)   # the teacher labels (or fits) each rolled
        recon = {n: s for n, s in students.items() if methods[n].recon}   # image itself, so fine-tuning keeps it
        if recon:
            t = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed + 13)
            dev_gen = torch.Generator(device=device).manual_seed(cfg.seed + 14)
            draw = lambda idx: augment(synth.images(idx, dev_gen, noise=cfg.train.resample), jitter, synth.flip, gen)  # noqa: E731
            steps = yield from iter_reconstruct(reference, recon, draw, synth.train_idx, recon_settings(cfg.train, len(synth.train_idx)),
                                                device, cfg.seed, stop_fn)
            reference = None
            timings["reconstruct"] = time.perf_counter() - t
            if steps == 0 or stop_fn():
                return
        kd = {n: s for n, s in students.items() if methods[n].kd}
        if kd:
            t = time.perf_counter()
            steps = yield from iter_distill(teacher, kd, synth.images, synth.train_idx, cfg.train, device,
                                            jitter, synth.flip, cfg.seed, stop_fn)
            timings["finetune"] = time.perf_counter() - t
            if cfg.train.epochs and steps == 0 or stop_fn():
                return

        t = time.perf_counter()
        yield StageStarted("evaluate", len(students))
        report = evaluate_run(teacher, students, specs, synth, labelled, cfg, device)
        for row in report["students"]:
            row["finetune"] = methods[row["name"]].value
        timings["evaluate"] = time.perf_counter() - t

        health = synthesis_health(report, synth)
        report.update(timings=timings, device=str(device), config=cfg.to_dict(), versions=_versions(), budget=budget,
                      synthesis={"final_bn_log_likelihood": health["final_bn_log_likelihood"],
                                 "final_ce": synth.history["ce"][-1] if synth.history.get("ce") else None,
                                 "num_images": cfg.synth.num_images, "holdout_images": cfg.synth.holdout_images,
                                 "health": health},
                      warnings=health_warnings(health))
        for w in report["warnings"]:
            yield Message(w, level="warning")
        stop_hooks.remove()  # export traces the students; saving is not interrupted half-way
        check_stop(stop_fn)
        if partial is not None:
            t = time.perf_counter()
            yield StageStarted("save", 0, f"writing {final}")
            save_run(partial, cfg, report, teacher, students, specs, synth)
            timings["save"] = time.perf_counter() - t
            timings["total"] = sum(timings.values())
            (partial / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
        timings.setdefault("total", sum(timings.values()))
        finished = True
        yield Done(report, str(final) if final else None)
    finally:
        if stop_hooks is not None:
            stop_hooks.remove()
        students.clear()
        if partial is not None and not finished and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


# ------------------------------------------------------------------------- stopping inside a pass

class RunStopped(Exception):
    """The stop flag was found set inside a forward or backward pass; iter_run turns it into Stopped."""


def check_stop(stop_fn: Callable[[], bool]) -> None:
    if stop_fn():
        raise RunStopped()


class StopHooks:
    """Check the stop flag at every module's forward and at the backward of every module output.

    One synthesis step of a large model on a CPU can take a minute; with these hooks a stop raises
    RunStopped within one layer of the pass that is running, and unwinding frees that pass's tensors.
    Forward hooks only (no module backward hooks, which would wrap outputs that timm modifies in place);
    the backward check is a tensor hook on each output, which autograd calls as the gradient flows back.
    """

    def __init__(self, stop_fn: Callable[[], bool], *models: torch.nn.Module):
        self.stop_fn = stop_fn
        self.handles = [m.register_forward_hook(self._forward) for model in models if model is not None
                        for m in model.modules()]

    def _check(self, *_) -> None:
        check_stop(self.stop_fn)

    def _forward(self, module, args, output) -> None:
        self._check()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._check)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def evaluate_run(teacher: Teacher, students: dict, specs: dict, synth: SynthResult, labelled, cfg: RunConfig,
                 device: torch.device) -> dict:
    """Teacher and student metrics: agreement and KL on held-out synthetic images, real top-1, size."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 99)
    idx = synth.holdout_idx if len(synth.holdout_idx) else synth.train_idx
    with torch.no_grad():
        fresh = torch.cat([synth.images(idx.to(device), gen) for _ in range(cfg.eval.fresh_draws)]).cpu()
    t_fresh = predict_logits(teacher.model, fresh, device)
    t_real = predict_logits(teacher.model, labelled[0], device) if labelled else None
    fp_size = sum(p.numel() * 4 for p in teacher.model.parameters())
    rows = []
    for name, s in students.items():
        s.eval()
        s_fresh = predict_logits(s, fresh, device)
        row = dict(name=name, w_bits=specs[name].w_bits, a_bits=specs[name].a_bits,
                   protocol=specs[name].protocol.value, agreement=round(agreement(t_fresh, s_fresh), 2),
                   kl=round(mean_kl(t_fresh, s_fresh), 5), size_bytes=model_size_bytes(s))
        if labelled:
            s_real = predict_logits(s, labelled[0], device)
            row.update(accuracy=round(top1(s_real, labelled[1]), 2),
                       real_agreement=round(agreement(t_real, s_real), 2))
        else:
            row.update(accuracy=None, real_agreement=None)
        rows.append(row)
    return dict(
        teacher=dict(name=teacher.name, architecture=teacher.architecture,
                     accuracy=round(top1(t_real, labelled[1]), 2) if labelled else None, size_bytes=fp_size,
                     synthetic_label_agreement=round(top1(t_fresh, synth.images.labels[idx.to(device)].cpu()
                                                          .repeat(cfg.eval.fresh_draws)), 2)),
        students=rows,
        labelled_data=labelled[2] if labelled else None,
        fresh_images=len(fresh),
    )


#: below this share of held-out synthetic images carrying their label, the images have lost their class signal
MIN_LABEL_AGREEMENT = 90.0


def synthesis_health(report: dict, synth: SynthResult) -> dict:
    """Signals that the synthetic images are fit to train on: the teacher's agreement with their labels (on
    fresh draws of held-out images), the final BN log-likelihood, the CE weight the recipe ended on, and the
    flip decision."""
    h = synth.history
    return dict(label_agreement=report["teacher"]["synthetic_label_agreement"],
                final_bn_log_likelihood=h["bn_ll"][-1] if h.get("bn_ll") else None,
                final_ce_weight=h["ce_weight"][-1] if h.get("ce_weight") else None,
                flip=synth.flip, jitter_pixels=synth.jitter, flip_check=synth.flip_check)


def health_warnings(health: dict) -> list[str]:
    """Plain-language warnings for a report (empty when the synthesis looks healthy)."""
    out = []
    agree = health.get("label_agreement")
    if agree is not None and agree < MIN_LABEL_AGREEMENT:
        out.append(f"the teacher recognises only {agree:.0f} % of the synthetic images as their intended class "
                   f"(healthy: {MIN_LABEL_AGREEMENT:.0f} % or more), so the quantized models learnt from weak "
                   "images; try the standard preset, more synthesis steps, or check that the model's weights are "
                   "trained (a randomly initialised network has no classes to show)")
    return out


def save_run(folder: Path, cfg: RunConfig, report: dict, teacher: Teacher, students: dict, specs: dict,
             synth: SynthResult) -> None:
    from PIL import Image
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    img_dir = folder / "images"
    img_dir.mkdir(exist_ok=True)
    pixels = synth.images.to_uint8(None, teacher.mean, teacher.std)
    labels = synth.images.labels.tolist()
    names = teacher.class_names
    holdout = set(synth.holdout_idx.tolist())
    index = []
    for i, (px, y) in enumerate(zip(pixels, labels)):
        fname = f"{i:04d}_{y}.png"
        Image.fromarray(px[..., 0] if px.shape[-1] == 1 else px).save(img_dir / fname)
        index.append(dict(file=fname, label=y, class_name=names[y] if names else None,
                          split="holdout" if i in holdout else "train"))
    (img_dir / "labels.json").write_text(json.dumps(index, indent=1) + "\n")
    for name, s in students.items():
        save_student(folder / "students" / f"{name}.safetensors", s, specs[name], teacher)
    if cfg.export.formats:  # ONNX QDQ + integer safetensors (gzq/export.py); records files in the report
        from .export import export_run
        export_run(folder, cfg.export, report, teacher, students, specs)
