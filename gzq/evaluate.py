"""Evaluation (docs/design.md 2.6): data-free agreement and KL on held-out synthetic images, real top-1 when
labelled data exists, model size."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import EvalConfig
from .data import LABELLED_DATASETS, load_dataset, load_image_folder, to_model_input
from .models import Teacher
from .synthesis import kl_teacher_student

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 500) -> torch.Tensor:
    """Logits of `model` on x (N, C, H, W), computed in batches on `device`, returned on the CPU."""
    return torch.cat([model(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Top-1 agreement with the teacher, in percent."""
    return 100.0 * (teacher_logits.argmax(1) == student_logits.argmax(1)).float().mean().item()


def mean_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """KL(teacher || student) averaged over images."""
    return kl_teacher_student(F.log_softmax(teacher_logits, 1), F.log_softmax(student_logits, 1)).item()


def load_labelled_data(teacher: Teacher, cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """Real labelled images for `teacher`, normalised: an ImageFolder (cfg.data) or the default model's
    own test set. None when neither exists.

    Returns:
        x (N, C, H, W) float, y (N,) int64, a description of the source.
    """
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
    return to_model_input(images, teacher.mean, teacher.std, teacher.input_size), labels, source
