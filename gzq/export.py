"""Export a fake-quant student as what it simulates (docs/design.md 2.7): ONNX QDQ and integer safetensors.

ONNX. The student is traced by torch's exporter with every QuantWrapper and tensor quantizer swapped for
a module that marks its quantization points with a placeholder node (`gzq::Mark`); the placeholders are
then rewritten with `onnx.helper` into standard operators, so any bit width is exact (torch.onnx's own
fake-quant translation accepts 8-bit ranges only, docs/design.md 6). Two tracers: TorchScript (the default) and
dynamo (torch.export + onnxscript, placeholders through `torch.onnx.ops.symbolic`). Measured on the
bundled model, both give the same fused integer graph in onnxruntime; TorchScript exports about 40x
faster and needs no extra package, dynamo is the exporter torch maintains.

    weights      int codes (initializer, per output channel, axis 0) -> DequantizeLinear
                 8 bit: int8 (uint8 when asymmetric); 4 bit: int4 / uint4 (opset >= 21); other widths: int8
                 codes that stay inside the bit range
    activations  QuantizeLinear -> DequantizeLinear, per tensor, at the input of every layer whose wrapper
                 has an activation quantizer and on every tensor of the deployable protocol
                 (gzq.quant.graph): 8 bit uint8; 4 bit uint4 (opset >= 21); other widths
                 QuantizeLinear(int8/uint8) -> Clip(qmin, qmax) -> DequantizeLinear. The same pair is
                 repeated after a shape-only op (Flatten, MaxPool) that reads it, which changes no value and
                 lets onnxruntime fuse the consumer (the classifier's QGemm).
    biases       float, or int32 codes -> DequantizeLinear (step input x weight scale) where the student
                 adds an integer bias (8-bit convs of 8-bit input, in every protocol)

Kernel taps that, at the model's fixed input size, only ever read padding are cut from each Conv
(`drop_padding_taps_`, the FP32 export too): exact, and integer kernels, unlike float ones, would multiply
them.

    q = saturate(round_half_even(x / scale) + zero_point)     x_hat = (q - zero_point) * scale

which is `primitives.quantize` / `primitives.dequantize` with the step sizes the fake-quant forward uses
(the absolute, clamped LSQ step: `effective_scale`), so the graph means what the
PyTorch model means, bit for bit up to float summation order.

Integer safetensors: gzq.checkpoint (save_int_weights, load_int_weights); the integer form both read is
gzq.quant.integer.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib.util
import itertools
import json
import logging
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import handle_torch_function, has_torch_function_unary

from .checkpoint import save_int_weights
from .config import ExportConfig, ExportFormat, QuantSpec
from .quant.convert import expand_cond_convs_
from .quant.graph import CONTAINER
from .quant.integer import ActQuant, LayerQuant, find_layer_quants, find_tensor_quants
from .quant.modules import QuantWrapper, WrapsLayer

log = logging.getLogger(__name__)

MIN_OPSET = 13            # per-channel QuantizeLinear/DequantizeLinear (axis)
INT4_OPSET = 21           # int4 / uint4 tensor types
_TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter stops at 20; the QDQ rewrite then declares the target


# ----------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------

class _Mark(torch.autograd.Function):
    """Identity that the TorchScript exporter writes as a `gzq::Mark(key)` placeholder node."""

    @staticmethod
    def forward(ctx, x, key: str):
        return x.clone()

    @staticmethod
    def symbolic(g, x, key: str):
        out = g.op("gzq::Mark", x, key_s=key)
        out.setType(x.type())
        return out


def _mark(x: torch.Tensor, key: str, dynamo: bool) -> torch.Tensor:
    """A `gzq::Mark(key)` placeholder on x, for the TorchScript or the dynamo (torch.export) exporter."""
    if dynamo:
        return torch.onnx.ops.symbolic("gzq::Mark", (x,), {"key": key}, dtype=x.dtype, shape=x.shape, version=1)
    return _Mark.apply(x, key)


class _ExportLayer(WrapsLayer, nn.Module):
    """Stands in for a QuantWrapper while tracing: marks its input (if quantized) and its weight."""

    def __init__(self, module: nn.Module, key: int, weight: torch.Tensor, quant_input: bool, dynamo: bool = False):
        super().__init__()
        self.module, self.key, self.quant_input, self.dynamo = module, key, quant_input, dynamo
        self.register_buffer("qweight", weight)
        if not dynamo:
            del module._parameters["weight"]  # set per call below (TorchScript cannot trace torch.func.functional_call)
            module.weight = weight            # until then, for a model that reads it (WrapsLayer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_input:
            x = _mark(x, f"a:{self.key}", self.dynamo)
        weight = _mark(self.qweight, f"w:{self.key}", self.dynamo)
        if self.dynamo:
            return functional_call(self.module, {"weight": weight}, (x,), strict=False)
        self.module.weight = weight
        return self.module(x)


class _ExportTensor(nn.Module):
    """Stands in for a tensor quantizer (deployable protocol) while tracing: marks the tensor."""

    def __init__(self, key: int, dynamo: bool = False):
        super().__init__()
        self.key, self.dynamo = key, dynamo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mark(x, f"t:{self.key}", self.dynamo)


def _int_type(lo: int, hi: int, bits: int, opset: int, prefer_signed: bool) -> int:
    """Smallest ONNX integer type holding [lo, hi]: 4-bit types for 4-bit codes (opset >= 21), else 8, else 16."""
    from onnx import TensorProto as T
    ranges = {T.INT4: (-8, 7), T.UINT4: (0, 15), T.INT8: (-128, 127), T.UINT8: (0, 255),
              T.INT16: (-32768, 32767), T.UINT16: (0, 65535)}
    cands = []
    if bits == 4 and opset >= INT4_OPSET:
        cands += [T.INT4, T.UINT4] if prefer_signed else [T.UINT4, T.INT4]
    cands += [T.INT8, T.UINT8, T.INT16, T.UINT16] if prefer_signed else [T.UINT8, T.INT8, T.UINT16, T.INT16]
    for t in cands:
        if ranges[t][0] <= lo and hi <= ranges[t][1]:
            return t
    raise ValueError(f"integer range [{lo}, {hi}] does not fit a 16-bit ONNX type")


def _int_tensor(name: str, values: torch.Tensor, onnx_type: int):
    import numpy as np
    from onnx import TensorProto, numpy_helper
    import ml_dtypes   # onnx's own dependency: numpy int4/uint4, packed two codes per byte in raw_data
    arr = values.detach().cpu().numpy().astype(np.int64)
    np_type = {TensorProto.INT4: ml_dtypes.int4, TensorProto.UINT4: ml_dtypes.uint4, TensorProto.INT8: np.int8,
               TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16, TensorProto.UINT16: np.uint16,
               TensorProto.INT32: np.int32}[onnx_type]
    t = numpy_helper.from_array(arr.astype(np_type), name)
    assert t.data_type == onnx_type, (t.data_type, onnx_type)
    return t


def _float_tensor(name: str, values: torch.Tensor):
    from onnx import numpy_helper
    return numpy_helper.from_array(values.detach().cpu().float().numpy(), name)


def _weight_nodes(lq: LayerQuant, out: str, opset: int):
    """Initializers and the DequantizeLinear node that produce the layer's quantized weight as `out`."""
    from onnx import TensorProto, helper
    lo = min(lq.w_qmin, int(lq.w_zero_point.min()))
    hi = max(lq.w_qmax, int(lq.w_zero_point.max()))
    t = _int_type(lo, hi, lq.w_bits, opset, prefer_signed=lq.w_symmetric)
    n = lq.name
    inits = [_int_tensor(f"{n}.weight_quantized", lq.codes, t), _float_tensor(f"{n}.weight_scale", lq.w_scale)]
    if t not in (TensorProto.INT4, TensorProto.UINT4) or bool(lq.w_zero_point.any()):
        inits.append(_int_tensor(f"{n}.weight_zero_point", lq.w_zero_point, t))   # absent means zero points of 0
    node = helper.make_node("DequantizeLinear", [i.name for i in inits], [out], name=f"{n}/weight_dq", axis=0)
    return inits, [node], t


def _act_nodes(a: ActQuant, inp: str, out: str, opset: int, int4: bool = True, node_prefix: str | None = None):
    """QuantizeLinear -> [Clip] -> DequantizeLinear of one tensor, per tensor.

    int4: whether 4-bit codes may be stored as uint4 (False where onnxruntime's graph optimisation fails
    on 4-bit codes: after a Clip, or next to an op it would run on the codes, e.g. MaxPool, which has no
    4-bit kernel); otherwise they are int8 codes clipped to [0, 15]. node_prefix: names of the nodes and
    intermediate tensors (default: the initializers' prefix).
    """
    import numpy as np
    from onnx import TensorProto as T, helper
    zp, qmin, qmax = a.zero_point, a.qmin, a.qmax
    p = a.prefix if node_prefix is None else node_prefix
    native = (a.bits == 8 and 0 <= zp <= 255) or (a.bits == 4 and int4 and opset >= INT4_OPSET and 0 <= zp <= 15)
    t = _int_type(min(qmin, zp), max(qmax, zp), a.bits if native else 8, opset, prefer_signed=False)
    if not native and qmax <= 127 and -128 <= zp <= 127:
        t = T.INT8                                     # the Quantize-Clip-Dequantize pattern, int8 codes
    ip = a.prefix.removeprefix(f"{CONTAINER}.")        # initializers: "x.scale", "layer1_0_act1.zero_point"
    s_name, z_name = f"{ip}scale", f"{ip}zero_point"
    inits = [_float_tensor(s_name, a.scale.reshape(())), _int_tensor(z_name, torch.tensor(zp), t)]
    q_out = f"{p}q"
    nodes = [helper.make_node("QuantizeLinear", [inp, s_name, z_name], [q_out], name=f"{p}quantize")]
    if native:
        nodes.append(helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [out], name=f"{p}dq"))
    elif t in (T.INT8, T.UINT8):                       # clip the codes to the bit range, then dequantize
        lo_name, hi_name, c_out = f"{ip}qmin", f"{ip}qmax", f"{p}q_clipped"
        inits += [_int_tensor(lo_name, torch.tensor(qmin), t), _int_tensor(hi_name, torch.tensor(qmax), t)]
        nodes += [helper.make_node("Clip", [q_out, lo_name, hi_name], [c_out], name=f"{p}clip"),
                  helper.make_node("DequantizeLinear", [c_out, s_name, z_name], [out], name=f"{p}dq")]
    else:                                              # 16-bit codes (zero point far out): clip after dequantizing,
        dq_out = f"{p}dq_unclipped"                     # bounds computed as DequantizeLinear does, so still exact
        s = a.scale.float().numpy()
        lo = (np.float32(qmin - zp) * s).astype(np.float32)
        hi = (np.float32(qmax - zp) * s).astype(np.float32)
        lo_name, hi_name = f"{ip}min", f"{ip}max"
        inits += [_float_tensor(lo_name, torch.from_numpy(np.array(lo))),
                  _float_tensor(hi_name, torch.from_numpy(np.array(hi)))]
        nodes += [helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=f"{p}dq"),
                  helper.make_node("Clip", [dq_out, lo_name, hi_name], [out], name=f"{p}clip")]
    return inits, nodes, t


def _live_nodes(nodes, outputs: set[str]) -> list:
    """Nodes that contribute to the graph outputs. The TorchScript exporter de-duplicates equal initializers
    through Identity nodes; once their placeholder consumers are rewritten those are dead and would keep
    the float weights in the file."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    return live[::-1]


# ops that onnxruntime's QDQ propagation moves a DequantizeLinear across (they commute with quantization)
_QDQ_TRANSPARENT = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")


# ops after which a QuantizeLinear must not have 4-bit codes: onnxruntime's ClipQuantFusion (ReLU6 is a
# Clip) rejects a 4-bit zero point and fails to load the model
_NO_INT4_BEFORE = ("Clip",)


# ops that a QuantizeLinear must not read 4-bit codes after, through shape-only ops: onnxruntime propagates the
# QuantizeLinear back across them and then runs them on the codes, and MaxPool has no 4-bit kernel (the model
# fails to load)
_NO_INT4_AFTER = ("MaxPool",)


def _after_op(name: str, producer: dict, ops: tuple[str, ...]) -> bool:
    """Whether tensor `name` comes from one of `ops`, directly or through shape-only ops (_QDQ_TRANSPARENT)."""
    while (node := producer.get(name)) is not None and node.op_type in _QDQ_TRANSPARENT:
        if node.op_type in ops:
            return True
        name = node.input[0]
    return node is not None and node.op_type in ops


def _input_quant(name: str, producer: dict, act_outs: dict) -> tuple[ActQuant, int] | None:
    """The activation quantizer (and its ONNX code type) whose dequantized output tensor `name` is, if any."""
    while name not in act_outs:
        node = producer.get(name)
        if node is None or node.op_type not in _QDQ_TRANSPARENT:
            return None
        name = node.input[0]
    return act_outs[name]


def _requantize_after_transparent(nodes, act_outs: dict, opset: int) -> list:
    """Repeat each activation quantizer after the shape-only ops (Flatten, MaxPool, ...) that read it.

    The PyTorch model quantizes a tensor once, before such ops, since they commute with quantization.
    onnxruntime only fuses a Conv / Gemm whose input comes straight from a DequantizeLinear, and does not
    carry a DequantizeLinear across every such op (Flatten before the classifier's Gemm); the same
    QuantizeLinear -> DequantizeLinear again after the op changes no value (re-quantizing a quantized
    tensor with its own step is exact) and gives the classifier its QGemm.
    """
    from onnx import TensorProto as T
    out = []
    for node in nodes:
        out.append(node)
        if node.op_type in _QDQ_TRANSPARENT and node.input[0] in act_outs:
            a, t = act_outs[node.input[0]]
            y = node.output[0]
            node.output[0] = f"{y}_float"
            k = sum(o.startswith(a.prefix) for o in (n.name for n in out))
            _, nodes_q, _ = _act_nodes(a, node.output[0], y, opset, int4=t in (T.INT4, T.UINT4),
                                       node_prefix=f"{a.prefix}again{k}_")
            out += nodes_q
            act_outs[y] = (a, t)
    return out


def _integer_kernel_layer(lq: LayerQuant, a: tuple[ActQuant, int] | None, w_type: int) -> bool:
    """Whether onnxruntime can run the layer as an integer kernel (8-bit QDQ input and weight)."""
    from onnx import TensorProto as T
    return a is not None and a[0].bits == 8 and a[1] == T.UINT8 and lq.w_bits == 8 and w_type in (T.INT8, T.UINT8)


def _rewrite_biases(nodes, layers: list[LayerQuant], w_types: dict, act_outs: dict):
    """The bias of each quantized-input Conv/Gemm as the fake-quant model adds it.

    - integer bias (`LayerQuant.bias_scale`: 8-bit convs of 8-bit input): int32 codes ->
      DequantizeLinear(step input_scale * weight_scale, axis 0), which QLinearConv takes as it is;
    - a layer that cannot run as an integer kernel: the float bias moves into an Add. onnxruntime's
      WeightBiasQuantization would otherwise round it to int32 with step input_scale * weight_scale; at
      4 bit that step is coarse and changes the logits (not what the fake-quant model computes);
    - any other conv that can run as an integer kernel keeps the float bias in the Conv (onnxruntime
      rounds it; what lets it pick QLinearConv);
    - a Gemm always loses it into an Add: onnxruntime fuses DQ -> Gemm with a float output (the logits)
      into QGemm only when the Gemm has no float bias.
    """
    from onnx import helper
    by_weight = {f"{lq.name}/weight_dq": lq for lq in layers}
    producer = {o: n for n in nodes for o in n.output}
    out, inits = [], []
    for node in nodes:
        has_bias = node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and bool(node.input[2])
        w_dq = producer.get(node.input[1]) if has_bias else None
        lq = by_weight.get(w_dq.name) if w_dq is not None else None
        a = _input_quant(node.input[0], producer, act_outs) if lq is not None else None
        if lq is not None and lq.bias_scale is not None:
            from onnx import TensorProto
            n = lq.name
            inits += [_int_tensor(f"{n}.bias_quantized", lq.bias_codes(), TensorProto.INT32),
                      _float_tensor(f"{n}.bias_scale", lq.bias_scale),
                      _int_tensor(f"{n}.bias_zero_point", torch.zeros_like(lq.bias_codes()), TensorProto.INT32)]
            node.input[2] = f"{n}/bias"
            out += [helper.make_node("DequantizeLinear", [i.name for i in inits[-3:]], [node.input[2]],
                                     name=f"{n}/bias_dq", axis=0), node]
            continue
        if lq is None or a is None or lq.bias is None or (
                node.op_type == "Conv" and _integer_kernel_layer(lq, a, w_types[lq.name])):
            out.append(node)
            continue
        shape = (-1, 1, 1) if node.op_type == "Conv" else (-1,)      # broadcast over (N, O, H, W) / (N, O)
        b_name, y = f"{lq.name}.bias", node.output[0]
        inits.append(_float_tensor(b_name, lq.bias.reshape(shape)))
        del node.input[2]
        node.output[0] = f"{y}_nobias"
        out += [node, helper.make_node("Add", [node.output[0], b_name], [y], name=f"{lq.name}/bias_add")]
    return out, inits


EXPORTERS = ("torchscript", "dynamo")


class TracingExportError(RuntimeError):
    """torch's tracing (TorchScript) exporter could not write the model."""


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str, **kw) -> None:
    """torch.onnx.export with a dynamic batch axis, input "input", output "logits".

    "torchscript": the tracing exporter (deprecated in torch, still shipped; needs nothing else).
    "dynamo": torch.export + onnxscript (the maintained exporter; needs the onnxscript package). It lowers
    global average pooling to ReduceMean, which `_global_pools_` turns back into GlobalAveragePool.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    with warnings.catch_warnings(), _exportable_adaptive_pools():
        warnings.filterwarnings("ignore", category=DeprecationWarning)   # legacy exporter: needs no onnxscript
        warnings.filterwarnings("ignore", message=".*[Oo]pset.*")
        if exporter == "torchscript":
            try:
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)
            except Exception as e:
                raise TracingExportError(f"{type(e).__name__}: {e}") from e
            return
        import io
        with contextlib.redirect_stdout(io.StringIO()):               # its progress lines
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), optimize=True,
                              verify=False, report=False)


def _pool_matrix(n_out: int, n_in: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): row i averages the inputs adaptive average pooling puts in bin i, those from
    floor(i n_in / n_out) up to ceil((i + 1) n_in / n_out). Built from Python numbers: one constant in the file."""
    rows = []
    for i in range(n_out):
        lo, hi = i * n_in // n_out, -(-(i + 1) * n_in // n_out)
        rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(n_in)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


_ADAPTIVE_AVG_POOL2D, _ADAPTIVE_MAX_POOL2D = F.adaptive_avg_pool2d, F.adaptive_max_pool2d
_pool_lock, _pool_exports, _exporting = threading.Lock(), 0, threading.local()


def _pool_sides(input: torch.Tensor, output_size) -> tuple[int, int, int, int] | None:
    """(h, w, out h, out w) of an adaptive pool on a tensor while this thread exports, else None."""
    if not getattr(_exporting, "depth", 0) or not isinstance(input, torch.Tensor):
        return None
    with warnings.catch_warnings():   # the sides are fixed in the file (only the batch axis is dynamic)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        h, w = int(input.shape[-2]), int(input.shape[-1])
    oh, ow = tuple(output_size) if isinstance(output_size, (tuple, list, torch.Size)) else (output_size,) * 2
    return h, w, int(oh or h), int(ow or w)   # None keeps that side


def _exportable_adaptive_avg_pool2d(input: torch.Tensor, output_size) -> torch.Tensor:
    """F.adaptive_avg_pool2d; while this thread exports, a fixed-kernel AveragePool where the output size divides
    the input's, else two averaging MatMuls."""
    if has_torch_function_unary(input):   # an fx Proxy or a tensor subclass: torch's own function is the target
        return handle_torch_function(_ADAPTIVE_AVG_POOL2D, (input,), input, output_size)
    sides = _pool_sides(input, output_size)
    if sides is None or sides[2:] == (1, 1):
        return _ADAPTIVE_AVG_POOL2D(input, output_size)
    h, w, oh, ow = sides
    if h % oh == 0 and w % ow == 0:
        return F.avg_pool2d(input, (h // oh, w // ow))
    with warnings.catch_warnings():   # the matrices are constants of the file
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return _pool_matrix(oh, h, input) @ input @ _pool_matrix(ow, w, input).T


def _exportable_adaptive_max_pool2d(input: torch.Tensor, output_size, return_indices: bool = False):
    """F.adaptive_max_pool2d; while this thread exports, a fixed-kernel MaxPool where the output size divides the
    input's (the tracing exporter needs the input's size for an adaptive one, and loses it after some reshapes)."""
    if has_torch_function_unary(input):
        return handle_torch_function(_ADAPTIVE_MAX_POOL2D, (input,), input, output_size, return_indices=return_indices)
    sides = _pool_sides(input, output_size)
    if sides is None or return_indices or sides[2:] == (1, 1) or sides[0] % sides[2] or sides[1] % sides[3]:
        return _ADAPTIVE_MAX_POOL2D(input, output_size, return_indices)
    h, w, oh, ow = sides
    return F.max_pool2d(input, (h // oh, w // ow))


@contextlib.contextmanager
def _exportable_adaptive_pools():
    """While this thread exports, adaptive pools become pools the tracing exporter can write: average pooling to a
    size that does not divide its input (timm's VGG head pools a small input up to 7 x 7) two averaging MatMuls,
    and pools to a size that divides it fixed-kernel pools (global ones stay global). The same values; other threads
    get torch's own functions throughout, and the last export out restores them."""
    global _pool_exports
    with _pool_lock:
        _pool_exports += 1
        F.adaptive_avg_pool2d, F.adaptive_max_pool2d = _exportable_adaptive_avg_pool2d, _exportable_adaptive_max_pool2d
    _exporting.depth = getattr(_exporting, "depth", 0) + 1
    try:
        yield
    finally:
        _exporting.depth -= 1
        with _pool_lock:
            _pool_exports -= 1
            if not _pool_exports:
                F.adaptive_avg_pool2d, F.adaptive_max_pool2d = _ADAPTIVE_AVG_POOL2D, _ADAPTIVE_MAX_POOL2D


def _global_pools_(m) -> None:
    """ReduceMean over H, W with keepdims (the dynamo exporter's adaptive_avg_pool2d(1)) as GlobalAveragePool,
    which onnxruntime runs as QLinearGlobalAveragePool between QDQ pairs (it has no integer ReduceMean)."""
    from onnx import helper, numpy_helper
    inits = {i.name: i for i in m.graph.initializer}
    for i, node in enumerate(m.graph.node):
        if node.op_type != "ReduceMean" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = sorted(int(a) % 4 for a in numpy_helper.to_array(inits[node.input[1]]).reshape(-1))
        if axes == [2, 3] and attrs.get("keepdims", 1) == 1 and not attrs.get("noop_with_empty_axes", 0):
            m.graph.node[i].CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                                      name=node.name))


def _live_taps(size: int, k: int, pad0: int, pad1: int, stride: int, dilation: int) -> tuple[int, int]:
    """First and last kernel tap along one axis that reads the input (not only padding) at some output."""
    n_out = (size + pad0 + pad1 - dilation * (k - 1) - 1) // stride + 1
    live = [i for i in range(k) if any(0 <= o * stride - pad0 + i * dilation < size for o in range(n_out))]
    return (live[0], live[-1]) if live else (0, k - 1)


def drop_padding_taps_(m) -> int:
    """Cut from each Conv the kernel rows and columns that, at the model's fixed input size, only ever
    read zero padding (in place). Returns how many convs changed.

    A 3x3 conv on a 1x1 map (the last stage of a 28-px ResNet) reads only its centre tap. Float kernels
    skip padding; integer kernels (im2col) multiply it, nine times the work. The taps removed multiply
    zeros (the zero point, for a quantized input), so the outputs do not change.
    """
    import onnx
    from onnx import helper, numpy_helper
    g = m.graph
    inferred = onnx.shape_inference.infer_shapes(m).graph
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.value_info) + list(inferred.input)}
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses = collections.Counter(i for n in g.node for i in n.input)
    changed = 0
    for conv in g.node:
        shape = shapes.get(conv.input[0]) if conv.op_type == "Conv" else None
        if not shape or len(shape) != 4 or None in shape[2:]:
            continue
        w_name = conv.input[1]
        dq = producer.get(w_name)
        if dq is not None and dq.op_type == "DequantizeLinear" and uses[w_name] == 1:
            w_name = dq.input[0]                     # per-output-channel codes: slice the codes
        if w_name not in inits or uses[w_name] != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        w = numpy_helper.to_array(inits[w_name])                                    # (O, I/groups, kh, kw)
        kh, kw = w.shape[2:]
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        strides, dil = list(attrs.get("strides", [1, 1])), list(attrs.get("dilations", [1, 1]))
        (r0, r1), (c0, c1) = (_live_taps(shape[2 + a], (kh, kw)[a], pads[a], pads[a + 2], strides[a], dil[a])
                              for a in (0, 1))
        if (r0, r1, c0, c1) == (0, kh - 1, 0, kw - 1):
            continue
        new = numpy_helper.from_array(w[:, :, r0:r1 + 1, c0:c1 + 1].copy(), w_name)
        new.data_type = inits[w_name].data_type
        inits[w_name].CopyFrom(new)
        pads = [pads[0] - r0 * dil[0], pads[1] - c0 * dil[1], pads[2] - (kh - 1 - r1) * dil[0],
                pads[3] - (kw - 1 - c1) * dil[1]]
        keep = [a for a in conv.attribute if a.name not in ("pads", "kernel_shape")]
        del conv.attribute[:]
        conv.attribute.extend(keep + [helper.make_attribute("pads", pads),
                                      helper.make_attribute("kernel_shape", [r1 - r0 + 1, c1 - c0 + 1])])
        changed += 1
    return changed


def compact_names_(m) -> None:
    """Shrinks what is not data: the intermediate tensors get short ids ("v0", "v1", ...) and the node names
    (an optional field) go. Graph inputs, outputs and the initializers, whose names say each node's layer
    ("layer1.0.conv1.weight_quantized"), stay. The exporters' path-like names are about a tenth of a small
    model's int4 file."""
    g = m.graph
    new: dict[str, str] = {}
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {i.name for i in g.initializer}
    ids = (f"v{i}" for i in itertools.count() if f"v{i}" not in keep)
    for node in g.node:
        node.name = ""
        for names in (node.input, node.output):
            for k, v in enumerate(names):
                if v and v not in keep:
                    if v not in new:
                        new[v] = next(ids)
                    names[k] = new[v]
    for vi in g.value_info:
        vi.name = new.get(vi.name, vi.name)


def _set_metadata(model, meta: dict[str, Any]) -> None:
    from onnx import helper
    del model.metadata_props[:]
    helper.set_model_props(model, {k: json.dumps(v) for k, v in meta.items()})   # every value is JSON


def _onnx_meta(data_config: dict | None, spec: QuantSpec | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"producer": "gzq"}
    if data_config:
        meta.update({k: data_config[k] for k in ("architecture", "input_size", "mean", "std", "class_names")
                     if k in data_config})
    if spec is not None:
        meta["quant_spec"] = spec.to_dict()
    return meta


@torch.no_grad()
def export_onnx(student: nn.Module, path: str | Path, input_size, opset: int = 21,
                data_config: dict | None = None, spec: QuantSpec | None = None,
                exporter: str = "torchscript") -> dict[str, Any]:
    """Write `student` as an ONNX QDQ model with a dynamic batch axis (input "input", output "logits").

    Args:
        input_size: (C, H, W) of one image, normalised as the teacher expects.
        opset: >= 13; 4-bit codes are stored as int4/uint4 from 21 on, as int8 below.
        exporter: "torchscript" (default: 40x faster to export, measured) or "dynamo" (see `_torch_export`).
    Returns:
        {"path", "bytes", "opset", "layers": {layer: {"weight": type, "input": type | None}},
         "tensors": {tensor quantizer: type}} (code types; "input" is the type of the quantizer the layer
        reads, its own or a tensor quantizer).
    """
    import onnx
    from onnx import TensorProto

    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (per-channel QuantizeLinear), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = find_layer_quants(student)
    if not layers:
        raise ValueError("the model has no QuantWrapper layers; use export_fp32_onnx for a float model")
    tensors = find_tensor_quants(student)
    model = copy.deepcopy(student).cpu().float().eval()
    dynamo = exporter == "dynamo"
    for key, lq in enumerate(layers):
        w: QuantWrapper = model.get_submodule(lq.name)
        model.set_submodule(lq.name, _ExportLayer(w.module, key, lq.dequantized_weight(), w.a_quant is not None,
                                                  dynamo))
    for key, a in enumerate(tensors):
        model.set_submodule(a.prefix[:-1], _ExportTensor(key, dynamo))
    example = torch.zeros(1, *input_size)
    kw = {} if dynamo else dict(do_constant_folding=True, custom_opsets={"gzq": 1})
    _torch_export(model, example, path, min(opset, _TORCHSCRIPT_MAX_OPSET), exporter, **kw)

    m = onnx.load(str(path))
    _global_pools_(m)
    g = m.graph
    name = TensorProto.DataType.Name
    new_nodes, new_inits, w_types, w_outs, act_outs = [], [], {}, {}, {}
    consumers: dict[str, list] = {}
    producers = {o: n for n in g.node for o in n.output}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in g.node:
        if node.domain != "gzq":
            new_nodes.append(node)
            continue
        kind, key = node.attribute[0].s.decode().split(":")
        if kind == "w":
            lq = layers[int(key)]
            inits, nodes, w_types[lq.name] = _weight_nodes(lq, node.output[0], opset)
            w_outs[node.output[0]] = lq.name
        else:
            a = tensors[int(key)] if kind == "t" else layers[int(key)].input_quant()
            int4 = not (getattr(producers.get(node.input[0]), "op_type", None) in _NO_INT4_BEFORE
                        or _after_op(node.input[0], producers, _NO_INT4_AFTER)
                        or any(c.op_type in _QDQ_TRANSPARENT for c in consumers.get(node.output[0], ())))
            inits, nodes, t = _act_nodes(a, node.input[0], node.output[0], opset, int4)
            act_outs[node.output[0]] = (a, t)
        new_nodes += nodes
        new_inits += inits
    missing = [lq.name for lq in layers if lq.name not in w_types]
    if missing:
        raise RuntimeError(f"the traced graph lost the quantized weights of {missing}")
    if len(act_outs) != len(tensors) + sum(lq.a_bits is not None for lq in layers):   # before the repeats
        raise RuntimeError("the traced graph lost activation quantizers")
    new_nodes = _requantize_after_transparent(new_nodes, act_outs, opset)
    producer = {o: n for n in new_nodes for o in n.output}
    types = {}                                   # each quantized layer: the code types of its weight and input
    for node in new_nodes:
        if len(node.input) > 1 and node.input[1] in w_outs:
            a = _input_quant(node.input[0], producer, act_outs)
            types[w_outs[node.input[1]]] = {"weight": name(w_types[w_outs[node.input[1]]]).lower(),
                                            "input": None if a is None else name(a[1]).lower()}
    new_nodes, bias_inits = _rewrite_biases(new_nodes, layers, w_types, act_outs)
    del g.node[:]
    g.node.extend(_live_nodes(new_nodes, {o.name for o in g.output}))
    new_inits += bias_inits
    used = {i for n in g.node for i in n.input}
    kept = [i for i in g.initializer if i.name in used]      # drops the float copies of the quantized weights
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    for vi in list(g.value_info):                              # stale shapes of the placeholders' outputs
        g.value_info.remove(vi)
    opsets = [o for o in m.opset_import if o.domain not in ("gzq",)]
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    if opset >= INT4_OPSET:
        m.ir_version = max(m.ir_version, 10)          # int4 / uint4 need IR 10
    drop_padding_taps_(m)
    compact_names_(m)
    _set_metadata(m, _onnx_meta(data_config, spec))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    tensor_types = {a.prefix[:-1]: name(t).lower() for a, t in act_outs.values() if a.prefix.startswith(f"{CONTAINER}.")}
    return dict(path=str(path), bytes=path.stat().st_size, opset=opset, layers=types, tensors=tensor_types)


@torch.no_grad()
def export_fp32_onnx(model: nn.Module, path: str | Path, input_size, opset: int = 21,
                     data_config: dict | None = None, exporter: str = "torchscript") -> dict[str, Any]:
    """The float model (e.g. the teacher) as ONNX, for comparison: same input/output names and batch axis."""
    import onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().float().eval()
    expand_cond_convs_(model)   # the same function, with kernels of a fixed shape
    kw = {} if exporter == "dynamo" else dict(do_constant_folding=True)
    _torch_export(model, torch.zeros(1, *input_size), path, min(opset, _TORCHSCRIPT_MAX_OPSET), exporter, **kw)
    m = onnx.load(str(path))
    _global_pools_(m)
    drop_padding_taps_(m)
    compact_names_(m)
    _set_metadata(m, _onnx_meta(data_config, None))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return dict(path=str(path), bytes=path.stat().st_size, opset=min(opset, _TORCHSCRIPT_MAX_OPSET))


def onnx_session(path: str | Path, threads: int | None = None, optimization: str = "all",
                 optimized_path: str | Path | None = None, fold_weights: bool = False):
    """An onnxruntime CPU session.

    Args:
        threads: intra-op threads (inter-op 1); None = onnxruntime's default.
        optimization: "all" (onnxruntime's default: what a user gets), "extended" (the QDQ -> integer-kernel
            fusions without hardware-specific layouts) or "none" (the graph as written).
        optimized_path: where to write the optimised graph.
        fold_weights: no QDQ fusion; weight DequantizeLinear is constant-folded at load.
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimization != "all":
        levels = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        so.graph_optimization_level = levels[optimization]
    if fold_weights:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session_or_path, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Logits (N, classes) of an ONNX classifier on x (N, C, H, W), in batches."""
    import numpy as np
    sess = session_or_path if hasattr(session_or_path, "run") else onnx_session(session_or_path)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch].detach().cpu().float().numpy()})[0] for i in range(0, len(x), batch)]
    return torch.from_numpy(np.concatenate(outs))


# ----------------------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------------------

def _rel(folder: Path, info: dict) -> dict:
    return {**info, "path": str(Path(info["path"]).relative_to(folder))}


def _with_fallback(write: Callable[..., dict], path: Path, exporter: str, opset: int, what: str) -> dict:
    """write(exporter=exporter) to `path`; where torch's tracing exporter cannot write the model (HaloNet's halo
    attention, say) the dynamo exporter tries once more (it needs onnxscript and writes opset >= 18). The info says
    which one wrote the file. Any other failure, or the retry's, is raised with the tracing exporter's error and
    leaves no file behind."""
    try:
        try:
            return {**write(exporter=exporter), "exporter": exporter}
        except TracingExportError as e:
            if exporter != "torchscript":
                raise
            if importlib.util.find_spec("onnxscript") is None or opset < 18:
                raise TracingExportError(f"{e} (the dynamo exporter may write it: pip install onnxscript, opset "
                                         f">= 18)") from e
            log.warning("ONNX export of %s: the tracing exporter failed (%s); trying the dynamo exporter", what,
                        str(e).splitlines()[0][:200])
            try:
                return {**write(exporter="dynamo"), "exporter": "dynamo"}
            except Exception as e2:  # noqa: BLE001 - reported with the first error
                raise TracingExportError(f"{e} (the dynamo exporter failed too: {type(e2).__name__}: "
                                         f"{str(e2).splitlines()[0][:300] if str(e2) else ''})") from e
    except Exception:
        Path(path).unlink(missing_ok=True)
        raise


def export_run(folder: str | Path, cfg: ExportConfig, report: dict, teacher, students: dict, specs: dict) -> None:
    """Write the downloads of a run into `folder` and record them in `report` (in place).

    students/<name>.onnx, students/<name>_int.safetensors (+ .json), teacher_fp32.onnx; each student row
    of the report gets "files": {format: {"path", "bytes", ...} or {"error"}}, the teacher row too.
    A format that fails for an architecture is recorded as an error instead of losing the finished run.
    """
    folder = Path(folder)
    formats = set(ExportFormat(f) for f in cfg.formats)
    dc = teacher.data_config()
    rows = {r["name"]: r for r in report.get("students", [])}
    if ExportFormat.ONNX in formats:
        try:
            path = folder / "teacher_fp32.onnx"
            info = _with_fallback(functools.partial(export_fp32_onnx, teacher.model, path, teacher.input_size,
                                                    cfg.opset, dc), path, cfg.exporter, cfg.opset, "the teacher")
            report.setdefault("teacher", {})["files"] = {"onnx": _rel(folder, info)}
        except Exception as e:  # noqa: BLE001 - recorded in the report
            log.warning("FP32 ONNX export of the teacher failed: %s", e)
            report.setdefault("teacher", {})["files"] = {"onnx": {"error": f"{type(e).__name__}: {e}"}}
    for name, s in students.items():
        files: dict[str, Any] = {}
        if ExportFormat.ONNX in formats:
            try:
                path = folder / "students" / f"{name}.onnx"
                info = _with_fallback(functools.partial(export_onnx, s, path, teacher.input_size, cfg.opset, dc,
                                                        specs[name]), path, cfg.exporter, cfg.opset, name)
                info.pop("layers"), info.pop("tensors")
                files["onnx"] = _rel(folder, info)
            except Exception as e:  # noqa: BLE001
                log.warning("ONNX export of %s failed: %s", name, e)
                files["onnx"] = {"error": f"{type(e).__name__}: {e}"}
        if ExportFormat.SAFETENSORS in formats:
            try:
                info = save_int_weights(s, folder / "students" / f"{name}_int.safetensors", specs[name], dc)
                info["json"] = str(Path(info["json"]).relative_to(folder))
                files["safetensors_int"] = _rel(folder, info)
            except Exception as e:  # noqa: BLE001
                log.warning("integer safetensors export of %s failed: %s", name, e)
                files["safetensors_int"] = {"error": f"{type(e).__name__}: {e}"}
        if name in rows:
            rows[name]["files"] = files
