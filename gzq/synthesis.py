"""GZNQ image synthesis: images as a generative model f_I(z), matched to the teacher's BN statistics by
likelihood and pushed to be hard for an ensemble of quantized students.

Generative Zero-shot Network Quantization (He et al., CVPR-W 2021, arXiv 2101.08430), appendix 1.1
(BN-statistic likelihood, see gzq.bn) and 1.2 (ensemble KL):

    L_img = lambda_bn L_BN + lambda_ce CE(teacher(x), y) - lambda_adv KL(p_T || mean_i q_i)
            + lambda_tv TV(x) + lambda_l2 ||x||^2
    each student i: min KL(p_T || q_i) on the same batch, in alternation with the image step,

after `warmup_steps` of BN + CE only. Random roll (jitter) and flips as in DeepInversion. The image means
are optimised in a 1/f-scaled DCT basis by default (gzq.images, SynthConfig.image_basis). With
`coarse_scale` < 1 the warm-up shows the teacher the images downsized (coarse to fine, as DeepInversion's
multi-resolution synthesis): the low frequencies form first, at a fraction of a full step's cost.

So that one recipe serves any architecture, resolution and class count, L_BN is the likelihood divided by
the layers' mean N (gzq.bn.bn_losses), O(1) like the CE (whose gradient at the logits is bounded for any
class count), and the CE weight adapts online (between lambda_ce and ce_max_scale x lambda_ce) until the teacher assigns the
target share of each batch to its labels. Augmentations are kept only as far as the teacher tolerates
them: at `augment_check_at` of the steps (half), if the teacher still misses the labels of the augmented batches
(agreement under `augment_min_agreement` with the CE weight free to grow), jitter and automatic flips are
switched off for the remaining steps, which then sharpen the class signal of images whose structure
formed under augmentation. Teachers trained on small images with small shifts cannot hold a class under
a wrapped roll, and a teacher that is not mirror-invariant cannot hold it under flips.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .accel import autocast
from .augment import augment, coarse_size, jitter_pixels, resize
from .bn import BNStatsRecorder, bn_losses
from .config import (
    BAND_CANDIDATES,
    BAND_PROBE_STEPS,
    ActInit,
    FlipMode,
    ImageBasis,
    SynthConfig,
    VRule,
)
from .evaluate import kl_score
from .events import Message, Preview, Progress, StageStarted, Stopped, drain
from .images import SyntheticImages
from .losses import ensemble_log_probs, kl_teacher_student, total_variation
from .models import Teacher
from .optim import adam, cosine_schedule, student_optimizer
from .quant.convert import calibrate_

log = logging.getLogger(__name__)


def balanced_labels(num: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """num labels covering the classes as evenly as possible, (num,) int64."""
    reps = math.ceil(num / num_classes)
    labels = torch.cat([torch.randperm(num_classes, generator=generator) for _ in range(reps)])[:num]
    return labels[torch.randperm(num, generator=generator)]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` (a gradient-reversal layer when < 0)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _adversarial_backward_(img_loss: torch.Tensor, xs: torch.Tensor, logits_t: torch.Tensor,
                           students: dict[str, nn.Module], images: nn.Module, lambda_adv: float,
                           boot_gens: dict[str, torch.Generator], amp=None) -> tuple[float, dict[str, float]]:
    """Gradients of one alternation step: the images get d/dx [img_loss - lambda_adv KL(p_T || mean_i q_i)],
    each student gets d/dtheta KL(p_T || q_i) with the teacher side detached.

    With one student the ensemble KL is that student's KL, so a single backward serves both: the student
    sees the images through a gradient-reversal layer (x -lambda_adv), and the teacher side of the KL is
    added with the student side detached. With several students the two objectives differ at the
    logits, so the images' gradient and the students' gradient take two backward passes. `amp`: a
    context factory the students' forwards run in (gzq.accel.autocast).

    Returns:
        the ensemble KL and each student's KL (floats).
    """
    amp = amp or contextlib.nullcontext
    p_log = F.log_softmax(logits_t, 1)
    p_det = p_log.detach()

    def own_kl(name, q):
        w = None
        if name in boot_gens:
            w = torch.poisson(torch.ones(len(q)), generator=boot_gens[name]).to(q.device)
        return kl_teacher_student(p_det, F.log_softmax(q, 1), w)

    if len(students) == 1:
        (name, student), = students.items()
        with amp():
            q = student(_ScaleGrad.apply(xs, -lambda_adv)).float()
        kl_own = own_kl(name, q)
        kl_t_side = kl_teacher_student(p_log, F.log_softmax(q.detach(), 1))
        (img_loss - lambda_adv * kl_t_side + kl_own).backward()
        return kl_t_side.item(), {name: kl_own.item()}

    with amp():
        q_logits = {n: s(xs).float() for n, s in students.items()}
    kl_ens = kl_teacher_student(p_log, ensemble_log_probs(list(q_logits.values())))
    img_params = [p for p in images.parameters() if p.requires_grad]
    grads = torch.autograd.grad(img_loss - lambda_adv * kl_ens, img_params, retain_graph=True)
    for p, g in zip(img_params, grads):
        p.grad = g
    kls = {n: own_kl(n, q) for n, q in q_logits.items()}
    torch.stack(list(kls.values())).sum().backward(inputs=[p for s in students.values() for p in s.parameters()])
    return kl_ens.item(), {n: v.item() for n, v in kls.items()}


@torch.no_grad()
def flip_check(teacher: nn.Module, images: SyntheticImages, labels: torch.Tensor, batch: int = 256, jitter: int = 0,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """How mirror-invariant the teacher is on the current images (their means): the share of images whose
    label it predicts as they are and mirrored, and the share whose prediction the mirror leaves unchanged.
    With jitter > 0 also the share it labels when rolled by up to `jitter` pixels (one random shift per
    batch of `batch`, from `generator`)."""
    hits, hits_flip, hits_roll, same = 0, 0, 0, 0
    for i in range(0, len(labels), batch):
        idx = torch.arange(i, min(i + batch, len(labels)), device=labels.device)
        x = images(idx, noise=False)
        p, pf = teacher(x).argmax(1), teacher(x.flip(3)).argmax(1)
        hits += int((p == labels[idx]).sum())
        hits_flip += int((pf == labels[idx]).sum())
        same += int((p == pf).sum())
        if jitter > 0:
            hits_roll += int((teacher(augment(x, jitter, False, generator)).argmax(1) == labels[idx]).sum())
    n = len(labels)
    out = dict(label_agreement=hits / n, flipped_label_agreement=hits_flip / n, consistency=same / n)
    if jitter > 0:
        out["rolled_label_agreement"] = hits_roll / n
    return out


def _global_flip_check(teacher: nn.Module, images: SyntheticImages, jitter: int = 0,
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """flip_check over every rank's shard of the images (each rank's shares weighted by its image count)."""
    check = flip_check(teacher, images, images.labels, jitter=jitter, generator=generator)
    if dist.world_size() <= 1:
        return check
    n = len(images.labels)
    *sums, total = dist.all_reduce_floats([v * n for v in check.values()] + [n])
    return {k: v / total for k, v in zip(check, sums)}


def flips_are_valid(check: dict[str, float], min_ratio: float = 0.9) -> bool:
    """Flips keep the class signal: mirrored images are assigned their label nearly as often as upright ones."""
    return check["flipped_label_agreement"] >= min_ratio * check["label_agreement"]


def choose_band(teacher: Teacher, cfg: SynthConfig, device: torch.device, seed: int = 0,
                stop: Callable[[], bool] = lambda: False, amp: bool = False) -> tuple[float | None, dict[float, float]]:
    """synth.band=auto: the share of the image frequencies the synthesis keeps (SynthConfig.band), chosen by the
    GZNQ objective itself. For each band of BAND_CANDIDATES, widest first, a short synthesis
    (cfg.band_probe_images() images, BAND_PROBE_STEPS teacher-only steps, the run's other settings) forms
    images in that band; the band whose images leave the lowest BN loss (the normalised likelihood,
    gzq.bn.bn_losses) wins. The probe stops at the first band that does worse than the one before; with
    `stop` set midway it returns (None, ...).

    A teacher trained on images with detail up to its input's resolution (a plain 28-px model, one trained on
    ImageNet at 224) needs the fine frequencies to reach its first layers' statistics, and keeps the full
    band; one trained on small images upsampled (28-px images at 224) is matched best by images that hold no
    more detail than its data did, and wider bands only add detail it never saw. Returns (band, {band: BN
    loss}); (1, {}) without probing in the pixel basis, which has no band to limit, for a synthesis of no
    steps, or for one too small to spare a probe (SynthConfig.band_probe_images). Every rank probes its
    shard of the probe's images and follows rank 0's losses, so all ranks probe the same bands and pick the
    same one. The probe runs at full size (no coarse warm-up)."""
    if not cfg.probes_band:
        return 1.0, {}
    n = min(max(cfg.band_probe_images(), dist.world_size()), cfg.num_images)   # at least one image per rank
    losses: dict[float, float] = {}
    for band in BAND_CANDIDATES:
        probe = dataclasses.replace(cfg, num_images=n, holdout_images=0, batch_size=n, steps=BAND_PROBE_STEPS,
                                    warmup_steps=BAND_PROBE_STEPS, adversarial=False, band=band,
                                    preview_every=BAND_PROBE_STEPS, coarse_scale=1.0)
        _, res = drain(iter_synthesize(teacher, {}, probe, device, seed + 104729, stop, amp=amp), keep=False)
        if res.steps_done < BAND_PROBE_STEPS:   # stopped
            return None, losses
        with torch.no_grad(), BNStatsRecorder(teacher.model) as rec:
            teacher.model(res.images(torch.arange(len(res.images.labels), device=device), noise=False))
            loss, _ = bn_losses(rec, cfg.bn_loss, cfg.n_rule, cfg.v_rule, normalize=cfg.bn_normalize)
        losses[band] = dist.broadcast_object(float(loss))
        if len(losses) > 1 and losses[band] >= list(losses.values())[-2]:
            break
    return min(losses, key=losses.get), losses


@dataclass
class SynthResult:
    images: SyntheticImages
    train_idx: torch.Tensor       # images the students may train on
    holdout_idx: torch.Tensor     # images no student ever trains on (fresh evaluation set)
    students_calibrated: bool
    steps_done: int
    history: dict[str, list]
    flip: bool = False            # whether flips were used at the end (and suit fine-tuning)
    flip_check: dict[str, float] | None = None   # the teacher's labels on the image means, upright and mirrored,
                                                 # and on the augmented batches, at the end of the warm-up
    jitter: int = 0               # the roll in pixels used at the end (0 once the augmentation check drops it)
    band: float = 1.0             # the share of the frequencies the images hold (SynthConfig.band, resolved)
    band_probe: dict[float, float] | None = None   # synth.band=auto: the BN loss the probe reached per band
    calibration: dict[str, dict] = field(default_factory=dict)   # students.act_percentile=auto: calibrate_'s
                                                                  # choice per student calibrated here


def iter_synthesize(teacher: Teacher, students: dict[str, nn.Module], cfg: SynthConfig, device: torch.device,
                    seed: int = 0, stop: Callable[[], bool] = lambda: False,
                    calibration: dict[str, ActInit | float] | None = None, bootstrap: set[str] | frozenset = frozenset(),
                    amp: bool = False) -> Iterator:
    """Optimise the synthetic images (and train the students in alternation). Yields events; returns SynthResult.

    Args:
        students: name -> fake-quant student (trained in place once the warm-up ends; ignored when
            cfg.adversarial is False).
        calibration: kwargs for calibrate_ when the students join (method, percentile).
        bootstrap: students (extra seeds of a configuration) that weight each image of their own KL by a
            Poisson(1) draw from their own generator, so copies of one configuration drift apart.
        amp: bf16 autocast of the teacher's and students' forwards (gzq.accel; BN statistics stay float32).

    With many processes (gzq.dist) each rank optimises its shard of the images (every N-th one, its own
    random streams) on its share of the global batch; the students' gradients are averaged over ranks, and
    at the end every rank holds all the images. cfg.global_bn_stats sums the BN statistics over ranks.
    """
    if not cfg.adversarial:
        students = {}
    yield StageStarted("synthesis", cfg.steps, f"{cfg.num_images} images, {len(students)} students, "
                                               f"{cfg.bn_loss.value} BN loss")
    band_probe = None
    if cfg.band == "auto":
        if cfg.probes_band:
            yield Message(f"choosing the images' frequency band: up to {len(BAND_CANDIDATES)} short syntheses of "
                          f"{cfg.band_probe_images()} images x {BAND_PROBE_STEPS} steps")
        elif cfg.image_basis == ImageBasis.SPECTRAL and cfg.steps > 0:
            yield Message("image band: the full band, not probed (the synthesis is too small to spare a probe; "
                          "set synth.band to choose one)")
        band, band_probe = choose_band(teacher, cfg, device, seed, stop, amp)
        cfg = dataclasses.replace(cfg, band=1.0 if band is None else band)   # None: stopped, as the loop will see
        if band_probe and band is not None:
            probed = ", ".join(f"{b:g}: {v:.4f}" for b, v in band_probe.items())
            yield Message(f"image band: {band:g} of the frequencies (BN loss after a short probe, per band: {probed})")
    boot_gens = {n: torch.Generator().manual_seed(seed * 1000 + i + 11) for i, n in enumerate(students) if n in bootstrap}
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)
    world = dist.world_size()
    k, hold = cfg.num_images, cfg.holdout_images
    labels = balanced_labels(k, teacher.num_classes, gen)
    images = SyntheticImages(labels, teacher.input_size, teacher.pixel_bounds, cfg.image_param,   # all k on every
                             cfg.init_log_scale, gen, cfg.image_basis, cfg.spectral_decay, cfg.band,  # rank: the
                             cfg.decorrelate_colour)                                                 # 1-process start
    holdout_mask = torch.zeros(k, dtype=torch.bool)
    holdout_mask[k - hold:] = True
    batch = min(cfg.batch_size, k)
    if world > 1:   # this rank's shard, its share of the global batch, and random streams of its own
        own = dist.shard(k)
        images.select_(own)
        holdout_mask = holdout_mask[own]
        batch = min(len(dist.shard(batch)), len(own))
        gen.manual_seed(seed + 7919 * (dist.rank() + 1))
        dev_gen.manual_seed(seed + 7919 * (dist.rank() + 1) + 1)
    images = images.to(device)
    holdout_mask = holdout_mask.to(device)
    k_own = len(images.labels)
    groups = [{"params": [images.mean], "lr": cfg.lr}]
    if images.log_scale is not None:
        groups.append({"params": [images.log_scale], "lr": cfg.lr_log_scale})
    opt = adam(groups, betas=(0.5, 0.9))
    sched = cosine_schedule(opt, cfg.steps)
    s_opts: dict[str, torch.optim.Optimizer] = {}  # made once the students are calibrated
    history: dict[str, list] = {"bn_ll": [], "ce": [], "kl_ens": [], "agreement": [], "ce_weight": []}
    jitter = jitter_pixels(cfg.jitter, teacher.input_size)
    coarse = coarse_size(teacher.input_size, cfg.coarse_scale, cfg.coarse_min_side)
    flip = cfg.flip != FlipMode.OFF           # AUTO starts with flips; the check at check_step may drop them
    check_step = max(int(cfg.augment_check_at * cfg.steps), 1)
    checked: dict[str, float] | None = None
    ce_scale = 1.0
    calibrated = False
    calib_choice: dict[str, dict] = {}
    perm = torch.randperm(k_own, generator=gen)
    cursor = 0
    all_idx = torch.arange(k)
    recorder = BNStatsRecorder(teacher.model, need_m4=cfg.v_rule == VRule.EMPIRICAL,
                               across_ranks=cfg.global_bn_stats and world > 1)
    bn_weight = world if recorder.across_ranks else 1
    t0 = time.perf_counter()
    step = 0
    try:
        for step in range(1, cfg.steps + 1):
            if stop():
                yield Stopped("synthesis", step)
                return SynthResult(images, all_idx[:k - hold], all_idx[k - hold:], calibrated, step - 1, history,
                                   flip, checked, jitter, cfg.band, band_probe, calib_choice)
            if cursor + batch > k_own:
                perm, cursor = torch.randperm(k_own, generator=gen), 0
            idx = perm[cursor:cursor + batch].to(device)
            cursor += batch
            x = augment(images(idx, dev_gen), jitter, flip, gen)          # (B, C, H, W)
            if step <= cfg.warmup_steps:    # coarse to fine: the warm-up forms the images' low frequencies
                x = resize(x, coarse)
            with autocast(device, amp):
                logits_t = teacher.model(x).float()
            l_bn, layer_ll = bn_losses(recorder, cfg.bn_loss, cfg.n_rule, cfg.v_rule, cfg.first_bn_weight,
                                       cfg.bn_normalize)
            ce = F.cross_entropy(logits_t, images.labels[idx], label_smoothing=cfg.label_smoothing)
            agree = (logits_t.detach().argmax(1) == images.labels[idx]).float().mean().item()
            train_sel = ~holdout_mask[idx]
            few_train = int(train_sel.sum()) < 2
            if world > 1:   # one collective: the global agreement, and whether any rank has too few to train on
                hits, count, short = dist.all_reduce_floats([agree * len(idx), len(idx), few_train])
                agree, few_train = hits / count, short > 0
            if cfg.ce_target > 0 and step > cfg.warmup_steps:
                # after the warm-up, grow the CE weight while the batch misses its labels, decay it once they hold
                ce_scale = (min(ce_scale * (1 + cfg.ce_adapt_rate), cfg.ce_max_scale) if agree < cfg.ce_target
                            else max(ce_scale / (1 + cfg.ce_adapt_rate), 1.0))
            # with the statistics of the global batch, each image moves them by 1/(global batch), not 1/(its
            # rank's batch) like the per-image means of the other terms: x world keeps the single-process balance
            loss = cfg.lambda_bn * bn_weight * l_bn + cfg.lambda_ce * ce_scale * ce
            if cfg.lambda_tv:
                loss = loss + cfg.lambda_tv * total_variation(x)
            if cfg.lambda_l2:
                loss = loss + cfg.lambda_l2 * x.pow(2).mean()
            losses = {"bn": l_bn.item(), "ce": ce.item(), "ce_weight": cfg.lambda_ce * ce_scale}
            student_kl = {}
            adversarial = bool(students) and step > cfg.warmup_steps and not few_train
            if adversarial and not calibrated:
                with torch.no_grad():
                    calib = [images(perm_i, dev_gen, noise=False) for perm_i in
                             torch.split(torch.nonzero(~holdout_mask).flatten(), 64)]
                    score = None
                    if (calibration or {}).get("percentile") == "auto":   # judged on this rank's held-out images
                        recorder.paused = True   # ranks may hold different numbers of them: no BN collectives
                        try:
                            score = kl_score(teacher.model, images(torch.nonzero(holdout_mask).flatten(), noise=False))
                        finally:
                            recorder.paused = False
                for n, s in students.items():
                    chosen = calibrate_(s, calib, **(calibration or {}), score=score)
                    if chosen and chosen["scores"]:
                        calib_choice[n] = chosen
                    s_opts[n] = student_optimizer(s, cfg.student_lr, cfg.student_lr_quant)
                calibrated = True
            opt.zero_grad(set_to_none=True)
            if adversarial:
                for o in s_opts.values():
                    o.zero_grad(set_to_none=True)
                kl_ens, student_kl = _adversarial_backward_(loss, x[train_sel], logits_t[train_sel], students, images,
                                                            cfg.lambda_adv, boot_gens, lambda: autocast(device, amp))
                losses["kl_ens"] = kl_ens
                history["kl_ens"].append(kl_ens)
                for s in students.values():
                    dist.average_gradients_(s.parameters())
                for o in s_opts.values():
                    o.step()
                loss = loss.detach() - cfg.lambda_adv * kl_ens
            else:
                loss.backward()
            opt.step()
            sched.step()
            images.clamp_()
            losses["total"] = loss.item()
            ll = layer_ll.tolist()
            history["bn_ll"].append(float(np.mean(ll)))
            history["ce"].append(losses["ce"])
            history["agreement"].append(agree)
            history["ce_weight"].append(cfg.lambda_ce * ce_scale)
            if step == check_step:
                checked = _global_flip_check(teacher.model, images, jitter,   # its own stream: the check
                                             torch.Generator().manual_seed(seed + 23))   # leaves gen's as it was
                held = float(np.mean(history["agreement"][-10:]))
                checked["augmented_agreement"] = held
                if cfg.augment_check and held < cfg.augment_min_agreement and (jitter or flip):
                    dropped = [n for n, on in (("jitter", jitter), ("flips", flip and cfg.flip == FlipMode.AUTO)) if on]
                    jitter, flip = 0, flip and cfg.flip == FlipMode.ON
                    yield Message(f"augmentation check: the teacher holds only {held:.0%} of the labels under "
                                  f"{' and '.join(dropped)} after the warm-up; {' and '.join(dropped)} off from here")
            yield Progress("synthesis", step, cfg.steps, time.perf_counter() - t0, losses, float(np.mean(ll)), ll,
                           student_kl)
            if step % cfg.preview_every == 0 or step == cfg.steps:
                yield Preview("synthesis", step, images.to_uint8(None, teacher.mean, teacher.std),
                              images.labels.tolist(), teacher.class_names)
    finally:
        recorder.remove()
        for s in students.values():
            s.zero_grad(set_to_none=True)
        images.to_pixel_basis_().requires_grad_(False)
    if world > 1:
        images.gather_(k).requires_grad_(False)
        for s in students.values():
            dist.check_identical(s, "a synthesis student")
    return SynthResult(images, all_idx[:k - hold], all_idx[k - hold:], calibrated, step, history, flip, checked,
                       jitter, cfg.band, band_probe, calib_choice)
