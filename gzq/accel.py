"""Switches of the accelerated path (RunConfig.amp, .channels_last, .compile), for a CUDA GPU first.

- bf16 autocast of the training forwards (synthesis: teacher and students; fine-tuning: the students'
  forward and the teacher's targets). What stays float32: the BN statistics of the likelihood (gzq.bn casts
  each BN input up before its moments), every activation quantizer (its codes need more than bf16's 8
  significant bits: gzq.quant.modules), the losses autocast keeps in float32 (softmax, cross-entropy),
  calibration, evaluation and export. `benchmarks/gpu.py` measures its effect on the likelihood.
- channels_last memory format of the teacher and students (NHWC convolutions, what tensor cores want).
- torch.compile of the fine-tuning forwards (teacher and students; synthesis keeps its BN hooks eager).
- pinned host memory and non-blocking copies for the batches that go to a GPU (evaluation's batches).
All are off by default: none has been measured on a GPU here (README, "Many processes (torchrun)").
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def channels_last_(model: nn.Module | None) -> nn.Module | None:
    """Convert the 4-d parameters and buffers of `model` to channels_last (in place)."""
    if model is not None:
        model.to(memory_format=torch.channels_last)
    return model


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(model) when enabled (parameters shared with `model`), else model itself."""
    return torch.compile(model) if enabled else model


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on device; from pinned host memory without blocking when the device is a GPU."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
