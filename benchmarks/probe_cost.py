"""What the band probe (synth.band=auto) costs in the CPU preset of 224-px architectures: its fixed size of
32 images per band against the size it now takes, at most BAND_PROBE_SHARE of the synthesis's images x steps.

    python benchmarks/probe_cost.py                                  # ~3 min on 2 cores
    python benchmarks/probe_cost.py --archs resnet50 --size 224 --budget-s 600

For each architecture (random weights: only the step costs matter here) the step costs are measured once on
this device (gzq.budget.measure_costs, as a preset run does), then the CPU preset is fitted to the budget
(gzq.budget.fit_budget) under each probe rule from the same costs, so the two columns differ only in the rule.
Prints the fitted images x steps, the probe's images per band, its estimated seconds (all four bands), its
share of the run, and the estimated run time. Writes benchmarks/results/probe_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gzq.config  # noqa: E402
from gzq.budget import measure_costs, plan_run, probe_seconds  # noqa: E402
from gzq.config import student_specs  # noqa: E402
from gzq.models import load_teacher  # noqa: E402
from gzq.presets import make_config  # noqa: E402
from gzq.quant.convert import create_student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["resnet18", "resnet50", "mobilenetv3_large_100", "efficientnet_b0"]
RULES = {"fixed 32 images": dict(BAND_PROBE_SHARE=1e9, BAND_PROBE_MIN_IMAGES=1),
         "sized by the synthesis": dict(BAND_PROBE_SHARE=gzq.config.BAND_PROBE_SHARE,
                                        BAND_PROBE_MIN_IMAGES=gzq.config.BAND_PROBE_MIN_IMAGES)}


def fits(arch: str, size: int, seconds: float) -> dict:
    cfg = make_config("cpu", "cpu", model=dict(name=arch, num_classes=10, input_size=(3, size, size)),
                      students=["w4a4", "w8a8"])
    dev = torch.device("cpu")
    teacher = load_teacher(cfg.model, dev)
    example = torch.zeros(2, *teacher.input_size)
    students = {n: create_student(teacher.model, s, example, teacher.classifier) for n, s in student_specs(cfg)}
    costs = measure_costs(teacher, students, cfg, dev)
    out = {}
    for rule, consts in RULES.items():
        saved = {k: getattr(gzq.config, k) for k in consts}
        try:
            for k, v in consts.items():
                setattr(gzq.config, k, v)
            fitted, est = plan_run(cfg, costs, len(students), seconds, cfg.eval.max_real_images or 0)
            s = fitted.synth
            probe_s = probe_seconds(s, costs)
            out[rule] = dict(images=s.num_images, steps=s.steps, probe_images=s.band_probe_images(),
                             probe_s=round(probe_s, 1), total_s=round(est.seconds, 1),
                             probe_share=round(probe_s / est.seconds, 3))
        finally:
            for k, v in saved.items():
                setattr(gzq.config, k, v)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--budget-s", type=float, default=600.0, help="the CPU preset's budget")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "probe_cost.json")
    args = p.parse_args(argv)
    rows = {}
    print(f"{'architecture':<24}{'rule':<24}{'images x steps':>16}{'probe images':>14}{'probe s':>9}"
          f"{'probe share':>13}{'run s':>8}")
    for arch in args.archs.split(","):
        rows[arch] = fits(arch, args.size, args.budget_s)
        for rule, r in rows[arch].items():
            print(f"{arch:<24}{rule:<24}{r['images']:>9} x {r['steps']:<4}{r['probe_images']:>14}{r['probe_s']:>9.0f}"
                  f"{100 * r['probe_share']:>12.0f}%{r['total_s']:>8.0f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(size=args.size, budget_s=args.budget_s, threads=torch.get_num_threads(),
                                        rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
