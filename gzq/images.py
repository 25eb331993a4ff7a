"""The synthetic images as a generative model f_I(z) (docs/design.md 2.1): what synthesis optimises and every
later stage draws from, and what the budget estimate times as part of a synthesis step."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from . import dist
from .config import ImageBasis, ImageParam
from .data import channel_view


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix, (n, n): coefficients c = D x, inverse x = D^T c."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def spectral_scale(h: int, w: int, decay: float, band: float = 1.0) -> torch.Tensor:
    """1/f^decay for each 2-D DCT coefficient of an h x w image, (h, w), normalised to unit mean square so that
    a step in these coordinates moves the pixels as much, on average, as a step in the pixels themselves.
    f is the radial frequency in cycles per pixel; the constant term counts as the lowest frequency present.
    band < 1 keeps the lowest `band` share of the frequencies along each axis and zeroes the rest (the image
    holds what an image of band * (h, w) pixels, upsampled, can)."""
    fy = torch.arange(h, dtype=torch.float64)[:, None] / (2 * h)
    fx = torch.arange(w, dtype=torch.float64)[None, :] / (2 * w)
    f = (fy ** 2 + fx ** 2).sqrt().clamp(min=1 / (2 * max(h, w)))
    scale = f ** -decay
    if band < 1:
        keep_h, keep_w = max(math.ceil(band * h), 1), max(math.ceil(band * w), 1)
        scale[keep_h:] = 0
        scale[:, keep_w:] = 0
    return (scale / scale.pow(2).mean().sqrt()).float()


#: The square root of natural images' RGB colour correlation (Olah et al., "Feature Visualization", Distill
#: 2017; measured on ImageNet): rows R, G, B; columns the decorrelated components, luminance first, then two
#: colour differences about 4x and 8x weaker.
COLOUR_CORRELATION_SQRT = ((0.26, 0.09, 0.02),
                           (0.27, 0.00, -0.05),
                           (0.27, -0.09, 0.03))


def colour_matrix(bounds) -> torch.Tensor:
    """A, (3, 3): normalised input x = A @ p per pixel for decorrelated colour parameters p. The colour
    correlation's square root, taken from pixel values to the model's normalised input (each row divided by its
    channel's std, hi - lo = 1 / std) and scaled to ||A||_F^2 = 3, as the identity has, so that parameters of
    unit variance give images of the same mean square as one parameter per channel does."""
    lo, hi = bounds
    a = torch.tensor(COLOUR_CORRELATION_SQRT, dtype=torch.float64) * (hi - lo).double().reshape(3, 1)
    return (a * math.sqrt(3) / a.norm()).float()


class SyntheticImages(nn.Module):
    """f_I(z): K images, each a learnable mean m_k and log-scale s_k (image-shaped), x_k = m_k + exp(s_k) z.

    In normalised input space; samples are clamped to the valid pixel range [0, 1] mapped through mean/std.
    With the spectral basis (ImageBasis.SPECTRAL) the parameter `mean` holds each image's 2-D DCT
    coefficients divided by spectral_scale, and the pixels are their inverse transform; to_pixel_basis_()
    turns it into the pixel means (what every later stage reads). With `decorrelate_colour` (3 channels,
    spectral basis) the coefficients' channels are decorrelated colour components, mixed into RGB by
    colour_matrix.
    """

    def __init__(self, labels: torch.Tensor, input_size, bounds, param: ImageParam, init_log_scale: float,
                 generator: torch.Generator, basis: ImageBasis = ImageBasis.PIXEL, spectral_decay: float = 1.0,
                 band: float = 1.0, decorrelate_colour: bool = False):
        super().__init__()
        k = len(labels)
        lo, hi = bounds                                                    # (1, C, 1, 1) each
        mean = torch.randn(k, *input_size, generator=generator)            # (K, C, H, W)
        self.register_buffer("labels", labels.clone())
        self.register_buffer("lo", lo.clone())
        self.register_buffer("hi", hi.clone())
        h, w = input_size[-2:]
        spectral = ImageBasis(basis) == ImageBasis.SPECTRAL
        self.register_buffer("dct_h", dct_matrix(h) if spectral else None, persistent=False)
        self.register_buffer("dct_w", dct_matrix(w) if spectral else None, persistent=False)
        self.register_buffer("freq_scale", spectral_scale(h, w, spectral_decay, band) if spectral else None,
                             persistent=False)
        colour = spectral and decorrelate_colour and input_size[0] == 3
        a = colour_matrix((lo.flatten(), hi.flatten())) if colour else None
        self.register_buffer("colour", a, persistent=False)
        self.register_buffer("colour_inv", torch.linalg.inv(a) if colour else None, persistent=False)
        self.mean = nn.Parameter(mean if spectral else self._in_range(mean))
        self.log_scale = (nn.Parameter(torch.full((k, *input_size), float(init_log_scale)))
                          if param == ImageParam.REPARAM else None)
        if spectral:
            self.clamp_()

    @property
    def spectral(self) -> bool:
        return self.freq_scale is not None

    def pixels(self, m: torch.Tensor) -> torch.Tensor:
        """Pixel means from rows of the parameter `mean` (the identity in the pixel basis)."""
        if not self.spectral:
            return m
        x = self.dct_h.T @ (m * self.freq_scale) @ self.dct_w
        return x if self.colour is None else torch.einsum("cd,kd...->kc...", self.colour, x)

    def _coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of pixels() (a coefficient outside the band, SynthConfig.band, becomes 0)."""
        if self.colour is not None:
            x = torch.einsum("cd,kd...->kc...", self.colour_inv, x)
        c = self.dct_h @ x @ self.dct_w.T
        kept = self.freq_scale > 0
        return torch.where(kept, c / torch.where(kept, self.freq_scale, 1.0), 0.0)

    def forward(self, idx: torch.Tensor, generator: torch.Generator | None = None, noise: bool = True) -> torch.Tensor:
        """Draw images idx, (B, C, H, W): fresh noise per call for the reparameterised option."""
        x = self.pixels(self.mean[idx])
        if noise and self.log_scale is not None:
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + self.log_scale[idx].exp() * z
        return self._in_range(x)

    def _in_range(self, x: torch.Tensor) -> torch.Tensor:
        """x clamped to the valid pixel range (min/max: a value on a bound gets half its gradient)."""
        return torch.maximum(torch.minimum(x, self.hi), self.lo)

    @torch.no_grad()
    def to_pixel_basis_(self) -> SyntheticImages:
        """Hold the pixel means in `mean` from here on (in place; a no-op in the pixel basis)."""
        if self.spectral:
            x = self._in_range(self.pixels(self.mean.detach()))  # the transform's rounding error clamped off
            self.mean = nn.Parameter(x, requires_grad=self.mean.requires_grad)
            self.dct_h = self.dct_w = self.freq_scale = self.colour = self.colour_inv = None
        return self

    @torch.no_grad()
    def select_(self, idx: torch.Tensor) -> SyntheticImages:
        """Keep images idx only (in place): a rank's shard of a run of many processes (gzq.dist.shard)."""
        self.mean = nn.Parameter(self.mean[idx].clone())
        if self.log_scale is not None:
            self.log_scale = nn.Parameter(self.log_scale[idx].clone())
        self.labels = self.labels[idx].clone()
        return self

    @torch.no_grad()
    def gather_(self, num: int) -> SyntheticImages:
        """The inverse of select_(gzq.dist.shard(num)) on every rank at once: all `num` images, in place."""
        self.mean = nn.Parameter(dist.gather_rows(self.mean.detach(), num))
        if self.log_scale is not None:
            self.log_scale = nn.Parameter(dist.gather_rows(self.log_scale.detach(), num))
        self.labels = dist.gather_rows(self.labels, num)
        return self

    @torch.no_grad()
    def clamp_(self) -> None:
        x = self._in_range(self.pixels(self.mean))
        self.mean.copy_(self._coefficients(x) if self.spectral else x)
        if self.log_scale is not None:
            self.log_scale.clamp_(max=1.0)

    @torch.no_grad()
    def to_uint8(self, idx: torch.Tensor | None = None, mean=None, std=None) -> np.ndarray:
        """The image means as (N, H, W, C) uint8 pixels."""
        m = self.pixels(self.mean if idx is None else self.mean[idx])
        px = (m * channel_view(std, m) + channel_view(mean, m)).clamp(0, 1).mul(255).round().to(torch.uint8)
        return px.permute(0, 2, 3, 1).cpu().numpy()
