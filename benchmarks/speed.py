"""Synthesis step time against its floor, measured side by side in one run.

    python benchmarks/speed.py                 # CPU preset on the default model, and timm resnet18 at 224 px
    python benchmarks/speed.py --train-only --train-archs resnet50     # only the training table

floor = teacher forward+backward (gradient to the input) + each student's forward+backward (gradients to
its weights and input) on the same batch, with no hooks and no losses. A GZNQ step in its adversarial
phase does all of that plus the BN statistics, the losses, the image and student optimiser steps.
Also: images per second and peak memory (RSS on CPU, allocator peak on CUDA).

Evaluation: a W4A4 student's forward without gradients (what evaluation, calibration and the
reconstruction's input capture run) on the short fake-quant path against the straight-through path that
training needs, interleaved, and the float teacher's forward on the same batch.

Training: the memory a training step keeps for its backward (per image) and the student's step time, with
the fake quantizers as one autograd node (gzq's) against the same maths in autograd's own ops, interleaved.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gzq.accel import autocast, channels_last_  # noqa: E402
from gzq.budget import _kept_bytes
from gzq.config import ModelSpec, QuantSpec, SynthConfig  # noqa: E402
from gzq.events import Progress  # noqa: E402
from gzq.models import load_teacher  # noqa: E402
from gzq.presets import PRESETS, resolve_device  # noqa: E402
from gzq.quant import calibrate_, create_student, modules, primitives  # noqa: E402
from gzq.synthesis import iter_synthesize  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_step(teacher, students, x, device, amp: bool = False) -> float:
    _sync(device)
    t = time.perf_counter()
    xi = x.clone().requires_grad_(True)
    with autocast(device, amp):
        out = teacher.model(xi).sum()
    out.backward()
    for s in students.values():
        xs = x.clone().requires_grad_(True)
        with autocast(device, amp):
            out = s(xs).sum()
        out.backward()
    _sync(device)
    return time.perf_counter() - t


def measure(spec: ModelSpec, input_size, batch: int, n_students: int, steps: int, device, amp: bool = False,
            channels_last: bool = False) -> dict:
    """Median step and floor seconds of `steps` synthesis steps (after 3 warm-up steps), images/s, peak
    memory, and the BN log-likelihood of the last step; amp and channels_last as RunConfig's (gzq.accel)."""
    teacher = load_teacher(spec, device)
    if input_size:
        teacher.input_size = input_size
    ex = torch.zeros(2, *teacher.input_size, device=device)
    names = ["w4a4", "w8a8", "w3a3", "w2a4"][:n_students]
    students = {n: create_student(teacher.model, QuantSpec.parse(n), ex, teacher.classifier) for n in names}
    if channels_last:
        for m in (teacher.model, *students.values()):
            channels_last_(m)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = 3
    cfg = SynthConfig(num_images=batch, holdout_images=0, batch_size=batch, steps=steps + warm, warmup_steps=1,
                      preview_every=10_000)
    x = torch.randn(batch, *teacher.input_size, device=device)
    times, floors = [], []
    bn_ll = None
    last = time.perf_counter()
    for ev in iter_synthesize(teacher, students, cfg, device, seed=0, amp=amp):
        if isinstance(ev, Progress):
            _sync(device)
            bn_ll = ev.bn_log_likelihood
            if ev.step > warm:
                times.append(time.perf_counter() - last)
                floors.append(floor_step(teacher, students, x, device, amp))  # interleaved: both see the same load
            last = time.perf_counter()
    step, floor = statistics.median(times), statistics.median(floors)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(model=spec.name, res=teacher.input_size[-1], batch=batch, students=n_students, step_s=step,
                floor_s=floor, ratio=step / floor, img_per_s=batch / step, peak_mb=peak, amp=amp,
                channels_last=channels_last, bn_ll=bn_ll)


def measure_eval(spec: ModelSpec, input_size, batch: int, repeats: int, device) -> dict:
    """Median seconds of a no-gradient forward: the teacher, a W4A4 student on the short path (gzq's
    fake_quantize) and on the straight-through path (fake_quantize_ste), interleaved."""
    teacher = load_teacher(spec, device)
    if input_size:
        teacher.input_size = input_size
    x = torch.randn(batch, *teacher.input_size, device=device)
    student = create_student(teacher.model, QuantSpec.parse("w4a4"), x[:2], teacher.classifier)
    calibrate_(student, [x])
    student.eval()
    short = primitives.fake_quantize

    def timed(model, fq) -> float:
        modules.fake_quantize = fq
        try:
            _sync(device)
            t = time.perf_counter()
            model(x)
            _sync(device)
            return time.perf_counter() - t
        finally:
            modules.fake_quantize = short
    times: dict[str, list[float]] = {"teacher": [], "short": [], "ste": []}
    with torch.no_grad():
        for i in range(repeats + 1):   # the first round warms up
            for key, model, fq in (("teacher", teacher.model, short), ("short", student, short),
                                   ("ste", student, primitives.fake_quantize_ste)):
                t = timed(model, fq)
                if i:
                    times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(model=spec.name, res=teacher.input_size[-1], batch=batch, teacher_s=med["teacher"],
                short_s=med["short"], ste_s=med["ste"], speedup=med["ste"] / med["short"])


def measure_train(spec: ModelSpec, input_size, batch: int, repeats: int, device) -> dict:
    """What a training step keeps for its backward and how long it takes, with the fake quantizers written in
    autograd's own ops (`fake_quantize_composed`, two more tensors of each quantized tensor's size kept) against
    gzq's one autograd node (`fake_quantize_ste`), interleaved: the kept bytes per image (gzq.budget's count,
    what sizes a run's batches) of a W4A4 student's forward, and of a synthesis step's forward (the teacher and
    students W4A4 and W8A8, gradients to the input); the median seconds of the student's forward + backward.
    The two give the same values and gradients, bit for bit (tests/test_quant.py)."""
    teacher = load_teacher(spec, device)
    if input_size:
        teacher.input_size = input_size
    x = torch.randn(batch, *teacher.input_size, device=device)
    students = [create_student(teacher.model, QuantSpec.parse(b), x[:2], teacher.classifier)
                for b in ("w4a4", "w8a8")]
    for s in students:
        calibrate_(s, [x])
    node = primitives.fake_quantize_ste   # gzq's fake_quantize takes whichever this name holds where gradients are on
    paths = {"composed": primitives.fake_quantize_composed, "node": node}

    def student_step():
        students[0](x.clone().requires_grad_(True)).logsumexp(1).mean().backward()

    def synth_forward(xi):
        return teacher.model(xi).logsumexp(1).mean() + sum(s(xi).logsumexp(1).mean() for s in students)

    out: dict[str, dict] = {k: {"times": []} for k in paths}
    try:
        for i in range(repeats + 1):   # the first round warms up
            for key, fq in paths.items():
                primitives.fake_quantize_ste = fq
                if i == 0:
                    out[key]["student_mib"] = _kept_bytes(
                        lambda: students[0](x.clone().requires_grad_(True)).sum(), batch) / batch / 2**20
                    out[key]["synth_mib"] = _kept_bytes(
                        lambda: synth_forward(x.clone().requires_grad_(True)), batch) / batch / 2**20
                    continue
                _sync(device)
                t = time.perf_counter()
                student_step()
                _sync(device)
                out[key]["times"].append(time.perf_counter() - t)
    finally:
        primitives.fake_quantize_ste = node
        for s in students:
            s.zero_grad(set_to_none=True)
    row = {"model": spec.name, "res": teacher.input_size[-1], "batch": batch}
    for key, r in out.items():
        row.update({f"{key}_student_mib": r["student_mib"], f"{key}_synth_mib": r["synth_mib"],
                    f"{key}_step_s": statistics.median(r["times"])})
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--train-only", action="store_true", help="only the training table")
    p.add_argument("--train-archs", default="resnet18,mobilenetv3_large_100,efficientnet_b0",
                   help="the training table's 224-px architectures (random weights), after the bundled model")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.train_only:
        return None, None, train_table(args, device)
    return (*synthesis_and_eval_tables(args, device), train_table(args, device))


def synthesis_and_eval_tables(args, device) -> tuple[list, list]:
    batch = PRESETS["cpu"]["synth"]["batch_size"]
    cases = [(ModelSpec("default"), None, batch, 1), (ModelSpec("default"), None, batch, 2)]
    if not args.quick:
        cases.append((ModelSpec("resnet18"), (3, 224, 224), 16, 1))
    rows = [measure(*c, steps=2 if args.quick else args.steps, device=device) for c in cases]
    print(f"device: {device}, threads: {torch.get_num_threads()}")
    print(f"{'model':<10}{'res':>5}{'batch':>6}{'M':>3}{'step s':>9}{'floor s':>9}{'step/floor':>11}{'img/s':>8}{'peak MB':>9}")
    for r in rows:
        print(f"{r['model']:<10}{r['res']:>5}{r['batch']:>6}{r['students']:>3}{r['step_s']:>9.3f}{r['floor_s']:>9.3f}"
              f"{r['ratio']:>11.2f}{r['img_per_s']:>8.1f}{r['peak_mb']:>9.0f}")
    eval_cases = [(ModelSpec("default"), None, 500)] + ([] if args.quick else [(ModelSpec("resnet18"), (3, 224, 224), 32)])
    evals = [measure_eval(*c, repeats=2 if args.quick else args.steps, device=device) for c in eval_cases]
    print("\nforward without gradients, W4A4 student: straight-through path against the short one (gzq's)")
    print(f"{'model':<10}{'res':>5}{'batch':>6}{'teacher s':>11}{'ste s':>9}{'short s':>9}{'speed-up':>10}{'vs teacher':>12}")
    for r in evals:
        print(f"{r['model']:<10}{r['res']:>5}{r['batch']:>6}{r['teacher_s']:>11.3f}{r['ste_s']:>9.3f}{r['short_s']:>9.3f}"
              f"{r['speedup']:>10.2f}{r['short_s'] / r['teacher_s']:>12.2f}")
    return rows, evals


def train_table(args, device) -> list:
    train_cases = [(ModelSpec("default"), None, 64)] + ([] if args.quick else [
        (ModelSpec(a), (3, 224, 224), 8) for a in args.train_archs.split(",") if a])
    trains = [measure_train(*c, repeats=2 if args.quick else 5, device=device) for c in train_cases]
    print("\ntraining step: fake quantizers in autograd's own ops (composed) against one autograd node (gzq's);"
          "\nMiB kept for the backward per image (a W4A4 student; a synthesis step: teacher + W4A4 + W8A8)")
    print(f"{'model':<24}{'res':>5}{'batch':>6}{'student':>9}{'(node)':>8}{'ratio':>7}{'synth':>8}{'(node)':>8}"
          f"{'ratio':>7}{'step s':>8}{'(node)':>8}{'ratio':>7}")
    for r in trains:
        cells = [(r["composed_" + k], r["node_" + k], w, d)
                 for k, w, d in (("student_mib", 9, 1), ("synth_mib", 8, 1), ("step_s", 8, 3))]
        print(f"{r['model']:<24}{r['res']:>5}{r['batch']:>6}"
              + "".join(f"{a:>{w}.{d}f}{b:>8.{d}f}{b / a:>7.2f}" for a, b, w, d in cells))
    return trains


if __name__ == "__main__":
    main()
