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
            `x += shortcut`) and of a product of two tensors (a squeeze-excite gate, a SiLU written as
            x * sigmoid(x)), every input of a concatenation, the input of average pooling and of a sigmoid
    writes  the output of every add, product, concatenation, average pooling and sigmoid, and of every
            quantized conv whose output is not quantized anyway (a conv before a SiLU, hard-swish or GELU:
            the runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into an integer conv, and only a
            ReLU, which the QuantizeLinear's clamp absorbs, may sit between)

A tensor read by several operators (a block input feeding conv1 and the shortcut) gets one quantizer,
shared, as in `quantize_static`. Placement looks through operators that commute with quantization
(Identity, Dropout, Flatten / view / reshape, max pooling: max(Q(x)) = Q(max(x)) since rounding is
monotonic), so a quantizer sits right after the conv / add that computes the tensor. An add or pooling
whose only consumer is a ReLU that is then quantized counts as written: with the zero point at 0 the
quantizer's clamp is the ReLU (onnxruntime removes such a ReLU, `ReluQuantFusion`); the zero point of a
quantizer on a ReLU's output is therefore fixed (not trained) at its calibrated 0. The network input is
quantized at 8 bit whatever the activation width (images are 8-bit data). So are, at 8 bit at least, the
tensors that only the gating ops read or write (a conv's output before its SiLU or hard-swish, a gate, a
SiLU's sigmoid): they are there for the runtime's 8-bit kernels, and narrower codes on them would cost
accuracy for nothing, while the tensors the layers read keep the activation width. An 8-bit conv reading an
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
GATING_BITS = 8             # least width of a tensor that only gating ops and activations read (see above)
CONTAINER = "act_quant"     # the GraphModule's ModuleDict of tensor quantizers, keyed by fx node name

_ADD = (operator.add, operator.iadd, torch.add)
_MUL = (operator.mul, operator.imul, torch.mul)
_SIGMOID_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_SIGMOID_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid)
_CAT = (torch.cat, torch.concat)
_AVG_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_AVG_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.avg_pool2d)
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d)
_TRANSPARENT_FUNCTIONS = (torch.flatten, F.max_pool2d, F.dropout)
_TRANSPARENT_METHODS = ("flatten", "view", "reshape")
# ops that move or clamp values without computing new ones: a conv output reaching a quantized tensor only
# through these needs no quantizer of its own
_LAYOUT_MODULES = _TRANSPARENT_MODULES + (nn.ReLU, nn.ReLU6, nn.Upsample)
_LAYOUT_FUNCTIONS = _TRANSPARENT_FUNCTIONS + (F.relu, F.relu6, torch.relu, operator.getitem, torch.split, torch.chunk,
                                              torch.reshape, F.interpolate, F.pad, torch.narrow)
_LAYOUT_METHODS = _TRANSPARENT_METHODS + ("split", "chunk", "permute", "contiguous", "transpose", "narrow",
                                          "squeeze", "unsqueeze", "expand", "repeat")
_ACTIVATION = "gzq_activation"   # node.meta key: the node's value is a tensor computed from the input


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
        # convs and linears stay modules even where a library subclasses them (timm's Linear), so that each
        # becomes a quantized layer
        return isinstance(m, (QuantWrapper, ActQuantizer, nn.Conv2d, nn.Linear) + self._leaves) \
            or super().is_leaf_module(m, qualname)


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
    if node.op == "call_function" and node.target in _MUL:
        return _tensor_args(node) if _gating(gm, node) else []
    if node.op == "call_function" and node.target in _CAT:
        return _tensor_args(node)
    if _is(gm, node, modules=_AVG_POOL_MODULES + _SIGMOID_MODULES, functions=_AVG_POOL_FUNCTIONS + _SIGMOID_FUNCTIONS,
           methods=("sigmoid",)):
        return [node.args[0]]
    return []


def _gating(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A sigmoid, or a product of two activation tensors (a squeeze-excite gate, a SiLU written as
    x * sigmoid(x)); not a product with a parameter (a layer scale) or of shape numbers (H * W)."""
    if node.op == "call_function" and node.target in _MUL:
        args = _tensor_args(node)
        return len(args) == 2 and all(a.meta.get(_ACTIVATION, False) for a in args)
    return _is(gm, node, _SIGMOID_MODULES, _SIGMOID_FUNCTIONS, ("sigmoid",))


def _mark_activations(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run `example` through `gm` once and mark each node whose value is a tensor computed from the input
    (node.meta[_ACTIVATION]): not a parameter or buffer, not a shape number."""
    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta[_ACTIVATION] = isinstance(out, torch.Tensor) and n.op not in ("get_attr", "output")
            return out
    with torch.no_grad():
        _Recorder(gm).run(example)


def _reaches_float_op(gm: fx.GraphModule, node: fx.Node, anchors: dict) -> bool:
    """Whether `node`'s value, followed through layout ops and ReLU / ReLU6 (which commute with
    quantization or fold into it) and not quantized on the way, is read by an operator that computes in
    float (an activation such as hard-swish or GELU, a mean): then the op that computes it, to run as an
    integer kernel, must write a quantized tensor. Integer operators and the network output do not count."""
    for user in node.users:
        if user.op == "output" or _integer_inputs(gm, user):
            continue
        if _is(gm, user, _LAYOUT_MODULES, _LAYOUT_FUNCTIONS, _LAYOUT_METHODS):
            if user not in anchors and _reaches_float_op(gm, user, anchors):
                return True
            continue
        return True
    return False


def _writes_integer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD + _CAT and len(_integer_inputs(gm, node)) >= 2) \
        or _is(gm, node, modules=_AVG_POOL_MODULES, functions=_AVG_POOL_FUNCTIONS)


def _conv_or_gate(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A quantized conv or a gating op: it writes a quantized tensor only where a float op reads its value."""
    return (_is(gm, node, modules=(QuantWrapper,)) and isinstance(_module(gm, node).module, nn.Conv2d)) \
        or _gating(gm, node)


def _clamp_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ReLU that alone reads `node`'s value, looking forward through single-use quantization-commuting
    ops (a folded BN's Identity); None where there is none."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _is(gm, user, (nn.ReLU,), (F.relu, torch.relu)):
            return user
        if not _is(gm, user, _TRANSPARENT_MODULES, _TRANSPARENT_FUNCTIONS, _TRANSPARENT_METHODS):
            return None
        node = user
    return None


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


def split_silu_(gm: fx.GraphModule) -> int:
    """Write every SiLU of `gm` (module or function) as x * sigmoid(x), in place, so that its sigmoid and its
    product each get quantized tensors and run as integer operators (onnxruntime's QLinearSigmoid and
    QLinearMul) as in onnxruntime's own quantize_static, instead of in float between a DequantizeLinear and a
    QuantizeLinear. Returns how many were split."""
    n = 0
    for node in list(gm.graph.nodes):
        if not _is(gm, node, (nn.SiLU,), (F.silu,)):
            continue
        x = node.args[0]
        with gm.graph.inserting_after(node):
            gate = gm.graph.call_function(torch.sigmoid, (x,))
        with gm.graph.inserting_after(gate):
            prod = gm.graph.call_function(operator.mul, (x, gate))
        node.replace_all_uses_with(prod)
        gm.graph.erase_node(node)
        n += 1
    if n:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return n


def insert_tensor_quantizers_(gm: fx.GraphModule, a_bits: int, example: torch.Tensor,
                              input_bits: int = INPUT_BITS) -> list[str]:
    """Insert one ActQuantizer per tensor an integer runtime reads or writes (in place). Returns their names.

    Quantized layers (QuantWrapper) must already be in `gm` and have no input quantizer of their own. SiLUs
    are written as x * sigmoid(x) first (split_silu_); `example` (an input batch) is run once to tell
    activation tensors from parameters and shape numbers.
    """
    split_silu_(gm)
    _mark_activations(gm, example)
    graph = gm.graph
    anchors: dict[fx.Node, bool] = {}           # ordered; True: a layer, add, concatenation or pooling reads or
    for node in list(graph.nodes):              # writes it (a_bits), False: only gating ops do (at least 8 bits)
        for t in _integer_inputs(gm, node):
            a = _anchor(gm, t)
            anchors[a] = anchors.get(a, False) or not _gating(gm, node)
    for node in list(graph.nodes):
        if _conv_or_gate(gm, node):
            if node not in anchors and _reaches_float_op(gm, node, anchors):
                anchors[node] = False
            continue
        if not _writes_integer(gm, node):
            continue
        relu = _clamp_user(gm, node)                   # a clamp the runtime folds into the QuantizeLinear
        if relu is None or _anchor(gm, relu) not in anchors:
            anchors[node] = True
    if CONTAINER not in gm._modules:
        gm.add_submodule(CONTAINER, nn.ModuleDict())
    container: nn.ModuleDict = gm.get_submodule(CONTAINER)
    names = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for anchor in sorted(anchors, key=order.__getitem__):
        bits = input_bits if anchor.op == "placeholder" else a_bits if anchors[anchor] else max(a_bits, GATING_BITS)
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
