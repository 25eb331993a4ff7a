"""Student fine-tuning by knowledge distillation on the synthetic set (docs/design.md 2.5).

All students share each batch and its teacher forward. They fit the image means; with
TrainConfig.resample every batch of reparameterised images draws fresh noise from f_I(z) instead, so the
students see a new sample of each image every epoch (the default before the zoo's tuning set preferred the
means).

With many processes (gzq.dist) every rank draws the same global batches and trains on its slice of each,
with its own noise and augmentation; gradients are averaged over ranks after every backward, as
DistributedDataParallel does, so the students stay identical on every rank (checked at the end). Pair
mixing (TrainConfig.mixup) blends images within each rank's slice of the batch.

With TrainConfig.stats_kd > 0 KD also matches, at every conv whose BN was folded into it, the students'
per-channel batch mean and variance to the folded teacher's on the same batch (gzq.losses.moment_loss, in units
of that BN's real-data variance), with that weight: only the statistics that the BN layers summarise, not each
image's features.

With TrainConfig.anchor = rho > 0, after each step every quantized layer's latent weight w is pulled toward
the BN-folded teacher's w0 (its value when KD starts): w <- w - rho (lr_t / lr) (w - w0), a decoupled L2-SP
(Li et al. 2018) that bounds how far KD on the synthetic images can move the weights from ones known to work
on real data. Biases, step sizes and zero points stay free.

With TrainConfig.act_warmup = f > 0, activation quantization phases in over the first f of the KD steps: each
element of every activation quantizer's output is the float activation with probability 0.5 (1 - t / (f T)) at
step t of T, else its quantized value (QDrop, Wei et al. 2022; Quant-Noise, Fan et al. 2021), drawn afresh each
forward; afterwards every element is quantized. The students first fit the weights' and the activations' rounding
with part of the activation error held off, instead of starting from a network that 4-bit activations may have
wrecked.

With TrainConfig.refit_rounds = R > 0, after KD's schedule each student's top-1 agreement with the teacher on
the training image means is measured (fit_agreement); a student under TrainConfig.refit_below percent has not
fit its own training images, a sign of a slow start (4-bit activations can leave a network that KD moves only
slowly) rather than of images it cannot learn from, and runs another round of KD, a fresh cosine schedule of the
same length from where it stands, up to R times. The students that fit are left as they are, so a run where
none falls under the threshold is the same as one without rounds.

With TrainConfig.feature_kd > 0 the students also match the teacher inside the network: at the output of
every unit that block reconstruction finds (gzq.reconstruct.find_units: the stem, each block, the head), the
normalised squared error ||s - t||^2 / ||t||^2 is averaged over units and added to the KL with that weight.
The targets come from a BN-folded copy of the teacher, whose units compute what the students' (folded) units
do; its logits are the teacher's up to rounding and serve as the KL's targets too.
"""
from __future__ import annotations

import copy
import time
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from . import dist
from .accel import autocast, compiled
from .augment import augment, mix_pairs, random_crops
from .bn import channel_moments
from .config import TrainConfig
from .events import Message, Progress, StageStarted, Stopped
from .losses import feature_loss, kd_loss, moment_loss
from .models import Teacher
from .optim import cosine_schedule, student_optimizer
from .quant import ActQuantizer
from .quant.convert import (
    expand_cond_convs_,
    fold_bn_,
    folded_bn_moments,
    quant_wrappers,
)
from .reconstruct import find_units


@contextmanager
def _output_hooks(model: nn.Module, names: list[str], record: Callable):
    """Forward hooks on the named submodules of `model` while the block is open: record(box, name, output)
    fills the yielded dict and returns what the forward goes on with."""
    box: dict = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: record(box, n, out))
               for n in names]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


@contextmanager
def act_dropout(models: list[nn.Module], gen: torch.Generator):
    """While open, each element of every activation quantizer's output in `models` is the quantizer's float input
    with probability box["p"] (the yielded dict, 0 to start; the caller sets it before each forward), drawn from
    `gen` (QDrop). With p 0 the quantizers run untouched."""
    box = {"p": 0.0}

    def mix(mod, args, out):
        if box["p"] <= 0 or mod.calibrating:
            return None
        x = args[0].to(out.dtype)
        keep = torch.rand(out.shape, generator=gen, device=out.device) < box["p"]
        return torch.where(keep, x, out)

    handles = [m.register_forward_hook(mix) for model in models for m in model.modules()
               if isinstance(m, ActQuantizer)]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fit_agreement(t_fwd: Callable, s_fwd: Callable, images: nn.Module, idx: torch.Tensor, device: torch.device,
                  chunk: int = 64) -> float:
    """Top-1 agreement (percent) of a student with the teacher on the image means images[idx], unaugmented."""
    same = 0
    for part in torch.split(idx, chunk):
        x = images(part.to(device), noise=False)
        same += int((s_fwd(x).argmax(1) == t_fwd(x).argmax(1)).sum())
    return 100.0 * same / max(len(idx), 1)


def unit_outputs(model: nn.Module, names: list[str]):
    """Collects the output of each named submodule of `model` into the yielded dict while the block is
    open. The forward goes on with a copy, so a later in-place op cannot change what was collected."""
    def keep(box, name, out):
        if isinstance(out, torch.Tensor):
            box[name] = out
            return out.clone()
    return _output_hooks(model, names, keep)


def output_moments(model: nn.Module, names: list[str]):
    """Collects the per-channel (mean, biased variance) of each named submodule's output over the batch and
    space into the yielded dict while the block is open (differentiable; float32 under autocast). As in
    unit_outputs, the forward goes on with a copy, which a later in-place op may change."""
    def moments(box, name, out):
        box[name] = channel_moments(out.float())
        return out.clone()
    return _output_hooks(model, names, moments)


@torch.no_grad()
def folded_conv_scales(teacher: nn.Module, students: dict[str, nn.Module], example: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """{conv name: (C,) real-data variance of its BN-folded output} for every conv of `teacher` whose BN the
    students fold (gzq.quant.convert.fold_bn_) and that every student calls under that name: the BN's gamma^2
    var / (var + eps), floored at 1e-2 of its layer's mean so that a channel a BN switched off does not dominate."""
    scales = {conv: g.clamp_min(1e-2 * g.mean().item()).clamp_min(1e-12)
              for conv, (_, g) in folded_bn_moments(teacher, example).items()}
    names = set(scales)
    for s in students.values():
        names &= {n for n, _ in s.named_modules()}
    if not names:
        raise ValueError("train.stats_kd: the model has no conv followed by a BatchNorm that the students keep; "
                         "set train.stats_kd=0 for this model")
    return {n: g for n, g in scales.items() if n in names}


def folded_copy(teacher: Teacher, example: torch.Tensor) -> nn.Module:
    """A frozen copy of the teacher in the students' float form: CondConv layers as ExpertConv, and every BN that
    follows a conv folded into it."""
    ref = copy.deepcopy(teacher.model).eval().requires_grad_(False)
    expand_cond_convs_(ref)
    fold_bn_(ref, example)
    return ref


def folded_reference(teacher: Teacher, students: dict[str, nn.Module], example: torch.Tensor,
                     reference: nn.Module | None = None):
    """(BN-folded copy of the teacher, names of the units both it and every student call) for feature KD.
    `reference`: such a copy made already (the pipeline makes it before it hooks the models for stopping)."""
    ref = reference if reference is not None else folded_copy(teacher, example)
    names = find_units(ref, example)
    for s in students.values():
        names = [n for n in names if n in set(find_units(s, example))]
    if not names:
        raise ValueError("train.feature_kd: no unit of the teacher is called as a module by the students; "
                         "set train.feature_kd=0 for this model")
    return ref, names


def iter_distill(teacher: Teacher, students: dict[str, nn.Module], images: nn.Module, train_idx: torch.Tensor,
                 cfg: TrainConfig, device: torch.device, jitter: int = 0, flip: bool = False, seed: int = 0,
                 stop: Callable[[], bool] = lambda: False, amp: bool = False, compile: bool = False,
                 reference: nn.Module | None = None, rounds: dict | None = None) -> Iterator:
    """Fine-tune every student in place on images[train_idx]. Yields events; returns the number of steps run.

    amp: bf16 autocast of the forwards; compile: torch.compile the teacher's and students' forwards (gzq.accel).
    reference: the BN-folded teacher that feature and moment KD (cfg.feature_kd, cfg.stats_kd) match; made here when
    not given. rounds: filled with the number of KD rounds each student ran (cfg.refit_rounds).
    """
    gen = torch.Generator().manual_seed(seed + 7)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 8)
    drop_gen = torch.Generator(device=device).manual_seed(seed + 9 + 7919 * dist.rank())   # act_warmup's masks
    aug_gen = gen                       # one stream in a single process; with many, the batches stay shared
    if dist.world_size() > 1:           # and each rank draws its own noise and augmentation
        aug_gen = torch.Generator().manual_seed(seed + 7 + 7919 * (dist.rank() + 1))
        dev_gen.manual_seed(seed + 8 + 7919 * (dist.rank() + 1))
    n = len(train_idx)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    total = cfg.epochs * steps_per_epoch
    anchors = {}
    for name, s in students.items():
        s.eval().requires_grad_(True)
        if cfg.anchor > 0:
            anchors[name] = [(w.module.weight, w.module.weight.detach().clone()) for _, w in quant_wrappers(s)]
    t_model, units, scales = teacher.model, [], {}
    if cfg.feature_kd > 0 or cfg.stats_kd > 0:
        with torch.no_grad():
            example = images(train_idx[:2].to(device), noise=False)
        if cfg.stats_kd > 0:
            scales = folded_conv_scales(teacher.model, students, example)
        if cfg.feature_kd > 0:
            t_model, units = folded_reference(teacher, students, example, reference)
        else:
            t_model = reference if reference is not None else folded_copy(teacher, example)
    t_fwd = compiled(t_model, compile)
    fwd = {name: compiled(s, compile) for name, s in students.items()}
    yield StageStarted("finetune", total, f"{cfg.epochs} epochs of KD on {n} images")
    t0 = time.perf_counter()
    step = 0
    with ExitStack() as hooks:   # the unit outputs of each forward (nothing without feature KD)
        t_feats = hooks.enter_context(unit_outputs(t_model, units))
        feats = {name: hooks.enter_context(unit_outputs(s, units)) for name, s in students.items()}
        t_moments = hooks.enter_context(output_moments(t_model, list(scales)))
        moments = {name: hooks.enter_context(output_moments(s, list(scales))) for name, s in students.items()}
        drop = hooks.enter_context(act_dropout(list(students.values()) if cfg.act_warmup > 0 else [], drop_gen))
        warmup = cfg.act_warmup * total
        active = dict(students)
        rounds = {} if rounds is None else rounds
        rounds.update({name: 1 for name in students})
        for rnd in range(cfg.refit_rounds + 1):   # a round: one cosine schedule of `epochs` over the active students
            opts = {name: student_optimizer(s, cfg.lr, cfg.lr_quant) for name, s in active.items()}
            scheds = {name: cosine_schedule(o, total) for name, o in opts.items()}
            for _ in range(cfg.epochs):
                perm = train_idx[torch.randperm(n, generator=gen)]
                for b in range(steps_per_epoch):
                    if stop():
                        yield Stopped("finetune", step)
                        return step
                    idx = dist.local_slice(perm[b * batch:(b + 1) * batch]).to(device)
                    drop["p"] = 0.5 * max(1 - step / warmup, 0.0) if warmup > 0 else 0.0
                    with torch.no_grad():
                        x = augment(images(idx, dev_gen, noise=cfg.resample), jitter, flip, aug_gen)
                        x = mix_pairs(random_crops(x, cfg.crop_scale, aug_gen), cfg.mixup, aug_gen)
                        with autocast(device, amp):
                            t_logits = t_fwd(x).float()
                    kls = {}
                    for name, s in active.items():
                        with autocast(device, amp):
                            logits = fwd[name](x).float()
                        loss = kd_loss(logits, t_logits, cfg.temperature)
                        kls[name] = loss.item() / cfg.temperature ** 2
                        if units:
                            loss = loss + cfg.feature_kd * feature_loss(feats[name], t_feats)
                        if scales:
                            loss = loss + cfg.stats_kd * moment_loss(moments[name], t_moments, scales)
                        opts[name].zero_grad(set_to_none=True)
                        loss.backward()
                        dist.average_gradients_(s.parameters())
                        opts[name].step()
                        if name in anchors:   # the weights' group is the first (gzq.optim.student_optimizer)
                            pull = cfg.anchor * opts[name].param_groups[0]["lr"] / cfg.lr
                            with torch.no_grad():
                                for w, w0 in anchors[name]:
                                    w.lerp_(w0, pull)
                        scheds[name].step()
                    step += 1
                    yield Progress("finetune", step, total * (rnd + 1), time.perf_counter() - t0,
                                   student_kl=kls)
            if rnd == cfg.refit_rounds or total == 0:
                break
            drop["p"] = 0.0
            fits = {name: fit_agreement(t_fwd, fwd[name], images, train_idx, device) for name in active}
            poor = {name: a for name, a in fits.items() if a < cfg.refit_below}
            if not poor:
                break
            yield Message(f"KD runs another {cfg.epochs} epochs for " + ", ".join(
                f"{name}, which gives the teacher's class on only {a:.0f} % of the training images"
                for name, a in poor.items()) + f" (under {cfg.refit_below:.0f} %; round {rnd + 2} of at most "
                f"{cfg.refit_rounds + 1})")
            active = {name: students[name] for name in poor}
            rounds.update({name: rnd + 2 for name in poor})
    for name, s in students.items():
        s.zero_grad(set_to_none=True)
        s.requires_grad_(False)
        dist.check_identical(s, f"student {name}")
    return step
