"""The integer form of a fake-quant student: codes, step sizes and zero points per quantized layer and per
tensor quantizer, as the ONNX export and the integer safetensors store them (docs/design.md 2.7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .convert import quant_wrappers
from .graph import tensor_quantizers
from .modules import INT32_RANGE, ActQuantizer, WeightQuantizer
from .primitives import dequantize, quantize


def effective_scale(q: nn.Module) -> torch.Tensor:
    """Step size(s) the fake-quant forward of `q` really multiplies by: (O,) for weights, () for activations."""
    if not isinstance(q, (WeightQuantizer, ActQuantizer)):
        raise TypeError(f"not a gzq quantizer: {type(q).__name__}")
    return q.effective_scale()


@dataclass
class ActQuant:
    """One per-tensor activation quantizer in integer form. Its ONNX initializers are `<prefix>scale` and
    `<prefix>zero_point`: `<layer>.input_` for a layer's input quantizer, `<module path>.` for a tensor
    quantizer of the deployable protocol (the names of its state-dict entries)."""
    prefix: str
    bits: int
    scale: torch.Tensor             # () float32
    zero_point: int
    qmin: int
    qmax: int
    numel: int                      # per-sample tensor size; sets the LSQ gain of the step size

    @classmethod
    def of(cls, prefix: str, aq: ActQuantizer) -> "ActQuant":
        return cls(prefix=prefix, bits=aq.bits, scale=effective_scale(aq).cpu(), qmin=aq.qmin, qmax=aq.qmax,
                   zero_point=int(torch.round(aq.zero_point.detach().float()).item()), numel=aq.numel)


@torch.no_grad()
def find_tensor_quants(student: nn.Module) -> list[ActQuant]:
    """The integer form of every tensor quantizer (deployable protocol; empty otherwise), in module order."""
    return [ActQuant.of(f"{name}.", aq) for name, aq in tensor_quantizers(student)]


@dataclass
class LayerQuant:
    """One QuantWrapper in integer form: what the ONNX graph and the integer safetensors store."""
    name: str
    op: str                         # "conv" | "linear"
    codes: torch.Tensor             # (O, ...) int64, in [w_qmin, w_qmax]
    w_scale: torch.Tensor           # (O,) float32
    w_zero_point: torch.Tensor      # (O,) int64
    w_bits: int
    w_qmin: int
    w_qmax: int
    w_symmetric: bool
    bias: torch.Tensor | None       # (O,) float32
    a_bits: int | None = None
    a_scale: torch.Tensor | None = None   # () float32
    a_zero_point: int | None = None
    a_qmin: int | None = None
    a_qmax: int | None = None
    a_numel: int | None = None      # per-sample input size; sets the activation LSQ gain
    bias_scale: torch.Tensor | None = None  # (O,) step of int32 bias codes (QuantWrapper.bias_scale), or None

    def input_quant(self) -> ActQuant | None:
        if self.a_bits is None:
            return None
        return ActQuant(prefix=f"{self.name}.input_", bits=self.a_bits, scale=self.a_scale,
                        zero_point=self.a_zero_point, qmin=self.a_qmin, qmax=self.a_qmax, numel=self.a_numel)

    def dequantized_weight(self) -> torch.Tensor:
        """(O, ...) float: equal to the fake-quant student's quantized weight."""
        view = (-1,) + (1,) * (self.codes.ndim - 1)
        return dequantize(self.codes.float(), self.w_scale.view(view), self.w_zero_point.float().view(view))

    def meta(self) -> dict[str, Any]:
        return dict(op=self.op, w_bits=self.w_bits, w_symmetric=self.w_symmetric, w_qmin=self.w_qmin,
                    w_qmax=self.w_qmax, a_bits=self.a_bits, a_qmin=self.a_qmin, a_qmax=self.a_qmax,
                    a_numel=self.a_numel, weight_shape=list(self.codes.shape), has_bias=self.bias is not None,
                    int_bias=self.bias_scale is not None)

    def bias_codes(self) -> torch.Tensor:
        """(O,) int32 codes of an integer bias: what the fake-quant forward dequantizes."""
        zero = torch.zeros_like(self.bias_scale)
        return quantize(self.bias, self.bias_scale, zero, *INT32_RANGE).to(torch.int64)


@torch.no_grad()
def find_layer_quants(student: nn.Module) -> list[LayerQuant]:
    """The integer form of every quantized layer of `student`, in module order."""
    out = []
    for name, w in quant_wrappers(student):
        wq, mod = w.w_quant, w.module
        weight = mod.weight.detach().float().cpu()                                   # (O, ...)
        view = (-1,) + (1,) * (weight.ndim - 1)
        scale = effective_scale(wq).cpu()                                            # (O,)
        zp = torch.round(wq.zero_point.detach().float().cpu())                       # (O,)
        codes = quantize(weight, scale.view(view), zp.view(view), wq.qmin, wq.qmax)
        lq = LayerQuant(name=name, op="conv" if isinstance(mod, nn.Conv2d) else "linear",
                        codes=codes.to(torch.int64), w_scale=scale, w_zero_point=zp.to(torch.int64),
                        w_bits=wq.bits, w_qmin=wq.qmin, w_qmax=wq.qmax, w_symmetric=wq.symmetric,
                        bias=None if mod.bias is None else mod.bias.detach().float().cpu().clone())
        b_scale = w.bias_scale()
        lq.bias_scale = None if b_scale is None else b_scale.detach().float().cpu()
        if w.a_quant is not None:
            a = ActQuant.of(f"{name}.input_", w.a_quant)
            lq.a_bits, lq.a_qmin, lq.a_qmax, lq.a_numel = a.bits, a.qmin, a.qmax, a.numel
            lq.a_scale, lq.a_zero_point = a.scale, a.zero_point
        out.append(lq)
    return out
