"""Budgets sized by the model's cost: measure what one synthesis step and one fine-tuning step cost on the
current device, estimate the run, and shrink the image count and step count until it fits a time budget.

The same preset then takes about its stated time (or less) on any model: the bundled 28-px ResNet keeps its
full budget, a 224-px network on two CPU cores gets fewer images and steps instead of an hour-long run.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .augment import coarse_size, resize
from .bn import BNStatsRecorder, bn_losses
from .config import RunConfig, SynthConfig, scaled_synth, student_specs
from .images import SyntheticImages
from .losses import total_variation
from .optim import adam

log = logging.getLogger(__name__)

#: floors below which a smaller budget stops being worth running (the budget curve's smallest points)
MIN_IMAGES, MIN_STEPS = 32, 40
#: per-student constant for ONNX and integer exports and their checks, seconds (small next to the stages)
EXPORT_SECONDS = 3.0


@dataclass
class StepCosts:
    """Measured seconds on one device."""
    synth_step: float      # one synthesis step at the synthesis batch: teacher forward+backward, BN losses,
                           # and each student's forward+backward
    kd_step: float         # one fine-tuning step at the fine-tuning batch: teacher forward, every student
                           # forward+backward
    forward_image: float   # one image through the teacher in eval (no grad), for evaluation
    student_forward_image: float = 0.0   # one image through every student (no grad)
    recon_units: int = 0   # blocks a reconstruction stage fits one after another (the caller counts them with
                           # gzq.reconstruct.find_units)
    warmup_step: float | None = None   # one warm-up step: the teacher alone, at the coarse size where synthesis
                                       # uses one (SynthConfig.coarse_scale); None = as synth_step


@dataclass
class RunEstimate:
    seconds: float                     # all stages after loading
    per_stage: dict[str, float]
    text: str                          # one line for people
    scale: float = 1.0                 # share of the configured synthesis budget kept (1 = all of it)
    costs: StepCosts | None = None
    budget: dict = field(default_factory=dict)   # images, steps, epochs the estimate is for


def _timed(fn, repeats: int = 2, long_s: float = 1.0) -> float:
    """The fastest of `repeats` timed calls after a warm-up; one timed call when the warm-up took over `long_s`
    (a slow step: a second repeat would add seconds to the wait and little to the accuracy)."""
    t = time.perf_counter()
    fn()  # warm-up: allocations, kernel selection
    if time.perf_counter() - t > long_s:
        repeats = 1
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_costs(teacher, students: dict, cfg: RunConfig, device: torch.device) -> StepCosts:
    """Time one synthesis step, one fine-tuning step and one evaluation forward of this teacher and these
    (uncalibrated) students on `device`. Costs a few steps; leaves no gradients or hooks behind."""
    gen = torch.Generator().manual_seed(0)
    sc = cfg.synth
    b = min(sc.batch_size, sc.num_images)
    # the images as synthesis holds them (their parameterisation and per-step clamp are part of a step's cost)
    images = SyntheticImages(torch.zeros(sc.num_images, dtype=torch.long), teacher.input_size, teacher.pixel_bounds,
                             sc.image_param, sc.init_log_scale, gen, sc.image_basis, sc.spectral_decay,
                             1.0 if sc.band == "auto" else sc.band).to(device)
    idx = torch.arange(b, device=device)
    y = torch.randint(teacher.num_classes, (b,), generator=gen).to(device)
    recorder = BNStatsRecorder(teacher.model)
    active = students if sc.adversarial else {}
    coarse = coarse_size(teacher.input_size, sc.coarse_scale, sc.coarse_min_side)
    # the images' own update is part of a step: Adam over every image's parameters, whatever the batch
    opt = adam([p for p in images.parameters() if p.requires_grad], lr=1e-6)
    try:
        def synth_step(joined=active, size=None):
            x = resize(images(idx), size)
            logits = teacher.model(x)
            loss = bn_losses(recorder, sc.bn_loss, sc.n_rule, normalize=sc.bn_normalize)[0]
            loss = loss + F.cross_entropy(logits, y) + total_variation(x) + x.pow(2).mean()
            for s in joined.values():
                loss = loss + s(x).logsumexp(1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            images.clamp_()
        synth_step_s = _timed(synth_step) if sc.steps else 0.0
        warmup_differs = sc.steps and min(sc.warmup_steps, sc.steps) and (active or coarse)
        warmup_step_s = _timed(lambda: synth_step({}, coarse)) if warmup_differs else None
    finally:
        recorder.remove()
    bk = min(cfg.train.batch_size, cfg.synth.num_images)
    xk = torch.randn(bk, *teacher.input_size, generator=gen).to(device)

    distilled = [students[n] for n, spec in student_specs(cfg) if n in students and cfg.train.method_for(spec).kd]

    def kd_step():
        with torch.no_grad():
            teacher.model(xk)
        for s in distilled:
            s(xk).logsumexp(1).mean().backward()
    kd_step_s = _timed(kd_step) if cfg.train.epochs and distilled else 0.0
    for s in students.values():
        s.zero_grad(set_to_none=True)
    with torch.no_grad():
        fwd = _timed(lambda: teacher.model(xk)) / bk
        s_fwd = _timed(lambda: [s(xk) for s in students.values()]) / bk
    return StepCosts(synth_step_s, kd_step_s, fwd, s_fwd, warmup_step=warmup_step_s)


def _shares(cfg: RunConfig) -> tuple[float, float]:
    """The shares of the students fitted by block reconstruction and by KD."""
    methods = [cfg.train.method_for(s) for s in cfg.students]
    return sum(m.recon for m in methods) / len(methods), sum(m.kd for m in methods) / len(methods)


def recon_seconds(cfg: RunConfig, costs: StepCosts) -> float:
    """A reconstruction stage: every unit captures its pool's inputs (a forward up to the unit, half the network
    on average, of the teacher and every student), then trains `recon_steps` batches, one unit's share of a
    full forward and backward each (so all units together: recon_steps full forward+backward passes)."""
    share = _shares(cfg)[0]
    steps, pool = cfg.train.recon_budget(cfg.synth.num_images - cfg.synth.holdout_images)
    capture = costs.recon_units * pool * 0.5 * (costs.forward_image + share * costs.student_forward_image)
    train = steps * cfg.train.recon_batch_size * 3 * share * costs.student_forward_image
    return capture + train if share else 0.0


def estimate(cfg: RunConfig, costs: StepCosts, num_students: int, real_images: int = 0) -> RunEstimate:
    """Seconds each stage of `cfg` will take at the measured costs."""
    s, t = cfg.synth, cfg.train
    train_images = s.num_images - s.holdout_images
    kd_steps = t.epochs * max(train_images // min(t.batch_size, train_images), 1)
    fresh = s.holdout_images * cfg.eval.fresh_draws
    warm = min(s.warmup_steps, s.steps)
    warm_step = costs.synth_step if costs.warmup_step is None else costs.warmup_step
    # synth.band=auto first forms a few images in each candidate band (priced as if every band were probed)
    probe = s.band_probe_image_steps() * warm_step / min(s.batch_size, s.num_images)
    stages = {
        "synthesis": probe + warm * warm_step + (s.steps - warm) * costs.synth_step,
        "calibration": 2 * train_images * costs.forward_image * num_students,
        "reconstruct": recon_seconds(cfg, costs),
        "finetune": kd_steps * costs.kd_step,
        "evaluate": (fresh + real_images) * costs.forward_image * (1 + num_students),
        "save": EXPORT_SECONDS * num_students if cfg.export.formats else 0.5,
    }
    total = sum(stages.values())
    text = (f"about {_fmt(total)} on this device, measured ({s.num_images} images, {s.steps} synthesis steps, "
            f"{_finetune_text(cfg)}; synthesis {_fmt(stages['synthesis'])}, "
            f"fine-tuning {_fmt(stages['finetune'] + stages['reconstruct'])})")
    return RunEstimate(total, stages, text, 1.0, costs,
                       dict(num_images=s.num_images, steps=s.steps, epochs=t.epochs))


def _finetune_text(cfg: RunConfig) -> str:
    t, (recon, kd) = cfg.train, _shares(cfg)
    steps = t.recon_budget(cfg.synth.num_images - cfg.synth.holdout_images)[0]
    parts = ([f"block reconstruction ({steps} steps per block)"] if recon else []) + \
        ([f"{t.epochs} fine-tuning epochs"] if kd else [])
    return " then ".join(parts) or "no fine-tuning"


def fit_budget(cfg: RunConfig, costs: StepCosts, num_students: int, seconds: float,
               real_images: int = 0) -> tuple[RunConfig, RunEstimate]:
    """The largest budget of the form (images x g^0.5, steps x g) with g <= 1 whose estimate fits `seconds`.

    Steps shrink faster than images: the budget curve shows a few more images at fewer steps each loses less
    than the reverse. Never below MIN_IMAGES / MIN_STEPS (such a run then takes longer than asked, and the
    estimate says so).
    """
    base = estimate(cfg, costs, num_students, real_images)
    if base.seconds <= seconds:
        return cfg, base
    g, fitted, est = 1.0, cfg, base
    while est.seconds > seconds and g > 1e-3:
        g *= 0.9
        images = max(int(cfg.synth.num_images * math.sqrt(g)), min(MIN_IMAGES, cfg.synth.num_images))
        steps = max(int(cfg.synth.steps * g), min(MIN_STEPS, cfg.synth.steps))
        fitted = copy.deepcopy(cfg)
        d = fitted.synth.to_dict()
        d.update(scaled_synth(cfg.synth, images, steps))
        fitted.synth = SynthConfig.from_dict(d)
        est = estimate(fitted, costs, num_students, real_images)
        if images == min(MIN_IMAGES, cfg.synth.num_images) and steps == min(MIN_STEPS, cfg.synth.steps):
            break
    est.scale = g
    est.text += f"; fitted to the {_fmt(seconds)} budget from {cfg.synth.num_images} images x {cfg.synth.steps} steps"
    return fitted, est


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
