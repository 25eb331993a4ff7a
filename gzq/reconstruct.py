"""Block reconstruction of fake-quant students on the synthetic images (BRECQ, QDrop, Genie-M).

Instead of distilling the whole network end to end, each unit (a residual block, an inverted residual, a
stage of one block, the stem, the classifier) is fitted in execution order so that its output matches the
teacher's, on the teacher's own input to that unit:

    loss  = || unit_q(x_mix) - unit_fp(x_fp) ||^2        (summed over features, mean over the batch;
                                                          train.recon_cap_energy weighs each image by
                                                          image_weights)
          + lambda * sum_w (1 - |2 h(V) - 1|^beta)       (AdaRound's regulariser, after a warm-up)

    x_mix = x_fp where a random mask is set, else x_q    (QDrop: the quantized network's input to the unit,
                                                          with each element kept float with probability p)

Weights: AdaRound learnable rounding, W_q = s * clamp(floor(W / s) + h(V) + z), h(V) the rectified sigmoid,
annealed to 0/1 by the regulariser (beta 20 -> 2); the weight step s stays as calibrated. By default the
forward uses the hard codes (V >= 0) with h(V)'s gradient passed straight through: with the few hundred
steps a CPU budget affords, AdaRound's soft weights never become hard, and the gap between what was fitted
and what is kept cost up to 5 points (README, "Fine-tuning method"). Activations: the
LSQ step sizes (and zero points) of the unit's quantizers are trained with it. When a unit is done its
rounding is made hard and baked into the float weight (W := s * code), so the ordinary fake-quant forward,
the ONNX export and the integer files all compute exactly the learnt codes.

Units come from the model's structure, for any timm CNN: one traced forward records every module's input
and output tensors; starting at the root, a module is split into its children while they chain (each
child's output is the next child's input, as in a stage of blocks or the root's stem / stages / head), and
kept whole otherwise (a residual block, a block with a shortcut, a dense block). Every unit takes one tensor
and returns one tensor, and is called once per forward; no architecture is named anywhere.

With many processes (gzq.dist) every rank captures the same pool and takes its slice of each batch; the
gradients of the rounding variables and step sizes are averaged over ranks, so the students stay identical.

Each unit gets its own pool of fresh draws of f_I(z): the teacher's and the student's inputs to the unit
are captured by running the networks up to it (a forward hook stops the pass there), so what precedes the
unit never needs to chain or be known.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from . import dist
from .events import Progress, StageStarted, Stopped
from .optim import adam, cosine_schedule
from .quant.convert import eval_forward
from .quant.modules import ActQuantizer, QuantWrapper

LAYERS = (QuantWrapper, nn.Conv2d, nn.Linear)
ZETA, GAMMA = 1.1, -0.1          # AdaRound's stretch of the sigmoid: h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)


@dataclass
class ReconSettings:
    """What one reconstruction stage runs (gzq.config.TrainConfig's recon_* fields)."""
    steps: int = 200              # optimisation steps per unit
    batch_size: int = 32
    pool: int = 512               # fresh draws of f_I(z) per unit, sampled into batches
    lr_round: float = 1e-2        # Adam on the rounding variables V
    lr_act: float = 1e-3          # Adam on activation step sizes, relative to their magnitude
    drop: float = 0.5             # QDrop: probability that an input element stays float
    reg: float = 0.01             # AdaRound regulariser weight
    warmup: float = 0.2           # share of the steps before the regulariser starts
    beta: tuple[float, float] = (20.0, 2.0)
    hard_forward: bool = True     # forward with the hard codes (gradient of the soft ones): no soft-to-hard gap
    cap_energy: bool = False      # an image's error counts as if its output energy were at most the pool's median


def recon_settings(cfg, train_images: int) -> ReconSettings:
    """The ReconSettings of a gzq.config.TrainConfig for `train_images` images (TrainConfig.recon_budget)."""
    steps, pool = cfg.recon_budget(train_images)
    return ReconSettings(steps=steps, batch_size=cfg.recon_batch_size, pool=pool, lr_round=cfg.recon_lr_round,
                         lr_act=cfg.recon_lr_act, drop=cfg.recon_drop, reg=cfg.recon_reg,
                         hard_forward=cfg.recon_hard_forward, cap_energy=cfg.recon_cap_energy)


# ------------------------------------------------------------------------------------------ unit discovery

@dataclass
class _Call:
    order: int
    calls: int
    inp: torch.Tensor | None      # the single tensor argument, None when the call took anything else
    out: torch.Tensor | None


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, LAYERS)


def _has_layer(m: nn.Module) -> bool:
    return any(_is_layer(x) for x in m.modules())


@torch.no_grad()
def find_units(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the reconstruction units of `model` in execution order (see the module docstring).

    Every conv / linear layer that is called once with one tensor lies in exactly one unit; a layer used
    otherwise (a shared layer, a layer fed a list) is left out, keeping its calibrated rounding.
    """
    calls: dict[nn.Module, _Call] = {}

    def pre_hook(m, args):   # by entry, so a parent precedes its children
        c = calls.get(m)
        if c is not None:
            c.calls += 1
            return
        inp = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        calls[m] = _Call(len(calls), 1, inp, None)

    def hook(m, args, out):
        c = calls[m]
        if c.calls == 1 and c.out is None and isinstance(out, torch.Tensor):
            c.out = out

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(hook))
    eval_forward(model, example, handles)

    def valid(m: nn.Module) -> bool:
        c = calls.get(m)
        return c is not None and c.calls == 1 and c.inp is not None and c.out is not None

    def first_call(m: nn.Module) -> float:
        """When m (or, for a container the forward never calls, such as an fx GraphModule's, its first
        descendant) ran; inf if never."""
        return min((calls[x].order for x in m.modules() if x in calls), default=math.inf)

    def children(m: nn.Module) -> list[tuple[str, nn.Module]]:
        kids = [(n, c) for n, c in m.named_children() if _has_layer(c) and first_call(c) < math.inf]
        return sorted(kids, key=lambda nc: first_call(nc[1]))

    def chains(m: nn.Module) -> bool:
        """The children run one after another, each reading the previous one's output (layer-free ones such as
        pooling or an activation included), and the parent returns the last one's output."""
        kids = sorted((c for c in m.children() if c in calls), key=lambda c: calls[c].order)
        if not kids or not all(valid(c) for c in kids) or calls[kids[0]].inp is not calls[m].inp:
            return False
        return all(calls[a].out is calls[b].inp for a, b in zip(kids, kids[1:])) and calls[kids[-1]].out is calls[m].out

    units: list[str] = []

    def visit(name: str, m: nn.Module, root: bool = False) -> None:
        if _is_layer(m):
            if valid(m):
                units.append(name)
            return
        kids = children(m)
        composite = sum(not _is_layer(c) for _, c in kids)   # stages and blocks, not single layers
        if not root and valid(m) and not (composite >= 2 and chains(m)):
            units.append(name)
            return
        for n, c in kids:
            visit(f"{name}.{n}" if name else n, c)

    visit("", model, root=True)
    return units


# -------------------------------------------------------------------------------------- learnable rounding

class LearnedRounding(nn.Module):
    """Stands in for a QuantWrapper's weight quantizer while its unit is reconstructed (AdaRound)."""

    def __init__(self, wrapper: QuantWrapper, hard_forward: bool = True):
        super().__init__()
        self.hard_forward = hard_forward
        wq = wrapper.w_quant
        w = wrapper.module.weight.detach()
        shape = (-1,) + (1,) * (w.ndim - 1)
        self.register_buffer("scale", wq.effective_scale().view(shape))
        self.register_buffer("zero_point", torch.round(wq.zero_point.detach()).view(shape))
        self.qmin, self.qmax = wq.qmin, wq.qmax
        x = w / self.scale
        self.register_buffer("base", torch.floor(x))
        rest = (x - self.base).clamp(1e-4, 1 - 1e-4)          # the fraction h(V) starts at: nearest rounding's input
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self) -> torch.Tensor:
        if self.hard:
            up = (self.v >= 0).to(self.base.dtype)
        elif self.hard_forward:   # the codes the unit will keep, with AdaRound's gradient passed straight through
            soft = self.h()
            up = soft + ((self.v >= 0).to(soft.dtype) - soft).detach()
        else:
            up = self.h()
        return torch.clamp(self.base + up + self.zero_point, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:   # w: the float weight, ignored (its floor is in base)
        return (self.codes() - self.zero_point) * self.scale

    def effective_scale(self) -> torch.Tensor:
        """(O,) the weight step, as WeightQuantizer.effective_scale (an int32 bias is coded with it)."""
        return self.scale.flatten()

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class _Reached(Exception):
    """Raised by a capture hook once the unit's tensors are in hand: the rest of the pass is not needed."""


def _capture(model: nn.Module, unit: nn.Module, x: torch.Tensor, output: bool) -> tuple[torch.Tensor, ...]:
    """The unit's input (and output) when `model` runs on x; stops the pass at the unit."""
    box: list = []

    def pre_hook(m, args):
        box.append(args[0].detach().clone() if output else args[0].detach())   # clone: the unit may act in place
        if not output:
            raise _Reached

    def hook(m, args, out):
        box.append(out.detach())
        raise _Reached

    handles = [unit.register_forward_pre_hook(pre_hook)] + ([unit.register_forward_hook(hook)] if output else [])
    try:
        model(x)
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
    if not box:
        raise RuntimeError(f"the reconstruction unit {type(unit).__name__} was not called by the forward pass")
    return tuple(box)


def _beta(frac: float, s: ReconSettings) -> float:
    """AdaRound's annealed exponent at this share of a unit's steps after the warm-up."""
    t = (frac - s.warmup) / max(1 - s.warmup, 1e-8)
    return s.beta[1] + 0.5 * (s.beta[0] - s.beta[1]) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def _unit_optimizer(unit: nn.Module, roundings: list[LearnedRounding], s: ReconSettings) -> torch.optim.Adam:
    groups = [{"params": [r.v for r in roundings], "lr": s.lr_round}] if roundings else []
    for q in (m for m in unit.modules() if isinstance(m, ActQuantizer)):
        groups.append({"params": [q.scale], "lr": s.lr_act * float(q.scale.detach().abs().clamp_min(1e-8))})
        if isinstance(q.zero_point, nn.Parameter):
            groups.append({"params": [q.zero_point], "lr": s.lr_act * 10})
    return adam(groups)


def iter_reconstruct(reference: nn.Module, students: dict[str, nn.Module], draw: Callable[[torch.Tensor], torch.Tensor],
                     train_idx: torch.Tensor, settings: ReconSettings, device: torch.device, seed: int = 0,
                     stop: Callable[[], bool] = lambda: False) -> Iterator:
    """Reconstruct every student in place, unit by unit. Yields StageStarted and one Progress per step
    (Progress.block names the unit, Progress.losses holds each student's reconstruction error per output
    element); returns the number of steps run.

    Args:
        reference: the float network with each student's structure: the teacher with its BatchNorms folded
            (gzq.quant.convert.fold_bn_), so a unit's float output is what the student's unit must match.
        draw: indices -> a fresh draw of those synthetic images (augmented as for fine-tuning), on device.
    """
    example = draw(train_idx[:2].to(device))
    units = find_units(next(iter(students.values())), example)
    if not units:
        raise ValueError("no reconstruction unit found in the student (no conv / linear layer called once "
                         "with one tensor); use --finetune kd")
    gen = torch.Generator().manual_seed(seed + 11)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 12 + (7919 * dist.rank() if dist.world_size() > 1 else 0))
    total = len(units) * settings.steps
    pool_n = max(settings.pool, settings.batch_size)
    yield StageStarted("reconstruct", total, f"{len(units)} blocks x {settings.steps} steps, "
                                             f"{pool_n} fresh draws per block")
    t0, step = time.perf_counter(), 0
    for s in students.values():
        s.eval().requires_grad_(False)
    for name in units:
        idx = train_idx[torch.randint(len(train_idx), (pool_n,), generator=gen)]
        t_unit = reference.get_submodule(name)
        fp_in, fp_out, q_in = [], [], {n: [] for n in students}
        with torch.no_grad():
            for chunk in torch.split(idx, settings.batch_size * 2):
                x = draw(chunk.to(device))
                a, b = _capture(reference, t_unit, x, output=True)
                fp_in.append(a)
                fp_out.append(b)
                for n, st in students.items():
                    q_in[n].append(_capture(st, st.get_submodule(name), x, output=False)[0])
        fp_in, fp_out = torch.cat(fp_in), torch.cat(fp_out)
        q_in = {n: torch.cat(v) for n, v in q_in.items()}
        weight = image_weights(fp_out) if settings.cap_energy else None
        state = {}
        for n, st in students.items():
            unit = st.get_submodule(name)
            wrappers = [m for m in unit.modules() if isinstance(m, QuantWrapper)]
            roundings = []
            for w in wrappers:
                r = LearnedRounding(w, settings.hard_forward).to(device)
                w.__dict__["_saved_w_quant"] = w.w_quant
                w.w_quant = r
                roundings.append(r)
            for q in (m for m in unit.modules() if isinstance(m, ActQuantizer)):
                q.requires_grad_(True)
            opt = _unit_optimizer(unit, roundings, settings)
            sched = cosine_schedule(opt, settings.steps)
            state[n] = (unit, wrappers, roundings, opt, sched)
        try:
            for i in range(settings.steps):
                if stop():
                    yield Stopped("reconstruct", step)
                    return step
                b = dist.local_slice(torch.randint(pool_n, (settings.batch_size,), generator=gen)).to(device)
                target = fp_out[b]
                frac = i / max(settings.steps, 1)
                beta = _beta(frac, settings)
                losses = {}
                for n, (unit, _, roundings, opt, sched) in state.items():
                    x_q, x_fp = q_in[n][b], fp_in[b]
                    if settings.drop > 0:
                        keep = torch.rand(x_q.shape, generator=dev_gen, device=device) < settings.drop
                        x_q = torch.where(keep, x_fp, x_q)
                    err = (unit(x_q) - target).pow(2).flatten(1).sum(1)
                    rec = (err * weight[b]).mean() if weight is not None else err.mean()
                    loss = rec
                    if frac >= settings.warmup and roundings:
                        loss = loss + settings.reg * sum(r.regulariser(beta) for r in roundings)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    dist.average_gradients_(p for g in opt.param_groups for p in g["params"])
                    opt.step()
                    sched.step()
                    losses[n] = rec.item() / target[0].numel()
                step += 1
                yield Progress("reconstruct", step, total, time.perf_counter() - t0, losses=losses, block=name)
        finally:
            for unit, wrappers, roundings, _, _ in state.values():
                _finish_unit(unit, wrappers, roundings)
    for n, st in students.items():
        dist.check_identical(st, f"student {n}")
    return step


def image_weights(out: torch.Tensor) -> torch.Tensor:
    """Per-image weights of the reconstruction error: median / max(energy, median), the energy being an
    image's summed squared output. An image at or under the median counts fully; one that carries many times
    the typical energy (a few synthetic images can hold most of a layer's variance) counts as a median one,
    so it no longer decides the unit's step sizes and rounding alone."""
    e = out.pow(2).flatten(1).sum(1)
    med = e.median().clamp_min(torch.finfo(e.dtype).tiny)
    return med / e.clamp_min(med)


@torch.no_grad()
def _finish_unit(unit: nn.Module, wrappers: list[QuantWrapper], roundings: list[LearnedRounding]) -> None:
    """Make the unit's rounding hard, bake it into the float weights and put the weight quantizers back."""
    for w, r in zip(wrappers, roundings):
        r.hard = True
        w.module.weight.copy_(r(w.module.weight))
        w.w_quant = w.__dict__.pop("_saved_w_quant")
    for q in (m for m in unit.modules() if isinstance(m, ActQuantizer)):
        q.requires_grad_(False)
