"""The augmentations that synthesis and fine-tuning share: a random roll (jitter) and horizontal flips,
as in DeepInversion (docs/design.md 2.4)."""
from __future__ import annotations

import torch


def jitter_pixels(fraction: float, input_size) -> int:
    """The roll, in pixels, that `fraction` of the input's shorter side gives (SynthConfig.jitter)."""
    return int(round(fraction * min(input_size[-2:])))


def augment(x: torch.Tensor, jitter: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random roll by up to `jitter` pixels (one shift per batch) and per-image horizontal flips."""
    if jitter > 0:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip:
        mask = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x
