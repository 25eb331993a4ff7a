"""Which stage do the images serve well: activation calibration, or KD fine-tuning?

    python benchmarks/stages.py                           # MobileNetV2 W4A4, seed 0 (~6 min on 2 cores)
    python benchmarks/stages.py --model default --bits w3a3 --seeds 0,1

Three image sets of the same size (GZNQ likelihood synthesis without students, squared-error synthesis,
real training images) are swapped between the two stages of the pipeline: every row calibrates a fresh
student on one set and fine-tunes it (CPU preset KD recipe) on another, or not at all. Real top-1 on the
Fashion-MNIST test set. Writes benchmarks/results/stages_<model>_<bits>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accuracy import MODELS, MSE_LAMBDA_BN, parse_bits, real_source  # noqa: E402
from gzq.config import EvalConfig, FlipMode, SynthConfig, TrainConfig  # noqa: E402
from gzq.distill import iter_distill  # noqa: E402
from gzq.evaluate import kl_score, load_labelled_data, predict_logits, top1  # noqa: E402
from gzq.models import load_teacher  # noqa: E402
from gzq.events import drain  # noqa: E402
from gzq.presets import PRESETS, resolve_device  # noqa: E402
from gzq.quant import calibrate_, create_student  # noqa: E402
from gzq.augment import finetune_jitter  # noqa: E402
from gzq.synthesis import iter_synthesize  # noqa: E402

ROWS = [("gznq", None), ("mse", None), ("real", None),
        ("gznq", "gznq"), ("mse", "mse"), ("real", "real"),
        ("real", "gznq"), ("real", "mse"), ("gznq", "real"), ("mse", "real")]


def image_sets(teacher, device, seed: int, synth: dict) -> dict:
    synth = dict(synth, adversarial=False)
    sets = {}
    for name, extra in [("gznq", {}), ("mse", dict(bn_loss="mse", lambda_bn=MSE_LAMBDA_BN))]:
        _, res = drain(iter_synthesize(teacher, {}, SynthConfig(**synth, **extra), device, seed), keep=False)
        sets[name] = (res.images, res.train_idx, res.holdout_idx)
    real = real_source(synth["num_images"], synth["holdout_images"], seed)(teacher, device)
    sets["real"] = (real.images, real.train_idx, real.holdout_idx)
    return sets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv2", choices=list(MODELS))
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the benchmark runs")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    spec = parse_bits(args.bits)
    teacher = load_teacher(MODELS[args.model], device)
    xs, ys, _ = load_labelled_data(teacher, EvalConfig())
    example = torch.zeros(2, *teacher.input_size, device=device)
    synth = dict(PRESETS["cpu"]["synth"])
    train = TrainConfig(**{**TrainConfig().to_dict(), **PRESETS["cpu"]["train"]})
    if args.quick:
        synth.update(num_images=24, holdout_images=4, batch_size=24, steps=6, warmup_steps=2)
        train.epochs = 1
        xs, ys = xs[:300], ys[:300]
    synth_defaults = SynthConfig()
    results: dict[tuple, list[float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        sets = image_sets(teacher, device, seed, synth)
        for calib, kd in ROWS:
            student = create_student(teacher.model, spec, example, teacher.classifier)
            images, idx, held = sets[calib]
            with torch.no_grad():   # as the pipeline: students.act_percentile=auto judged on the held-out images
                score = None
                if spec.probes_percentile:
                    score = kl_score(teacher.model, images(held.to(device), noise=False))
                calibrate_(student, [images(i.to(device), noise=False) for i in torch.split(idx, 64)],
                           spec.act_init, spec.act_percentile, score=score)
            if kd is not None:
                images, idx, _ = sets[kd]
                drain(iter_distill(teacher, {spec.name: student}, images, idx, train, device,
                                   finetune_jitter(synth_defaults, train, teacher.input_size),
                                   synth_defaults.flip != FlipMode.OFF, seed), keep=False)
            acc = round(top1(predict_logits(student, xs, device), ys), 2)
            results.setdefault((calib, kd), []).append(acc)
            print(f"  seed {seed}: calibrate on {calib:<5} fine-tune on {kd or '-':<5} top-1 {acc:6.2f}", flush=True)
    print(f"\n{args.model} {spec.name}, FP {top1(predict_logits(teacher.model, xs, device), ys):.2f}")
    print(f"{'calibration':<13}{'KD':<7}{'top-1 mean':>11}{'seeds':>24}")
    rows = []
    for (calib, kd), accs in results.items():
        print(f"{calib:<13}{kd or '-':<7}{statistics.mean(accs):>11.2f}{str(accs):>24}")
        rows.append(dict(calibration=calib, kd=kd, mean=round(statistics.mean(accs), 2), seeds=accs))
    results_dir = Path(tempfile.mkdtemp()) if args.quick else Path(__file__).resolve().parent / "results"
    out = args.out or results_dir / f"stages_{args.model}_{spec.name}.json"   # smoke runs never overwrite results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model=args.model, bits=spec.name, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
