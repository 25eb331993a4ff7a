"""Fake-quant modules: they hold step sizes and zero points and call the pure primitives."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from .primitives import affine_params, fake_quantize, grad_scale, mse_search, quant_range, symmetric_scale


class WeightQuantizer(nn.Module):
    """Per-output-channel weight quantizer with learnable step sizes (LSQ).

    Symmetric: signed codes, zero point 0. Asymmetric: unsigned codes with a per-channel zero point.
    """

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool = True):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.qmin, self.qmax = quant_range(bits, signed=symmetric)
        out = weight.shape[0]
        w = weight.detach().reshape(out, -1)                      # (O, K)
        lo, hi = w.min(1).values, w.max(1).values
        scale, zp = mse_search(w, lo, hi, self.qmin, self.qmax, symmetric, bits)
        self.scale = nn.Parameter(scale)                          # (O,)
        if symmetric:
            self.register_buffer("zero_point", torch.zeros(out))
        else:
            self.zero_point = nn.Parameter(zp)
        self._g = 1.0 / math.sqrt(w.shape[1] * self.qmax)

    def _view(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (w.ndim - 1)))

    def effective_scale(self) -> torch.Tensor:
        """The step sizes the forward multiplies by, (O,) (grad_scale changes gradients, never values)."""
        return self.scale.detach().abs().clamp_min(1e-8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = grad_scale(self.scale, self._g).abs().clamp_min(1e-8)
        return fake_quantize(w, self._view(scale, w), self._view(self.zero_point, w), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, per_channel"


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer (unsigned codes, zero point 0 after a ReLU), LSQ step size.

    Calibration: while `calibrating` it passes x through unchanged and keeps a random subsample of it;
    `init_from_calibration_()` then sets the range (MSE-optimal or percentile clipping).
    """

    def __init__(self, bits: int, max_samples: int = 200_000):
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = quant_range(bits, signed=False)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.zero_point = nn.Parameter(torch.tensor(0.0))
        self.calibrating = False
        self.max_samples = max_samples
        self._samples: list[torch.Tensor] = []
        self._numel = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            flat = x.detach().flatten()
            if flat.numel() > self.max_samples // 4:
                flat = flat[torch.randint(0, flat.numel(), (self.max_samples // 4,), device=flat.device)]
            self._samples.append(flat.float())
            self._numel = x[0].numel()
            return x
        g = 1.0 / math.sqrt(self._numel * self.qmax)
        scale = grad_scale(self.scale, g).abs().clamp_min(1e-8)  # value: effective_scale()
        return fake_quantize(x, scale, self.zero_point, self.qmin, self.qmax)

    def effective_scale(self) -> torch.Tensor:
        """The step size the forward multiplies by, () (grad_scale changes gradients, never values)."""
        return self.scale.detach().abs().clamp_min(1e-8)

    @torch.no_grad()
    def init_from_calibration_(self, method: str = "mse", percentile: float = 99.99) -> None:
        if not self._samples:
            raise RuntimeError("activation quantizer saw no data during calibration")
        x = torch.cat(self._samples)
        self._samples = []
        lo, hi = x.min(), x.max()
        if method == "percentile":
            k = min(x.numel(), 1_000_000)
            xs = x[:k]
            hi = torch.quantile(xs, percentile / 100)
            lo = torch.quantile(xs, 1 - percentile / 100) if lo < 0 else lo
            scale, zp = affine_params(lo, hi, self.qmin, self.qmax)
        else:
            scale, zp = mse_search(x[None], lo[None], hi[None], self.qmin, self.qmax, False, self.bits)
            scale, zp = scale[0], zp[0]
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_tensor"


class QuantWrapper(nn.Module):
    """A conv or linear layer with its weight (and optionally its input) fake-quantized.

    The wrapped module runs unchanged with the quantized weight substituted, so every Conv2d subclass
    (timm's same-padding convs included) keeps its own forward.
    """

    def __init__(self, module: nn.Module, w_bits: int, a_bits: int | None, w_symmetric: bool = True):
        super().__init__()
        self.module = module
        self.w_quant = WeightQuantizer(module.weight, w_bits, w_symmetric)
        self.a_quant = ActQuantizer(a_bits) if a_bits is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        params = {"weight": self.w_quant(self.module.weight)}
        return functional_call(self.module, params, (x,), strict=False)

    def quantized_weight(self) -> torch.Tensor:
        return self.w_quant(self.module.weight)
