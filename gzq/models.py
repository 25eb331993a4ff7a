"""Load a teacher: the bundled default model, a timm architecture (pretrained from the hub), or a local checkpoint.

Everything about a model comes from timm: `create_model`, `pretrained_cfg` (first conv, classifier) and
`resolve_model_data_config` (input size, mean, std). Nothing is hard-coded per architecture.
"""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ModelSpec
from .data import channel_view

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "default_model.safetensors"


class ModelLoadError(ValueError):
    """A teacher could not be loaded; the message says what was wrong and what to do."""


@dataclass
class Teacher:
    """A full-precision classifier in eval mode with everything synthesis and export need to know."""
    model: nn.Module
    name: str                       # "default" or the timm architecture
    architecture: str
    model_kwargs: dict
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    class_names: list[str] | None = None
    first_conv: str | None = None
    classifier: str | None = None
    dataset: str | None = None      # "fashion-mnist" when a built-in test set exists
    reference_accuracy: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid range of a [0, 1] pixel in normalised space, (1, C, 1, 1) each."""
        mean, std = channel_view(self.mean), channel_view(self.std)
        return (0 - mean) / std, (1 - mean) / std

    def data_config(self) -> dict:
        return dict(architecture=self.architecture, model_kwargs=self.model_kwargs, input_size=list(self.input_size),
                    mean=list(self.mean), std=list(self.std), num_classes=self.num_classes,
                    class_names=self.class_names, first_conv=self.first_conv, classifier=self.classifier)


def find_bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """All BatchNorm layers (timm's BatchNormAct2d included), in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(name: str) -> bool:
    """Whether a timm architecture contains BatchNorm (built on the meta device: no memory, no weights)."""
    import timm
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return bool(find_bn_layers(model))


POPULAR_BN_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "mobilenetv2_100", "mobilenetv3_large_100",
    "mobilenetv3_small_100", "efficientnet_b0", "efficientnet_b1", "regnetx_002", "regnety_004",
    "regnety_016", "resnext50_32x4d", "densenet121", "mnasnet_100", "ghostnet_100",
)


def list_bn_models(pattern: str = "*", pretrained: bool = False, limit: int | None = None) -> list[str]:
    """timm architectures matching `pattern` that contain BatchNorm (ViT, Swin, ConvNeXt are left out).

    Each candidate is built on the meta device, so this costs time (not memory): narrow the pattern.
    """
    import timm
    out = []
    for name in timm.list_models(pattern, pretrained=pretrained):
        try:
            if has_batchnorm(name):
                out.append(name)
        except Exception as e:  # some architectures refuse default kwargs; they are not listable
            log.debug("skipping %s: %s", name, e)
        if limit is not None and len(out) >= limit:
            break
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"checkpoint {path.name} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "give a .safetensors file or a PyTorch state dict saved with torch.save") from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"checkpoint {path.name} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_weights_(model: nn.Module, sd: dict[str, torch.Tensor], arch: str, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        hint = ("check the architecture name, and num_classes / in_chans if the checkpoint was trained with "
                "other values" if mismatched else "check that the checkpoint was saved from this architecture")
        raise ModelLoadError(f"checkpoint {source} does not fit {arch}: {'; '.join(parts)}; {hint}")
    model.load_state_dict(sd)


def _unknown_model_error(name: str) -> ModelLoadError:
    import timm
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for names"
    return ModelLoadError(f"unknown model {name!r}: not 'default' and not a timm architecture{hint}")


def read_model_card(checkpoint: str | Path) -> dict:
    """The JSON card saved next to a checkpoint (<name>.json: architecture, timm kwargs, input size, mean/std,
    class names, dataset), or {} when there is none. scripts/train_default_model.py writes one."""
    path = Path(checkpoint).with_suffix(".json")
    if not path.exists():
        return {}
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model card {path.name} is not valid JSON: {e}") from None
    return card if isinstance(card, dict) and "architecture" in card else {}


def load_teacher(spec: ModelSpec | str = "default", device: torch.device | str = "cpu", **timm_kwargs) -> Teacher:
    """Build the teacher described by `spec`, in eval mode with frozen weights, on `device`.

    "default" is the bundled checkpoint assets/default_model.safetensors with its card. A checkpoint with a
    card (same name, .json) brings its architecture kwargs, input size, mean/std, class names and dataset;
    ModelSpec fields override them. timm_kwargs go to `timm.create_model` (e.g.
    pretrained_cfg_overlay=dict(file=...) to take "pretrained" weights from a local file instead of the hub).
    """
    import timm
    from timm.data import resolve_model_data_config

    if isinstance(spec, str):
        spec = ModelSpec(name=spec)
    checkpoint = Path(spec.checkpoint) if spec.checkpoint else (DEFAULT_WEIGHTS if spec.name == "default" else None)
    card = read_model_card(checkpoint) if checkpoint else {}
    arch = card["architecture"] if spec.name == "default" else spec.name
    if card and card["architecture"] != arch:
        card = {}  # a card for another architecture says nothing about this one
    if not timm.is_model(arch):
        if any(ch in arch for ch in "*?["):
            raise ModelLoadError(f"model name {arch!r} is a pattern; give one timm architecture name")
        raise _unknown_model_error(arch)
    if not has_batchnorm(arch):
        raise ModelLoadError(
            f"{arch} has no BatchNorm layers, and GZNQ synthesises images from BatchNorm statistics; "
            "pick a CNN with BatchNorm (ResNet, MobileNet, EfficientNet, RegNet...), e.g. resnet18")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in card.get("model_kwargs", {}).items()}
    kwargs.update(timm_kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.in_chans is not None:
        kwargs["in_chans"] = spec.in_chans
    if checkpoint is not None:
        sd = _read_state_dict(checkpoint)
        model = timm.create_model(arch, pretrained=False, **kwargs)
        _load_weights_(model, sd, arch, spec.name if spec.name == "default" else checkpoint.name)
    else:
        try:
            model = timm.create_model(arch, pretrained=spec.pretrained, **kwargs)
        except Exception as e:
            raise ModelLoadError(
                f"could not download pretrained weights for {arch} ({type(e).__name__}); check the network, "
                "or upload a checkpoint of the architecture instead") from None
        if not spec.pretrained:
            log.warning("%s is randomly initialised (pretrained=False): synthesis will mirror a random net", arch)
    dc = resolve_model_data_config(model)
    in_chans = spec.in_chans or kwargs.get("in_chans") or dc["input_size"][0]
    input_size = spec.input_size or tuple(card.get("input_size", ())) or (in_chans, *dc["input_size"][1:])
    mean = spec.mean or tuple(card.get("mean", ())) or _fit_channels(dc["mean"], in_chans)
    std = spec.std or tuple(card.get("std", ())) or _fit_channels(dc["std"], in_chans)
    if len(mean) != input_size[0] or len(std) != input_size[0]:
        raise ModelLoadError(f"mean/std have {len(mean)}/{len(std)} entries but the model takes {input_size[0]} channels")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    model.eval().requires_grad_(False).to(device)
    made_for = tuple(card.get("input_size", ())) or (input_size[0], *dc["input_size"][1:])
    outputs = _check_input_size(model, arch, tuple(input_size), made_for, device)
    num_classes = getattr(model, "num_classes", None) or outputs
    class_names = card.get("class_names") or (_imagenet_names() if num_classes == 1000 else None)
    if class_names and len(class_names) != num_classes:
        class_names = None
    kwargs.pop("pretrained_cfg_overlay", None)
    return Teacher(model=model, name=spec.name, architecture=arch, model_kwargs=_jsonable(kwargs),
                   input_size=tuple(input_size), mean=tuple(mean), std=tuple(std), num_classes=int(num_classes),
                   class_names=list(class_names) if class_names else None,
                   first_conv=cfg.get("first_conv"), classifier=cfg.get("classifier"),
                   dataset=card.get("dataset"), reference_accuracy=card.get("test_accuracy"))


def _fit_channels(values, n: int) -> tuple[float, ...]:
    """timm's per-channel mean/std adapted to n input channels (grey models take the channel average)."""
    values = tuple(float(v) for v in values)
    if n == len(values):
        return values
    return (sum(values) / len(values),) * n


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@torch.no_grad()
def _check_input_size(model: nn.Module, arch: str, input_size: tuple, made_for: tuple, device) -> int:
    """One forward of a zero image at `input_size`: the model's number of outputs, or a ModelLoadError that says
    which sizes to give where the network cannot take this one (an input too small for its stem, or a side its
    downsampling does not divide where branches of different strides meet, as in HRNet or DLA)."""
    try:
        return model(torch.zeros(1, *input_size, device=device)).shape[-1]
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
        raise
    except (RuntimeError, AssertionError, ValueError) as e:
        if tuple(input_size) == tuple(made_for):   # the size is not what failed
            raise
        size, made = "x".join(map(str, input_size)), "x".join(map(str, made_for))
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelLoadError(f"{arch} cannot run on {size} inputs ({reason}); give an input size it takes: the one it "
                             f"was made for, {made}, or another its layers allow (sides a multiple of 32 suit most "
                             "networks)") from None


def _imagenet_names() -> list[str] | None:
    try:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    except Exception:  # class names are a nicety
        return None

