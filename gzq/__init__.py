"""GZQ: data-free quantization of timm CNNs by Generative Zero-shot Network Quantization (GZNQ)."""
from .config import (ActInit, BNLoss, EvalConfig, ImageParam, ModelSpec, NRule, Protocol, QuantSpec, RunConfig,
                     SynthConfig, TrainConfig, VRule)

__all__ = ["ActInit", "BNLoss", "EvalConfig", "ImageParam", "ModelSpec", "NRule", "Protocol", "QuantSpec",
           "RunConfig", "SynthConfig", "TrainConfig", "VRule"]
