"""Budgets sized by the model's cost: measure what one synthesis step and one fine-tuning step cost on the
current device, estimate the run, and shrink the image count and step count until it fits a time budget.

The same preset then takes about its stated time (or less) on any model: the bundled 28-px ResNet keeps its
full budget, a 224-px network on two CPU cores gets fewer images and steps instead of an hour-long run.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .augment import coarse_size, resize
from .bn import BNStatsRecorder, bn_losses
from .config import RunConfig, SynthConfig, override, scaled_synth, student_specs
from .distill import folded_conv_scales, output_moments
from .images import SyntheticImages
from .losses import moment_loss, total_variation
from .optim import adam
from .quant.convert import has_branches
from .reconstruct import find_units

log = logging.getLogger(__name__)

#: floors below which a smaller budget stops being worth running (the budget curve's smallest points)
MIN_IMAGES, MIN_STEPS = 32, 40
#: per-student constant for ONNX and integer exports and their checks, seconds (small next to the stages)
EXPORT_SECONDS = 3.0
#: the batch a step is first timed at (its cost is then priced per image), and the one its memory is counted at
TIMED_BATCH, MEMORY_PROBE_BATCH = 16, 4
#: the run's own batch is timed as well where the small batch predicts a step under this many seconds
FULL_BATCH_TIMING_S = 10.0
#: share of the free memory that the tensors a step's backward keeps may take (fit_memory), per device type: on
#: the CPU a step's resident peak was about twice those plus the models (benchmarks/preset_fit.py) with 0.2,
#: when each fake quantizer kept two more tensors; one autograd node keeps 0.56-0.62x as much and its peak per
#: image is 1.14-1.42x what it keeps, against 0.95-1.10x (benchmarks/step_memory.py), so the shares are 3/4 of
#: those before, for the same peak with 1.2-1.3x the batch. CUDA's caching allocator keeps less slack (a GPU share
#: not yet measured on a GPU). And the smallest batch the cut goes to.
MEMORY_SHARE, MIN_BATCH = {"cpu": 0.15, "cuda": 0.26}, 8


@dataclass
class StepCosts:
    """Measured seconds (and bytes) on one device, per image of a batch: a stage's step costs its batch times
    these, so a budget fitted to fewer images (a smaller batch) is priced at the batch it will run."""
    synth_image: float     # one synthesis step, per image of its batch: teacher forward+backward, BN losses,
                           # each student's forward+backward
    kd_image: float        # one fine-tuning step, per image: teacher forward, every student forward+backward
    forward_image: float   # one image through the teacher in eval (no grad), for evaluation
    student_forward_image: float = 0.0   # one image through every student block reconstruction fits (no grad)
    recon_units: int = 0   # blocks a reconstruction stage fits one after another (gzq.reconstruct.find_units)
    fused_copies: int = 0  # students.fuse_branches=auto: students whose fused copy is calibrated beside them
    given_images: bool = False   # the run's images are given (no synthesis for the students to join)
    warmup_image: float | None = None   # one warm-up step per image: the teacher alone, at the coarse size where
                                        # synthesis uses one (SynthConfig.coarse_scale); None = as synth_image
    update_image: float = 0.0    # the images' own update in a synthesis step (Adam and clamp over every image,
                                 # whatever the batch), per image held
    synth_image_bytes: int = 0   # memory one image adds to a synthesis step: what its backward keeps
    kd_image_bytes: int = 0      # the same for a fine-tuning step
    timed_batch: dict = field(default_factory=dict)   # stage -> the batch the costs were timed at
    memory: int = 0              # bytes free on the device when measured (0 = unknown: batches are not cut)
    memory_share: float = MEMORY_SHARE["cpu"]   # the share of them a step may keep (MEMORY_SHARE of the device)


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


def _kept_bytes(fn, batch: int) -> int:
    """Bytes of the batch-sized tensors that autograd saves for the backward of what `fn` computes (each
    storage once): the activation memory of a training step, which grows with the batch. Runs `fn` once,
    holding every saved tensor until it returns so that no freed storage's address is counted twice.

    Two reference cycles through autograd's C++ side, which Python's collector cannot see, would keep the
    whole graph's memory alive after the call: saved variables keep the hooks and so `held` (emptied before
    returning), and an op's own output saved as itself keeps the op (the hook hands back a detached alias)."""
    held: dict[int, torch.Tensor] = {}

    def pack(t):
        if t.ndim and t.shape[0] == batch:
            held.setdefault(t.untyped_storage().data_ptr(), t)
        return t.detach()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    kept = sum(t.untyped_storage().nbytes() for t in held.values())
    held.clear()
    return kept


def available_memory(device: torch.device) -> int:
    """Bytes a run can still allocate on `device`: free GPU memory (plus what torch's cache holds unused), or
    on the CPU the system's available memory, capped by a container's (cgroup) limit where one is set."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_f).read_text().strip(), Path(usage_f).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, int(limit) - int(usage))
        break
    return max(int(avail), 0)


def measure_costs(teacher, students: dict, cfg: RunConfig, device: torch.device,
                  memory: int | None = None, given_images: bool = False) -> StepCosts:
    """Time one synthesis step, one fine-tuning step and one evaluation forward of this teacher and these
    (uncalibrated) students on `device`, and what one image adds to each step's memory. Leaves no gradients
    or hooks behind.

    Each step is first timed at a batch of at most TIMED_BATCH images and priced per image, so measuring a
    large model is quick and never holds a full batch in memory. Where that predicts a step under
    FULL_BATCH_TIMING_S at the batch the run will use (the configured one, or what `memory` bytes hold,
    default available_memory: see fit_memory), that batch is timed too and its cost kept: a small batch
    costs more per image (fixed overheads; a GPU it leaves idle).

    The fine-tuning step and the students' forward (block reconstruction's) are timed over the students fitted
    after synthesis by that method (student_counts; `given_images`: the run's images are given, and every student
    is fitted).
    """
    memory = available_memory(device) if memory is None else memory
    share = MEMORY_SHARE.get(device.type, MEMORY_SHARE["cpu"])
    gen = torch.Generator().manual_seed(0)
    sc = cfg.synth
    full_b = min(sc.batch_size, sc.num_images)
    # the images as synthesis holds them (their parameterisation and per-step clamp are part of a step's cost)
    images = SyntheticImages(torch.zeros(sc.num_images, dtype=torch.long), teacher.input_size, teacher.pixel_bounds,
                             sc.image_param, sc.init_log_scale, gen, sc.image_basis, sc.spectral_decay,
                             1.0 if sc.band == "auto" else sc.band, sc.decorrelate_colour).to(device)
    y_all = torch.randint(teacher.num_classes, (full_b,), generator=gen).to(device)
    recorder = BNStatsRecorder(teacher.model)
    every = student_specs(cfg)
    _, kept, joined = student_counts(cfg, len(every), given_images)   # extra seeds may end with synthesis
    active = students if joined else {}
    coarse = coarse_size(teacher.input_size, sc.coarse_scale, sc.coarse_min_side)
    # the images' own update is part of a step: Adam over every image's parameters, whatever the batch
    opt = adam([p for p in images.parameters() if p.requires_grad], lr=1e-6)
    timed: dict[str, int] = {}

    def synth_loss(b, joined=active, size=None):
        x = resize(images(torch.arange(b, device=device)), size)
        logits = teacher.model(x)
        loss = bn_losses(recorder, sc.bn_loss, sc.n_rule, normalize=sc.bn_normalize)[0]
        loss = loss + F.cross_entropy(logits, y_all[:b]) + total_variation(x) + x.pow(2).mean()
        for s in joined.values():
            loss = loss + s(x).logsumexp(1).mean()
        return loss

    def update():
        opt.step()
        images.clamp_()

    def synth_step(b, joined=active, size=None):
        synth_loss(b, joined, size).backward()
        update()
        opt.zero_grad(set_to_none=True)

    def per_image(stage, step, image_bytes, full, fixed=0.0):
        """Seconds per image of `step(b)` less its `fixed` seconds: at a small batch, then at the batch the run
        will use (the full one, or what memory holds: fit_memory) where that is quick enough to time."""
        run_b = memory_batch(full, image_bytes, memory, share)
        b = min(run_b, TIMED_BATCH)
        t = max(_timed(lambda: step(b)) - fixed, 0.0) / b
        if b < run_b and t * run_b <= FULL_BATCH_TIMING_S:
            b, t = run_b, max(_timed(lambda: step(run_b)) - fixed, 0.0) / run_b
        timed[stage] = b
        return t

    try:
        small = min(full_b, MEMORY_PROBE_BATCH)
        synth_bytes = update_s = 0
        if sc.steps:
            synth_bytes = _kept_bytes(lambda: synth_loss(small), small) // small
            for p in (p for g in opt.param_groups for p in g["params"]):
                p.grad = torch.zeros_like(p)
            update_s = _timed(update)     # the step's share that follows the images held, not the batch
            opt.zero_grad(set_to_none=True)
        synth_s = per_image("synthesis", synth_step, synth_bytes, full_b, update_s) if sc.steps else 0.0
        warmup_differs = sc.steps and min(sc.warmup_steps, sc.steps) and (active or coarse)
        warmup_s = (per_image("warmup", lambda b: synth_step(b, {}, coarse), synth_bytes, full_b, update_s)
                    if warmup_differs else None)
    finally:
        recorder.remove()
    images = opt = None
    kd_full = min(cfg.train.batch_size, cfg.synth.num_images)
    xk = torch.randn(kd_full, *teacher.input_size, generator=gen).to(device)
    fitted = [(students[n], cfg.train.method_for(spec)) for n, spec in every[:kept] if n in students]
    distilled = [s for s, method in fitted if method.kd]
    rebuilt = [s for s, method in fitted if method.recon]

    scales = (folded_conv_scales(teacher.model, dict(enumerate(distilled)), xk[:2])
              if cfg.train.stats_kd > 0 and distilled else {})

    def kd_loss(b):   # with the channel-moment term's hooks where it is on (gzq.distill)
        with ExitStack() as hooks:
            t_moments = hooks.enter_context(output_moments(teacher.model, list(scales)))
            moments = [hooks.enter_context(output_moments(s, list(scales))) for s in distilled]
            with torch.no_grad():
                teacher.model(xk[:b])
            loss = sum(s(xk[:b]).logsumexp(1).mean() for s in distilled)
            return loss + sum(moment_loss(m, t_moments, scales) for m in moments) if scales else loss

    kd_s = kd_bytes = 0
    if cfg.train.epochs and distilled:
        small = min(kd_full, MEMORY_PROBE_BATCH)
        kd_bytes = _kept_bytes(lambda: kd_loss(small), small) // small
        kd_s = per_image("finetune", lambda b: kd_loss(b).backward(), kd_bytes, kd_full)
    for s in students.values():
        s.zero_grad(set_to_none=True)
    b = min(kd_full, TIMED_BATCH)
    with torch.no_grad():
        fwd = _timed(lambda: teacher.model(xk[:b])) / b
        s_fwd = _timed(lambda: [s(xk[:b]) for s in rebuilt]) / b if rebuilt else 0.0
    return StepCosts(synth_s, kd_s, fwd, s_fwd, len(find_units(rebuilt[0], xk[:2])) if rebuilt else 0,
                     fused_copies(cfg, has_branches(teacher.model), given_images),
                     warmup_image=warmup_s, update_image=update_s / sc.num_images,
                     synth_image_bytes=synth_bytes, given_images=given_images,
                     kd_image_bytes=kd_bytes, timed_batch=timed, memory=memory, memory_share=share)


def memory_batch(batch: int, image_bytes: int, memory: int, share: float) -> int:
    """The largest batch up to `batch` whose kept tensors (`image_bytes` per image) take at most `share` of
    `memory` bytes; never below MIN_BATCH (nor above `batch`). `memory` 0 = unknown: `batch` as it is."""
    if not image_bytes or not memory:
        return batch
    return min(batch, max(int(share * memory // image_bytes), MIN_BATCH))


def fit_memory(cfg: RunConfig, costs: StepCosts) -> tuple[RunConfig, str]:
    """`cfg` with its synthesis and fine-tuning batches cut to what the free memory the costs were measured
    with (costs.memory) holds (memory_batch): the tensors a step's backward keeps may take costs.memory_share
    of it (MEMORY_SHARE); the step's peak is above them, and the models, the images and the allocator's slack
    take the rest.

    A cut synthesis batch runs proportionally more steps, so that each image gets as many updates as the
    budget meant (about the same time: each step is cheaper); fine-tuning keeps its epochs. Returns the config
    (the same object when nothing changes) and a note for the estimate ("" when nothing changes), which also
    says when even a batch of MIN_BATCH is more than memory holds."""
    notes, d, memory = [], {}, costs.memory
    if not memory:
        return cfg, ""
    for section, per_image, label in (("synth", costs.synth_image_bytes, "synthesis"),
                                      ("train", costs.kd_image_bytes, "fine-tuning")):
        batch = getattr(cfg, section).batch_size
        if section == "synth":
            batch = min(batch, cfg.synth.num_images)
        capped = memory_batch(batch, per_image, memory, costs.memory_share)
        if capped < batch:
            d[f"{section}.batch_size"] = capped
            short = per_image * capped > costs.memory_share * memory
            notes.append(f"{label} batch {batch} -> {capped}" + (", still more than memory holds" if short else ""))
            if section == "synth":
                d["synth.steps"] = math.ceil(cfg.synth.steps * batch / capped)
    if not d:
        return cfg, ""
    return override(cfg, d), f"batches cut to fit {memory / 2**30:.1f} GiB of free memory ({'; '.join(notes)})"


def _shares(cfg: RunConfig) -> tuple[float, float]:
    """The shares of the students fitted by block reconstruction and by KD."""
    methods = [cfg.train.method_for(s) for s in cfg.students]
    return sum(m.recon for m in methods) / len(methods), sum(m.kd for m in methods) / len(methods)


def recon_seconds(cfg: RunConfig, costs: StepCosts) -> float:
    """A reconstruction stage: every unit captures its pool's inputs (a forward up to the unit, half the network
    on average, of the teacher and every student it fits), then trains `recon_steps` batches, one unit's share
    of a full forward and backward each (so all units together: recon_steps full forward+backward passes)."""
    if not _shares(cfg)[0]:
        return 0.0
    steps, pool = cfg.train.recon_budget(cfg.synth.num_images - cfg.synth.holdout_images)
    capture = costs.recon_units * pool * 0.5 * (costs.forward_image + costs.student_forward_image)
    return capture + steps * cfg.train.recon_batch_size * 3 * costs.student_forward_image


def probe_seconds(s: SynthConfig, costs: StepCosts) -> float:
    """synth.band=auto first forms a few images in each candidate band: teacher-only steps of the probe's
    images, priced as if every band were probed."""
    warm_image = costs.synth_image if costs.warmup_image is None else costs.warmup_image
    return s.band_probe_image_steps() * (warm_image + costs.update_image)


def student_counts(cfg: RunConfig, every: int, given_images: bool = False) -> tuple[int, int, bool]:
    """(students a run calibrates, counted once per calibration; students it fine-tunes, evaluates and saves;
    whether its students join synthesis), for `every` student (gzq.config.student_specs). Adversarial synthesis
    calibrates every student (extra seeds included) when they join at the end of the warm-up; unless it keeps
    them, the configurations start again from their initial weights and are calibrated once more, and the extra
    seeds end there. Otherwise (and where the images are given, `given_images`) the students are calibrated once,
    after synthesis. They join only batches that hold at least two training images (gzq.synthesis): counted here as
    a batch that can hold two, in one process (with several, each process's share of the batch must)."""
    s = cfg.synth
    adversarial = s.adversarial and not given_images
    joined = adversarial and s.steps > s.warmup_steps and min(s.batch_size, s.num_images - s.holdout_images) >= 2
    kept = len(cfg.students) if adversarial and not s.keep_students else every
    return (every if joined else 0) + (0 if joined and s.keep_students else kept), kept, joined


def fits_branches(cfg: RunConfig, method) -> bool:
    """Whether a student is fitted to the branched network unit by unit (block reconstruction, KD's unit terms),
    so that it keeps the branches."""
    return method.recon or cfg.train.feature_kd > 0 or cfg.train.stats_kd > 0


def fused_copies(cfg: RunConfig, branches: bool, given_images: bool = False) -> int:
    """How many students students.fuse_branches=auto will calibrate a fused copy of (gzq.pipeline._choose_fusion),
    for the estimate: on a teacher with something to fuse (`branches`, gzq.quant.convert.has_branches), those left
    to choose and not fitted to the branched network unit by unit, among the students calibrated after synthesis
    (student_counts; students that adversarial synthesis calibrated and keeps keep their branches)."""
    every = student_specs(cfg)
    _, kept, joined = student_counts(cfg, len(every), given_images)
    if not branches or (joined and cfg.synth.keep_students):
        return 0
    specs = [spec for _, spec in every][:kept]
    return sum(q.fuse_branches == "auto" and not fits_branches(cfg, cfg.train.method_for(q)) for q in specs)


def estimate(cfg: RunConfig, costs: StepCosts, num_students: int, real_images: int = 0) -> RunEstimate:
    """Seconds each stage of `cfg` will take at the measured costs."""
    s, t = cfg.synth, cfg.train
    train_images = s.num_images - s.holdout_images
    kd_batch = min(t.batch_size, train_images)
    kd_steps = t.epochs * max(train_images // kd_batch, 1)
    fresh = s.holdout_images * cfg.eval.fresh_draws
    warm = min(s.warmup_steps, s.steps)
    batch = min(s.batch_size, s.num_images)
    warm_image = costs.synth_image if costs.warmup_image is None else costs.warmup_image
    calibrated, kept, _ = student_counts(cfg, num_students, costs.given_images)
    stages = {
        "synthesis": probe_seconds(s, costs) + batch * (warm * warm_image + (s.steps - warm) * costs.synth_image)
        + s.steps * s.num_images * costs.update_image,
        "calibration": 2 * train_images * costs.forward_image * (calibrated + costs.fused_copies),
        "reconstruct": recon_seconds(cfg, costs),
        "finetune": kd_steps * kd_batch * costs.kd_image,
        "evaluate": (fresh + real_images) * costs.forward_image * (1 + kept),
        "save": EXPORT_SECONDS * kept if cfg.export.formats else 0.5,
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
    than the reverse. Never below MIN_IMAGES images with MIN_STEPS updates each (a batch cut by memory,
    fit_memory, runs more steps for as many updates); such a run then takes longer than asked, and the
    estimate says so.
    """
    base = estimate(cfg, costs, num_students, real_images)
    if base.seconds <= seconds:
        return cfg, base
    # the floor: MIN_IMAGES images with MIN_STEPS updates each (more steps where the batch holds fewer images)
    min_images = min(MIN_IMAGES, cfg.synth.num_images)
    min_steps = min(math.ceil(MIN_STEPS * min_images / min(cfg.synth.batch_size, min_images)), cfg.synth.steps)
    g, fitted, est = 1.0, cfg, base
    while est.seconds > seconds and g > 1e-3:
        g *= 0.9
        images = max(int(cfg.synth.num_images * math.sqrt(g)), min_images)
        steps = max(int(cfg.synth.steps * g), min_steps)
        fitted = copy.deepcopy(cfg)
        d = fitted.synth.to_dict()
        d.update(scaled_synth(cfg.synth, images, steps))
        fitted.synth = SynthConfig.from_dict(d)
        est = estimate(fitted, costs, num_students, real_images)
        if images == min_images and steps == min_steps:
            break
    est.scale = g
    est.text += f"; fitted to the {_fmt(seconds)} budget from {cfg.synth.num_images} images x {cfg.synth.steps} steps"
    return fitted, est


def plan_run(cfg: RunConfig, costs: StepCosts, num_students: int, seconds: float | None = None,
             real_images: int = 0) -> tuple[RunConfig, RunEstimate]:
    """What `cfg` becomes on the measured device and what it will take: batches cut to the free memory
    (fit_memory), then, when `seconds` is given, the budget fitted to it (fit_budget)."""
    cfg, note = fit_memory(cfg, costs)
    if seconds is None:
        est = estimate(cfg, costs, num_students, real_images)
    else:
        cfg, est = fit_budget(cfg, costs, num_students, seconds, real_images)
    if note:
        est.text += f"; {note}"
    return cfg, est


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
