"""How the CPU preset fits 224-px hub architectures: what measuring the model costs (seconds, peak memory),
the budget and batches it fits, and, with --run, how long the run then takes against its estimate.

    python benchmarks/preset_fit.py --memory-gib 16                    # measuring only, ~8 min on 2 cores
    python benchmarks/preset_fit.py --memory-gib 16 --run              # and a run each (~10 min more each)

Each architecture (random weights, 10 classes; only costs matter) runs in a process of its own, so its peak
memory (ru_maxrss) is its own; a process whose resident memory passes --max-gib is stopped (as the OOM
killer would stop it on a machine with that much memory) and its row says so. Two ways of measuring, side by side from the same code:
- "per image": gzq.budget.measure_costs as runs use it: each step timed at a small batch first, priced per
  image, the run's batch timed too where that is quick, batches cut to the free memory (fit_memory);
- "full batch": every step timed at the preset's full batch, no memory cut (how the budget was measured before).
Columns: seconds spent measuring, the process's peak memory, the fitted images x steps and batches, and the
estimate. --run adds a row "run": a fresh process runs the preset end to end with gzq.pipeline.run (which
measures with the "per image" rule and fits as above), and the row gives its own measuring time, estimate
and peak memory, and the stages' actual time (after loading and measuring) against that estimate.
Writes benchmarks/results/preset_fit.json after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = ["resnet18", "resnet50", "mobilenetv3_large_100", "efficientnet_b0"]
RULES = ("per image", "full batch")


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(arch: str, size: int, seconds: float, rule: str, memory_gib: float | None) -> dict:
    import torch

    import gzq.budget as budget
    from gzq.config import student_specs
    from gzq.models import load_teacher
    from gzq.presets import make_config
    from gzq.quant.convert import create_student

    cfg = make_config("cpu", "cpu", model={"name": arch, "num_classes": 10, "input_size": (3, size, size)},
                      students=["w4a4", "w8a8"], time_budget_s=seconds)
    if memory_gib is not None:   # the machine this stands for
        budget.available_memory = lambda device: int(memory_gib * 2**30)
    if rule == "run":
        from gzq.pipeline import run as run_pipeline
        report = run_pipeline(cfg)
        tm, synth = report["timings"], report["config"]["synth"]
        stages = {k: v for k, v in tm.items() if k not in ("load", "estimate", "total")}
        return dict(arch=arch, rule=rule, estimate_s=report["budget"]["estimate_s"], measure_s=round(tm["estimate"], 1),
                    run_s=round(sum(stages.values()), 1), stages_s={k: round(v, 1) for k, v in stages.items()},
                    images=synth["num_images"], steps=synth["steps"], synth_batch=min(synth["batch_size"],
                    synth["num_images"]), kd_batch=report["config"]["train"]["batch_size"], peak_gib=round(_peak_gib(), 2))
    dev = torch.device("cpu")
    teacher = load_teacher(cfg.model, dev)
    example = torch.zeros(2, *teacher.input_size)
    students = {n: create_student(teacher.model, s, example, teacher.classifier) for n, s in student_specs(cfg)}
    t = time.perf_counter()
    if rule == "full batch":
        budget.TIMED_BATCH = 1 << 30
        costs = budget.measure_costs(teacher, students, cfg, dev, memory=0)
    else:
        costs = budget.measure_costs(teacher, students, cfg, dev)
    measure_s = time.perf_counter() - t
    fitted, est = budget.plan_run(cfg, costs, len(students), seconds)
    return dict(arch=arch, rule=rule, measure_s=round(measure_s, 1), peak_gib=round(_peak_gib(), 2),
                images=fitted.synth.num_images, steps=fitted.synth.steps, synth_batch=min(fitted.synth.batch_size,
                fitted.synth.num_images), kd_batch=fitted.train.batch_size, estimate_s=round(est.seconds, 1),
                free_gib=round(costs.memory / 2**30, 1), synth_image_mib=round(costs.synth_image_bytes / 2**20, 1),
                timed_batch=costs.timed_batch, text=est.text)


def _watched(cmd: list[str], max_gib: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`, killing it when its resident memory passes `max_gib` (as the OOM killer would, but only
    it); returns the finished process and the largest resident memory seen, GiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            rss = next(int(x.split()[1]) for x in status.read_text().splitlines() if x.startswith("VmRSS:")) / 2**20
        except (OSError, StopIteration):
            rss = 0.0
        peak = max(peak, rss)
        if rss > max_gib:
            proc.kill()
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--budget-s", type=float, default=600.0, help="the CPU preset's budget")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of: {', '.join(RULES)}")
    p.add_argument("--run", action="store_true", help="also run the preset end to end in a fresh process")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preset_fit.json")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="the machine's free memory, GiB (default: what is free here at the start): the per-image "
                        "rule fits its batches to it, and a process whose resident memory passes it is stopped")
    p.add_argument("--child", nargs=2, metavar=("ARCH", "RULE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.size, args.budget_s, args.child[1], args.memory_gib)))
        return
    import torch

    from gzq.budget import available_memory
    max_gib = args.memory_gib or available_memory(torch.device("cpu")) / 2**30
    rules = args.rules.split(",")
    if bad := [r for r in rules if r not in RULES]:
        p.error(f"unknown rule(s) {bad}; choose from {list(RULES)}")
    rows = []
    print(f"{'architecture':<24}{'rule':<12}{'measure s':>10}{'peak GiB':>9}{'images x steps':>16}{'batches':>9}"
          f"{'estimate s':>11}{'run s':>7}{'run/est':>8}", flush=True)
    for arch in args.archs.split(","):
        for rule in rules + (["run"] if args.run else []):
            cmd = [sys.executable, __file__, "--child", arch, rule, "--size", str(args.size),
                   "--budget-s", str(args.budget_s), "--memory-gib", f"{max_gib:.3f}"]
            res, peak = _watched(cmd, max_gib)
            if res.returncode:
                why = (f"stopped at {peak:.1f} GiB, over the {max_gib:.1f} GiB cap" if peak > max_gib else
                       f"exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1][:200]}")
                r = dict(arch=arch, rule=rule, error=why)
                print(f"{arch:<24}{rule:<12}  failed ({why})", flush=True)
            else:
                r = json.loads(res.stdout.strip().splitlines()[-1])
                run = (f"{r['run_s']:>7.0f}{r['run_s'] / r['estimate_s']:>8.2f}" if "run_s" in r
                       else f"{'-':>7}{'-':>8}")
                print(f"{arch:<24}{rule:<12}{r['measure_s']:>10.1f}{r['peak_gib']:>9.1f}{r['images']:>9} x "
                      f"{r['steps']:<4}{r['synth_batch']:>4}/{r['kd_batch']:<4}{r['estimate_s']:>11.0f}" + run, flush=True)
            rows.append(r)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(size=args.size, budget_s=args.budget_s, memory_gib=round(max_gib, 1),
                                                threads=os.environ.get("OMP_NUM_THREADS"), rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
