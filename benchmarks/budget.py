"""Accuracy versus synthesis budget for the default method (GZNQ, W4A4, all layers) on the bundled model.

    python benchmarks/budget.py                    # W4A4 and W3A3, ~6 min on 2 cores
                                                   # writes assets/budget_curve.png and benchmarks/results/budget.json

Each point is one run with the default recipe at a budget of (images, synthesis steps); the fine-tuning
recipe is the CPU preset's. The plot shows real Fashion-MNIST test accuracy against images x steps, with
the wall time of each run, so users can see what each preset buys. Needs matplotlib for the plot.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gzq.config import override  # noqa: E402
from gzq.pipeline import run  # noqa: E402
from gzq.presets import make_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [(32, 20), (64, 40), (128, 100), (256, 300), (512, 500)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="w4a4,w3a3", help="comma-separated configurations, one curve each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", type=Path, default=ROOT / "assets" / "budget_curve.png")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "budget.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="change a default, e.g. --set synth.init_log_scale=-1 (repeatable)")
    args = p.parse_args(argv)
    try:
        override(make_config("cpu", "cpu"), *args.set)
    except ValueError as e:
        p.error(str(e))
    curves: dict[str, list] = {}
    fp = None
    for bits in args.bits.split(","):
        rows = curves.setdefault(bits, [])
        for images, steps in BUDGETS:
            synth = dict(num_images=images, holdout_images=max(images // 8, 2), batch_size=min(96, images),
                         steps=steps, warmup_steps=steps // 3)   # each point of the curve, all fields given
            cfg = override(make_config("cpu", args.device, students=[bits], seed=args.seed, synth=synth), *args.set)
            t = time.perf_counter()
            report = run(cfg)
            secs = time.perf_counter() - t
            fp = report["teacher"]["accuracy"]
            acc = report["students"][0]["accuracy"]
            rows.append(dict(images=images, steps=steps, accuracy=acc, wall_s=round(secs, 1)))
            print(f"{bits} {images:>6} images {steps:>5} steps  top-1 {acc:6.2f}  ({secs:5.1f} s)", flush=True)
    print(f"\nFP32 teacher: {fp:.2f}")
    print(f"{'bits':<6}{'images':>7}{'steps':>7}{'img x steps':>12}{'top-1':>8}{'FP - top-1':>11}{'wall s':>8}")
    for bits, rows in curves.items():
        for r in rows:
            print(f"{bits:<6}{r['images']:>7}{r['steps']:>7}{r['images'] * r['steps']:>12}{r['accuracy']:>8.2f}"
                  f"{fp - r['accuracy']:>11.2f}{r['wall_s']:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(seed=args.seed, overrides=args.set, fp=fp, curves=curves), indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return curves
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for bits, rows in curves.items():
        x = [r["images"] * r["steps"] for r in rows]
        ax.plot(x, [r["accuracy"] for r in rows], "o-", label=f"GZNQ {bits} (all layers)")
        for xi, r in zip(x, rows):
            ax.annotate(f"{r['images']}x{r['steps']}, {r['wall_s']:.0f}s", (xi, r["accuracy"]),
                        textcoords="offset points", xytext=(0, -12), ha="center", fontsize=6)
    ax.axhline(fp, color="grey", ls="--", label=f"FP32 teacher {fp:.2f}%")
    ax.set_xscale("log")
    ax.set_xlabel("synthesis budget: images x steps (log); labels: images x steps, wall time")
    ax.set_ylabel("real top-1 (%), Fashion-MNIST test")
    ax.set_title("Accuracy vs synthesis budget, bundled model, 2 CPU cores", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    lo = min(r["accuracy"] for rows in curves.values() for r in rows)
    ax.set_ylim(lo - 1.5, fp + 0.5)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")
    return curves


if __name__ == "__main__":
    main()
