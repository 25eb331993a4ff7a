"""The form: plain-language choices -> RunConfig, and an honest model choice.

Nothing here imports Gradio; the layout builds the components from these tables and the run handler
calls `build_config` and `weights_problem` with the form's values.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import timm

from ..config import QuantSpec, RunConfig, override
from ..models import POPULAR_BN_MODELS, _unknown_model_error, has_batchnorm
from ..presets import make_config

DEFAULT_MODEL_LABEL = "Example: clothing photos (ResNet-18 on Fashion-MNIST, bundled, works offline)"

#: (label, value) for the model picker: the bundled model first, then timm CNNs whose weights download
MODEL_CHOICES: list[tuple[str, str]] = [(DEFAULT_MODEL_LABEL, "default")] + [
    (f"{name} (ImageNet; its weights need internet)", name) for name in POPULAR_BN_MODELS]

#: "how small": (label, bits for weights and activations)
BITS_CHOICES: list[tuple[str, int]] = [("8-bit", 8), ("4-bit", 4), ("3-bit", 3), ("2-bit", 2)]

#: "how long": (label, preset); the estimate under the form says what each means on this device
PRESET_CHOICES: list[tuple[str, str]] = [
    ("Quick try", "quick CPU"),
    ("Standard", "standard"),
    ("Paper scale (GPU)", "paper-scale GPU"),
]

#: UI preset -> (library preset, section overrides)
UI_PRESETS: dict[str, tuple[str, dict]] = {
    "quick CPU": ("cpu", dict(synth=dict(num_images=64, holdout_images=8, batch_size=64, steps=40, warmup_steps=15),
                              train=dict(epochs=3), eval=dict(max_real_images=2000))),
    "standard": ("cpu", {}),
    "paper-scale GPU": ("gpu", {}),
}

PROTOCOLS = [("every layer at the chosen bits", "all_layers"),
             ("first and last layer kept at 8 bit", "first_last_8bit"),
             ("every tensor an integer runtime needs (fastest download at 8 bit)", "deployable")]

#: one sentence per technical term, shown with its field under "Advanced"
TIPS: dict[str, str] = {
    "model": "The bundled example, a listed timm classifier, or type any timm name.",
    "bits": "8 bits make the download about 4× smaller than the original and, with the 'integer runtime' "
            "option under Advanced, faster on a CPU; 4 bits about 7.5-8× smaller but not faster (CPUs have no "
            "4-bit kernels, so it runs in float). Fewer bits lose more accuracy (4-bit is a good start).",
    "preset": "Longer runs make better images and a more accurate small model; the estimate below is measured "
              "on this device.",
    "pretrained": "Downloads the model's trained weights from the Hugging Face hub, which needs internet.",
    "random_weights": "Runs on an untrained network: only to try the app, the result classifies nothing.",
    "checkpoint": "A file with your model's trained weights: .safetensors, or a PyTorch state dict "
                  "(read safely: it cannot run code).",
    "num_classes": "How many categories your checkpoint predicts, if not the architecture's usual 1000.",
    "in_chans": "Colour channels of your model's input: 3 for colour, 1 for greyscale.",
    "w_bits": "How many bits store each weight (the learned numbers of the model); fewer bits, smaller file.",
    "a_bits": "How many bits carry the values passed between layers while the model runs.",
    "extra_students": "More bit-widths to train from the same images, e.g. w8a8, w3a3 (w = weights, a = values "
                      "between layers).",
    "protocol": "Whether the first and last layer, the most sensitive ones, keep 8 bits "
                "(the setting of the BRECQ and Genie papers) or get the chosen bits too (GDFQ, SynQ); 'integer "
                "runtime' also quantizes the input, residual sums and pooling, so that at 8 bit onnxruntime "
                "runs every layer on integer kernels (what the download is measured on).",
    "fuse_branches": "For networks trained with parallel branches (RepVGG, MobileOne, FastViT, RepViT, RepGhost): "
                     "quantize the fused form they run in after training, one layer per block, where that keeps the "
                     "small model's answers as close to the original's on test images made for the run; the download "
                     "then runs 1.1 to 5.4 times faster. The log says which form was kept. Networks timm cannot "
                     "re-parameterise are unchanged.",
    "steps": "How many times the synthetic images are improved; more steps, more natural images.",
    "num_images": "How many synthetic images are made to train the small model on.",
    "epochs": "How many passes the small model makes over the synthetic images while it learns.",
    "finetune": "How the small model learns from the original: kd matches its answers (distillation), recon "
                "matches it block by block (learnt rounding), recon+kd does both, calibrate only measures its "
                "ranges (no training); auto calibrates 8-bit models and uses kd below 8 bits.",
    "shift": "Moves each training batch by a few pixels, so the small model also learns the original's answers "
             "for shifted images. If the run warns that a 4-bit model has collapsed, try it off: "
             "on the two benchmark models whose 4-bit results fell furthest short, that gained 8 and 15 points.",
    "num_students": "Small models trained together (the 'students'); 0 means one per bit-width.",
    "seed": "The same seed gives the same images and the same result.",
    "lambda_bn": "Weight of the BatchNorm term (λ BN): how strongly images must match the statistics "
                 "the model saw in training.",
    "lambda_ce": "Weight of the class term (λ CE): how strongly each image must look like its class.",
    "lambda_adv": "Weight of the adversarial term (λ adversarial): how strongly images seek out where the "
                  "small models disagree with the original (KL, a measure of disagreement).",
    "lambda_tv": "Weight of the smoothness term (λ TV): penalises pixel-to-pixel noise.",
    "lambda_l2": "Weight of the brightness term (λ L2): keeps pixel values moderate.",
    "bn_loss": "How image statistics are compared with the model's: likelihood (this method) or squared "
               "error (the older DeepInversion way).",
    "image_param": "reparam: each image is a mean plus learned noise (this method); pixel: plain pixels.",
    "labelled_zip": "A .zip of folders, one per class, with images inside; used only to measure real accuracy.",
}


def default_preset(on_gpu: bool) -> str:
    return "standard" if on_gpu else "quick CPU"


def preset_config(preset: str) -> RunConfig:
    """The RunConfig a UI preset stands for, before any advanced overrides."""
    if preset not in UI_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(UI_PRESETS)}")
    lib_preset, overrides = UI_PRESETS[preset]
    return make_config(lib_preset, **overrides)


ADVANCED_KEYS = ["steps", "num_images", "epochs", "finetune", "shift", "num_students", "seed", "lambda_bn",
                 "lambda_ce", "lambda_adv", "lambda_tv", "lambda_l2", "bn_loss", "image_param"]


def preset_fields(preset: str) -> dict[str, Any]:
    """Values the advanced section shows for a preset (what Run will use unless edited)."""
    cfg = preset_config(preset)
    s = cfg.synth
    return dict(steps=s.steps, num_images=s.num_images, epochs=cfg.train.epochs, finetune=cfg.train.method.value,
                shift=cfg.train.shift, num_students=s.num_students,
                seed=cfg.seed, lambda_bn=s.lambda_bn, lambda_ce=s.lambda_ce, lambda_adv=s.lambda_adv,
                lambda_tv=s.lambda_tv, lambda_l2=s.lambda_l2, bn_loss=s.bn_loss.value, image_param=s.image_param.value)


def _as_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if value is None or value == "":
        raise ValueError(f"{name} is empty; give a whole number")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not f.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value}")
    v = int(f)
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")
    return v


def parse_students(w_bits, a_bits, protocol: str, extra: str | None, fuse_branches: bool = True) -> list[QuantSpec]:
    """The main student (w_bits/a_bits) then the extra ones ('w8a8, w3a3'), all with one protocol, no repeats;
    fuse_branches ticked lets the run fuse re-parameterisable branches where the held-out KL allows ("auto")."""
    main = QuantSpec(w_bits=_as_int("weight bits", w_bits, 2, 8), a_bits=_as_int("activation bits", a_bits, 2, 8),
                     protocol=protocol or "all_layers", fuse_branches="auto" if fuse_branches else False)
    out = [main]
    for tok in (extra or "").replace(";", ",").replace(" ", ",").split(","):
        if tok.strip():
            spec = dataclasses.replace(QuantSpec.parse(tok, protocol=main.protocol), fuse_branches=main.fuse_branches)
            if spec.name not in {s.name for s in out}:
                out.append(spec)
    return out


def model_name(model: str | None) -> str:
    name = (model or "").strip()
    if name == DEFAULT_MODEL_LABEL:
        return "default"
    return next((value for label, value in MODEL_CHOICES if label == name), name)


def build_config(model: str | None, checkpoint: str | None = None, num_classes=None, in_chans=None,
                 pretrained: bool = False, w_bits=4, a_bits=4, protocol: str = "all_layers",
                 extra_students: str | None = "", fuse_branches: bool = True, preset: str = "quick CPU", steps=None,
                 num_images=None, epochs=None, finetune=None, shift=None, num_students=None, seed=None, lambda_bn=None,
                 lambda_ce=None, lambda_adv=None, lambda_tv=None, lambda_l2=None, bn_loss=None, image_param=None,
                 data_dir: str | None = None, device: str = "auto", **_ignored) -> RunConfig:
    """The RunConfig for the form's values. Raises ValueError with a message meant for the user.

    Advanced values left empty take the preset's. When the image count or steps differ from the preset,
    the hold-out images, batch size and warm-up follow them by the library's one rule (gzq.config.override).
    Values the config does not take (random_weights, labelled_zip) are ignored here.
    """
    name = model_name(model)
    if not name:
        raise ValueError("pick a model: the bundled example, one of the listed timm CNNs, or type a timm name")
    if name == "default" and checkpoint:
        raise ValueError("the bundled example takes no checkpoint; to use your own file, type its timm "
                         "architecture in the model box (e.g. resnet18)")
    base = preset_config(preset)
    budget: dict[str, Any] = {}
    if num_images not in (None, ""):
        budget["synth.num_images"] = _as_int("image count", num_images, 2)
    if steps not in (None, ""):
        budget["synth.steps"] = _as_int("steps", steps, 1)
    synth: dict[str, Any] = {}
    for key, val in dict(lambda_bn=lambda_bn, lambda_ce=lambda_ce, lambda_adv=lambda_adv, lambda_tv=lambda_tv,
                         lambda_l2=lambda_l2).items():
        if val not in (None, ""):
            synth[key] = float(val)
    if num_students not in (None, ""):
        synth["num_students"] = _as_int("number of students", num_students, 0, 16)
    if bn_loss:
        synth["bn_loss"] = bn_loss
    if image_param:
        synth["image_param"] = image_param
    train = {"epochs": _as_int("fine-tune epochs", epochs, 0)} if epochs not in (None, "") else {}
    if finetune:
        train["method"] = finetune
    if shift is not None:
        train["shift"] = bool(shift)
    model_spec: dict[str, Any] = dict(name=name, checkpoint=checkpoint or None, pretrained=bool(pretrained))
    if num_classes not in (None, "", 0):
        model_spec["num_classes"] = _as_int("number of classes", num_classes, 1)
    if in_chans not in (None, "", 0):
        model_spec["in_chans"] = _as_int("input channels", in_chans, 1, 4)
    eval_section = {"data": data_dir, "max_real_images": None} if data_dir else {}
    lib_preset, overrides = UI_PRESETS[preset]
    cfg = make_config(lib_preset, device=device, model=model_spec,
                      students=parse_students(w_bits, a_bits, protocol, extra_students, fuse_branches),
                      synth={**overrides.get("synth", {}), **synth}, train={**overrides.get("train", {}), **train},
                      eval={**overrides.get("eval", {}), **eval_section},
                      seed=_as_int("seed", seed, 0) if seed not in (None, "") else base.seed)
    return override(cfg, budget)


def weights_problem(cfg: RunConfig, random_weights: bool = False) -> str | None:
    """Why this model cannot run as asked (it has no trained weights), or None.

    A timm architecture with neither a checkpoint nor a pretrained download is an untrained network: the
    images would mirror noise and the quantized model would classify nothing. It is refused unless the
    user asks for random weights. Unknown names and models without BatchNorm return None here so that
    the loader's own message (with its suggestions) reaches the user.
    """
    m = cfg.model
    if random_weights or m.name == "default" or m.checkpoint or m.pretrained:
        return None
    if not timm.is_model(m.name) or not has_batchnorm(m.name):
        return None
    return (f"{m.name} has no trained weights here, so the result would mean nothing. Give it weights: tick "
            "\"Download its trained weights\" (needs internet), or upload your weights file under \"Use your own "
            "weights file\". To try the app on an untrained network anyway, tick \"random weights (for "
            "testing)\" under Advanced.")


def check_form(values: dict[str, Any], data_dir: str | None = None) -> RunConfig:
    """The RunConfig for the form's values, refused at once (ValueError, a message for the user) when the
    values, the model name or its weights rule the run out: what needs no model load is checked here."""
    cfg = build_config(**values, data_dir=data_dir)
    name = cfg.model.name
    if name != "default" and not timm.is_model(name) and not any(ch in name for ch in "*?["):
        raise _unknown_model_error(name)   # the loader's own message, with its suggestions
    problem = weights_problem(cfg, bool(values.get("random_weights")))
    if problem:
        raise ValueError(problem)
    return cfg
