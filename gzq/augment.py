"""The augmentations that synthesis and fine-tuning share: a random roll (jitter) and horizontal flips,
as in DeepInversion (docs/design.md 2.4), and the random crops and mixing of image pairs that KD may add."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def jitter_pixels(fraction: float, input_size) -> int:
    """The roll, in pixels, that `fraction` of the input's shorter side gives (SynthConfig.jitter)."""
    return int(round(fraction * min(input_size[-2:])))


def finetune_jitter(synth, train, input_size) -> int:
    """The roll fine-tuning (KD, reconstruction) applies, in pixels: synth.jitter's share of the side, as synthesis
    starts out with (the teacher labels or fits each rolled image itself), or 0 where train.shift is off."""
    return jitter_pixels(synth.jitter, input_size) if train.shift else 0


def coarse_size(input_size, scale: float, min_side: int) -> tuple[int, int] | None:
    """The (h, w) a coarse synthesis step shows the teacher (SynthConfig.coarse_scale), or None where the
    input stays full size: scale 1, or a shorter side that scaling would take under `min_side` pixels."""
    h, w = input_size[-2:]
    if scale >= 1 or min(h, w) * scale < min_side:
        return None
    return max(round(h * scale), 1), max(round(w * scale), 1)


def resize(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """x resized to `size` (bilinear, antialiased, so the content above the smaller size's band is dropped
    rather than aliased); x itself when size is None."""
    if size is None:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def augment(x: torch.Tensor, jitter: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random roll by up to `jitter` pixels (one shift per batch) and per-image horizontal flips."""
    if jitter > 0:
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip:
        mask = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x


def random_crops(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image replaced by a random crop of it, resized back to the full size: the crop covers a fraction
    U(scale, 1) of the image's area, with an aspect ratio between 3/4 and 4/3 (torchvision's
    RandomResizedCrop, per image, in one batched resampling). scale >= 1 returns x unchanged.

    For distillation only, where the teacher labels each crop itself (the other half of "function matching"
    beside the pair mixing below): the students see the images' parts at other scales and positions.
    """
    if scale >= 1:
        return x
    n = len(x)
    area = scale + (1 - scale) * torch.rand(n, generator=generator)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=generator))
    sw = (area * ratio).sqrt().clamp(max=1)
    sh = (area / sw).clamp(max=1)      # sw x sh = area exactly
    tx, ty = (2 * torch.rand(n, generator=generator) - 1) * (1 - sw), (2 * torch.rand(n, generator=generator) - 1) * (1 - sh)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([sw, zero, tx], 1), torch.stack([zero, sh, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mix_pairs(x: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image blended with another of the batch, x_i <- l_i x_i + (1 - l_i) x_j, l_i ~ Beta(alpha, alpha).

    For distillation only: the teacher labels the blend itself ("function matching", Beyer et al., CVPR 2022),
    so the students also see the inputs between the classes, where the synthetic images, each formed to be
    one class, leave the teacher's function unsampled. alpha <= 0 returns x unchanged.
    """
    if alpha <= 0 or len(x) < 2:
        return x
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, len(x)))
    perm = torch.randperm(len(x), generator=generator)
    lam = lam.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[perm.to(x.device)]
