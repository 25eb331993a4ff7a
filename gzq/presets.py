"""Budget presets and the RunConfig they give: what fits a 2-core CPU in a few minutes, and a GPU budget."""
from __future__ import annotations

import copy

import torch

from . import dist
from .config import ModelSpec, QuantSpec, RunConfig

# Presets: what fits a 2-core CPU in a few minutes on the bundled model, and a GPU budget near the paper's.
# time_budget_s caps the run: on a costlier model the images and steps shrink to fit (gzq.budget).
PRESETS: dict[str, dict] = {
    "cpu": dict(synth=dict(num_images=256, holdout_images=32, batch_size=96, steps=300, warmup_steps=100),
                train=dict(epochs=40, batch_size=64), time_budget_s=600),
    "gpu": dict(synth=dict(num_images=1024, holdout_images=128, batch_size=256, steps=2000, warmup_steps=500),
                train=dict(epochs=100, batch_size=128), time_budget_s=3600),
}


def resolve_device(name: str) -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> a torch.device; under torchrun a bare "cuda" is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        device = torch.device("cuda", dist.local_rank())
    return device


def make_config(preset: str | None = None, device: str = "auto", **sections) -> RunConfig:
    """A RunConfig from a preset ("cpu", "gpu", or None = chosen by device) with section overrides.

    Args:
        sections: model=ModelSpec|dict, students=[QuantSpec|str], synth=dict, train=dict, eval=dict, seed=int.
    """
    if preset is None:
        preset = "gpu" if resolve_device(device).type == "cuda" else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = copy.deepcopy(PRESETS[preset])
    d = RunConfig().to_dict()
    d["synth"].update(base["synth"])
    d["train"].update(base["train"])
    d["time_budget_s"] = base.get("time_budget_s")
    for key, val in sections.items():
        if val is None:
            continue
        if key == "students":
            d[key] = [QuantSpec.parse(v).to_dict() if isinstance(v, str) else
                      (v.to_dict() if isinstance(v, QuantSpec) else v) for v in val]
        elif key == "model":
            d[key] = val.to_dict() if isinstance(val, ModelSpec) else {**d[key], **val}
        elif isinstance(val, dict):
            d[key].update(val)
        else:
            d[key] = val
    d["device"], d["preset"] = device, preset
    return RunConfig.from_dict(d)
