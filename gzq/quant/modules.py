"""Fake-quant modules: they hold step sizes and zero points and call the pure primitives."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ..config import AUTO_PERCENTILE_FALLBACK, ActInit, QuantSpec
from .primitives import affine_params, fake_quantize, grad_scale, mse_search, mse_search_hist, quant_range


#: clipping ranges the MSE search tries per weight channel (most of the time to build a student; tests lower it)
WEIGHT_GRID = 80

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
        scale, zp = mse_search(w, lo, hi, self.qmin, self.qmax, symmetric, bits, grid=WEIGHT_GRID)
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

    Calibration sees the data twice (`gzq.quant.calibrate_` drives it): while `calibrating`, x passes
    through unchanged; the first pass records the exact range, and after `start_histogram_()` the second
    counts every value in `bins` equal bins over that range. `init_from_calibration_()` then sets the range
    (MSE-optimal or percentile clipping) from the histogram: all the data, no random subsample, so the
    result does not depend on the random state.
    """

    def __init__(self, bits: int, bins: int = 4096):
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = quant_range(bits, signed=False)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.zero_point = nn.Parameter(torch.tensor(0.0))
        self.calibrating = False
        self.bins = bins
        self._range: tuple[float, float] | None = None
        self._hist: torch.Tensor | None = None
        self._numel = 1

    @property
    def numel(self) -> int:
        """Per-sample size of the quantized tensor (found by calibration); sets the LSQ gain of the step size."""
        return int(self._numel)

    @numel.setter
    def numel(self, value: int) -> None:
        self._numel = int(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x.detach().float())
            self._numel = x[0].numel()
            return x
        if x.dtype in (torch.bfloat16, torch.float16):   # mixed precision: codes need float32's precision
            x = x.float()
        g = 1.0 / math.sqrt(self._numel * self.qmax)
        scale = grad_scale(self.scale, g).abs().clamp_min(1e-8)  # value: effective_scale()
        return fake_quantize(x, scale, self.zero_point, self.qmin, self.qmax)

    def freeze_zero_point_(self) -> None:
        """Keep the zero point out of training (a buffer, same state-dict key). For a ReLU's output: the
        calibrated zero point is 0, so the quantizer's clamp is the ReLU, which an integer runtime then
        drops (onnxruntime's ReluQuantFusion needs the zero point at 0)."""
        zp = self.zero_point.detach().clone()
        del self._parameters["zero_point"]
        self.register_buffer("zero_point", zp)

    def _observe(self, x: torch.Tensor) -> None:
        if self._hist is None:
            lo, hi = (v.item() for v in torch.aminmax(x))   # one pass over x
            self._range = (lo, hi) if self._range is None else (min(self._range[0], lo), max(self._range[1], hi))
        else:
            lo, hi = self._range
            self._hist += torch.histc(x, self.bins, lo, hi)

    def start_histogram_(self) -> None:
        """End the range pass: the next calibration pass counts values over the range seen, widened to hold 0."""
        if self._range is None:
            raise RuntimeError("activation quantizer saw no data during calibration")
        lo, hi = min(self._range[0], 0.0), max(self._range[1], 0.0)
        self._range = (lo, hi if hi > lo else lo + 1e-6)
        self._hist = torch.zeros(self.bins, device=self.scale.device)

    @torch.no_grad()
    def init_from_calibration_(self, method: ActInit | str = QuantSpec.act_init,
                               percentile: float | str = QuantSpec.act_percentile) -> None:
        """Set the step size and zero point from the histogram calibration filled. percentile="auto" (chosen by
        gzq.quant.convert.calibrate_, which can judge the student as a whole) means AUTO_PERCENTILE_FALLBACK."""
        if percentile == "auto":
            percentile = AUTO_PERCENTILE_FALLBACK
        if self._hist is None or self._hist.sum() == 0:
            raise RuntimeError("activation quantizer saw no data during calibration (or only the range pass)")
        hist, (lo, hi) = self._hist, self._range
        self._hist, self._range = None, None
        if ActInit(method).resolve(self.bits) == ActInit.PERCENTILE:   # the central `percentile` % of the values
            cdf = hist.double().cumsum(0) / hist.sum()
            edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64, device=hist.device)
            top = edges[1 + int(torch.searchsorted(cdf, percentile / 100))].clamp(max=hi)
            bottom = edges[int(torch.searchsorted(cdf, 1 - percentile / 100))] if lo < 0 else torch.tensor(lo)
            scale, zp = affine_params(bottom.float(), top.float(), self.qmin, self.qmax)
        else:
            scale, zp = mse_search_hist(hist, lo, hi, self.qmin, self.qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    def effective_scale(self) -> torch.Tensor:
        """The step size the forward multiplies by, () (grad_scale changes gradients, never values)."""
        return self.scale.detach().abs().clamp_min(1e-8)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_tensor"


def reduce_calibration_(quantizers: list[ActQuantizer]) -> None:
    """In a run of many processes (gzq.dist), merge what each rank's calibration pass saw, so every rank
    ends with the statistics of all ranks' batches together and hence identical step sizes: after the range
    pass the union of the ranges (one all-reduce), after the histogram pass the summed counts (one more).
    A no-op in a single process."""
    from .. import dist
    if dist.world_size() <= 1 or not quantizers:
        return
    if quantizers[0]._hist is None:
        inf = float("inf")
        r = torch.tensor([[-q._range[0], q._range[1]] if q._range is not None else [-inf, -inf]
                          for q in quantizers], dtype=torch.float64)
        dist.all_reduce_(r, "max")                                        # (L, 2): -lo, hi
        for q, (neg_lo, hi) in zip(quantizers, r.tolist()):
            q._range = (-neg_lo, hi) if hi > -inf else None
    else:
        h = dist.all_reduce_(torch.stack([q._hist for q in quantizers]))  # (L, bins)
        for q, row in zip(quantizers, h):
            q._hist = row.clone()


INT32_RANGE = (-(2 ** 31), 2 ** 31 - 1)


class WrapsLayer:
    """Mixed into a module that wraps a layer as `self.module`: attributes it lacks come from that layer
    (`weight`, `bias`, `out_channels`...), which some models read in their own forward (XCiT's positional encoding
    reads its conv's `weight.device`)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module" or name.startswith("__"):
                raise
            return getattr(super().__getattr__("module"), name)


class QuantWrapper(WrapsLayer, nn.Module):
    """A conv or linear layer with its weight (and optionally its input) fake-quantized.

    The wrapped module runs unchanged with the quantized weight substituted, so every Conv2d subclass
    (timm's same-padding convs included) keeps its own forward.

    Integer bias: once `set_int_bias_input(q)` names the quantizer of the layer's input, the bias is
    rounded to int32 codes with step input_scale * weight_scale per output channel, as an integer kernel
    (onnxruntime's QLinearConv, quantize_static's bias) adds it to its int32 accumulator. The step sizes
    are taken as they are (no gradient through them); the bias gets the straight-through gradient.
    """

    def __init__(self, module: nn.Module, w_bits: int, a_bits: int | None, w_symmetric: bool = True):
        super().__init__()
        self.module = module
        self.w_quant = WeightQuantizer(module.weight, w_bits, w_symmetric)
        self.a_quant = ActQuantizer(a_bits) if a_bits is not None else None
        self._int_bias_input: ActQuantizer | None = None     # a reference, not a submodule: it lives upstream

    def set_int_bias_input(self, q: ActQuantizer | None) -> None:
        object.__setattr__(self, "_int_bias_input", q)

    @property
    def has_int_bias(self) -> bool:
        """Whether the bias is added as int32 codes (set_int_bias_input)."""
        return self._int_bias_input is not None and self.module.bias is not None

    def bias_scale(self) -> torch.Tensor | None:
        """(O,) step of the int32 bias codes, or None for a float bias. None also while the input's quantizer
        is still calibrating: its step is not known yet, and the ranges after this layer are measured on the
        float bias."""
        if not self.has_int_bias or self._int_bias_input.calibrating:
            return None
        return self._int_bias_input.effective_scale() * self.w_quant.effective_scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_quant is not None:
            x = self.a_quant(x)
        params = {"weight": self.w_quant(self.module.weight)}
        b_scale = self.bias_scale()
        if b_scale is not None:
            params["bias"] = fake_quantize(self.module.bias, b_scale, torch.zeros_like(b_scale), *INT32_RANGE)
        return functional_call(self.module, params, (x,), strict=False)

    def quantized_weight(self) -> torch.Tensor:
        return self.w_quant(self.module.weight)
