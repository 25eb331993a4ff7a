"""Does every kind of timm BN network go through the whole pipeline and come out as files that run without GZQ?

    python benchmarks/architectures.py                          # 42 architectures, ~30 min on one thread
    python benchmarks/architectures.py --protocol deployable    # students an integer runtime runs throughout
    python benchmarks/architectures.py --archs resnet18,cspresnet50 --size 64
    python benchmarks/architectures.py --float-weights          # only: how much of each student stays float

Each architecture is built with random weights and BatchNorm statistics gathered from a few batches of noise
(no download: what is measured is the code path, not accuracy), then run end to end at a tiny budget
(16 images x 4 synthesis steps, one KD epoch, students w4a4 and w8a8, both downloads). For each student the
ONNX file is run in onnxruntime with its default graph optimisations and compared with the fake-quant
student rebuilt from the run's checkpoint, and the integer safetensors file is rebuilt and compared too, on
the same 64 random inputs. A row fails if a stage raises, a file is missing, onnxruntime cannot load or run
it, the integer file does not rebuild the student exactly, or a float form the students start from (BN folded
into the convs; the student with its quantizers taken out) is not the model's own function (`fold`: largest logit
error over 1e-3 of the logit scale, in float64).

How close the ONNX outputs come is reported beside it, not judged: "w4a4 ONNX" / "w8a8 ONNX" are the top-1
agreement with the student, "w8a8 floor" the student's agreement with itself when its input moves by 1e-6
(NUDGE), and `close` in the JSON says whether the file stays within 90 % agreement and a 95th-percentile
logit error of 10 % (or twice what the nudge gives). The file cannot be exact: its float convolutions sum
in another order, so a value that lands on a rounding boundary takes the other code, and in a random network
such a one-step change spreads, most in the deep depthwise ones; the file run with every onnxruntime
optimisation off (`onnx_unoptimised`) departs as far, and so does the student from itself under the nudge.
Trained models are held to tight bounds instead (tests/test_export.py: the bundled ResNet's files agree with
their students on at least 99.5 % of the 10,000 test images).
"int8 convs" is the share of the W8A8 file's convolutions that onnxruntime runs as integer kernels
(QLinearConv) after its QDQ fusions. Writes benchmarks/results/architectures[_deployable].json.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import torch  # noqa: E402

from gzq.models import find_bn_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLD_TOLERANCE = 1e-3   # the folded float form's largest logit error, relative to the logit scale
NUDGE = 1e-6   # the input change (x N(0, 1) per value) that measures how far rounding flips alone move a student

#: (architecture, family); chosen to cover the families timm has with BatchNorm, small variants for speed
ARCHS = [
    ("resnet18", "ResNet"), ("resnet50d", "ResNet-D"), ("seresnext26d_32x4d", "SE-ResNeXt"),
    ("ecaresnet26t", "ECA-ResNet"), ("skresnet18", "selective kernel"), ("legacy_seresnet18", "SENet (legacy)"),
    ("res2net50_26w_4s", "Res2Net"), ("resnet18d", "ResNet-D"),
    ("mobilenetv2_050", "MobileNetV2"), ("mobilenetv3_small_050", "MobileNetV3"),
    ("mobilenetv4_conv_small", "MobileNetV4"), ("efficientnet_lite0", "EfficientNet-Lite"),
    ("tf_efficientnet_b0", "EfficientNet (TF 'same' padding)"), ("mixnet_s", "MixNet"),
    ("fbnetc_100", "FBNet"), ("spnasnet_100", "SPNASNet"), ("hardcorenas_a", "HardCoReNAS"),
    ("tinynet_e", "TinyNet"), ("lcnet_050", "LCNet"),
    ("ghostnetv2_100", "GhostNetV2"), ("repghostnet_050", "RepGhost"),
    ("regnetz_005", "RegNetZ"), ("regnetx_002", "RegNetX"),
    ("rexnet_100", "ReXNet"), ("gernet_s", "GENet (ByobNet)"),
    ("dla34", "DLA"), ("dpn48b", "DPN"), ("densenet121", "DenseNet"), ("hrnet_w18_small", "HRNet"),
    ("cspresnet50", "CSPNet"), ("cs3darknet_s", "CSP-Darknet"), ("darknet17", "Darknet"),
    ("ese_vovnet19b_dw", "VoVNet"), ("selecsls42b", "SelecSLS"),
    ("vgg11_bn", "VGG-BN"), ("repvgg_a0", "RepVGG"), ("mobileone_s0", "MobileOne"),
    ("convmixer_768_32", "ConvMixer"), ("efficientvit_b0", "EfficientViT (MIT, conv + linear attention)"),
    ("mobilevit_xxs", "MobileViT"), ("fastvit_t8", "FastViT"), ("xception41", "Xception"),
]


def _teacher_checkpoint(arch: str, size: int, folder: Path) -> tuple[Path, int]:
    """Random weights with BatchNorm running statistics from three train-mode batches of noise: (the
    checkpoint, the number of BN layers)."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, num_classes=10)
    bns = find_bn_layers(m)
    for _, mod in bns:
        mod.momentum = None               # a plain average of the batches
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, size, size) * 0.8 + 0.1)
    path = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path, len(bns)


def _fold_error(arch: str, ckpt: Path, size: int, protocol: str = "all_layers") -> dict:
    """How far the float forms the students start from depart from the model itself, on 8 random inputs: the
    BN-folded copy that block reconstruction and KD's unit terms fit to (gzq.distill.folded_copy), and a W4A4
    student of `protocol` with its quantizers taken out (BN folded, CondConv expanded, every rewrite the
    conversion makes). Each must be the model's function. In float64: a deep random network can turn float32's
    rounding differences into large output changes (see NUDGE), which float64 keeps far below the tolerance."""
    from gzq.config import ModelSpec, QuantSpec
    from gzq.distill import folded_copy
    from gzq.models import load_teacher
    from gzq.quant.convert import create_student, quant_wrappers
    from gzq.quant.modules import ActQuantizer
    teacher = load_teacher(ModelSpec(name=arch, checkpoint=str(ckpt), num_classes=10, input_size=(3, size, size)),
                           torch.device("cpu"))
    teacher.model.double()
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    student = create_student(teacher.model, QuantSpec.parse("w4a4", protocol), x[:2], teacher.classifier).eval()
    for _, w in quant_wrappers(student):
        w.w_quant = torch.nn.Identity()
    for q in student.modules():
        if isinstance(q, ActQuantizer):
            q.calibrating = True    # passes its input through
    out = {}
    with torch.no_grad():
        ref = teacher.model(x)
        for name, form in (("folded", folded_copy(teacher, x[:2])), ("student", student)):
            y = form(x)
            error = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            out[name] = {"agree": round(100 * (y.argmax(1) == ref.argmax(1)).float().mean().item(), 2),
                         "max_rel": float(f"{error:.3g}")}
    return {"max_rel": max(v["max_rel"] for v in out.values()), **out}


def _compare(a: torch.Tensor, ref: torch.Tensor) -> dict:
    """Top-1 agreement (%) and each image's largest logit error relative to the logit scale: 95th percentile
    and maximum."""
    per_image = (a - ref).abs().amax(1) / max(ref.abs().max().item(), 1e-12)
    return dict(agree=round(100 * (a.argmax(1) == ref.argmax(1)).float().mean().item(), 2),
                p95_rel=round(per_image.quantile(0.95).item(), 5), max_rel=round(per_image.max().item(), 5))


def _within(onnx: dict, floor: dict) -> bool:
    """The ONNX file is as close to the student as the bounds, or as the student is to itself under NUDGE."""
    return (onnx["agree"] >= min(90, floor["agree"] - 10) and onnx["p95_rel"] <= max(0.1, 2 * floor["p95_rel"])
            and onnx["max_rel"] <= max(0.25, 2 * floor["max_rel"]))


def check(arch: str, size: int, folder: Path, seed: int = 0, protocol: str = "all_layers") -> dict:
    """One architecture end to end; a row of the table."""
    import gzq
    from gzq.checkpoint import load_int_weights, load_student
    from gzq.export import onnx_session, run_onnx
    from gzq.config import QuantSpec
    row = dict(arch=arch, size=size, protocol=protocol, ok=False)
    specs = [QuantSpec.parse(b, protocol) for b in ("w4a4", "w8a8")]
    t0 = time.perf_counter()
    stage = "build"
    try:
        ckpt, row["bn_layers"] = _teacher_checkpoint(arch, size, folder)
        stage = "fold"
        row["fold"] = _fold_error(arch, ckpt, size, protocol)
        if row["fold"]["max_rel"] > FOLD_TOLERANCE:
            raise RuntimeError(f"the students' float form (BN folded) is not the model: {row['fold']}")
        stage = "pipeline"
        cfg = gzq.make_config("cpu", "cpu", model=dict(name=arch, checkpoint=str(ckpt), num_classes=10,
                                                       input_size=(3, size, size)),
                              students=specs, seed=seed,
                              synth=dict(num_images=16, holdout_images=4, steps=4, warmup_steps=2, batch_size=8),
                              train=dict(epochs=1, batch_size=8))
        report = gzq.run(dataclasses.replace(cfg, time_budget_s=None), folder / "run")   # the budget as given
        x = torch.randn(64, 3, size, size, generator=torch.Generator().manual_seed(1))
        row["fused"] = [s["name"] for s in report["students"] if s.get("fuse_branches")]   # fuse_branches=auto's pick
        stage = "files"
        for s in report["students"]:
            s = {**s, "name": s["name"].removesuffix("_dep").removesuffix("_fl8"), "file": s["name"]}
            files = s.get("files") or {}
            errors = {k: v["error"] for k, v in files.items() if "error" in v}
            if errors or {"onnx", "safetensors_int"} - set(files):
                raise RuntimeError(f"{s['name']}: downloads missing or failed: {errors or sorted(files)}")
            student, _, _ = load_student(folder / "run" / "students" / f"{s['file']}.safetensors")
            with torch.no_grad():
                ref = student(x)
                nudged = student(x + NUDGE * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
                rebuilt = load_int_weights(folder / "run" / files["safetensors_int"]["path"])[0](x)
            path = str(folder / "run" / files["onnx"]["path"])
            out = run_onnx(onnx_session(path, threads=1), x)
            as_written = run_onnx(onnx_session(path, threads=1, optimization="none"), x)
            row[s["name"]] = dict(onnx=_compare(out, ref), onnx_unoptimised=_compare(as_written, ref),
                                  int_file=_compare(rebuilt, ref), floor=_compare(nudged, ref))
            if s["name"] == "w8a8":   # the share of convolutions onnxruntime runs as int8 kernels
                opt = folder / "optimised.onnx"
                onnx_session(path, optimization="extended", optimized_path=opt)
                ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
                row["int8_convs"] = round(100 * ops["QLinearConv"] / max(ops["QLinearConv"] + ops["Conv"], 1), 1)
        row["ok"] = all(row[n]["int_file"]["max_rel"] <= 1e-4 for n in ("w4a4", "w8a8"))
        if not row["ok"]:
            row["error"] = "the integer file does not rebuild the student"
        row["close"] = all(_within(row[n]["onnx"], row[n]["floor"]) for n in ("w4a4", "w8a8"))
    except Exception as e:  # noqa: BLE001 - every failure is a row
        row["error"] = f"{stage}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["traceback"] = traceback.format_exc()[-2000:]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict], families: dict[str, str]) -> str:
    head = (f"{'architecture':<24}{'family':<36}{'BN':>5}  {'w4a4 ONNX':>10}{'w8a8 ONNX':>10}{'w8a8 floor':>11}"
            f"{'int8 convs':>11}{'s':>7}  result")
    lines = [head]
    for r in rows:
        cols = [f"{r[n]['onnx']['agree']:.1f}%" if n in r else "-" for n in ("w4a4", "w8a8")]
        cols.append(f"{r['w8a8']['floor']['agree']:.1f}%" if "w8a8" in r else "-")
        result = "ok" if r["ok"] else r.get("error", "failed")
        lines.append(f"{r['arch']:<24}{families.get(r['arch'], ''):<36}{r.get('bn_layers') or '-':>5}  "
                     f"{cols[0]:>10}{cols[1]:>10}{cols[2]:>11}{r.get('int8_convs', '-'):>10}%{r['seconds']:>7.1f}"
                     f"  {result}")
    n_ok = sum(r["ok"] for r in rows)
    lines.append(f"{n_ok} of {len(rows)} architectures pass; the ONNX outputs stay close on "
                 f"{sum(r.get('close', False) for r in rows)}")
    return "\n".join(lines)


def float_weight_rows(archs: list[str], size: int, protocol: str) -> list[dict]:
    """The share of each architecture's W4A4 student weights that no quantized layer holds (random weights; the
    student is only built, not run): layers GZQ has no quantized form for stay float."""
    import timm

    from gzq.config import QuantSpec
    from gzq.quant.convert import create_student, float_weights
    rows = []
    for arch in archs:
        try:
            m = timm.create_model(arch, pretrained=False, num_classes=10).eval()
            if not find_bn_layers(m):
                rows.append({"arch": arch, "float_weights_pct": None, "modules": ["no BatchNorm: refused"]})
            else:
                s = create_student(m, QuantSpec.parse("w4a4", protocol), torch.zeros(2, 3, size, size))
                share, kinds = float_weights(s)
                rows.append({"arch": arch, "float_weights_pct": round(share, 6), "modules": kinds})
        except Exception as e:  # noqa: BLE001 (a name timm does not know, a size the model cannot take)
            failed = f"failed: {type(e).__name__}: {e}"[:200]
            rows.append({"arch": arch, "float_weights_pct": None, "modules": [failed]})
        r = rows[-1]
        print(f"{arch:<28}{'-' if r['float_weights_pct'] is None else r['float_weights_pct']:>8} %  "
              f"{', '.join(r['modules'])}", flush=True)
    return rows


def fold_rows(archs: list[str], size: int, protocol: str = "all_layers") -> list[dict]:
    """For each architecture (random weights, BN statistics from noise): how many BN layers the students fold
    into a conv, and how far their float forms depart from the model (`_fold_error`); nothing else is run."""
    from gzq.quant.convert import trace_layers
    rows = []
    for arch in archs:
        try:
            with tempfile.TemporaryDirectory() as d:
                ckpt, bns = _teacher_checkpoint(arch, size, Path(d))
                import timm
                model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
                folded = len({b for _, b in trace_layers(model, torch.zeros(2, 3, size, size)).conv_bn_pairs})
                row = {"arch": arch, "bn_layers": bns, "folded": folded,
                       "fold": _fold_error(arch, ckpt, size, protocol)}
        except Exception as e:  # noqa: BLE001 (a name timm does not know, a size the model cannot take)
            row = {"arch": arch, "error": f"{type(e).__name__}: {e}"[:200]}
        row["ok"] = "fold" in row and row["fold"]["max_rel"] <= FOLD_TOLERANCE
        rows.append(row)
        print(f"{arch:<28}" + (f"{row['folded']:>4} of {row['bn_layers']:>4} BN folded, largest logit error "
                               f"{row['fold']['max_rel']:.2e}{'' if row['ok'] else '  NOT THE MODEL'}"
                               if "fold" in row else f"  {row['error']}"), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", help="comma-separated timm names (default: the list in this file)")
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--protocol", default="all_layers", choices=["all_layers", "deployable"],
                   help="the students' quantization protocol (deployable: every tensor an integer runtime reads)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/architectures[_PROTOCOL].json)")
    p.add_argument("--float-weights", action="store_true",
                   help="only build each W4A4 student and report the share of its weights left float")
    p.add_argument("--fold", action="store_true",
                   help="only check that the students' float forms (BN folded, quantizers taken out) are the model's "
                        "function")
    args = p.parse_args(argv)
    archs = args.archs.split(",") if args.archs else [a for a, _ in ARCHS]
    if args.float_weights or args.fold:
        rows = (fold_rows if args.fold else float_weight_rows)(archs, args.size, args.protocol)
        if args.out:
            out = {"size": args.size, "protocol": args.protocol, "rows": rows}
            args.out.write_text(json.dumps(out, indent=1) + "\n")
        skipped = ("has no BatchNorm", "Unknown model")   # refused, or not a timm name: nothing to check
        return 0 if not args.fold or all(r["ok"] or any(k in r.get("error", "") for k in skipped) for r in rows) else 1
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "architectures.json" if args.protocol == "all_layers" else f"architectures_{args.protocol}.json")
    logging.basicConfig(level=logging.WARNING)
    families = dict(ARCHS)
    rows = []
    for arch in archs:
        with tempfile.TemporaryDirectory() as d:
            row = check(arch, args.size, Path(d), protocol=args.protocol)
        rows.append(row)
        print(f"{arch}: {'ok' if row['ok'] else row.get('error')} ({row['seconds']} s)", flush=True)
    print(table(rows, families))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(size=args.size, protocol=args.protocol, torch=torch.__version__, rows=rows),
                                   indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
