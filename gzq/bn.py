"""BatchNorm statistics of the teacher and the losses that match synthetic batches to them.

GZNQ appendix 1.1: by the central limit theorem the batch mean and (biased) batch variance of a BN
layer's input are approximately Gaussian around the running statistics:

    mu_hat  ~ N(mu,      sigma^2 / N)
    var_hat ~ N(sigma^2, V / N),   V = Var[(Wx - mu)^2]

so the synthesis loss is their negative log-likelihood. V is 2 sigma^4 for Gaussian activations
(VRule.GAUSSIAN) or the batch's detached 4th central moment minus var_hat^2 (VRule.EMPIRICAL); N is the
batch size (NRule.BATCH) or batch x height x width (NRule.BATCH_SPATIAL). The squared-error loss of
DeepInversion / ZeroQ is kept as the baseline (BNLoss.MSE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import dist
from .config import BNLoss, NRule, VRule
from .models import find_bn_layers

_LOG_2PI = math.log(2 * math.pi)


@dataclass
class BatchStats:
    """Statistics of one BN layer's input over (batch, height, width)."""
    mean: torch.Tensor        # (C,)
    var: torch.Tensor         # (C,), biased
    m4: torch.Tensor | None   # (C,), 4th central moment, detached (only for VRule.EMPIRICAL)
    batch: int                # B
    spatial: int              # H * W (1 for BatchNorm1d on (B, C))


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of x over every dim but 1, with a one-pass backward.

    Forward sums x - shift and its square (shifting by a value near the mean, the BN's running mean, keeps
    the variance free of cancellation). Backward is one multiply-add over x:
    dL/dx = g_mean / N + g_var * 2 (x - mean) / N. On CPU this is about 3x faster than autograd through
    torch.var_mean, which matters because it runs on every BN layer at every synthesis step.
    """

    @staticmethod
    def forward(ctx, x, shift):
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        n = x.numel() // x.shape[1]
        d = x - shift.view(shape)
        mean_d = d.sum(dims) / n
        var = ((d * d).sum(dims) / n - mean_d * mean_d).clamp_min(0)
        mean = mean_d + shift
        ctx.save_for_backward(x, mean)
        ctx.n, ctx.shape = n, shape
        return mean, var

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        a = g_var * (2.0 / ctx.n)
        b = g_mean / ctx.n - a * mean
        return torch.addcmul(b.view(ctx.shape), x, a.view(ctx.shape)), None


class _GlobalChannelMoments(torch.autograd.Function):
    """_ChannelMoments over the union of every rank's batch (gzq.dist): the shifted sums and the count are
    all-reduced, so each rank gets the statistics of the global batch. The backward needs no communication:
    every rank computes the same loss of the same global statistics, so g_mean and g_var agree across ranks,
    and dL/dx of this rank's x is the single-process formula with the global mean and N."""

    @staticmethod
    def forward(ctx, x, shift):
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        d = x - shift.view(shape)
        sums = torch.cat([d.sum(dims), (d * d).sum(dims), d.new_tensor([x.numel() // x.shape[1]])])
        dist.all_reduce_(sums)                                       # (2C + 1,): sum d, sum d^2, count
        c = x.shape[1]
        n = sums[-1]
        mean_d = sums[:c] / n
        var = (sums[c:2 * c] / n - mean_d * mean_d).clamp_min(0)
        mean = mean_d + shift
        ctx.save_for_backward(x, mean)
        ctx.n, ctx.shape = float(n), shape
        ctx.mark_non_differentiable(n)
        return mean, var, n

    @staticmethod
    def backward(ctx, g_mean, g_var, _):
        return _ChannelMoments.backward(ctx, g_mean, g_var)


def channel_moments(x: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of x, (B, C, ...) -> (C,), (C,); differentiable in x.

    `shift`, (C,), is any value near the channel means (it only serves numerical accuracy); default 0.
    """
    if shift is None:
        shift = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    return _ChannelMoments.apply(x, shift.detach().to(x.dtype))


def global_channel_moments(x: torch.Tensor, shift: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """channel_moments over the batches of all ranks together (each passes its own x), and the number of
    values behind each channel's statistics. In a single process: channel_moments and x's count."""
    if shift is None:
        shift = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    mean, var, n = _GlobalChannelMoments.apply(x, shift.detach().to(x.dtype))
    return mean, var, int(n)


class BNStatsRecorder:
    """Forward pre-hooks on every BN layer of `model` that record its input statistics.

    Use as a context manager so the hooks are always removed. `stats` holds one BatchStats per BN layer
    for the latest forward, in the order of `layers`. With `across_ranks`, the statistics are those of the
    global batch, every rank's together (gzq.dist; BatchStats.batch is then the global batch size); the
    fourth moment of VRule.EMPIRICAL stays this rank's.
    """

    def __init__(self, model: nn.Module, need_m4: bool = False, across_ranks: bool = False):
        self.layers = find_bn_layers(model)
        if not self.layers:
            raise ValueError("the model has no BatchNorm layers")
        self.need_m4 = need_m4
        self.across_ranks = across_ranks
        self.stats: list[BatchStats | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_pre_hook(self._make_hook(i)) for i, (_, m) in enumerate(self.layers)]
        self._constants: dict[str, torch.Tensor] | None = None
        self.paused = False   # True: forwards leave `stats` alone (and, across ranks, run no collective)

    def _make_hook(self, i: int):
        def hook(module, args):
            if self.paused:
                return
            x = args[0]  # (B, C, H, W) or (B, C)
            if x.dtype in (torch.bfloat16, torch.float16):   # mixed precision: statistics in float32
                x = x.float()
            dims = [0] + list(range(2, x.ndim))
            spatial = math.prod(x.shape[2:]) if x.ndim > 2 else 1
            if self.across_ranks:
                mean, var, n = global_channel_moments(x, getattr(module, "running_mean", None))
                batch = n // spatial
            else:
                mean, var = channel_moments(x, getattr(module, "running_mean", None))
                batch = x.shape[0]
            m4 = None
            if self.need_m4:
                with torch.no_grad():
                    shape = [1, -1] + [1] * (x.ndim - 2)
                    m4 = (x - mean.view(shape)).pow(4).mean(dims)
            self.stats[i] = BatchStats(mean, var, m4, batch, spatial)
        return hook

    def constants(self) -> dict[str, torch.Tensor]:
        """The running statistics of all layers as one vector each, (sum C,), and each channel's layer index.
        Cached: the teacher is frozen."""
        if self._constants is None:
            bns = [bn for _, bn in self.layers]
            counts = torch.tensor([bn.num_features for bn in bns], device=bns[0].running_mean.device)
            self._constants = dict(
                mu=torch.cat([bn.running_mean for bn in bns]),
                sigma2=torch.cat([bn.running_var + bn.eps for bn in bns]),
                seg=torch.repeat_interleave(torch.arange(len(bns), device=counts.device), counts),
                counts=counts.to(bns[0].running_mean.dtype),
            )
        return self._constants

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def gaussian_stat_nll(mu_hat, var_hat, mu, sigma2, n, v) -> torch.Tensor:
    """Per-channel NLL of (mu_hat, var_hat) without the constant normaliser, (C,).

    N (mu_hat - mu)^2 / (2 sigma^2) + N (var_hat - sigma^2)^2 / (2 V)
    """
    return n * (mu_hat - mu).pow(2) / (2 * sigma2) + n * (var_hat - sigma2).pow(2) / (2 * v)


def gaussian_stat_log_likelihood(mu_hat, var_hat, mu, sigma2, n, v) -> torch.Tensor:
    """Per-channel log-density log N(mu_hat; mu, sigma^2/N) + log N(var_hat; sigma^2, V/N), (C,)."""
    log_norm = -0.5 * (_LOG_2PI + torch.log(sigma2 / n)) - 0.5 * (_LOG_2PI + torch.log(v / n))
    return log_norm - gaussian_stat_nll(mu_hat, var_hat, mu, sigma2, n, v)


def _segment_mean(values: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (sum C,) within each layer's segment -> (L,)."""
    return torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add(0, seg, values) / counts


def bn_losses(recorder: BNStatsRecorder, kind: BNLoss, n_rule: NRule = NRule.BATCH,
              v_rule: VRule = VRule.GAUSSIAN, first_weight: float = 1.0,
              normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthesis loss L_BN and the per-layer log-likelihood (for plotting) of the latest forward.

    L_BN is the w_l-weighted mean over layers of each layer's channel-mean NLL (or DeepInversion's
    squared-error norm for BNLoss.MSE). The NLL grows linearly with N, so its raw scale depends on the
    batch size and (with N = B x H x W) on the resolution: a 64-px network's likelihood starts hundreds of
    times above a 28-px one's. `normalize` divides it by the layers' mean N, which keeps the relative
    weight the N rule gives each layer but makes the scale that of one value's squared z-scores, O(1) for
    any batch, resolution, depth or width. The log-likelihood is always the GZNQ Gaussian one, so curves of
    both losses can be compared on one axis. All layers' channels are handled as one concatenated
    vector, (sum C,), so the cost does not grow with the number of small per-layer ops.

    Returns:
        loss: scalar with grad; log_likelihood: (L,) detached, mean over channels per layer.
    """
    for i, s in enumerate(recorder.stats):
        if s is None:
            raise RuntimeError(f"BN layer {recorder.layers[i][0]} saw no input in the last forward")
    c = recorder.constants()
    stats = recorder.stats
    mu_hat = torch.cat([s.mean for s in stats])                                   # (sum C,)
    var_hat = torch.cat([s.var for s in stats])
    per_layer_n = [s.batch * s.spatial if n_rule == NRule.BATCH_SPATIAL else s.batch for s in stats]
    n = torch.tensor(per_layer_n, dtype=mu_hat.dtype, device=mu_hat.device)[c["seg"]]
    if v_rule == VRule.EMPIRICAL and all(s.m4 is not None for s in stats):
        m4 = torch.cat([s.m4 for s in stats])
        v = (m4 - var_hat.detach().pow(2)).clamp_min(1e-3 * c["sigma2"].pow(2))
    else:
        v = 2 * c["sigma2"].pow(2)
    nll = gaussian_stat_nll(mu_hat, var_hat, c["mu"], c["sigma2"], n, v)              # (sum C,)
    layer_nll = _segment_mean(nll, c["seg"], c["counts"])                          # (L,)
    if kind == BNLoss.MSE:
        layer_loss = torch.stack([torch.norm(s.mean - bn.running_mean, 2) + torch.norm(s.var - bn.running_var, 2)
                                  for (_, bn), s in zip(recorder.layers, stats)])
    elif normalize:
        layer_loss = layer_nll / torch.tensor(per_layer_n, dtype=mu_hat.dtype).mean()
    else:
        layer_loss = layer_nll
    w = torch.ones(len(stats), device=mu_hat.device)
    w[0] = first_weight
    loss = (layer_loss * w).sum() / w.sum()
    with torch.no_grad():  # log N(mu_hat; mu, sigma^2/N) + log N(var_hat; sigma^2, V/N), channel mean per layer
        log_norm = -0.5 * (2 * _LOG_2PI + torch.log(c["sigma2"] / n) + torch.log(v / n))
        ll = _segment_mean(log_norm, c["seg"], c["counts"]) - layer_nll.detach()
    return loss, ll
