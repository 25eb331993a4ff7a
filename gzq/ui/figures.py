"""The run's live plots: the BN-statistic log-likelihood over synthesis, each student's KL to the teacher over
synthesis then fine-tuning, and, when the students are fitted block by block, each block's reconstruction
error. Pure functions of a RunView."""
from __future__ import annotations

import bisect
import functools
import math

import numpy as np
import plotly.graph_objects as go

from .view import RunView

PLOT_MAX_POINTS = 400      # per trace; longer histories are strided


def _stride(n: int) -> int:
    return max(1, math.ceil(n / PLOT_MAX_POINTS))


@functools.lru_cache(maxsize=8)
def _empty_figure(title: str, note: str) -> go.Figure:
    """A placeholder plot. Cached: building a plotly figure costs a noticeable fraction of a second on a
    busy CPU, and the page shows these at the start of every run. Not to be modified by callers."""
    fig = go.Figure()
    fig.update_layout(title=title, template="plotly_white", height=300, margin=dict(l=50, r=20, t=50, b=40),
                      annotations=[dict(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)],
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def bn_figure(view: RunView) -> go.Figure:
    """BN-statistic log-likelihood over synthesis steps: the mean (bold) and each BN layer (thin)."""
    title = "Image quality<br><sup>BN-statistic log-likelihood, higher is better</sup>"
    if not view.bn_steps:
        return _empty_figure(title, "appears when synthesis starts")
    k = _stride(len(view.bn_steps))
    xs = view.bn_steps[::k]
    fig = go.Figure()
    n_layers = min((len(r) for r in view.bn_layers), default=0)
    if n_layers:   # every layer in one trace of numpy arrays, lines separated by NaN gaps: a trace per layer,
        # or Python lists, cost plotly's validation half a second a figure on a network of a hundred BN layers
        per_layer = np.array([r[:n_layers] for r in view.bn_layers[::k]], dtype=float).T     # (layers, points)
        gaps = np.full((n_layers, 1), np.nan)
        fig.add_trace(go.Scatter(
            x=np.hstack([np.broadcast_to(np.asarray(xs, dtype=float), per_layer.shape), gaps]).ravel(),
            y=np.hstack([per_layer, gaps]).ravel(),
            customdata=np.repeat(np.arange(1, n_layers + 1), len(xs) + 1), mode="lines",
            name=f"per layer ({n_layers})", line=dict(width=1, color="#1f77b4"), opacity=0.35,
            hovertemplate="BN layer %{customdata}: %{y:.3g}"))
    fig.add_trace(go.Scatter(x=xs, y=view.bn_total[::k], mode="lines", name="mean over layers",
                             line=dict(width=3, color="#d62728")))
    fig.update_layout(title=title, template="plotly_white", height=300, margin=dict(l=50, r=20, t=50, b=40),
                      xaxis_title="synthesis step", yaxis_title="log-likelihood per channel",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def kl_figure(view: RunView) -> go.Figure:
    """KL(teacher || student) per student over synthesis then fine-tuning steps (log scale once the values
    span a decade or more)."""
    title = "Distance to the original<br><sup>KL per small model, lower is better</sup>"
    if not view.kl:
        return _empty_figure(title, "appears once the students join (after the warm-up)")
    fig = go.Figure()
    values = [y for _, ys in view.kl.values() for y in ys if y > 0]
    span = max(values) / min(values) if values else 1.0
    for name, (xs, ys) in view.kl.items():
        k = _stride(len(xs))
        fig.add_trace(go.Scatter(x=xs[::k], y=[max(y, 1e-8) for y in ys[::k]], mode="lines+markers",
                                 marker=dict(size=3), name=name))
    if view.finetune_offset is not None:
        fig.add_vline(x=view.finetune_offset + 0.5, line_dash="dash", line_color="grey",
                      annotation_text="fine-tune", annotation_position="top right")
    fig.update_layout(title=title, template="plotly_white", height=300, margin=dict(l=50, r=20, t=50, b=40),
                      xaxis_title="step (synthesis, then fine-tuning)", yaxis_title="KL(teacher ‖ student)",
                      yaxis=dict(type="log") if span >= 10 else dict(type="linear"),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def recon_figure(view: RunView) -> go.Figure:
    """Each student's reconstruction error over the steps of block reconstruction, one block after another
    (thin lines mark where a block starts; hovering a point names its block)."""
    title = "Block by block<br><sup>reconstruction error of the block being fitted, lower is better</sup>"
    if not view.recon:
        return _empty_figure(title, "appears when the small models are fitted block by block<br>"
                                    "(Advanced, how the small model learns: recon)")
    starts = [s for s, _ in view.recon_blocks]
    names = [b for _, b in view.recon_blocks]
    fig = go.Figure()
    for name, (xs, ys) in view.recon.items():
        k = _stride(len(xs))
        xs_k = xs[::k]
        blocks = [names[max(bisect.bisect_right(starts, x) - 1, 0)] for x in xs_k]
        fig.add_trace(go.Scatter(x=xs_k, y=[max(y, 1e-12) for y in ys[::k]], mode="lines", name=name,
                                 customdata=blocks, hovertemplate="block %{customdata}<br>error %{y:.3g}"))
    # block boundaries as one list of shapes (add_vline per block costs ~10 ms each)
    shapes = [dict(type="line", xref="x", yref="paper", x0=x - 0.5, x1=x - 0.5, y0=0, y1=1,
                   line=dict(width=1, color="lightgrey")) for x in starts[1:]]
    fig.update_layout(title=title, template="plotly_white", height=300, margin=dict(l=50, r=20, t=50, b=40),
                      shapes=shapes,
                      xaxis_title=f"step ({len(starts)} blocks so far)", yaxis_title="mean squared error",
                      yaxis=dict(type="log"), legend=dict(orientation="h", y=-0.25))
    return fig
