"""Student checkpoints, in both formats a run writes, and the one way to rebuild a student from them.

Float checkpoint: `students/<name>.safetensors`, the fake-quant student's state dict (BN-folded float weights,
step sizes, zero points), and a `.json` beside it with its QuantSpec and the teacher's data config.

Integer safetensors: per quantized layer `<layer>.weight` (int8/uint8 codes), `<layer>.weight_scale` (O,),
`<layer>.weight_zero_point` (O,) int32, `<layer>.bias` (float; added as int32 codes of step input_scale x
weight_scale where the JSON says `int_bias`), `<layer>.input_scale` / `.input_zero_point`
(per tensor); every other tensor of the student (an unfolded BN, a layer scale, the step sizes and zero
points of the deployable protocol's tensor quantizers) as float under its state-dict name; plus a JSON
with the quantization spec, the per-layer and per-tensor bit widths and the data config.

Both rebuild the fake-quant student exactly through `rebuild_student`: the architecture from timm, BN
folded, the quantizers of the spec, then the saved tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Protocol, QuantSpec
from .quant.convert import create_student, quant_wrappers, split_names
from .quant.graph import tensor_quantizers
from .quant.integer import find_layer_quants, find_tensor_quants
from .quant.primitives import dequantize

INT_FORMAT_VERSION = 1


def rebuild_student(data_config: dict, spec: QuantSpec, split: list[str] | None = None) -> nn.Module:
    """The fake-quant student of `spec` for a teacher's saved data config (Teacher.data_config()): the
    architecture from timm with random weights, BN folded, quantizers in place, ready for saved tensors.
    `split`: the fused convs that kept their diagonal taps apart (gzq.quant.convert.split_names of the saved
    student; chosen from the teacher's weights, so not re-chosen from random ones)."""
    import timm
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config["model_kwargs"].items()}
    model = timm.create_model(data_config["architecture"], pretrained=False, **kwargs).eval()
    example = torch.zeros(1, *data_config["input_size"])
    return create_student(model, spec, example, data_config.get("classifier"), split=split or [])


def save_student(path: str | Path, student: nn.Module, spec: QuantSpec, data_config: dict,
                 teacher_name: str | None = None) -> None:
    """Student weights (BN-folded float weights, step sizes, zero points) + the spec needed to rebuild it."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}, str(path))
    meta = {"quant_spec": spec.to_dict(), "teacher": data_config, "teacher_name": teacher_name,
            "int_bias_layers": [n for n, w in quant_wrappers(student) if w.has_int_bias],
            "split_taps": split_names(student)}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def load_student(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, QuantSpec, dict]:
    """Rebuild a saved float checkpoint exactly (rebuild_student, then the saved tensors).

    Returns:
        (student in eval mode, its QuantSpec, the data config).
    """
    from safetensors.torch import load_file
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    spec = QuantSpec.from_dict(meta["quant_spec"])
    dc = meta["teacher"]
    student = rebuild_student(dc, spec, meta.get("split_taps"))
    _keep_int_biases(student, meta.get("int_bias_layers"), spec)
    sd = load_file(str(path))
    _check_same_tensors(path, dc, sd, student.state_dict())
    student.load_state_dict(sd)
    return student.to(device).eval().requires_grad_(False), spec, dc


def _check_same_tensors(path: Path, dc: dict, saved, rebuilt) -> None:
    """A clear error where the saved tensors are not the ones the rebuilt student has."""
    diff = sorted(set(saved) ^ set(rebuilt))
    if diff:
        raise ValueError(
            f"{path.name} does not fit the {dc['architecture']} student this version of gzq builds: {len(diff)} "
            f"tensors differ ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''}). Files an earlier gzq wrote "
            "for a student it built otherwise are such files: deployable-protocol files of networks with SiLU, "
            "hard-swish or squeeze-excite gates written before those tensors were quantized, and MixNet students "
            "(mixed-kernel convs) written before the BN after their convs was folded into them; quantize the model "
            "again to get a file for this version.")


def _keep_int_biases(student: nn.Module, names, spec: QuantSpec) -> None:
    """Leave the int32 bias (QuantWrapper.set_int_bias_input) only on the layers that had it when saved. A file
    that does not list them predates int32 biases outside the deployable protocol."""
    if names is None:
        if spec.protocol == Protocol.DEPLOYABLE:
            return
        names = ()
    for n, w in quant_wrappers(student):
        if n not in names:
            w.set_int_bias_input(None)


def _int_json_path(path: Path) -> Path:
    return path.with_suffix(".json")


@torch.no_grad()
def save_int_weights(student: nn.Module, path: str | Path, spec: QuantSpec, data_config: dict) -> dict[str, Any]:
    """Integer weights, scales, zero points and float remainder of `student` (+ `<stem>.json` beside it).

    Returns:
        {"path", "bytes", "json"}.
    """
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = find_layer_quants(student)
    tensors: dict[str, torch.Tensor] = {}
    prefixes = tuple(f"{lq.name}." for lq in layers)
    for k, v in student.state_dict().items():                 # what is not a quantized layer stays float
        if not k.startswith(prefixes):
            tensors[k] = v.detach().cpu().contiguous()
    for lq in layers:
        n = lq.name
        code_type = torch.int8 if lq.w_qmin < 0 else torch.uint8   # codes always lie in [qmin, qmax]
        tensors[f"{n}.weight"] = lq.codes.to(code_type).contiguous()
        tensors[f"{n}.weight_scale"] = lq.w_scale.contiguous()
        tensors[f"{n}.weight_zero_point"] = lq.w_zero_point.to(torch.int32).contiguous()
        if lq.bias is not None:
            tensors[f"{n}.bias"] = lq.bias.contiguous()
        if lq.a_bits is not None:
            tensors[f"{n}.input_scale"] = lq.a_scale.reshape(()).contiguous()
            tensors[f"{n}.input_zero_point"] = torch.tensor(lq.a_zero_point, dtype=torch.int32)
    meta = dict(format="gzq-int", version=INT_FORMAT_VERSION, quant_spec=spec.to_dict(), data_config=data_config,
                layers={lq.name: lq.meta() for lq in layers}, split_taps=split_names(student),
                tensors={a.prefix[:-1]: dict(bits=a.bits, qmin=a.qmin, qmax=a.qmax, numel=a.numel)
                         for a in find_tensor_quants(student)},
                formula="x_hat = (q - zero_point) * scale; q = clamp(round_half_even(x / scale) + zero_point, "
                        "qmin, qmax); weights per output channel (axis 0), inputs per tensor; a layer with "
                        "int_bias adds its bias as round_half_even(bias / step) * step, step = input_scale * "
                        "weight_scale (int32 codes, as QLinearConv), the others in float")
    save_file(tensors, str(path), metadata={"format": "gzq-int", "version": str(INT_FORMAT_VERSION)})
    jpath = _int_json_path(path)
    jpath.write_text(json.dumps(meta, indent=2) + "\n")
    return dict(path=str(path), bytes=path.stat().st_size, json=str(jpath))


@torch.no_grad()
def load_int_weights(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, QuantSpec, dict]:
    """Rebuild the fake-quant student from integer safetensors: architecture from timm, BN folded,
    quantizers, then weights = dequantized codes and step sizes whose forward value is the stored scale.

    Returns:
        (student in eval mode, its QuantSpec, the data config).
    """
    from safetensors.torch import load_file
    path = Path(path)
    meta = json.loads(_int_json_path(path).read_text())
    if meta.get("format") != "gzq-int":
        raise ValueError(f"{path} is not a gzq integer-weights file (its JSON has no format 'gzq-int')")
    spec = QuantSpec.from_dict(meta["quant_spec"])
    dc = meta["data_config"]
    student = rebuild_student(dc, spec, meta.get("split_taps"))
    tensors = load_file(str(path))
    wrappers = dict(quant_wrappers(student))
    if set(wrappers) != set(meta["layers"]):
        raise ValueError(f"{path.name} does not fit {dc['architecture']}: quantized layers differ "
                         f"({sorted(set(wrappers) ^ set(meta['layers']))[:3]}...)")
    _check_same_tensors(path, dc, meta.get("tensors", {}), dict(tensor_quantizers(student)))
    sd = {}
    prefixes = tuple(f"{n}." for n in wrappers)
    for k, v in tensors.items():
        if not k.startswith(prefixes):
            sd[k] = v
    _keep_int_biases(student, [n for n, lm in meta["layers"].items() if lm.get("int_bias")], spec)
    for n, w in wrappers.items():
        lm = meta["layers"][n]
        codes = tensors[f"{n}.weight"].to(torch.int64)
        scale, zp = tensors[f"{n}.weight_scale"].float(), tensors[f"{n}.weight_zero_point"].float()
        if (w.w_quant.bits, w.w_quant.symmetric) != (lm["w_bits"], lm["w_symmetric"]):
            raise ValueError(f"layer {n}: file has w{lm['w_bits']} symmetric={lm['w_symmetric']}, "
                             f"the spec rebuilds w{w.w_quant.bits} symmetric={w.w_quant.symmetric}")
        view = (-1,) + (1,) * (codes.ndim - 1)
        sd[f"{n}.module.weight"] = dequantize(codes.float(), scale.view(view), zp.view(view))
        if f"{n}.bias" in tensors:
            sd[f"{n}.module.bias"] = tensors[f"{n}.bias"]
        sd[f"{n}.w_quant.scale"] = scale.float()
        sd[f"{n}.w_quant.zero_point"] = zp
        if w.a_quant is not None:
            w.a_quant.numel = int(lm["a_numel"])                     # sets the LSQ gain of the step size
            s = tensors[f"{n}.input_scale"].float()
            sd[f"{n}.a_quant.scale"] = s.float()
            sd[f"{n}.a_quant.zero_point"] = tensors[f"{n}.input_zero_point"].float()
    for n, aq in tensor_quantizers(student):                      # deployable protocol: tensor quantizers
        aq.numel = int(meta["tensors"][n]["numel"])
    _check_same_tensors(path, dc, sd, student.state_dict())
    student.load_state_dict(sd, strict=True)
    return student.to(device).eval().requires_grad_(False), spec, dc
