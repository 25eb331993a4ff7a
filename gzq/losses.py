"""The losses that synthesis, fine-tuning and evaluation share: KL between teacher and student(s), the
ensemble of several students, total variation, and the distillation losses."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_teacher_student(p_log: torch.Tensor, q_log: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) from log-probabilities, mean over the batch (weighted mean with per-sample `weights`)."""
    kl = (p_log.exp() * (p_log - q_log)).sum(1)
    return kl.mean() if weights is None else (kl * weights).sum() / weights.sum().clamp_min(1e-8)


def ensemble_log_probs(student_logits: list[torch.Tensor]) -> torch.Tensor:
    """log( (1/M) sum_i softmax(q_i) ), (B, K)."""
    stacked = torch.stack([F.log_softmax(q, 1) for q in student_logits])   # (M, B, K)
    return torch.logsumexp(stacked, 0) - math.log(len(student_logits))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and of horizontally neighbouring pixels, (B, C, H, W) -> ()."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), mean over the batch."""
    t = temperature
    return kl_teacher_student(F.log_softmax(teacher_logits / t, 1), F.log_softmax(student_logits / t, 1)) * t * t


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the named tensors both dicts hold of ||s - t||^2 / ||t||^2 (each over the whole batch), so every
    unit counts alike whatever its width, resolution or scale."""
    names = [n for n in teacher if n in student]
    if not names:
        raise ValueError("feature_loss: the student and the teacher share no unit output")
    terms = [(student[n].float() - teacher[n].float()).pow(2).sum() / teacher[n].float().pow(2).sum().clamp_min(1e-12)
             for n in names]
    return torch.stack(terms).mean()


def moment_loss(student: dict[str, tuple[torch.Tensor, torch.Tensor]],
                teacher: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the named layers of the channel mean of (m_s - m_t)^2 / (2 g) + (v_s - v_t)^2 / (4 g^2): the
    students' per-channel batch (mean, variance) against the teacher's on the same batch, in units of each
    channel's real-data variance g (`scale`), so every layer counts alike whatever its width or scale. The form
    is the normalised GZNQ likelihood of the synthesis's BN loss (gzq.bn), with the teacher's moments as the
    centre."""
    terms = []
    for name, (m_t, v_t) in teacher.items():
        m_s, v_s = student[name]
        g = scale[name]
        terms.append(((m_s - m_t).pow(2) / (2 * g) + (v_s - v_t).pow(2) / (4 * g * g)).mean())
    if not terms:
        raise ValueError("moment_loss: no layer to match")
    return torch.stack(terms).mean()
