"""Pure quantization maths: uniform affine fake quantization with straight-through rounding (LSQ).

Nothing here holds state. The fake-quant modules, the exporter and the tests all call these functions,
so what PyTorch simulates is what the ONNX QuantizeLinear/DequantizeLinear graph computes:

    q     = clamp(round(x / scale) + zero_point, qmin, qmax)   # round half to even, like ONNX
    x_hat = (q - zero_point) * scale

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): with the rounding's gradient passed
straight through, autograd of x_hat gives LSQ's gradients for x, scale and zero_point. Training runs that
maths as one autograd node (`fake_quantize_ste`), which keeps only its inputs for the backward: written in
autograd's own ops (`fake_quantize_composed`, the reference it matches bit for bit) each quantizer keeps two
more tensors of its input's size, about half of a student's training memory.
"""
from __future__ import annotations

import torch


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-wide code: signed [-2^(b-1), 2^(b-1) - 1] or unsigned [0, 2^b - 1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _straight_through(value: torch.Tensor, grad_source: torch.Tensor) -> torch.Tensor:
    """Exactly `value` forward (the added term is y - y = 0), the gradient of `grad_source` backward."""
    return value.detach() + (grad_source - grad_source.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return _straight_through(x.round(), x)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of x, gradient multiplied by g (LSQ's step-size gradient scaling)."""
    return _straight_through(x, x * g)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize; scale/zero_point broadcast against x; zero_point is rounded too.

    Forward: exactly ONNX's clamp(round(x / scale) + zero_point). Backward: LSQ's, i.e. the gradient of
    clamp(x / scale + zero_point) with rounding passed straight through (1 inside the range, 0 where clipped).
    When no gradient is wanted (evaluation, calibration, capture) the same values take half the passes.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
        return fake_quantize_ste(x, scale, zero_point, qmin, qmax)
    zp = torch.round(zero_point)
    q = torch.round(x / scale).add_(zp).clamp_(qmin, qmax)
    return q.sub_(zp).mul_(scale)


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                      qmax: int) -> torch.Tensor:
    """fake_quantize with its straight-through terms always built (the training path): the gradients of
    fake_quantize_composed, from one autograd node that keeps only its inputs (`_FakeQuantize`)."""
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)


def fake_quantize_composed(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                           qmax: int) -> torch.Tensor:
    """The training path written with autograd's own ops (the reference `_FakeQuantize` is tested against): its
    graph keeps two more tensors of x's size for the backward, the clamp's input and q - zero_point."""
    zp = round_ste(zero_point)
    q = _straight_through(torch.clamp(torch.round(x / scale) + zp, qmin, qmax), torch.clamp(x / scale + zp, qmin, qmax))
    return (q - zp) * scale


def _clamp_passes_ends() -> bool:
    """Whether torch.clamp's backward passes the gradient at exactly min and max (torch releases differ). Asked
    with gradients on whatever the importing code has switched off."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([0.0, 1.0], requires_grad=True)
        torch.clamp(x, 0.0, 1.0).sum().backward()
    ends = x.grad.tolist()
    if ends not in ([0.0, 0.0], [1.0, 1.0]):
        raise RuntimeError(f"torch.clamp's gradient at its range's ends is {ends}; gzq's fake quantizer knows 0 or 1")
    return ends == [1.0, 1.0]


_CLAMP_PASSES_ENDS = _clamp_passes_ends()


def _inside(v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Where torch.clamp(v, qmin, qmax) passes the gradient."""
    if _CLAMP_PASSES_ENDS:
        return (v >= qmin) & (v <= qmax)
    return (v > qmin) & (v < qmax)


class _FakeQuantize(torch.autograd.Function):
    """fake_quantize_composed's values and gradients, with x, scale and zero_point the only tensors kept for the
    backward (it recomputes x / scale there): a fake-quant student's training step keeps less memory. Where
    neither the step nor the zero point wants a gradient (a frozen student) it keeps the clamp's mask instead
    of x (a byte per value)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        ctx.qmin, ctx.qmax, ctx.x_shape = qmin, qmax, x.shape
        zp = torch.round(zero_point)
        t = x / scale
        ctx.keeps_mask = not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        if ctx.keeps_mask:
            ctx.save_for_backward(_inside(t + zp, qmin, qmax), scale)
        else:
            ctx.save_for_backward(x, scale, zero_point)
        return (torch.clamp(torch.round(t) + zp, qmin, qmax) - zp) * scale

    @staticmethod
    def backward(ctx, grad):
        if ctx.keeps_mask:   # only x wants a gradient
            inside, scale = ctx.saved_tensors
        else:
            x, scale, zero_point = ctx.saved_tensors
            zp = torch.round(zero_point)
            t = x / scale
            inside = _inside(t + zp, ctx.qmin, ctx.qmax)
        g_v = torch.where(inside, grad * scale, 0.0)     # d/dv of (clamp(v) - zp) * scale, v = x / scale + zp
        g_x = (g_v / scale).sum_to_size(ctx.x_shape) if ctx.needs_input_grad[0] else None
        if ctx.keeps_mask:
            return g_x, None, None, None, None
        g_scale = g_zp = None
        if ctx.needs_input_grad[1]:
            q = torch.clamp(torch.round(t) + zp, ctx.qmin, ctx.qmax)
            # as autograd sums them: each path's term reduced on its own, then added
            g_scale = (grad * (q - zp)).sum_to_size(scale.shape) + (-g_v * (t / scale)).sum_to_size(scale.shape)
        if ctx.needs_input_grad[2]:
            g_zp = g_v.sum_to_size(zero_point.shape) + (-(grad * scale)).sum_to_size(zero_point.shape)
        return g_x, g_scale, g_zp, None, None


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer codes (as an integer-valued float tensor) that fake_quantize dequantizes."""
    return torch.clamp(torch.round(x / scale) + torch.round(zero_point), qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - torch.round(zero_point)) * scale


def affine_params(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued) zero point mapping [lo, hi] (lo <= 0 <= hi) onto [qmin, qmax]."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale mapping [-absmax, absmax] onto the signed range (the positive end sets it)."""
    return (absmax / (2 ** (bits - 1) - 1)).clamp_min(1e-8)


def mse_search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
               bits: int, grid: int = 80, min_ratio: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range that minimises the quantization MSE, searched over shrunk [alpha lo, alpha hi].

    Args:
        x: (G, K) samples, one row per quantization group (a weight output channel, or 1 row per tensor).
        lo, hi: (G,) observed range.
    Returns:
        scale, zero_point: (G,) each.
    """
    alphas = torch.linspace(min_ratio, 1.0, grid, device=x.device)                  # (A,)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zp = torch.ones_like(lo), torch.zeros_like(lo)
    for a in alphas:
        if symmetric:
            scale = symmetric_scale(torch.maximum(-lo, hi) * a, bits)
            zp = torch.zeros_like(scale)
        else:
            scale, zp = affine_params(lo * a, hi * a, qmin, qmax)
        xq = dequantize(quantize(x, scale[:, None], zp[:, None], qmin, qmax), scale[:, None], zp[:, None])
        err = (xq - x).pow(2).mean(1)                                                # (G,)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def mse_search_hist(counts: torch.Tensor, lo: float, hi: float, qmin: int, qmax: int, grid: int = 80,
                    min_ratio: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric clipping range minimising the quantization MSE of a histogram, over shrunk [alpha lo, alpha hi].

    Args:
        counts: (bins,) value counts in equal bins over [lo, hi] (lo <= 0 <= hi); each bin's values are
            taken at its centre.
    Returns:
        scale, zero_point: () each.
    """
    bins = counts.numel()
    width = (hi - lo) / bins
    centers = lo + width * (torch.arange(bins, device=counts.device, dtype=torch.float64) + 0.5)   # (N,)
    alphas = torch.linspace(min_ratio, 1.0, grid, device=counts.device, dtype=torch.float64)[:, None]
    scale, zp = affine_params(lo * alphas, hi * alphas, qmin, qmax)                                  # (A, 1)
    xq = dequantize(quantize(centers, scale, zp, qmin, qmax), scale, zp)                             # (A, N)
    err = ((xq - centers).pow(2) * counts.double()).sum(1)                                          # (A,)
    best = int(err.argmin())
    return scale[best, 0].float(), zp[best, 0].float()
