"""Optimisers and the learning-rate schedule that synthesis and fine-tuning share."""
from __future__ import annotations

import math

import torch
from torch import nn


def adam(params, **kwargs) -> torch.optim.Adam:
    """torch.optim.Adam with the fused kernel where the device has one (CPU and CUDA): one call per tensor
    in C++, where foreach on CPU loops over a dozen small ops per tensor in Python-dispatched kernels."""
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


def student_optimizer(model: nn.Module, lr: float, lr_quant: float) -> torch.optim.Adam:
    """Adam over a student's weights (step `lr`) and its quantizers (step sizes relative to their values).

    Adam's step does not depend on the gradient's scale, so a fixed learning rate would move an 8-bit
    weight step size of 1e-3 by as much as a 4-bit one of 5e-2. Each quantizer's step sizes therefore get
    `lr_quant` times their current mean magnitude (create the optimizer after calibration); zero points
    are in code units and take `lr_quant` as is.
    """
    weights, groups = [], []
    for n, p in model.named_parameters():
        if n.endswith("scale"):
            groups.append({"params": [p], "lr": lr_quant * float(p.detach().abs().mean().clamp_min(1e-8))})
        elif n.endswith("zero_point"):
            groups.append({"params": [p], "lr": lr_quant})
        else:
            weights.append(p)
    return adam([{"params": weights, "lr": lr}] + groups)


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every group's learning rate from its value to 0 over `total_steps` steps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total_steps, 1))))
