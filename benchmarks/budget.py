"""Accuracy versus synthesis budget for the default method (GZNQ, W4A4, all layers) on the bundled model.

    python benchmarks/budget.py            # ~6 min on 2 cores; writes assets/budget_curve.png and results/budget.json

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
from gzq.events import Done  # noqa: E402
from gzq.pipeline import iter_run, make_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [(32, 20), (64, 40), (128, 100), (256, 300), (512, 500)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", type=Path, default=ROOT / "assets" / "budget_curve.png")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "budget.json")
    args = p.parse_args(argv)
    rows = []
    fp = None
    for images, steps in BUDGETS:
        synth = dict(num_images=images, holdout_images=max(images // 8, 2), batch_size=min(96, images),
                     steps=steps, warmup_steps=steps // 3)
        cfg = make_config("cpu", args.device, students=[args.bits], seed=args.seed, synth=synth)
        t = time.perf_counter()
        report = next(ev.report for ev in iter_run(cfg) if isinstance(ev, Done))
        secs = time.perf_counter() - t
        fp = report["teacher"]["accuracy"]
        acc = report["students"][0]["accuracy"]
        rows.append(dict(images=images, steps=steps, accuracy=acc, wall_s=round(secs, 1)))
        print(f"{images:>6} images {steps:>5} steps  top-1 {acc:6.2f}  ({secs:5.1f} s)", flush=True)
    print(f"\nFP32 teacher: {fp:.2f}")
    print(f"{'images':>7}{'steps':>7}{'img x steps':>12}{'top-1':>8}{'FP - top-1':>11}{'wall s':>8}")
    for r in rows:
        print(f"{r['images']:>7}{r['steps']:>7}{r['images'] * r['steps']:>12}{r['accuracy']:>8.2f}"
              f"{fp - r['accuracy']:>11.2f}{r['wall_s']:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(bits=args.bits, seed=args.seed, fp=fp, rows=rows), indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return rows
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    x = [r["images"] * r["steps"] for r in rows]
    ax.plot(x, [r["accuracy"] for r in rows], "o-", label=f"GZNQ {args.bits} (all layers)")
    ax.axhline(fp, color="grey", ls="--", label=f"FP32 teacher {fp:.2f}%")
    for xi, r in zip(x, rows):
        ax.annotate(f"{r['images']}x{r['steps']}\n{r['wall_s']:.0f}s", (xi, r["accuracy"]), textcoords="offset points",
                    xytext=(0, -26), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("synthesis budget: images x steps (log)")
    ax.set_ylabel("real top-1 (%), Fashion-MNIST test")
    ax.set_title("Accuracy vs synthesis budget, bundled model, 2 CPU cores")
    ax.legend(loc="lower right", fontsize=8)
    lo = min(r["accuracy"] for r in rows)
    ax.set_ylim(lo - 3, fp + 1)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
