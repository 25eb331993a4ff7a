"""Student fine-tuning by knowledge distillation on the synthetic set (docs/design.md 2.5).

All students share each batch and its teacher forward. With reparameterised images every batch draws
fresh noise from f_I(z), so the students see a new sample of each image every epoch.

With many processes (gzq.dist) every rank draws the same global batches and trains on its slice of each,
with its own noise and augmentation; gradients are averaged over ranks after every backward, as
DistributedDataParallel does, so the students stay identical on every rank (checked at the end). Pair
mixing (TrainConfig.mixup) blends images within each rank's slice of the batch.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from torch import nn

from . import dist
from .accel import autocast, compiled
from .augment import augment, mix_pairs
from .config import TrainConfig
from .events import Progress, StageStarted, Stopped
from .losses import kd_loss
from .models import Teacher
from .optim import cosine_schedule, student_optimizer


def iter_distill(teacher: Teacher, students: dict[str, nn.Module], images: nn.Module, train_idx: torch.Tensor,
                 cfg: TrainConfig, device: torch.device, jitter: int = 0, flip: bool = False, seed: int = 0,
                 stop: Callable[[], bool] = lambda: False, amp: bool = False, compile: bool = False) -> Iterator:
    """Fine-tune every student in place on images[train_idx]. Yields events; returns the number of steps run.

    amp: bf16 autocast of the forwards; compile: torch.compile the teacher's and students' forwards (gzq.accel).
    """
    gen = torch.Generator().manual_seed(seed + 7)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 8)
    aug_gen = gen                       # one stream in a single process; with many, the batches stay shared
    if dist.world_size() > 1:           # and each rank draws its own noise and augmentation
        aug_gen = torch.Generator().manual_seed(seed + 7 + 7919 * (dist.rank() + 1))
        dev_gen.manual_seed(seed + 8 + 7919 * (dist.rank() + 1))
    n = len(train_idx)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    total = cfg.epochs * steps_per_epoch
    opts, scheds = {}, {}
    for name, s in students.items():
        opts[name] = student_optimizer(s, cfg.lr, cfg.lr_quant)
        scheds[name] = cosine_schedule(opts[name], total)
        s.eval().requires_grad_(True)
    t_fwd = compiled(teacher.model, compile)
    fwd = {name: compiled(s, compile) for name, s in students.items()}
    yield StageStarted("finetune", total, f"{cfg.epochs} epochs of KD on {n} images")
    t0 = time.perf_counter()
    step = 0
    for _ in range(cfg.epochs):
        perm = train_idx[torch.randperm(n, generator=gen)]
        for b in range(steps_per_epoch):
            if stop():
                yield Stopped("finetune", step)
                return step
            idx = dist.local_slice(perm[b * batch:(b + 1) * batch]).to(device)
            with torch.no_grad():
                x = augment(images(idx, dev_gen, noise=cfg.resample), jitter, flip, aug_gen)
                x = mix_pairs(x, cfg.mixup, aug_gen)
                with autocast(device, amp):
                    t_logits = t_fwd(x).float()
            kls = {}
            for name, s in students.items():
                with autocast(device, amp):
                    logits = fwd[name](x).float()
                loss = kd_loss(logits, t_logits, cfg.temperature)
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                dist.average_gradients_(s.parameters())
                opts[name].step()
                scheds[name].step()
                kls[name] = loss.item() / cfg.temperature ** 2
            step += 1
            yield Progress("finetune", step, total, time.perf_counter() - t0, student_kl=kls)
    for name, s in students.items():
        s.zero_grad(set_to_none=True)
        s.requires_grad_(False)
        dist.check_identical(s, f"student {name}")
    return step
