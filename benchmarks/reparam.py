"""Re-parameterisable networks: quantize the training form (each branch its own conv) or the fused one?

    python benchmarks/reparam.py                                  # the zoo's four such models, ~10 min
    python benchmarks/reparam.py --models repvgg_32 --json ''     # one model, no results file
    python benchmarks/reparam.py --models '' --checkpoint ghostnetv3_050:DIR/ghostnetv3_48.safetensors --json ''

RepVGG, MobileOne, FastViT and RepViT train with parallel conv + BN branches that timm's
`reparameterize_model` fuses into one conv for inference (same function, fewer and cheaper layers). A GZQ run
quantizes either form (students.fuse_branches: false keeps the branches, true fuses, auto, the default, picks
per student by the held-out KL). This benchmark measures what each form gives on the zoo's trained models
(scripts/train_zoo.py): for each bit-width a student of each form is calibrated on the same real training images
(post-training quantization, no synthesis or KD, so that only the form differs) and scored on real test images;
then the W8A8 deployable ONNX files of every form are timed in onnxruntime, interleaved, and each fused file's
latency is given as a ratio to the branched one. Two fused forms: "fused" is what students.fuse_branches=true
builds (a fused conv whose identity-like diagonal taps would dominate its weight grid keeps them apart as a
depthwise 1x1 conv, gzq.quant.convert.split_identity_), "plain" fuses everything into one conv each.
Writes benchmarks/results/reparam.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from export import _random_timm, latency_samples, session
from timm.utils.model import reparameterize_model

from gzq.config import SPLIT_MIN_GAIN, ModelSpec, Protocol, QuantSpec
from gzq.data import load_dataset, to_model_input
from gzq.evaluate import predict_logits, top1
from gzq.export import export_onnx
from gzq.models import load_teacher
from gzq.quant import calibrate_, create_student
from gzq.quant.convert import SplitConv

MODELS = ("repvgg_32", "mobileone_48", "repvit_64", "fastvit_64")
BITS = ("w8a8", "w4a4")
#: students.fuse_branches and create_student's split_min_gain of each form
FORMS = {"branches": (False, SPLIT_MIN_GAIN), "fused": (True, SPLIT_MIN_GAIN), "plain": (True, math.inf)}


def n_convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def measure(model: torch.nn.Module, input_size, classifier, calib: torch.Tensor, test: torch.Tensor,
            labels: torch.Tensor, work: Path, bits=BITS, seconds: float = 2.0) -> dict:
    """Top-1 of the FP model and of each form's calibrated student at each of `bits`, and the W8A8
    deployable files' batch-1 latency (each fused form / branched, one thread)."""
    model = model.eval()
    fused = reparameterize_model(model).eval()
    dev = torch.device("cpu")
    split = create_student(model, QuantSpec(8, 8, fuse_branches=True), torch.zeros(2, *input_size), classifier)
    row = {"convs": n_convs(model), "fused_convs": n_convs(fused),
           "split_convs": sum(isinstance(m, SplitConv) for m in split.modules()),
           "fp": top1(predict_logits(model, test, dev), labels),
           "fused_fp": top1(predict_logits(fused, test, dev), labels)}
    example = torch.zeros(2, *input_size)
    for b in bits:
        for form, (fuse, gain) in FORMS.items():
            s = create_student(model, dataclasses.replace(QuantSpec.parse(b), fuse_branches=fuse), example, classifier,
                               split_min_gain=gain)
            with torch.no_grad():
                calibrate_(s, calib.split(64))
                row[f"{b}_{form}"] = top1(predict_logits(s, test, dev), labels)
    row.update(file_latency(model, input_size, classifier, calib, work, seconds))
    return row


def file_latency(model: torch.nn.Module, input_size, classifier, calib: torch.Tensor, work: Path,
                 seconds: float = 2.0) -> dict:
    """Batch-1 latency (median ms, one thread) of each form's W8A8 deployable ONNX file, timed interleaved so that
    load from other processes falls on all alike, and each fused file's as a ratio to the branched one's."""
    example, paths = torch.zeros(2, *input_size), {}
    for form, (fuse, gain) in FORMS.items():
        s = create_student(model, QuantSpec(8, 8, Protocol.DEPLOYABLE, fuse_branches=fuse), example, classifier,
                           split_min_gain=gain)
        with torch.no_grad():
            calibrate_(s, calib.split(64))
        paths[form] = Path(export_onnx(s.eval(), work / f"{form}.onnx", input_size)["path"])
    sessions = {form: session(p, 1) for form, p in paths.items()}
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    samples = {form: [] for form in sessions}
    for _ in range(3):
        for form, sess in sessions.items():
            samples[form] += latency_samples(sess, x, 5, seconds / 3)
    out = {f"ms_{form}": statistics.median(samples[form]) for form in sessions}
    return {**out, "fused_latency_ratio": out["ms_fused"] / out["ms_branches"],
            "plain_latency_ratio": out["ms_plain"] / out["ms_branches"]}


def format_table(rows: list[dict], bits=BITS) -> str:
    acc = "".join(f"{f'{b} ' + form:>16}" for b in bits for form in FORMS)
    head = (f"{'model':<14}{'arch':<15}{'convs':>14}{'FP':>7}{'fused FP':>10}{acc}{'W8A8 file ms':>14}"
            f"{'fused x':>9}{'plain x':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        a = "".join(f"{r[f'{b}_{form}']:>16.2f}" for b in bits for form in FORMS)
        lines.append(f"{r['model']:<14}{r['arch']:<15}{r['convs']:>5}->{r['fused_convs']:<4}({r['split_convs']:>2})"
                     f"{r['fp']:>7.2f}{r['fused_fp']:>10.2f}{a}{r['ms_branches']:>14.2f}"
                     f"{r['fused_latency_ratio']:>8.2f}x{r['plain_latency_ratio']:>8.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    from train_zoo import ZOO, ensure_trained
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--checkpoint", action="append", default=[], metavar="ARCH:PATH",
                   help="also a model outside the zoo: its timm architecture and a checkpoint trained on a bundled "
                        "dataset (scripts/train_default_model.py); repeatable")
    p.add_argument("--calib-images", type=int, default=256, help="real training images the students calibrate on")
    p.add_argument("--test-images", type=int, default=5000)
    p.add_argument("--timm", default="", help="also these timm architectures at 224 px, random weights: the files' "
                                              "latency only, e.g. repvgg_a0,mobileone_s0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "reparam.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    models = [(name, ZOO[name].arch, None) for name in args.models.split(",") if name in ZOO]
    unknown = [m for m in args.models.split(",") if m and m not in ZOO]
    if unknown:
        raise SystemExit(f"unknown zoo model {unknown[0]!r}; the zoo has {', '.join(ZOO)}")
    for c in args.checkpoint:
        arch, _, path = c.partition(":")
        if not path or not Path(path).is_file():
            raise SystemExit(f"--checkpoint {c!r}: give ARCH:PATH with an existing checkpoint file")
        models.append((Path(path).stem, arch, path))
    for name, arch, path in models:
        t = load_teacher(ModelSpec(name=arch, checkpoint=str(path or ensure_trained(name))))
        xs, ys = load_dataset(t.dataset, "train")
        idx = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))[:args.calib_images]
        calib = to_model_input(xs[idx], t.mean, t.std, t.input_size)
        xt, yt = load_dataset(t.dataset, "test")
        test = to_model_input(xt[:args.test_images], t.mean, t.std, t.input_size)
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(t.model, t.input_size, t.classifier, calib, test, yt[:args.test_images], Path(tmp))
        rows.append(dict(model=name, arch=arch, **row))
        print(f"  {name} done", flush=True)
    lat = []
    for arch in [a for a in args.timm.split(",") if a]:
        m, _ = _random_timm(arch)
        with tempfile.TemporaryDirectory() as tmp:
            r = file_latency(m, (3, 224, 224), m.pretrained_cfg["classifier"], torch.randn(32, 3, 224, 224),
                             Path(tmp), seconds=4.0)
        lat.append(dict(model=f"{arch} (224 px)", convs=n_convs(m), fused_convs=n_convs(reparameterize_model(m)), **r))
        print(f"  {arch} done", flush=True)
    print(f"post-training quantization on {args.calib_images} real training images, top-1 % on "
          f"{args.test_images} test images; W8A8 deployable ONNX, batch 1, {args.threads} thread(s), median ms;\n"
          f"fused: students.fuse_branches=true ((n) convs keep their diagonal taps apart at 8 bits), plain: one conv "
          f"each")
    print(format_table(rows))
    if lat:
        print("\nW8A8 deployable ONNX at 224 px, random weights, batch 1, median ms")
        print(f"{'model':<26}{'convs':>10}{'branches ms':>13}{'fused ms':>10}{'fused x':>9}{'plain x':>9}")
        for r in lat:
            print(f"{r['model']:<26}{r['convs']:>5}->{r['fused_convs']:<3}{r['ms_branches']:>14.2f}"
                  f"{r['ms_fused']:>10.2f}{r['fused_latency_ratio']:>8.2f}x{r['plain_latency_ratio']:>8.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"zoo": rows, "timm_224": lat}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
