"""The whole GZNQ run as one generator of events: load -> synthesise (+ students) -> fine-tune -> evaluate -> save.

Orchestration only: the stages live in their modules (synthesis, distill, evaluate, export, budget) and this
module chains them. What the app, the CLI and the tests call; `run` is the one-call form for Python users.
A run writes one folder: config.json, report.json, images/, students/. It is written to `<out>.partial`
and renamed when complete, so a stopped or failed run leaves nothing half-written behind.

Under torchrun (gzq.dist) every rank runs this same generator: the stages split their work over ranks,
rank 0 alone evaluates and writes, and it renames the folder only once every rank has finished; a rank that
fails or dies fails the others at their next collective, and nothing is left on disk.
"""
from __future__ import annotations

import contextlib
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

from . import dist
from .accel import channels_last_
from .augment import augment, finetune_jitter, jitter_pixels
from .budget import fits_branches, measure_costs, plan_run
from .checkpoint import save_student
from .config import AUTO_PERCENTILE_FALLBACK, FUSE_KL_SLACK, FlipMode, RunConfig, student_specs
from .distill import folded_copy, iter_distill
from .evaluate import evaluate_run, health_warnings, kl_score, load_labelled_data, synthesis_health
from .events import Done, Message, Progress, StageStarted, Stopped
from .models import Teacher, load_teacher
from .presets import resolve_device
from .quant.convert import IdentityTaps, calibrate_, create_student, has_branches, quant_wrappers
from .reconstruct import iter_reconstruct, recon_settings
from .synthesis import SynthResult, flip_check, flips_are_valid, iter_synthesize

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import timm
    v = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        from importlib.metadata import version
        v["gzq"] = version("gzq")
    except Exception:
        v["gzq"] = "source"
    return v


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
    students = {n: create_student(teacher.model, s, example, teacher.classifier) for n, s in student_specs(cfg)}
    labelled = load_labelled_data(teacher, cfg.eval)
    load_s = time.perf_counter() - t
    costs = measure_costs(teacher, students, cfg, device)
    n_real = len(labelled.labels) if labelled else 0
    _, est = plan_run(cfg, costs, len(students), cfg.time_budget_s, n_real)
    est.per_stage = {"load": load_s, **est.per_stage}
    est.seconds += load_s
    return est


def run(cfg: RunConfig, out_dir: str | Path | None = None,
        stop: Callable[[], bool] | threading.Event | None = None,
        synth_source: Callable[[Teacher, torch.device], SynthResult] | None = None) -> dict:
    """Run GZNQ end to end and return its report (what report.json holds); the one-call form of iter_run,
    with the same arguments.

    Raises:
        RunStopped: the stop flag was set before the run finished.
    """
    last = None
    for last in iter_run(cfg, out_dir, stop, synth_source):
        pass
    if isinstance(last, Stopped):
        raise RunStopped(f"stopped during {last.stage} at step {last.step}")
    if not isinstance(last, Done):
        raise RunStopped("the run ended without a report")
    return last.report


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


def check_world(cfg: RunConfig, world: int) -> None:
    """Refuse a budget too small to split over `world` processes: each needs images to train on and a part
    of every batch."""
    if world <= 1:
        return
    train_images = cfg.synth.num_images - cfg.synth.holdout_images
    if train_images < 2 * world:
        raise ValueError(f"{world} processes need at least {2 * world} training images (2 each), but the run has "
                         f"{train_images} ({cfg.synth.num_images} images, {cfg.synth.holdout_images} held out); "
                         "use more images or fewer processes")
    batches = {"synth.batch_size": cfg.synth.batch_size, "train.batch_size": cfg.train.batch_size,
               "train.recon_batch_size": cfg.train.recon_batch_size}
    small = [f"{k}={v}" for k, v in batches.items() if v < world]
    if small:
        raise ValueError(f"{world} processes split every batch, so each batch needs at least {world} images; "
                         f"got {', '.join(small)}")


def _iter_run(cfg: RunConfig, out_dir: str | Path | None, stop_fn: Callable[[], bool],
              synth_source: Callable[[Teacher, torch.device], SynthResult] | None) -> Iterator:
    device = resolve_device(cfg.device)
    world, main = dist.world_size(), dist.is_main()
    check_world(cfg, world)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    final = Path(out_dir) if out_dir else None
    partial = final.with_name(final.name + ".partial") if final else None
    if final is not None and final.exists() and (not final.is_dir() or (any(final.iterdir())
                                                                        and not (final / "config.json").exists())):
        raise ValueError(f"output folder {final} exists and is not a GZQ run folder; choose a new --out")
    if not main:
        final = partial = None
    if partial is not None:
        if partial.exists():
            shutil.rmtree(partial)
        if world == 1:   # with many processes rank 0 creates it only to write, after the ranks have finished,
            partial.mkdir(parents=True)   # so even a rank 0 that is killed mid-run leaves nothing behind
    finished = False
    students: dict = {}
    stop_hooks = None
    try:
        t = time.perf_counter()
        yield StageStarted("load", 0, f"loading {cfg.model.name} on {device}")
        teacher = load_teacher(cfg.model, device)
        example = torch.zeros(2, *teacher.input_size, device=device)
        specs = dict(student_specs(cfg))
        for n, s in specs.items():
            check_stop(stop_fn)
            students[n] = create_student(teacher.model, s, example, teacher.classifier)
        check_stop(stop_fn)
        methods = {n: cfg.train.method_for(specs[n]) for n in students}
        reference = None
        if any(m.recon for m in methods.values()) or cfg.train.feature_kd > 0 or cfg.train.stats_kd > 0:
            # the float network in the students' shape (BN folded): what block reconstruction and the
            # unit-output and channel-moment terms of KD match
            reference = folded_copy(teacher, example)
        if cfg.channels_last:
            for m in (teacher.model, reference, *students.values()):
                channels_last_(m)
        labelled = load_labelled_data(teacher, cfg.eval)
        stop_hooks = StopHooks(stop_fn, teacher.model, reference, *students.values())  # after the copies: not copied
        timings["load"] = time.perf_counter() - t
        yield Message(f"teacher {teacher.architecture} ({teacher.num_classes} classes, input {teacher.input_size}) "
                      f"on {device}; students: {', '.join(students)}"
                      + (f"; labelled data: {labelled.source}" if labelled else "; no labelled data"))

        t = time.perf_counter()
        costs = measure_costs(teacher, students, cfg, device, given_images=synth_source is not None)
        n_real = len(labelled.labels) if labelled else 0
        seconds = cfg.time_budget_s if synth_source is None else None
        fitted, est = plan_run(cfg, costs, len(students), seconds, n_real)
        cfg = dataclasses.replace(fitted, time_budget_s=None)   # the saved config reproduces this budget
        timings["estimate"] = time.perf_counter() - t
        budget = dict(estimate_s=round(est.seconds, 1), per_stage_s={k: round(v, 1) for k, v in est.per_stage.items()},
                      scale=round(est.scale, 3), **est.budget)
        text = est.text
        if world > 1:   # every rank runs rank 0's budget (each measured its own, as one process)
            cfg_d, budget, text = dist.broadcast_object((cfg.to_dict(), budget, text))
            cfg = RunConfig.from_dict(cfg_d)
            check_world(cfg, world)
            budget["processes"] = world
        yield Message(f"estimated time: {text}")

        t = time.perf_counter()
        calib = dict(method=cfg.students[0].act_init, percentile=cfg.students[0].act_percentile)
        if calib["percentile"] == "auto" and not any(s.probes_percentile for s in cfg.students):
            calib["percentile"] = AUTO_PERCENTILE_FALLBACK   # nothing to choose: no teacher pass for a probe
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
            synth = yield from iter_synthesize(teacher, students, cfg.synth, device, cfg.seed, stop_fn, calib, seeds,
                                               amp=cfg.amp)
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
        fusion: dict[str, dict] = {}   # students.fuse_branches=auto: the KLs it chose by
        auto_fuse = set()
        for n in students:   # resolved below where it is chosen; students calibrated during synthesis keep branches
            if specs[n].fuse_branches == "auto":
                specs[n] = dataclasses.replace(specs[n], fuse_branches=False)
                auto_fuse.add(n)
        if not has_branches(teacher.model):
            auto_fuse = set()
        if not synth.students_calibrated:
            t = time.perf_counter()
            yield StageStarted("calibration", 0)
            synth.calibration = {}
            with torch.no_grad():
                batches = [synth.images(i.to(device), noise=False)   # each rank its share; calibrate_ reduces
                           for i in torch.split(dist.local_slice(synth.train_idx), 64)]
                score = None
                if auto_fuse or any(specs[n].probes_percentile for n in students):   # judged on the held-out images
                    held = synth.holdout_idx if len(synth.holdout_idx) else synth.train_idx
                    score = kl_score(teacher.model, synth.images(dist.local_slice(held).to(device), noise=False))
            for n, s in students.items():
                chosen = calibrate_(s, batches, specs[n].act_init, specs[n].act_percentile, score=score)
                if chosen and chosen["scores"]:   # probed (a percentile-calibrated student)
                    synth.calibration[n] = chosen
            for n in sorted(n for n in auto_fuse if fits_branches(cfg, methods[n])):
                auto_fuse.discard(n)
                yield Message(f"{n}: kept the re-parameterisable branches (block reconstruction or KD's unit "
                              f"terms fit the branched network)")
            chosen_forms = _choose_fusion(teacher, students, specs, auto_fuse, batches, example, score, stop_hooks)
            for n, (student, chosen, kl) in chosen_forms.items():
                fusion[n] = kl
                if student is not None:
                    student = channels_last_(student) if cfg.channels_last else student
                    stop_hooks.swap(students[n], student)
                    students[n] = student
                    synth.calibration.pop(n, None)
                    if chosen and chosen["scores"]:
                        synth.calibration[n] = chosen
                yield Message(f"{n}: {'fused' if specs[n].fuse_branches else 'kept'} the re-parameterisable branches "
                              f"(KL to the teacher on held-out synthetic images: branches {kl['branches']:.5f}, "
                              f"fused {kl['fused']:.5f})")
            timings["calibration"] = time.perf_counter() - t
        for n, chosen in synth.calibration.items():
            kls = ", ".join(f"{p:g}: {v:.4f}" for p, v in chosen["scores"].items())
            yield Message(f"{n}: activation ranges at percentile {chosen['percentile']:g} (the student's KL to "
                          f"the teacher on held-out synthetic images, per percentile: {kls})")

        jitter = finetune_jitter(cfg.synth, cfg.train, teacher.input_size)
        recon = {n: s for n, s in students.items() if methods[n].recon}
        if recon:
            t = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed + 13)
            dev_gen = torch.Generator(device=device).manual_seed(cfg.seed + 14)
            draw = lambda idx: augment(synth.images(idx, dev_gen, noise=True), jitter, synth.flip, gen)  # noqa: E731
            settings = recon_settings(cfg.train, len(synth.train_idx))
            steps = yield from iter_reconstruct(reference, recon, draw, synth.train_idx, settings, device, cfg.seed,
                                                stop_fn)
            timings["reconstruct"] = time.perf_counter() - t
            if steps == 0 or stop_fn():
                return
        kd, kd_rounds = {n: s for n, s in students.items() if methods[n].kd}, {}
        if kd:
            t = time.perf_counter()
            steps = yield from iter_distill(teacher, kd, synth.images, synth.train_idx, cfg.train, device,
                                            jitter, synth.flip, cfg.seed, stop_fn, amp=cfg.amp, compile=cfg.compile,
                                            reference=reference, rounds=kd_rounds)
            reference = None
            timings["finetune"] = time.perf_counter() - t
            if cfg.train.epochs and steps == 0 or stop_fn():
                return

        t = time.perf_counter()
        yield StageStarted("evaluate", len(students))
        report = None
        if main:   # the students are identical on every rank (checked by the stages): rank 0 evaluates
            report = evaluate_run(teacher, students, specs, synth, labelled, cfg, device)
            for row in report["students"]:
                row["finetune"] = methods[row["name"]].value
                if row["name"] in kd_rounds:
                    row["kd_rounds"] = kd_rounds[row["name"]]
                if row["name"] in synth.calibration:   # students.act_percentile=auto
                    chosen = synth.calibration[row["name"]]
                    row.update(act_percentile=chosen["percentile"],
                               act_percentile_kl={f"{p:g}": round(v, 5) for p, v in chosen["scores"].items()})
                if row["name"] in fusion:   # students.fuse_branches=auto
                    row.update(fuse_branches=specs[row["name"]].fuse_branches, fuse_branches_kl=fusion[row["name"]])
        report = dist.broadcast_object(report)
        timings["evaluate"] = time.perf_counter() - t

        health = synthesis_health(report, synth, jitter)
        report.update(timings=timings, device=str(device), config=cfg.to_dict(), versions=_versions(), budget=budget,
                      processes=world,
                      synthesis={"final_bn_log_likelihood": health["final_bn_log_likelihood"],
                                 "final_ce": synth.history["ce"][-1] if synth.history.get("ce") else None,
                                 "num_images": cfg.synth.num_images, "holdout_images": cfg.synth.holdout_images,
                                 "health": health},
                      warnings=health_warnings(health, report["students"]))
        for w in report["warnings"]:
            yield Message(w, level="warning")
        stop_hooks.remove()  # export traces the students; saving is not interrupted half-way
        check_stop(stop_fn)
        if partial is not None:
            t = time.perf_counter()
            yield StageStarted("save", 0, f"writing {final}")
            partial.mkdir(parents=True, exist_ok=True)
            save_run(partial, cfg, report, teacher, students, specs, synth)
            timings["save"] = time.perf_counter() - t
            timings["total"] = sum(timings.values())
            (partial / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        dist.barrier()   # every rank got here: none failed, so the folder is complete
        if partial is not None:
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


def _choose_fusion(teacher: Teacher, students: dict, specs: dict, names: set, batches: list, example: torch.Tensor,
                   score: Callable[[torch.nn.Module], float], stop_hooks: StopHooks) -> dict:
    """students.fuse_branches=auto, for the students `names` (calibrated, with the branches): a fused copy of each
    (the re-parameterised network, create_student) is calibrated on the same batches, and where its KL to the teacher
    on the held-out synthetic images (`score`, the calibration's kl_score) exceeds the branched student's by at most
    FUSE_KL_SLACK it takes its place (specs[n] then says fuse_branches=True). A student whose fused copy has the
    same layers (nothing re-parameterisable) keeps the branches unscored. Each fused copy is made with `stop_hooks`
    paused (a copy of the hooked teacher would carry them) and calibrated and scored watched by them.

    Returns {name: (the fused student where it was chosen, else None; its calibrate_ result; {"branches": KL,
    "fused": KL})} for every student scored.
    """
    out = {}
    for n in sorted(names):
        spec = dataclasses.replace(specs[n], fuse_branches=True)
        with stop_hooks.paused():
            fused = create_student(teacher.model, spec, example, teacher.classifier)
        if _n_layers(fused) == _n_layers(students[n]):
            continue   # nothing re-parameterisable
        with stop_hooks.watching(fused):
            chosen = calibrate_(fused, batches, spec.act_init, spec.act_percentile, score=score)
            kl = {"branches": round(score(students[n]), 6), "fused": round(score(fused), 6)}
        keep = kl["fused"] - kl["branches"] <= FUSE_KL_SLACK
        if keep:
            specs[n] = spec
        out[n] = (fused if keep else None, chosen, kl)
    return out


def _n_layers(student: torch.nn.Module) -> int:
    """Quantized layers, not counting the diagonal taps a fused conv keeps apart, plus the BN layers left unfolded
    (a RepGhost block's identity BN: fusing removes those and keeps the number of convs)."""
    return sum(not isinstance(w.module, IdentityTaps) for _, w in quant_wrappers(student)) \
        + sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in student.modules())


# ------------------------------------------------------------------------- stopping inside a pass

class RunStopped(Exception):
    """The stop flag was found set inside a forward or backward pass; iter_run turns it into Stopped, and `run`
    raises it for a run that stopped."""


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
        self.models = [m for m in models if m is not None]
        self.handles = []
        self._hook(self.models)

    def _hook(self, models) -> None:
        self.handles += [m.register_forward_hook(self._forward) for model in models for m in model.modules()]

    def swap(self, old: torch.nn.Module, new: torch.nn.Module) -> None:
        """Hook `new`, a model made after the others that replaces `old`."""
        self.models = [m for m in self.models if m is not old] + [new]
        self._hook([new])

    @contextlib.contextmanager
    def paused(self):
        """No hooks inside the block: a deep copy made there (a fused student) copies no hooks, and no stop flag."""
        self._unhook()
        try:
            yield
        finally:
            self._hook(self.models)

    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module):
        """`model` hooked too inside the block (a model made there, which may be let go after it)."""
        handles = [m.register_forward_hook(self._forward) for m in model.modules()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _check(self, *_) -> None:
        check_stop(self.stop_fn)

    def _forward(self, module, args, output) -> None:
        self._check()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._check)

    def _unhook(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def remove(self) -> None:
        """Remove every hook, for good (the models are let go)."""
        self._unhook()
        self.models = []


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
        save_student(folder / "students" / f"{name}.safetensors", s, specs[name], teacher.data_config(), teacher.name)
    if cfg.export.formats:  # ONNX QDQ + integer safetensors (gzq/export.py); records files in the report
        from .export import export_run
        export_run(folder, cfg.export, report, teacher, students, specs)
