"""Quantization: pure primitives (primitives), fake-quant modules (modules), model conversion (convert)."""
from .convert import calibrate_, create_student, fold_bn_, model_size_bytes, quantize_
from .modules import ActQuantizer, QuantWrapper, WeightQuantizer
from .primitives import dequantize, fake_quantize, quant_range, quantize

__all__ = ["calibrate_", "create_student", "fold_bn_", "model_size_bytes", "quantize_", "ActQuantizer",
           "QuantWrapper", "WeightQuantizer", "dequantize", "fake_quantize", "quant_range", "quantize"]
