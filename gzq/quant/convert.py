"""Turn a float model into a fake-quant student, generically (no per-architecture code).

`fold_bn_` folds every BatchNorm that directly consumes a conv's output (or a channel concatenation of conv
outputs) into that conv; `quantize_`
swaps each Conv2d / Linear for a QuantWrapper according to a QuantSpec and protocol; `calibrate_`
initialises activation ranges from (synthetic) data; `expand_cond_convs_` first gives timm's CondConv layers
(per-image kernels) an ordinary conv to quantize. Which BN follows which conv, and which layer
reads the network input, is found by tracing one forward with hooks, so it works on any timm CNN.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from timm.layers import CondConv2d, Conv2dSame
from timm.utils.model import reparameterize_model
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..config import (
    AUTO_PERCENTILE_FALLBACK,
    AUTO_PERCENTILE_MARGIN,
    AUTO_PERCENTILES,
    SPLIT_MIN_GAIN,
    ActInit,
    Protocol,
    QuantSpec,
)
from . import graph
from .modules import ActQuantizer, QuantWrapper, WeightQuantizer, reduce_calibration_

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass
class GraphInfo:
    """What one traced forward tells about the layers."""
    conv_bn_pairs: list[tuple[str, str]]   # (conv name, bn name) where the BN reads the conv's output directly
    input_consumers: list[str]             # quantizable layers that read the network input
    order: list[str]                       # quantizable layers in execution order
    channels: dict[str, slice] = dataclasses.field(default_factory=dict)   # a BN reading a concatenation of convs:
    #                                                                        the conv's channels of it


def _concatenated_convs(x: torch.Tensor, produced: dict) -> list[tuple[str, object, tuple[slice, object]]]:
    """[(conv name, its output's grad_fn, (its channels of `x`, the concatenation's grad_fn))] where `x` is a
    channel concatenation of conv outputs as the convs wrote them (MixNet's MixedConv2d), else []. `produced`:
    {grad_fn of a conv's output: (conv name, the output)}."""
    cat = x.grad_fn
    if x.dim() != 4 or type(cat).__name__ != "CatBackward0":
        return []
    dim = cat._saved_dim
    if (dim - 2 ** 64 if dim >= 2 ** 63 else dim) % 4 != 1:
        return []
    parts = [produced.get(fn) for fn, _ in cat.next_functions]
    if not parts or not all(parts):
        return []
    bounds = [0]
    for _, out in parts:
        bounds.append(bounds[-1] + out.shape[1])
    return [(name, out.grad_fn, (slice(a, b), cat)) for (name, out), a, b in zip(parts, bounds, bounds[1:])]


@torch.no_grad()
def eval_forward(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One forward of `model` in eval mode on `example`, then remove the hook `handles` and restore the mode."""
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _graph_uses(outputs) -> collections.Counter:
    """How many operations of the autograd graph behind `outputs` (tensors, or tuples / lists / dicts of them) read
    each node's result: a node read twice is a value that two operations consume. Returning a value counts as
    reading it. Readers outside the graph (a comparison, an integer op, a detached copy) are not seen."""
    roots = list(dict.fromkeys(t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None))
    uses: collections.Counter = collections.Counter(roots)
    stack, seen = list(roots), set(roots)
    while stack:
        for fn, _ in stack.pop().next_functions:
            if fn is not None:
                uses[fn] += 1
                if fn not in seen:
                    seen.add(fn)
                    stack.append(fn)
    return uses


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    return [t for item in items for t in _tensors(item)]


def trace_layers(model: nn.Module, example: torch.Tensor, pairs: bool = True) -> GraphInfo:
    """One eval forward of `model` on `example`, which records the layers. A BN is paired with the conv it
    follows only where it reads the conv's output as the conv wrote it (no in-place op between) and nothing else
    reads that output (a pre-norm block's shortcut, say), for folding it into the conv must not change what the
    others see: the forward builds the autograd graph (of `example`, with gradients) to count the readers.
    `pairs=False` records only the layers' order and the input's readers (no graph: a cheaper forward)."""
    produced: dict[object, tuple[str, torch.Tensor]] = {}   # a conv output's grad_fn: (conv name, the output)
    found, consumers, order, unmatched = [], [], [], set()
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def conv_hook(mod, args, out):
        if out.grad_fn is not None:   # an in-place op on the output later gives it another grad_fn
            produced[out.grad_fn] = (names[mod], out)
        order.append(names[mod])

    def quant_pre_hook(mod, args):
        if args and args[0] is example:
            consumers.append(names[mod])

    def bn_pre_hook(mod, args):
        x = args[0]
        if mod.running_var is None:   # batch statistics at inference (track_running_stats=False): nothing to fold
            unmatched.add(names[mod])
            return
        cname, out = produced.get(x.grad_fn, (None, None))
        if out is x:   # a conv's output as the conv wrote it
            found.append((cname, names[mod], x.grad_fn, None))
            return
        parts = _concatenated_convs(x, produced)   # MixNet's MixedConv2d, say
        for cname, fn, channels in parts:
            found.append((cname, names[mod], fn, channels))
        if not parts:   # a BN called again on another input cannot be folded for one of its calls
            unmatched.add(names[mod])

    for n, m in model.named_modules():
        if isinstance(m, QUANTIZABLE):
            handles.append(m.register_forward_hook(conv_hook))
            handles.append(m.register_forward_pre_hook(quant_pre_hook))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and pairs:
            handles.append(m.register_forward_pre_hook(bn_pre_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.set_grad_enabled(pairs):   # not a leaf: a forward may change its input in place
            example = example.detach().requires_grad_(pairs).clone()
            out = model(example)
            uses = _graph_uses(out) if pairs else collections.Counter()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    calls = collections.Counter(order)   # a conv called twice writes two outputs the fold would both change
    seen = set()
    order = [n for n in order if not (n in seen or seen.add(n))]
    whole = unmatched | {b for c, b, fn, channels in found   # a BN folds into all the convs it reads, or none
                         if not (isinstance(model.get_submodule(c), nn.Conv2d) and uses[fn] == 1 and calls[c] == 1
                                 and (channels is None or uses[channels[1]] == 1))}
    found = [(c, b, channels) for c, b, _, channels in found if b not in whole]
    return GraphInfo([(c, b) for c, b, _ in found], consumers, order,
                     {c: channels[0] for c, _, channels in found if channels is not None})


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What is left of a BN layer once its affine transform lives in the conv: timm's BatchNormAct2d keeps
    its dropout and activation, a plain BatchNorm becomes Identity."""
    parts = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
    return nn.Sequential(*parts) if parts else nn.Identity()


@torch.no_grad()
def folded_bn_moments(teacher: nn.Module, example: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{conv name: (mean, variance)}, (C,) each, of the BN-folded output of every conv of `teacher` that a BN
    reads directly, on the teacher's real data as the BN's running statistics give it: beta and
    gamma^2 var / (var + eps)."""
    out = {}
    info = trace_layers(teacher, example)
    for conv, bn_name in info.conv_bn_pairs:
        bn, ch = teacher.get_submodule(bn_name), info.channels.get(conv, slice(None))
        var, denom = bn.running_var[ch], bn.running_var[ch] + bn.eps
        out[conv] = ((bn.bias[ch].float(), bn.weight[ch].float().pow(2) * var / denom) if bn.affine
                     else (torch.zeros_like(var), var / denom))
    return out


@torch.no_grad()
def fold_bn_(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Fold each BN that directly follows a conv into the conv (in place); a BN that reads a channel concatenation
    of convs (MixNet's MixedConv2d) folds its channels of it into each. Returns the folded (conv, BN) pairs."""
    info = trace_layers(model, example)
    for conv_name, bn_name in info.conv_bn_pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        ch = info.channels.get(conv_name, slice(None))
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean[ch], bn.running_var[ch], bn.eps,
                                    *(None if t is None else t[ch] for t in (bn.weight, bn.bias)))
        conv.weight, conv.bias = w, b
    for bn_name in dict.fromkeys(b for _, b in info.conv_bn_pairs):   # once each: a BN may follow several convs
        model.set_submodule(bn_name, _bn_replacement(model.get_submodule(bn_name)))
    log.debug("folded %d BN layers into %d convs", len({b for _, b in info.conv_bn_pairs}), len(info.conv_bn_pairs))
    return info.conv_bn_pairs


class IdentityTaps(nn.Conv2d):
    """The diagonal centre taps kept apart from a fused conv (`split_identity_`): a depthwise 1x1 conv, no bias."""


class SplitConv(nn.Module):
    """conv(x) + taps(x): a conv whose identity-like diagonal centre taps run as their own depthwise 1x1 conv."""

    def __init__(self, conv: nn.Conv2d, taps: IdentityTaps):
        super().__init__()
        self.conv, self.taps = conv, taps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.taps(x)


class ExpertConv(nn.Module):
    """timm's CondConv2d as an ordinary conv: CondConv convolves each image with its own mix of E expert kernels,
    sum_e r_e W_e (r: the block's routing weights), which is the same as mixing the E experts' outputs,
    sum_e r_e conv(x, W_e), since a conv is linear in its kernel. `conv` holds every expert's kernel as its own
    output channels (grouped by the conv's groups, then expert), so it quantizes per channel like any conv, and
    a file writes one conv with a fixed kernel (an integer one where its input is quantized) and the mix. It
    computes every expert's output, E times the original conv's work."""

    def __init__(self, cond: nn.Module):
        super().__init__()
        e, out, g = cond.num_experts, cond.out_channels, cond.groups
        conv_cls = Conv2dSame if cond.dynamic_padding else nn.Conv2d
        self.conv = conv_cls(cond.in_channels, g * e * (out // g), cond.kernel_size, cond.stride,
                             0 if cond.dynamic_padding else cond.padding, cond.dilation, g,
                             bias=cond.bias is not None).to(cond.weight)
        self.experts, self.groups = e, g
        with torch.no_grad():   # expert e's output channel o (in group o // (out / g)) -> (group, e, o % (out / g))
            w = cond.weight.view(e, g, out // g, *cond.weight_shape[1:]).transpose(0, 1)
            self.conv.weight.copy_(w.reshape(self.conv.weight.shape))
            if cond.bias is not None:
                self.conv.bias.copy_(cond.bias.view(e, g, out // g).transpose(0, 1).reshape(-1))

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).unflatten(1, (self.groups, self.experts, -1))   # (B, g, E, out / g, H, W)
        return (y * routing_weights[:, None, :, None, None, None]).sum(2).flatten(1, 2)


def expand_cond_convs_(model: nn.Module) -> int:
    """Replace each timm CondConv2d of `model` (in place) by its ExpertConv, the same function with an ordinary
    conv inside for the quantizer and the export. Returns how many were replaced."""
    names = [n for n, m in model.named_modules() if isinstance(m, CondConv2d)]
    for n in names:
        model.set_submodule(n, ExpertConv(model.get_submodule(n)))
    return len(names)


def _diagonal_taps(conv: nn.Module) -> torch.Tensor | None:
    """(C,) centre tap of input channel o in output channel o of a stride-1, size-keeping conv with as many outputs
    as inputs (dense, depthwise or grouped: then the o-th output's group reads it as input o % per_group); None for
    any other."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or conv.stride != (1, 1) \
            or conv.dilation != (1, 1) or conv.in_channels != conv.out_channels:
        return None
    out, per_group, kh, kw = conv.weight.shape
    if kh % 2 == 0 or kw % 2 == 0 or conv.padding != (kh // 2, kw // 2):
        return None
    o = torch.arange(out)
    return conv.weight.detach()[o, o % per_group, kh // 2, kw // 2]


def _weight_error(w: torch.Tensor, bits: int, symmetric: bool) -> float:
    return float((WeightQuantizer(w, bits, symmetric)(w) - w).pow(2).sum())


@torch.no_grad()
def split_identity_(model: nn.Module, bits: int, symmetric: bool = True, min_gain: float = SPLIT_MIN_GAIN,
                    names: list[str] | None = None) -> list[str]:
    """Keep the identity-like diagonal centre taps of convs apart (in place; create_student calls it on fused
    networks): conv(W) becomes conv(W - D) + depthwise-1x1(D), the same function, where that lowers the conv's
    weight quantization error at `bits` by at least `min_gain` (SPLIT_MIN_GAIN; math.inf: never) and leaves every
    channel of W - D a weight, or exactly the convs `names` where given (a saved student's, rebuilt on other
    weights). Fusing a RepVGG or MobileOne block adds its identity BN to one centre tap per output channel, far
    above the others, and a per-channel weight grid would spend its range on it; D alone (one weight per channel)
    quantizes exactly. Returns the names of the split convs.
    """
    split = []
    for name, conv in list(model.named_modules()):
        taps = _diagonal_taps(conv)
        if taps is None or (names is not None and name not in names):
            continue
        w, o = conv.weight.detach(), torch.arange(conv.out_channels)
        rest = w.clone()
        rest[o, o % w.shape[1], w.shape[2] // 2, w.shape[3] // 2] = 0
        if names is None and (math.isinf(min_gain) or not rest.flatten(1).any(1).all()   # nothing left in a channel
                              or _weight_error(w, bits, symmetric) < min_gain * _weight_error(rest, bits, symmetric)):
            continue
        conv.weight = nn.Parameter(rest)
        ident = IdentityTaps(conv.out_channels, conv.out_channels, 1, groups=conv.out_channels, bias=False)
        ident.weight = nn.Parameter(taps.view(-1, 1, 1, 1).clone().to(w))
        model.set_submodule(name, SplitConv(conv, ident))
        split.append(name)
    if names is not None and set(names) - set(split):
        raise ValueError(f"no conv with diagonal taps to keep apart at {sorted(set(names) - set(split))[:3]}")
    log.debug("kept the diagonal taps of %d fused convs apart", len(split))
    return split


def split_names(student: nn.Module) -> list[str]:
    """The convs of `student` that keep their diagonal taps apart (SplitConv; also in an fx-traced student)."""
    return [n[:-len(".taps")] for n, w in quant_wrappers(student) if isinstance(w.module, IdentityTaps)]


def quantize_(model: nn.Module, spec: QuantSpec, example: torch.Tensor, classifier: str | None = None) -> nn.Module:
    """Swap every Conv2d / Linear of `model` (in place) for a QuantWrapper following `spec`.

    The layer that reads the network input keeps a float input (docs/design.md 2.5). With the "first/last 8-bit"
    protocol that layer and the classifier (timm's `pretrained_cfg['classifier']`, else the last layer
    executed) use 8-bit weights and inputs. With the "deployable" protocol the layers get no input
    quantizer: `gzq.quant.graph` quantizes the tensors instead (see `create_student`).
    """
    info = trace_layers(model, example, pairs=False)
    if not info.order:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    last = classifier if classifier in info.order else info.order[-1]
    first = set(info.input_consumers) or {info.order[0]}
    for name in info.order:
        w_bits, a_bits = spec.w_bits, spec.a_bits
        if spec.protocol == Protocol.FIRST_LAST_8BIT and (name in first or name == last):
            w_bits, a_bits = 8, 8
        if name in first or spec.protocol == Protocol.DEPLOYABLE:
            a_bits = None
        model.set_submodule(name, QuantWrapper(model.get_submodule(name), w_bits, a_bits, spec.w_symmetric))
    return model


def _clear_attention_bias_cache(module: nn.Module, *_) -> None:
    module.attention_bias_cache.clear()


def uncache_attention_biases_(model: nn.Module) -> int:
    """timm's LeViT, TinyViT, EfficientFormer (V1, V2) and EfficientViT (MSRA) cache each attention's bias table in
    eval mode. A student is trained in eval mode: the cached table would keep an autograd graph that a second
    backward cannot go through (nor a deepcopy), and after an update it would be stale. The table now lives for
    one forward only (one gather each). Returns how many modules were so changed."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "attention_bias_cache", None), dict)]
    for m in mods:
        m.attention_bias_cache.clear()
        m.register_forward_pre_hook(_clear_attention_bias_cache)
        m.register_forward_hook(_clear_attention_bias_cache, always_call=True)
    return len(mods)


def has_branches(model: torch.nn.Module) -> bool:
    """Whether `model` has modules timm's reparameterize_model acts on (without them there is nothing to fuse)."""
    return any(hasattr(m, a) for m in model.modules() for a in ("fuse", "reparameterize", "switch_to_deploy"))


def create_student(teacher: nn.Module, spec: QuantSpec, example: torch.Tensor, classifier: str | None = None,
                   split_min_gain: float = SPLIT_MIN_GAIN, split: list[str] | None = None) -> nn.Module:
    """A BN-folded fake-quant copy of `teacher` (weights trainable; activation ranges still to calibrate).

    With the deployable protocol the copy is an fx.GraphModule (same submodule names) with one activation
    quantizer per tensor that an integer runtime reads or writes (`gzq.quant.graph`). With every protocol, a
    conv with 8-bit weights and an 8-bit input adds its bias as int32 codes (step input scale x weight scale):
    onnxruntime runs such a conv as QLinearConv, which rounds the bias so, and the student computes what the
    ONNX file will.

    With spec.fuse_branches the copy is first re-parameterised (timm's reparameterize_model: the parallel conv + BN
    branches of RepVGG, MobileOne, FastViT, RepViT or RepGhost blocks fused, the same function), and a fused
    conv whose identity-like diagonal taps dominate its weight grid keeps them apart (`split_identity_`,
    `split_min_gain`, math.inf never splits; `split` names them instead). With False, and with "auto" (the
    default) until the pipeline chooses, each branch keeps its own quantized conv.
    """
    student = reparameterize_model(teacher) if spec.fuse_branches is True else copy.deepcopy(teacher)
    expand_cond_convs_(student)
    fold_bn_(student, example)
    if spec.fuse_branches is True:
        split_identity_(student, spec.w_bits, spec.w_symmetric, split_min_gain, split)
    if spec.protocol == Protocol.DEPLOYABLE:
        student = graph.trace(student.eval())
    quantize_(student, spec, example, classifier)
    if spec.protocol == Protocol.DEPLOYABLE:
        graph.insert_tensor_quantizers_(student, spec.a_bits, example)
    else:   # an 8-bit conv of 8-bit input adds its bias as int32 codes, as onnxruntime's QLinearConv will
        for _, w in quant_wrappers(student):
            if isinstance(w.module, nn.Conv2d) and w.w_quant.bits == 8 and w.a_quant is not None \
                    and w.a_quant.bits == 8:
                w.set_int_bias_input(w.a_quant)
    uncache_attention_biases_(student)
    student.to(example.device).eval().requires_grad_(True)   # new quantizer tensors follow the model's device
    return student


def quant_wrappers(model: nn.Module) -> list[tuple[str, QuantWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWrapper)]


@torch.no_grad()
def calibrate_(model: nn.Module, batches, method: ActInit | str = QuantSpec.act_init,
               percentile: float | str = QuantSpec.act_percentile,
               score: Callable[[nn.Module], float] | None = None) -> dict | None:
    """Initialise every activation quantizer's range from `batches` (an iterable of input tensors).

    Two passes over the batches: the first finds each quantizer's range, the second fills its histogram.
    In a run of many processes each rank passes its own share of the images; ranges and histograms are
    reduced over ranks after each pass, so every rank gets the step sizes of all the images together.

    percentile="auto" sets the percentile-calibrated ranges at each of AUTO_PERCENTILES in turn, calls
    `score(model)` (lower is better: the pipeline's is the KL to the teacher on held-out synthetic images) and
    keeps choose_percentile's pick. Returns {"percentile": chosen, "scores": {percentile: score}} then (no
    scores where no quantizer is percentile-calibrated or `score` is None: AUTO_PERCENTILE_FALLBACK), else None.
    """
    batches = list(batches)
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for a in acts:
        a.calibrating = True
    try:
        for x in batches:
            model(x)
        reduce_calibration_(acts)
        for a in acts:
            a.start_histogram_()
        for x in batches:
            model(x)
        reduce_calibration_(acts)
    finally:
        for a in acts:
            a.calibrating = False
    if percentile != "auto":
        for a in acts:
            a.init_from_calibration_(method, percentile)
        return None
    probed = [a for a in acts if ActInit(method).resolve(a.bits) == ActInit.PERCENTILE]
    for a in acts:
        if a not in probed:   # their ranges do not depend on the percentile
            a.init_from_calibration_(method)
    seen = [(a._hist, a._range) for a in probed]
    scores: dict[float, float] = {}
    for p in (AUTO_PERCENTILES if probed and score is not None else ()):
        for a, (hist, rng) in zip(probed, seen):
            a._hist, a._range = hist, rng
            a.init_from_calibration_(method, p)
        scores[p] = float(score(model))
    chosen = choose_percentile(scores)
    for a, (hist, rng) in zip(probed, seen):
        a._hist, a._range = hist, rng
        a.init_from_calibration_(method, chosen)
    return {"percentile": chosen, "scores": scores}


def choose_percentile(scores: dict[float, float]) -> float:
    """The percentile a calibration with percentile="auto" keeps, from {percentile: score} (lower is better):
    AUTO_PERCENTILE_FALLBACK unless another scores under AUTO_PERCENTILE_MARGIN times its score (or it has no
    finite score), then the lowest. AUTO_PERCENTILE_FALLBACK when nothing was scored."""
    finite = {p: v for p, v in scores.items() if math.isfinite(v)}
    if not finite:
        return AUTO_PERCENTILE_FALLBACK
    best = min(finite, key=finite.get)
    base = finite.get(AUTO_PERCENTILE_FALLBACK)
    return best if base is None or finite[best] < AUTO_PERCENTILE_MARGIN * base else AUTO_PERCENTILE_FALLBACK


#: elementwise activations a quantizer may read a BN-folded conv's output through (bn_ranges_)
ACTIVATIONS = {"identity": lambda y: y, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish,
               "silu": F.silu, "gelu": F.gelu, "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid}


@torch.no_grad()
def bn_fed_quantizers(student: nn.Module, convs: list[str], example: torch.Tensor,
                      peak: float = 16.0) -> dict[str, tuple[str, str]]:
    """{quantizer name: (conv name, activation name)} for each activation quantizer of `student` whose input
    is an elementwise activation (ACTIVATIONS) of one of `convs`' outputs, found in one forward of `example`
    rather than from the model's code: every conv output is rescaled to the largest magnitude `peak` (so that
    ReLU and ReLU6, or the hard and smooth activations, differ on it, and no scale compounds with depth) and
    each quantizer's input is compared with each activation of each conv output of its shape. Leaves the
    quantizers' calibration state as it was."""
    outs, ins = {}, {}
    quantizers = {n: m for n, m in student.named_modules() if isinstance(m, ActQuantizer)}
    state = {n: (q.calibrating, q._range, q._hist) for n, q in quantizers.items()}

    def scaled(name):
        def hook(mod, args, out):
            outs[name] = out * (peak / out.abs().max().clamp_min(1e-12))
            return outs[name].clone()   # the forward goes on with a copy: an in-place activation leaves outs
        return hook
    with ExitStack() as stack:
        for n in convs:
            stack.callback(student.get_submodule(n).register_forward_hook(scaled(n)).remove)
        for n, q in quantizers.items():
            stack.callback(q.register_forward_pre_hook(lambda m, args, n=n: ins.__setitem__(n, args[0].clone())).remove)
            q.calibrating, q._range, q._hist = True, None, None   # pass the input through unchanged
        try:
            eval_forward(student, example, [])
        finally:
            for n, q in quantizers.items():
                q.calibrating, q._range, q._hist = state[n]
    found = {}
    for qn, x in ins.items():
        for cn, y in outs.items():
            if y.shape != x.shape:
                continue
            tol = 1e-4 * y.abs().max().item() + 1e-6
            act = next((a for a, f in ACTIVATIONS.items() if torch.allclose(f(y), x, rtol=1e-4, atol=tol)), None)
            if act is not None:
                found[qn] = (cn, act)
                break
    return found


@torch.no_grad()
def bn_ranges_(student: nn.Module, teacher: nn.Module, example: torch.Tensor,
               method: ActInit | str = QuantSpec.act_init, percentile: float | str = QuantSpec.act_percentile,
               samples: int = 4096, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Set the range of every activation quantizer that reads an activation of a BN-folded conv's output
    (bn_fed_quantizers) from the teacher's BN statistics instead of from images: per channel, `samples`
    draws of act(N(mean, var)) with the folded output's real-data moments (folded_bn_moments), through the
    same range rule as calibrate_. Returns the quantizers it set; the others keep their ranges."""
    moments = folded_bn_moments(teacher, example)
    names = {n for n, _ in student.named_modules()}
    found = bn_fed_quantizers(student, [c for c in moments if c in names], example)
    gen = torch.Generator().manual_seed(seed)
    for qn, (cn, act) in found.items():
        q = student.get_submodule(qn)
        mean, var = (t.float().cpu() for t in moments[cn])
        z = torch.randn(1, mean.numel(), samples, generator=gen)
        x = ACTIVATIONS[act](mean.view(1, -1, 1) + var.sqrt().view(1, -1, 1) * z).to(q.scale.device)
        q.calibrating, q._range, q._hist = True, None, None
        try:
            q(x)
            q.start_histogram_()
            q(x)
        finally:
            q.calibrating = False
        q.init_from_calibration_(method, percentile)
    return found


def float_weights(model: nn.Module) -> tuple[float, list[str]]:
    """The share (%) of a student's weights (its parameters of two or more dimensions) that no quantized layer
    holds, and the kinds of module that hold them: layers GZQ has no quantized form for (a Conv1d or Conv3d,
    attention position tables, layer scales) stay float in every student and in its files."""
    inside = {id(p) for _, w in quant_wrappers(model) for p in w.parameters()}
    total, left, kinds, seen = 0, 0, set(), set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.ndim >= 2 and id(p) not in seen:   # a shared weight once
                seen.add(id(p))
                total += p.numel()
                if id(p) not in inside:
                    left += p.numel()
                    kinds.add(type(module).__name__)
    return (100 * left / total if total else 0.0), sorted(kinds)


def model_size_bytes(model: nn.Module) -> int:
    """Deployed size: quantized weights at their bit-width; biases, scales, zero points and any float
    layer left (e.g. an unfolded BN) at 32 bit."""
    bits = 0
    counted = set()
    for _, w in quant_wrappers(model):
        bits += w.module.weight.numel() * w.w_quant.bits
        counted.add(id(w.module.weight))
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in counted and p.dtype.is_floating_point:
            bits += p.numel() * 32
    return bits // 8
