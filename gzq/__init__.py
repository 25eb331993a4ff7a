"""GZQ: data-free quantization of timm CNNs by Generative Zero-shot Network Quantization (GZNQ).

    import gzq
    report = gzq.run(gzq.make_config("cpu", students=["w4a4"]), "runs/x")
"""
from .config import (ActInit, BNLoss, EvalConfig, ImageParam, ModelSpec, NRule, Protocol, QuantSpec, RunConfig,
                     SynthConfig, TrainConfig, VRule, override)

__all__ = ["ActInit", "BNLoss", "EvalConfig", "ImageParam", "ModelSpec", "NRule", "Protocol", "QuantSpec",
           "RunConfig", "SynthConfig", "TrainConfig", "VRule", "make_config", "override", "run"]


def make_config(preset: str | None = None, device: str = "auto", **sections) -> RunConfig:
    """A RunConfig from a budget preset with section overrides (gzq.presets.make_config)."""
    from .presets import make_config as _make_config   # torch loads on first use, not on `import gzq`
    return _make_config(preset, device, **sections)


def run(cfg: RunConfig, out_dir=None, stop=None) -> dict:
    """Run GZNQ end to end and return the report; raises gzq.pipeline.RunStopped if stopped (gzq.pipeline.run)."""
    from .pipeline import run as _run
    return _run(cfg, out_dir, stop)
