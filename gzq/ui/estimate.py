"""How long a run will take on this device, measured before it starts.

`estimate(cfg)` uses `estimate_seconds(cfg)`, a small measured probe: load the model (without downloading
weights), time one forward+backward pass of the teacher and of one student on a few images at the
model's input size, and scale by the steps and images the config asks for. Probes are cached per model
and device, so the form can ask at every change; the run itself prints the library's step-timed estimate.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from ..augment import coarse_size
from ..budget import fused_copies, student_counts
from ..config import EvalConfig, RunConfig, student_specs
from ..presets import resolve_device

RECON_BLOCKS = 20   # typical number of reconstruction units, for the estimate before the model is traced

_PROBES: dict[tuple, "Probe"] = {}
_PROBE_LOCK = threading.Lock()


@dataclass
class Probe:
    """Measured costs of one model on one device, in seconds (per image where it says so)."""
    load: float
    teacher_step: float      # forward + backward of the teacher, per image
    student_step: float      # forward + backward of one fake-quant student, per image
    real_images: int         # labelled images the evaluation will run (the default model's test set)
    input_size: tuple = ()   # (C, H, W) of the teacher's input
    branches: bool = False   # re-parameterisable branches (students.fuse_branches=auto calibrates fused copies)


@dataclass
class Estimate:
    seconds: float
    per_stage: dict[str, float]
    text: str


def probe_key(cfg: RunConfig) -> tuple:
    """What a probe depends on: the model and the device."""
    spec = cfg.model
    return spec.name, spec.checkpoint, spec.num_classes, spec.in_chans, spec.input_size, str(resolve_device(cfg.device))


def _probe(cfg: RunConfig) -> Probe:
    from ..evaluate import load_labelled_data
    from ..models import load_teacher
    from ..quant.convert import create_student, has_branches

    device = resolve_device(cfg.device)
    spec, key = cfg.model, probe_key(cfg)
    with _PROBE_LOCK:
        if key in _PROBES:
            return _PROBES[key]
        t = time.perf_counter()
        # the same network without a download: an estimate needs its shape and size, not its weights
        teacher = load_teacher(spec.__class__(**{**spec.to_dict(), "pretrained": False}), device)
        student = create_student(teacher.model, cfg.students[0], torch.zeros(2, *teacher.input_size, device=device),
                                 teacher.classifier)
        labelled = load_labelled_data(teacher, EvalConfig()) if spec.name == "default" else None  # all of it
        load = time.perf_counter() - t
        n = 4 if teacher.input_size[-1] >= 128 else 32
        x = torch.randn(n, *teacher.input_size, device=device, requires_grad=True)

        def per_image(model: torch.nn.Module) -> float:
            times = []
            for _ in range(2 if n < 32 else 3):   # the first pass pays for allocations and kernel choice
                t0 = time.perf_counter()
                model(x).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return min(times[1:]) / n

        probe = Probe(load, per_image(teacher.model), per_image(student.train()),
                      len(labelled.labels) if labelled else 0, tuple(teacher.input_size), has_branches(teacher.model))
        del teacher, student, x
        _PROBES[key] = probe
        return probe


def estimate_seconds(cfg: RunConfig) -> dict[str, float]:
    """Seconds per stage for `cfg` on its device, from a measured probe of its model."""
    p = _probe(cfg)
    s, tr = cfg.synth, cfg.train
    every = student_specs(cfg)
    m_all = len(every)                                  # students during synthesis
    calibrated, m, students_join = student_counts(cfg, m_all)   # calibrations; students fine-tuned and exported
    batch = min(s.batch_size, s.num_images)
    joined = s.steps - s.warmup_steps if students_join else 0   # steps the students take part in
    warm = min(s.warmup_steps, s.steps)
    coarse = coarse_size(p.input_size, s.coarse_scale, s.coarse_min_side) if p.input_size else None
    area = coarse[0] * coarse[1] / (p.input_size[-2] * p.input_size[-1]) if coarse else 1.0
    # every step: the teacher pass plus the BN and image terms (about 1.5 passes; a warm-up step at the coarse
    # size costs its share of the area); once the students have joined, each student's pass, the images'
    # gradient through it and its own update (about 3 passes)
    synthesis = batch * ((s.steps - warm + warm * area) * 1.5 * p.teacher_step + joined * 3 * m_all * p.student_step)
    synthesis += s.band_probe_image_steps() * 1.5 * p.teacher_step   # synth.band=auto: teacher-only probe steps
    n_train = s.num_images - s.holdout_images
    # observers see the training images twice (ranges, then histograms): forward passes without gradients, a
    # third of a training pass, through each student calibrated and each fused copy auto-fusion weighs against one
    calibration = 2 * n_train * (calibrated + fused_copies(cfg, p.branches)) * p.student_step / 3
    methods = [tr.method_for(spec) for _, spec in every[:m]]   # and the extra seeds that outlive synthesis
    m_kd, m_recon = sum(x.kd for x in methods), sum(x.recon for x in methods)
    fine_tune = tr.epochs * max(n_train // min(tr.batch_size, n_train), 1) * min(tr.batch_size, n_train) * (
        p.teacher_step / 3 + 2 * m_kd * p.student_step) if m_kd else 0.0
    if m_recon:   # every block: its pool's inputs (half a forward on average; a CNN has some 10-30 blocks),
        steps, pool = tr.recon_budget(n_train)   # then the steps, one block's share of a training pass each
        fine_tune += RECON_BLOCKS * pool * (p.teacher_step + m_recon * p.student_step) / 6 \
            + steps * tr.recon_batch_size * m_recon * p.student_step
    n_real = min(p.real_images, cfg.eval.max_real_images or p.real_images)
    # forward passes only, without gradients and in large batches: about a tenth of a training pass
    evaluate = (s.holdout_images * cfg.eval.fresh_draws + n_real) * (p.teacher_step + m * p.student_step) / 10
    save = p.load * (1 + m) / 2 if cfg.export.formats else 0.0    # export traces each model once
    return dict(load=p.load, synthesis=synthesis, calibration=calibration, finetune=fine_tune, evaluate=evaluate,
                save=save)


def estimate(cfg: RunConfig) -> Estimate:
    """The run-time estimate shown before Run, from the probe above: cached per model, so the form can ask
    again at every change (the run itself prints the library's step-timed estimate, gzq.budget)."""
    from .view import format_seconds
    per_stage = estimate_seconds(cfg)
    total = sum(per_stage.values())
    cap = cfg.time_budget_s
    if cap is not None and total > per_stage["load"] + cap:
        # the run fits the budget to the preset's time cap (gzq.budget): fewer images and steps, same cap
        fitted = per_stage["load"] + cap
        text = (f"about {format_seconds(fitted)}: this preset's full budget would take {format_seconds(total)} "
                f"on this device, so the run makes fewer images and steps to fit {format_seconds(cap)} (it "
                f"prints its own measured estimate when it starts)")
        return Estimate(fitted, per_stage, text)
    text = (f"about {format_seconds(total)} (measured on this device: loading {format_seconds(per_stage['load'])}, "
            f"making images {format_seconds(per_stage['synthesis'])}, training "
            f"{format_seconds(per_stage['calibration'] + per_stage['finetune'])})")
    return Estimate(total, per_stage, text)
