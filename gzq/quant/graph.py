"""Place activation quantizers on tensors, as an integer runtime needs them (the "deployable" protocol).

An integer runtime (onnxruntime's QLinearConv / QLinearAdd / QGemm, TensorRT, TFLite) fuses an operator
into an integer kernel only when every tensor it reads comes from a DequantizeLinear and every tensor it
writes goes into a QuantizeLinear: the pattern onnxruntime's `quantize_static` produces. Quantizing the
input of each conv (the research protocols) leaves the residual adds, the network input and the pooling
in float, so those units run dequantize-then-float.

Here the float model is traced once with torch.fx (timm's CNNs are fx-traceable; timm's own no-trace
modules and functions stay leaves), and one `ActQuantizer` is inserted per tensor that an integer
operator reads:

    reads   input of every quantized conv / linear, both inputs of a residual add (`x + shortcut`,
            `x += shortcut`), every input of a concatenation, the input of average pooling
    writes  the output of every add, concatenation and average pooling

A tensor read by several operators (a block input feeding conv1 and the shortcut) gets one quantizer,
shared, as in `quantize_static`. Placement looks through operators that commute with quantization
(Identity, Dropout, Flatten / view / reshape, max pooling: max(Q(x)) = Q(max(x)) since rounding is
monotonic), so a quantizer sits right after the conv / add that computes the tensor. An add or pooling
whose only consumer is a ReLU that is then quantized counts as written: with the zero point at 0 the
quantizer's clamp is the ReLU (onnxruntime removes such a ReLU, `ReluQuantFusion`); the zero point of a
quantizer on a ReLU's output is therefore fixed (not trained) at its calibrated 0. The network input is
quantized at 8 bit whatever the activation width (images are 8-bit data). An 8-bit conv reading an
8-bit tensor adds its bias as int32 codes with step input_scale * weight_scale, as QLinearConv does
(`QuantWrapper.set_int_bias_input`; `gzq.quant.convert.create_student` does the same for the other
protocols); other layers keep a float bias (the exporter adds it in float).

Nothing here knows an architecture: the rules are about operators, so any fx-traceable CNN works.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import ActQuantizer, QuantWrapper

INPUT_BITS = 8
CONTAINER = "act_quant"     # the GraphModule's ModuleDict of tensor quantizers, keyed by fx node name

_ADD = (operator.add, operator.iadd, torch.add)
_CAT = (torch.cat, torch.concat)
_AVG_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_AVG_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.avg_pool2d)
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d)
_TRANSPARENT_FUNCTIONS = (torch.flatten, F.max_pool2d, F.dropout)
_TRANSPARENT_METHODS = ("flatten", "view", "reshape")


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps timm's registered no-trace modules and functions as leaves."""

    def __init__(self):
        try:
            from timm.layers._fx import get_notrace_functions, get_notrace_modules
            self._leaves, funcs = tuple(get_notrace_modules()), tuple(get_notrace_functions())
        except ImportError:  # pragma: no cover - timm without fx helpers
            self._leaves, funcs = (), ()
        super().__init__(autowrap_functions=funcs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantWrapper, ActQuantizer) + self._leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """`model` as an fx.GraphModule with the same submodules under the same qualified names.

    Python control flow is fixed at trace time (timm's CNNs have none that depends on data in eval mode).
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise ValueError(f"the deployable protocol needs an fx-traceable model; {type(model).__name__} is not "
                         f"({type(e).__name__}: {e}); use the all_layers protocol") from e
    gm = fx.GraphModule(model, graph, type(model).__name__)
    for a in ("pretrained_cfg", "default_cfg", "num_classes", "num_features"):   # what timm helpers read
        if hasattr(model, a):
            setattr(gm, a, getattr(model, a))
    return gm


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is(gm: fx.GraphModule, node: fx.Node, modules=(), functions=(), methods=()) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.target in _CAT else node.args[:2]
    return [a for a in args if isinstance(a, fx.Node)]


def _integer_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The tensors `node` reads that an integer kernel needs quantized (empty for a float operator)."""
    if _is(gm, node, modules=(QuantWrapper,)):
        return [node.args[0]]
    if node.op == "call_function" and node.target in _ADD:
        args = _tensor_args(node)
        return args if len(args) == 2 else []              # x + 1.0 is not a residual add
    if node.op == "call_function" and node.target in _CAT:
        return _tensor_args(node)
    if _is(gm, node, modules=_AVG_POOL_MODULES, functions=_AVG_POOL_FUNCTIONS):
        return [node.args[0]]
    return []


def _writes_integer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD + _CAT and len(_integer_inputs(gm, node)) >= 2) \
        or _is(gm, node, modules=_AVG_POOL_MODULES, functions=_AVG_POOL_FUNCTIONS)


def _source(gm: fx.GraphModule, node: fx.Node, single_use: bool = False) -> fx.Node:
    """The node whose value `node` carries, looking back through quantization-commuting ops (only through
    those whose input has no other user, with `single_use`)."""
    while (_is(gm, node, _TRANSPARENT_MODULES, _TRANSPARENT_FUNCTIONS, _TRANSPARENT_METHODS)
           and isinstance(node.args[0], fx.Node) and (not single_use or len(node.args[0].users) == 1)):
        node = node.args[0]
    return node


def _anchor(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Where the quantizer of the tensor `node` goes: right after the op that computes its values."""
    return _source(gm, node, single_use=True)


def insert_tensor_quantizers_(gm: fx.GraphModule, a_bits: int, input_bits: int = INPUT_BITS) -> list[str]:
    """Insert one ActQuantizer per tensor an integer runtime reads or writes (in place). Returns their names.

    Quantized layers (QuantWrapper) must already be in `gm` and have no input quantizer of their own.
    """
    graph = gm.graph
    anchors: dict[fx.Node, None] = {}                                 # ordered set
    for node in list(graph.nodes):
        for t in _integer_inputs(gm, node):
            anchors[_anchor(gm, t)] = None
    for node in list(graph.nodes):
        if not _writes_integer(gm, node):
            continue
        users = list(node.users)
        relu = users[0] if len(users) == 1 and _is(gm, users[0], (nn.ReLU,), (F.relu, torch.relu)) else None
        if relu is None or _anchor(gm, relu) not in anchors:
            anchors[node] = None
    if CONTAINER not in gm._modules:
        gm.add_submodule(CONTAINER, nn.ModuleDict())
    container: nn.ModuleDict = gm.get_submodule(CONTAINER)
    names = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for anchor in sorted(anchors, key=order.__getitem__):
        bits = input_bits if anchor.op == "placeholder" else a_bits
        container[anchor.name] = ActQuantizer(bits)
        if _is(gm, anchor, (nn.ReLU, nn.ReLU6), (F.relu, F.relu6, torch.relu)):
            container[anchor.name].freeze_zero_point_()
        target = f"{CONTAINER}.{anchor.name}"
        with graph.inserting_after(anchor):
            q = graph.call_module(target, (anchor,))
        anchor.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        names.append(target)
    for node in graph.nodes:                         # 8-bit convs add their bias as int32, as QLinearConv does
        w = _module(gm, node)
        if isinstance(w, QuantWrapper) and isinstance(w.module, nn.Conv2d) and w.w_quant.bits == 8:
            q = _module(gm, _source(gm, node.args[0]))
            if isinstance(q, ActQuantizer) and q.bits == 8:
                w.set_int_bias_input(q)
    graph.lint()
    gm.recompile()
    return names


def tensor_quantizers(model: nn.Module) -> list[tuple[str, ActQuantizer]]:
    """The ActQuantizers that stand alone on tensors (not inside a QuantWrapper), in module order."""
    if CONTAINER not in model._modules:
        return []
    return [(f"{CONTAINER}.{n}", m) for n, m in model.get_submodule(CONTAINER).named_children()]
