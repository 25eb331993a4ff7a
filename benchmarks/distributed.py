"""One process against N processes (torchrun, gloo on a CPU), measured side by side in one run.

    python benchmarks/distributed.py                 # speed (synthesis steps) and accuracy (whole runs)
    python benchmarks/distributed.py --quick         # a few steps and a tiny run, for the tests

Speed: the same GZNQ synthesis (CPU preset batch, one W4A4 student, in its adversarial phase) timed per step
as 1 process x 1 thread, 1 process x N threads, and N processes x 1 thread (each rank a 1/N share of the
global batch), with and without the BN statistics summed over ranks (synth.global_bn_stats). A step of the N
processes is timed on rank 0; the ranks meet at every step's collectives, so it is the slowest rank's step.
Accuracy: `python -m gzq run` on the bundled model at one budget, 1 process and N processes with
global_bn_stats off and on: real top-1 of the W4A4 student, the teacher's label agreement on held-out
synthetic images, and the BN log-likelihood of the saved images measured afterwards in one process at the
synthesis batch (comparable across process counts, unlike the per-rank value the run plots).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    """One measurement in this process (rank 0 of a torchrun job writes the result)."""
    from gzq import dist
    from gzq.config import QuantSpec, SynthConfig
    from gzq.events import Progress
    from gzq.models import load_teacher
    from gzq.presets import PRESETS
    from gzq.quant import create_student
    from gzq.synthesis import iter_synthesize
    device = torch.device("cpu")
    dist.init_from_env(device)
    finished = False
    try:
        teacher = load_teacher("default", device)
        ex = torch.zeros(2, *teacher.input_size)
        students = {"w4a4": create_student(teacher.model, QuantSpec.parse("w4a4"), ex, teacher.classifier)}
        preset = PRESETS["cpu"]["synth"]
        warm = args.warm
        batch = args.batch or preset["batch_size"]
        cfg = SynthConfig(num_images=max(preset["num_images"], batch), holdout_images=0, batch_size=batch,
                          steps=args.steps + warm, warmup_steps=1, preview_every=10_000,
                          global_bn_stats=args.global_bn)
        times, last = [], time.perf_counter()
        for ev in iter_synthesize(teacher, students, cfg, device, seed=0):
            if isinstance(ev, Progress):
                if ev.step > warm:
                    times.append(time.perf_counter() - last)
                last = time.perf_counter()
        if dist.is_main():
            Path(args.out).write_text(json.dumps(dict(step_s=statistics.median(times), batch=cfg.batch_size)))
        finished = True
    finally:
        dist.shutdown(sync=finished)


def measure_speed(procs: int, threads: int, global_bn: bool, steps: int, batch: int = 0, warm: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        me = [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--batch", str(batch),
              "--warm", str(warm), "--out", str(out)]
        if global_bn:
            me.append("--global-bn")
        cmd = ([sys.executable, *me] if procs == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                str(_free_port()), *me])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        for attempt in range(2):   # gloo sometimes aborts a rank at exit (gzq.dist.shutdown): run it once more
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            if r.returncode == 0:
                break
            if attempt or "terminate called without an active exception" not in r.stderr:
                raise RuntimeError(f"{cmd} failed:\n{r.stderr[-3000:]}")
            out.unlink(missing_ok=True)
        res = json.loads(out.read_text())
    return dict(procs=procs, threads=threads, global_bn=global_bn, **res, img_s=res["batch"] / res["step_s"])


def bn_log_likelihood(run: Path, batch: int) -> float:
    """Mean BN log-likelihood per (layer, channel) of a run's saved training images, in batches of `batch`."""
    import numpy as np
    from PIL import Image

    from gzq.bn import BNStatsRecorder, bn_losses
    from gzq.config import BNLoss, NRule
    from gzq.data import to_model_input
    from gzq.models import load_teacher
    teacher = load_teacher("default")
    index = [e for e in json.loads((run / "images" / "labels.json").read_text()) if e["split"] == "train"]
    px = torch.from_numpy(np.stack([np.array(Image.open(run / "images" / e["file"])) for e in index]))
    x = to_model_input(px, teacher.mean, teacher.std, teacher.input_size)
    batch = min(batch, len(x))
    lls = []
    with BNStatsRecorder(teacher.model) as rec, torch.no_grad():
        for i in range(0, len(x) - batch + 1, batch):
            teacher.model(x[i:i + batch])
            lls.append(bn_losses(rec, BNLoss.LIKELIHOOD, NRule.BATCH_SPATIAL)[1].mean().item())
    return float(np.mean(lls))


def measure_run(procs: int, global_bn: bool, budget: list[str], out: Path) -> dict:
    args = ["-m", "gzq", "run", "--model", "default", "--device", "cpu", "--students", "w4a4", "--export", "none",
            *budget, "--out", str(out)]
    if global_bn:
        args += ["--set", "synth.global_bn_stats=true"]
    cmd = ([sys.executable, *args] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            str(_free_port()), *args])
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{r.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    s = rep["students"][0]
    return dict(procs=procs, global_bn=global_bn, top1=s["accuracy"], agree=rep["teacher"]["synthetic_label_agreement"],
                bn_ll=bn_log_likelihood(out, rep["config"]["synth"]["batch_size"]), wall_s=wall,
                synth_s=rep["timings"]["synthesis"])


def print_speed(speed: list[dict], steps: int) -> None:
    one, threaded = speed[0]["step_s"], speed[1]["step_s"]
    n = speed[1]["threads"]
    print(f"synthesis step, default model, batch {speed[0]['batch']} (global), 1 W4A4 student, "
          f"{os.cpu_count()} cores, median of {steps}")
    print(f"{'processes':>10}{'threads':>8}{'global BN':>10}{'step s':>9}{'img/s':>8}{'vs 1x1':>8}{f'vs 1x{n}':>8}")
    for r in speed:
        print(f"{r['procs']:>10}{r['threads']:>8}{'on' if r['global_bn'] else 'off':>10}{r['step_s']:>9.3f}"
              f"{r['img_s']:>8.1f}{one / r['step_s']:>8.2f}{threaded / r['step_s']:>8.2f}")
    print(f"(speed-up: step time of 1 process x 1 thread, and of 1 process x {n} threads, over this row's)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed synthesis steps per case")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the accuracy runs")
    p.add_argument("--budget", default="--images 256 --steps 300 --epochs 40",
                   help="the accuracy runs' budget (CLI options)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--global-bn", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)   # 0: the CPU preset's
    p.add_argument("--warm", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    n = args.procs
    steps = 2 if args.quick else args.steps
    cases = [(1, 1, False), (1, n, False), (n, 1, False), (n, 1, True)]
    runs = [(1, False), (n, False), (n, True)]
    if args.quick:   # every code path once (N processes with global BN statistics) at a batch of 16, in seconds
        cases, runs = [c for c in cases if c != (n, 1, False)], [r for r in runs if r != (n, False)]
    speed = [measure_speed(pr, th, gb, steps, *((16, 1) if args.quick else (0, 3))) for pr, th, gb in cases]
    print_speed(speed, steps)
    acc = []
    if not args.skip_accuracy:
        budget = ("--images 32 --steps 4 --epochs 1 --max-real-images 1000 --set train.recon_steps=2" if args.quick
                  else args.budget)
        with tempfile.TemporaryDirectory() as tmp:
            for seed in [int(s) for s in args.seeds.split(",")]:
                for pr, gb in runs:
                    row = measure_run(pr, gb, budget.split() + ["--seed", str(seed)],
                                      Path(tmp) / f"{pr}_{gb}_{seed}")
                    acc.append(dict(seed=seed, **row))
        print(f"\nwhole runs ({budget}), W4A4 real top-1 on the test images")
        print(f"{'seed':>5}{'processes':>10}{'global BN':>10}{'top-1':>8}{'agree %':>9}{'BN ll':>9}{'synth s':>9}"
              f"{'wall s':>8}")
        for r in acc:
            print(f"{r['seed']:>5}{r['procs']:>10}{'on' if r['global_bn'] else 'off':>10}{r['top1']:>8.2f}"
                  f"{r['agree']:>9.1f}{r['bn_ll']:>9.2f}{r['synth_s']:>9.1f}{r['wall_s']:>8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(speed=speed, accuracy=acc), indent=1) + "\n")
    return speed, acc


if __name__ == "__main__":
    main()
