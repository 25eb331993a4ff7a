"""The run's two live plots: the BN-statistic log-likelihood over synthesis, and each student's KL to the
teacher over synthesis then fine-tuning. Pure functions of a RunView."""
from __future__ import annotations

import functools
import math

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
    for j in range(n_layers):
        fig.add_trace(go.Scatter(x=xs, y=[r[j] for r in view.bn_layers[::k]], mode="lines", name=f"BN layer {j + 1}",
                                 line=dict(width=1), opacity=0.35, legendgroup="layers",
                                 showlegend=j == 0, legendgrouptitle_text=None))
    if n_layers:
        fig.data[0].name = f"per layer ({n_layers})"
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
