"""Evaluation (docs/design.md 2.6): data-free agreement and KL on held-out synthetic images, real top-1 when
labelled data exists, model size; the report a run writes, and the health of its synthetic images."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .accel import to_device
from .config import EvalConfig, RunConfig
from .data import LABELLED_DATASETS, load_dataset, load_image_folder, to_model_input
from .losses import kl_teacher_student
from .models import Teacher
from .quant.convert import float_weights, model_size_bytes

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 500) -> torch.Tensor:
    """Logits of `model` on x (N, C, H, W), computed in batches on `device`, returned on the CPU."""
    return torch.cat([model(to_device(x[i:i + batch], device)).float().cpu() for i in range(0, len(x), batch)])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Top-1 agreement with the teacher, in percent."""
    return 100.0 * (teacher_logits.argmax(1) == student_logits.argmax(1)).float().mean().item()


def mean_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """KL(teacher || student) averaged over images."""
    return kl_teacher_student(F.log_softmax(teacher_logits, 1), F.log_softmax(student_logits, 1)).item()


def kl_score(teacher: nn.Module, x: torch.Tensor, batch: int = 256) -> Callable[[nn.Module], float]:
    """score(model): the mean KL(teacher || model) over the images x (N, C, H, W), on x's device. With many
    processes each rank passes its own images and every rank gets the mean over all of them."""
    with torch.no_grad():
        t_log = [teacher(x[i:i + batch]).float().log_softmax(1) for i in range(0, len(x), batch)]

    @torch.no_grad()
    def score(model: nn.Module) -> float:
        total = sum(kl_teacher_student(t, model(x[i * batch:(i + 1) * batch]).float().log_softmax(1)).item() * len(t)
                    for i, t in enumerate(t_log))
        total, n = dist.all_reduce_floats([total, len(x)])
        return total / max(n, 1)
    return score


class LabelledData(NamedTuple):
    """Real labelled images, normalised for the teacher."""
    images: torch.Tensor    # (N, C, H, W) float
    labels: torch.Tensor    # (N,) int64
    source: str             # a description of where they come from


def load_labelled_data(teacher: Teacher, cfg: EvalConfig) -> LabelledData | None:
    """Real labelled images for `teacher`, normalised: an ImageFolder (cfg.data) or the default model's
    own test set. None when neither exists."""
    if cfg.data:
        images, labels, classes = load_image_folder(cfg.data, teacher.input_size)
        if len(classes) > teacher.num_classes:
            raise ValueError(f"{cfg.data} has {len(classes)} class folders but the model has {teacher.num_classes} "
                             "classes; the folders must be the model's classes in order")
        if teacher.class_names and len(classes) == teacher.num_classes:
            log.info("class folders %s map to model classes by sorted order", classes[:3])
        source = f"image folder {cfg.data} ({len(labels)} images)"
    elif teacher.dataset in LABELLED_DATASETS:
        try:
            images, labels = load_dataset(teacher.dataset, "test")
        except FileNotFoundError as e:
            log.warning("%s", e)
            return None
        source = f"{teacher.dataset} test set ({len(labels)} images)"
    else:
        return None
    if cfg.max_real_images is not None:
        images, labels = images[:cfg.max_real_images], labels[:cfg.max_real_images]
    return LabelledData(to_model_input(images, teacher.mean, teacher.std, teacher.input_size), labels, source)


def evaluate_run(teacher: Teacher, students: dict, specs: dict, synth, labelled: LabelledData | None,
                 cfg: RunConfig, device: torch.device) -> dict:
    """Teacher and student metrics: agreement and KL on held-out synthetic images, real top-1, size.

    synth: the synthesis stage's SynthResult (its images, train and held-out indices).
    """
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 99)
    idx = synth.holdout_idx if len(synth.holdout_idx) else synth.train_idx
    with torch.no_grad():
        fresh = torch.cat([synth.images(idx.to(device), gen) for _ in range(cfg.eval.fresh_draws)]).cpu()
    t_fresh = predict_logits(teacher.model, fresh, device)
    t_real = predict_logits(teacher.model, labelled.images, device) if labelled else None
    fp_size = sum(p.numel() * 4 for p in teacher.model.parameters())
    rows = []
    for name, s in students.items():
        s.eval()
        s_fresh = predict_logits(s, fresh, device)
        row = dict(name=name, w_bits=specs[name].w_bits, a_bits=specs[name].a_bits,
                   protocol=specs[name].protocol.value, agreement=round(agreement(t_fresh, s_fresh), 2),
                   kl=round(mean_kl(t_fresh, s_fresh), 5), size_bytes=model_size_bytes(s))
        share, kinds = float_weights(s)
        row.update(float_weights_pct=round(share, 2), float_weight_modules=kinds)
        if labelled:
            s_real = predict_logits(s, labelled.images, device)
            row.update(accuracy=round(top1(s_real, labelled.labels), 2),
                       real_agreement=round(agreement(t_real, s_real), 2))
        else:
            row.update(accuracy=None, real_agreement=None)
        rows.append(row)
    return dict(
        teacher=dict(name=teacher.name, architecture=teacher.architecture,
                     accuracy=round(top1(t_real, labelled.labels), 2) if labelled else None, size_bytes=fp_size,
                     synthetic_label_agreement=round(top1(t_fresh, synth.images.labels[idx.to(device)].cpu()
                                                          .repeat(cfg.eval.fresh_draws)), 2)),
        students=rows,
        labelled_data=labelled.source if labelled else None,
        fresh_images=len(fresh),
    )


#: above this share (%) of its weights left float, a student is not what its bit-width says
#: (gzq.quant.convert.float_weights). The position tables and layer scales of BN networks with attention hold
#: up to 1.3 % (Visformer; `benchmarks/architectures.py --float-weights`); a layer kind GZQ does not quantize
#: can hold most of a network (CondConv's experts before ExpertConv)
MAX_FLOAT_WEIGHTS = 5.0


#: below this share of held-out synthetic images carrying their label, the images have lost their class signal
MIN_LABEL_AGREEMENT = 90.0


#: below this share of held-out synthetic images on which a quantized model gives the teacher's class, it has
#: most likely collapsed. On the zoo's tuning set and the bundled models healthy 4-bit students agree on 77-100 %;
#: the collapsed ones seen (efficientnet_48 at 4 bits, 18-27 % real top-1 against 75 %) on 22-30 %.
MIN_STUDENT_AGREEMENT = 50.0


def synthesis_health(report: dict, synth, finetune_shift: int = 0) -> dict:
    """Signals that the synthetic images are fit to train on: the teacher's agreement with their labels (on
    fresh draws of held-out images), the final BN log-likelihood, the CE weight the recipe ended on, the
    flip decision, the images' frequency band (with the BN loss per band probed under synth.band=auto), and
    the roll fine-tuning gave each batch (finetune_shift, pixels; 0 with train.shift off)."""
    h = synth.history
    return dict(label_agreement=report["teacher"]["synthetic_label_agreement"], finetune_shift_pixels=finetune_shift,
                final_bn_log_likelihood=h["bn_ll"][-1] if h.get("bn_ll") else None,
                final_ce_weight=h["ce_weight"][-1] if h.get("ce_weight") else None,
                flip=synth.flip, jitter_pixels=synth.jitter, flip_check=synth.flip_check,
                band=synth.band,
                band_probe={str(b): round(v, 5) for b, v in synth.band_probe.items()} if synth.band_probe else None)


def health_warnings(health: dict, students: list[dict] = ()) -> list[str]:
    """Plain-language warnings for a report (empty when the synthesis and the students look healthy).
    students: the report's student rows (their `agreement` with the teacher on held-out synthetic images, and how
    they were fine-tuned: a collapsed student fine-tuned on shifted images is pointed to training without the shift,
    which gained 8 and 15 points on the two zoo models whose W4A4 students fell furthest short; and the share of
    their weights left float, `float_weights_pct`)."""
    out = []
    agree = health.get("label_agreement")
    if agree is not None and agree < MIN_LABEL_AGREEMENT:
        out.append(f"the teacher recognises only {agree:.0f} % of the synthetic images as their intended class "
                   f"(healthy: {MIN_LABEL_AGREEMENT:.0f} % or more), so the quantized models learnt from weak "
                   "images; try the standard preset, more synthesis steps, or check that the model's weights are "
                   "trained (a randomly initialised network has no classes to show)")
    for row in students:
        a = row.get("agreement")
        shifted = health.get("finetune_shift_pixels") and row.get("finetune") != "calibrate"
        if a is not None and a < MIN_STUDENT_AGREEMENT:
            out.append(f"the {row['name']} model gives the original model's class on only {a:.0f} % of held-out "
                       f"synthetic images (healthy: {MIN_STUDENT_AGREEMENT:.0f} % or more), so it has most likely "
                       "collapsed and will be far less accurate than the original; do not use it as it is: try "
                       "three times the fine-tuning epochs (a slow student may just need them), another seed, "
                       + ("fine-tuning without the shift (untick \"shift the images while the small model learns\" "
                          "under Advanced; CLI: --set train.shift=false), " if shifted else "")
                       + "or a wider bit-width (e.g. w4a8 or w8a8), and check it on labelled images if you have any")
        share = row.get("float_weights_pct")
        if share is not None and share > MAX_FLOAT_WEIGHTS:
            out.append(f"{share:.1f} % of the {row['name']} model's weights are in layers GZQ has no quantized "
                       f"form for ({', '.join(row.get('float_weight_modules', []))}); they stay float in the model and "
                       "its files, so it is larger than its bit-width says and an integer runtime runs those layers in "
                       "float")
    return out
