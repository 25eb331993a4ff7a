"""Where a W4A4 gap lies: calibrate the activation ranges on one image set, fine-tune by KD on another.

    python scripts/calibration_swap.py --model mobilenetv3_224 --seeds 0,1,2 --pairs synth:synth,real:synth,synth:real
    python scripts/calibration_swap.py --model mobilenetv2_64 --seeds 0,1,2 --pairs bn:synth
    python scripts/calibration_swap.py --model mobilenetv2_64 --seeds 0 --ranges
    python scripts/calibration_swap.py --model mobilenetv2 --seeds 0 --pairs synth:synth --trace 1
    python scripts/calibration_swap.py --model efficientnet_48 --seeds 0,1 --fit
    python scripts/calibration_swap.py --model efficientnet_48 --seeds 0 --percentiles
    python scripts/calibration_swap.py --model lcnet_128 --seeds 0 --follow [--set train.epochs=90]
    python scripts/calibration_swap.py --model lcnet_128 --seeds 0 --parts

For each seed, the synthetic images are benchmarks/finetune.py's cached ones (made there if missing; 196 x 177
at 224 px, 128 x 150 otherwise, no student ensemble) and the real ones as many training images of the
teacher's data set. Each pair CAL:KD builds a fresh W4A4 student, calibrates it on CAL's training images,
then runs the default KD on KD's training images; real top-1 on the first 5,000 test images after
calibration and after KD, one JSON line per run. synth:synth is the harness's own KD column.

CAL = bn calibrates on the synthetic images with their statistics corrected to the teacher's BN layers: in
one forward of all of them, each BN-folded conv output of the student is shifted and scaled, channel by
channel, to the mean and standard deviation that the BN's running statistics give for real data (beta and
|gamma| sqrt(var / (var + eps))), so every quantizer downstream sees activations of real-data statistics.
CAL = bnmean shifts each channel to the BN's real-data mean and leaves its spread.
CAL = gauss calibrates on the synthetic images, then sets the range of every quantizer that reads an activation
of a BN-folded conv's output from the teacher's BN statistics alone (gzq.quant.convert.bn_ranges_: samples
of act(N(mean, var)) per channel); the other quantizers keep their synthetic ranges. --ranges compares, without
KD, how far the synthetic and the gauss step sizes of those quantizers are from the ones real images give.

--fit asks where a collapsed W4A4 student fails: real top-1 after calibration alone on synth and real images at
W4A4, W4A8 and W8A4; at W4A4 calibrated on real images, with only one kind of activation quantizer on (named by
its module path without the block index: conv_pw.a_quant, ...); then the default KD on the synthetic images, and
the student's agreement with the teacher on its own training images, its KL in the first and last steps, and its
real top-1.

--follow asks whether the synthetic images teach the student to follow the teacher where it matters: for KD on the
synthetic and on the real training images (--set overrides the fine-tuning config, e.g. train.epochs=90), the
student's top-1 agreement and KL with the teacher on the synthetic training images, the real training images and
512 test images, after calibration alone and after KD, and its real top-1.

--parts asks which part of the synthetic-KD student falls short of the real-KD one: both are fitted by the default
KD, then each top-level part's parameters and buffers (a stage's blocks one by one, e.g. blocks.0) are moved from
the real student into the synthetic one and back, and each hybrid's real top-1 is printed.

--percentiles calibrates the W4A4 student on the synthetic images with the 4-bit activation ranges at several
percentiles and prints, for each, real top-1 after calibration alone and the student's KL to the teacher on the
held-out synthetic images (a data-free signal).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "scripts")]
from accuracy import real_source
from finetune import model_spec, synthetic_source

from gzq.augment import finetune_jitter
from gzq.config import QuantSpec, override, student_specs
from gzq.distill import fit_agreement, iter_distill
from gzq.evaluate import load_labelled_data, predict_logits, top1
from gzq.events import Progress, drain
from gzq.models import load_teacher
from gzq.presets import make_config
from gzq.quant import ActQuantizer, calibrate_, create_student
from gzq.quant.convert import bn_ranges_, folded_bn_moments


@contextmanager
def bn_corrected(student, teacher, example, scale: bool = True):
    """While open, each BN-folded conv output of `student` gets, per channel over the batch, the mean and
    standard deviation the teacher's BN running statistics give for real data (the mean alone without
    `scale`)."""
    handles = []
    for conv, (mean, var) in folded_bn_moments(teacher, example).items():
        beta, sd = mean.view(1, -1, 1, 1), var.sqrt().view(1, -1, 1, 1)

        def fn(m, args, out, beta=beta, sd=sd):
            mean = out.mean((0, 2, 3), keepdim=True)
            if not scale:
                return out - mean + beta
            return (out - mean) / out.std((0, 2, 3), keepdim=True).clamp_min(1e-6) * sd + beta
        handles.append(student.get_submodule(conv).register_forward_hook(fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def setup(model: str, seed: int, bits: str = "w4a4"):
    """(config, teacher, {"synth", "real": image source}, quant spec) of one model and seed."""
    budgets = {"mobilenetv3_224": (196, 177, 20), "mobilenetv2": (256, 300, 40)}   # images, steps, KD epochs
    images, steps, epochs = budgets.get(model, (128, 150, 30))
    cache, dev = ROOT / "benchmarks" / "results" / "finetune_cache", torch.device("cpu")
    spec = model_spec(model, False, cache / "zoo")
    cfg = make_config("cpu", "auto", model=spec, students=[bits], seed=seed,
                      synth={"num_images": images, "holdout_images": images // 8},
                      train={"method": "kd", "epochs": epochs}, eval={"max_real_images": 5000})
    teacher = load_teacher(spec, dev)
    sources = {"synth": synthetic_source(spec, images, steps, seed, cache, model)(teacher, dev),
               "real": real_source(images, images // 8, seed)(teacher, dev)}
    return cfg, teacher, sources, dict(student_specs(cfg))[bits]


@torch.no_grad()
def calibrated(cal: str, teacher, sources, qspec, seed: int):
    """A fresh student calibrated as CAL says, and the quantizers bn_ranges_ set (gauss only)."""
    student = create_student(teacher.model, qspec, torch.zeros(2, *teacher.input_size), teacher.classifier)
    found = {}
    if cal in ("bn", "bnmean"):   # all the images in one batch: the correction uses the whole set's statistics
        x = sources["synth"].images(sources["synth"].train_idx, noise=False)
        with bn_corrected(student, teacher.model, x[:2], scale=cal == "bn"):
            calibrate_(student, [x], qspec.act_init, qspec.act_percentile)
    else:
        src = sources["synth" if cal == "gauss" else cal]
        x = src.images(src.train_idx, noise=False)
        calibrate_(student, torch.split(x, 64), qspec.act_init, qspec.act_percentile)
        if cal == "gauss":
            found = bn_ranges_(student, teacher.model, x[:8], qspec.act_init, qspec.act_percentile, seed=seed)
    return student, found


@torch.no_grad()
def real_top1(student, labelled) -> float:
    return top1(predict_logits(student, labelled.images, torch.device("cpu")), labelled.labels)


@torch.no_grad()
def trace_point(student, held, t_logp, labelled) -> dict:
    """Real top-1 of the student, and its KL to the teacher (log-probabilities t_logp) on the held-out images."""
    kl = torch.nn.functional.kl_div(student(held).log_softmax(1), t_logp, log_target=True, reduction="batchmean")
    return {"accuracy": round(real_top1(student, labelled), 2), "heldout_kl": round(kl.item(), 4)}


def swap_runs(model: str, seed: int, pairs: list[tuple[str, str]], bits: str = "w4a4", trace: int = 0) -> list[dict]:
    cfg, teacher, sources, qspec = setup(model, seed, bits)
    dev = torch.device("cpu")
    labelled = load_labelled_data(teacher, cfg.eval)
    jitter = finetune_jitter(cfg.synth, cfg.train, teacher.input_size)
    rows = []
    for cal, kd in pairs:
        student, _ = calibrated(cal, teacher, sources, qspec, seed)
        calibrated_acc = real_top1(student, labelled)
        k = sources[kd]
        with torch.no_grad():   # the held-out images and the teacher's view of them, once per run
            held = k.images(k.holdout_idx, noise=False)
            t_logp = teacher.model(held).log_softmax(1)
        per_epoch = max(len(k.train_idx) // min(cfg.train.batch_size, len(k.train_idx)), 1)
        for ev in iter_distill(teacher, {bits: student}, k.images, k.train_idx, cfg.train, dev, jitter, k.flip, seed):
            if trace and isinstance(ev, Progress) and ev.step % (trace * per_epoch) == 0:
                print(json.dumps(dict(epoch=ev.step // per_epoch, **trace_point(student, held, t_logp, labelled))),
                      flush=True)
        acc = real_top1(student, labelled)
        rows.append({"model": model, "seed": seed, "calibrate": cal, "kd": kd, "calibrated": round(calibrated_acc, 2),
                     "accuracy": round(acc, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def range_errors(model: str, seed: int, bits: str = "w4a4") -> dict:
    """How far the synthetic images' and the BN statistics' (gauss) step sizes are from those real images give,
    over the quantizers bn_ranges_ sets: the mean of |log(step / real step)|."""
    _, teacher, sources, qspec = setup(model, seed, bits)
    steps, names = {}, []
    for cal in ("real", "synth", "gauss"):
        student, found = calibrated(cal, teacher, sources, qspec, seed)
        steps[cal] = {n: q.effective_scale().item() for n, q in student.named_modules() if isinstance(q, ActQuantizer)}
        names = names or list(found)
    err = {cal: sum(abs(math.log(steps[cal][n] / steps["real"][n])) for n in names) / len(names)
           for cal in ("synth", "gauss")}
    row = {"model": model, "seed": seed, "quantizers": len(steps["real"]), "from_bn": len(names),
           "log_error_synth": round(err["synth"], 4), "log_error_gauss": round(err["gauss"], 4)}
    print(json.dumps(row), flush=True)
    return row


def fit_check(model: str, seed: int) -> dict:
    """Calibration alone at three bit-widths, activation quantizers by kind, and how far default KD fits."""
    row = {"model": model, "seed": seed}
    cfg, teacher, sources, qspec = setup(model, seed)   # the images and data do not depend on the bit-width
    labelled = load_labelled_data(teacher, cfg.eval)
    for bits in ("w4a4", "w4a8", "w8a4"):
        for cal in ("synth", "real"):
            row[f"{bits}_{cal}"] = round(real_top1(calibrated(cal, teacher, sources, QuantSpec.parse(bits), seed)[0],
                                                   labelled), 2)
    student, _ = calibrated("real", teacher, sources, qspec, seed)
    quantizers = [(n, m) for n, m in student.named_modules() if isinstance(m, ActQuantizer)]
    kinds = {}
    for n, m in quantizers:
        kinds.setdefault(re.sub(r"^(blocks|stages|features|layer\d+)\.[\d.]*", "", n), []).append(m)
    row["only"] = {}
    for kind, ms in kinds.items():
        for _, m in quantizers:   # every other quantizer passes its input through
            if all(m is not k for k in ms):
                m.forward = lambda x: x
        row["only"][kind] = round(real_top1(student, labelled), 2)
        for _, m in quantizers:
            m.__dict__.pop("forward", None)
    student, _ = calibrated("synth", teacher, sources, qspec, seed)
    k, kls = sources["synth"], []
    for ev in iter_distill(teacher, {"s": student}, k.images, k.train_idx, cfg.train, torch.device("cpu"),
                           finetune_jitter(cfg.synth, cfg.train, teacher.input_size), k.flip, seed):
        if isinstance(ev, Progress):
            kls.append(ev.student_kl["s"])
    row.update(train_agreement=round(fit_agreement(teacher.model, student, k.images, k.train_idx,
                                                   torch.device("cpu")), 1),
               kl_first=round(sum(kls[:4]) / 4, 3), kl_last=round(sum(kls[-4:]) / 4, 3),
               kd=round(real_top1(student, labelled), 2))
    print(json.dumps(row), flush=True)
    return row


def kd_fitted(cal: str, cfg, teacher, sources, qspec, seed: int, student=None):
    """`student` (default: a fresh one calibrated on the training images of `cal`, synth or real) fitted in place
    by KD on those images."""
    if student is None:
        student, _ = calibrated(cal, teacher, sources, qspec, seed)
    k = sources[cal]
    drain(iter_distill(teacher, {"s": student}, k.images, k.train_idx, cfg.train, torch.device("cpu"),
                       finetune_jitter(cfg.synth, cfg.train, teacher.input_size), k.flip, seed), keep=False)
    return student


def follow_check(model: str, seed: int, overrides: list[str]) -> list[dict]:
    """How closely students fitted on synthetic and on real images follow the teacher on each kind of image."""
    cfg, teacher, sources, qspec = setup(model, seed)
    cfg = override(cfg, *overrides)
    labelled = load_labelled_data(teacher, cfg.eval)
    xs = {k: sources[k].images(sources[k].train_idx, noise=False) for k in ("synth", "real")}
    xs["test"] = labelled.images[:512]
    with torch.no_grad():
        t_logp = {k: teacher.model(x).log_softmax(1) for k, x in xs.items()}

    @torch.no_grad()
    def follows(student):
        out = {}
        for k, x in xs.items():
            s_logp = student(x).log_softmax(1)
            out[k] = {"agreement": round((s_logp.argmax(1) == t_logp[k].argmax(1)).float().mean().item() * 100, 1),
                      "kl": round(torch.nn.functional.kl_div(s_logp, t_logp[k], log_target=True,
                                                             reduction="batchmean").item(), 3)}
        return out

    rows = []
    for cal in ("synth", "real"):
        student, _ = calibrated(cal, teacher, sources, qspec, seed)
        row = {"model": model, "seed": seed, "images": cal, "set": overrides, "calibrated": follows(student)}
        kd_fitted(cal, cfg, teacher, sources, qspec, seed, student)
        row.update(after_kd=follows(student), accuracy=round(real_top1(student, labelled), 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_of(name: str) -> str:
    """A state-dict entry's top-level part: the module under the root, or a stage's block (blocks.0)."""
    bits = name.split(".")
    return ".".join(bits[:2]) if bits[0] in ("blocks", "stages", "features", "layers") and len(bits) > 2 else bits[0]


def part_swaps(model: str, seed: int) -> list[dict]:
    """Real top-1 of the synthetic-KD student with one part from the real-KD student, and the other way round."""
    cfg, teacher, sources, qspec = setup(model, seed)
    labelled = load_labelled_data(teacher, cfg.eval)
    fitted = {cal: kd_fitted(cal, cfg, teacher, sources, qspec, seed) for cal in ("synth", "real")}
    states = {cal: s.state_dict() for cal, s in fitted.items()}
    rows = [{"model": model, "seed": seed, "part": None,
             **{cal: round(real_top1(s, labelled), 2) for cal, s in fitted.items()}}]
    print(json.dumps(rows[0]), flush=True)
    for part in dict.fromkeys(part_of(n) for n in states["synth"]):
        row = {"model": model, "seed": seed, "part": part}
        for dst, src in (("synth", "real"), ("real", "synth")):
            hybrid = copy.deepcopy(fitted[dst])
            hybrid.load_state_dict({n: (states[src] if part_of(n) == part else states[dst])[n] for n in states[dst]})
            row[f"{dst} with {src}'s"] = round(real_top1(hybrid, labelled), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def percentile_check(model: str, seed: int, percentiles=(99.0, 99.5, 99.9, 99.99)) -> dict:
    """Calibration alone at each 4-bit activation percentile: real top-1 and the held-out synthetic KL."""
    cfg, teacher, sources, qspec = setup(model, seed)
    labelled = load_labelled_data(teacher, cfg.eval)
    k = sources["synth"]
    x, held = k.images(k.train_idx, noise=False), k.images(k.holdout_idx, noise=False)
    t_logp = teacher.model(held).log_softmax(1)
    row = {"model": model, "seed": seed}
    base = create_student(teacher.model, qspec, torch.zeros(2, *teacher.input_size), teacher.classifier)
    for pct in percentiles:
        student = copy.deepcopy(base)   # building a student runs the weights' range search: once
        calibrate_(student, torch.split(x, 64), "percentile", pct)
        row[str(pct)] = trace_point(student, held, t_logp, labelled)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv3_224")
    p.add_argument("--seeds", default="0")
    p.add_argument("--pairs", default="synth:synth,real:synth,synth:real")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="also print real top-1 and the held-out KL every N epochs of KD")
    p.add_argument("--fit", action="store_true", help="calibration alone by bit-width and by kind of activation "
                   "quantizer, then how far default KD fits its training images")
    p.add_argument("--percentiles", action="store_true", help="calibration alone at several 4-bit activation "
                   "percentiles: real top-1 and the held-out synthetic KL")
    p.add_argument("--follow", action="store_true", help="agreement and KL with the teacher on synthetic, real "
                   "and test images of students fitted by KD on synthetic and on real images")
    p.add_argument("--parts", action="store_true", help="move each part between the synthetic-KD and the real-KD "
                   "students and measure the hybrids")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config overrides for --follow, e.g. train.epochs=90")
    p.add_argument("--ranges", action="store_true", help="compare the step sizes of synth and gauss with real's "
                   "instead of running KD")
    args = p.parse_args(argv)
    pairs = [tuple(pr.split(":")) for pr in args.pairs.split(",")]
    bad = [pr for pr in pairs
           if len(pr) != 2 or pr[0] not in {"synth", "real", "bn", "bnmean", "gauss"} or pr[1] not in {"synth", "real"}]
    if bad:
        p.error(f"--pairs takes CAL:KD items, CAL synth, real, bn, bnmean or gauss and KD synth or real, got {bad}")
    for seed in (int(s) for s in args.seeds.split(",")):
        if args.percentiles:
            percentile_check(args.model, seed)
        elif args.follow:
            follow_check(args.model, seed, args.set)
        elif args.parts:
            part_swaps(args.model, seed)
        elif args.fit:
            fit_check(args.model, seed)
        elif args.ranges:
            range_errors(args.model, seed)
        else:
            swap_runs(args.model, seed, pairs, trace=args.trace)


if __name__ == "__main__":
    main()
