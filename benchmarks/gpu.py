"""A short prepared check for a machine with a CUDA GPU: speed of the paper-scale preset, mixed precision on
and off, and CUDA against CPU on a tiny model.

    python benchmarks/gpu.py                          # timm resnet18 (random weights) at 224 px, gpu preset batch
    python benchmarks/gpu.py --model resnet50 --checkpoint resnet50.safetensors
    python benchmarks/gpu.py --dry-run                # no GPU needed: a tiny model through the same code on the CPU

1. Synthesis step time against its floor (gzq benchmarks/speed.py: teacher and student forward+backward, no
   hooks, no losses), images/s and peak memory, at the gpu preset's batch with one W4A4 student, for
   fp32 and for bf16 autocast + channels_last (RunConfig.amp, .channels_last), plus the BN log-likelihood
   of the last step: the effect of mixed precision on the quantity synthesis maximises.
2. CUDA against CPU on a tiny model: the teacher's logits on one batch, a student's fake-quant logits, and the
   images after a few synthesis steps (plain pixels in the pixel basis, so both devices draw no noise and
   clamp alike), within a tolerance.
With no GPU and without --dry-run it says so and measures nothing. --dry-run runs timm's `test_resnet` at
32 px for two steps on the CPU and compares CPU against CPU in channels_last for part 2 (CUDA unmeasured).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import measure  # noqa: E402

from gzq.accel import channels_last_  # noqa: E402
from gzq.config import ImageBasis, ImageParam, ModelSpec, QuantSpec, SynthConfig  # noqa: E402
from gzq.models import load_teacher  # noqa: E402
from gzq.presets import PRESETS  # noqa: E402
from gzq.quant import calibrate_, create_student  # noqa: E402
from gzq.synthesis import iter_synthesize  # noqa: E402

#: CUDA against CPU: largest absolute difference allowed (logits of a random tiny network are O(1))
TOLERANCE = dict(teacher_logits=1e-3, student_logits=5e-2, images=1e-2)


def speed_table(spec: ModelSpec, input_size, batch: int, steps: int, device: torch.device) -> list[dict]:
    rows = [measure(spec, input_size, batch, 1, steps, device, amp=amp, channels_last=amp) for amp in (False, True)]
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f", threads: {torch.get_num_threads()}"))
    print(f"{'model':<12}{'res':>5}{'batch':>6}{'amp+NHWC':>9}{'step s':>9}{'floor s':>9}{'step/floor':>11}"
          f"{'img/s':>9}{'peak MB':>9}{'BN ll':>9}")
    for r in rows:
        print(f"{r['model']:<12}{r['res']:>5}{r['batch']:>6}{'on' if r['amp'] else 'off':>9}{r['step_s']:>9.3f}"
              f"{r['floor_s']:>9.3f}{r['ratio']:>11.2f}{r['img_per_s']:>9.1f}{r['peak_mb']:>9.0f}{r['bn_ll']:>9.2f}")
    return rows


def _tiny_run(device: torch.device, channels_last: bool, steps: int = 3) -> dict[str, torch.Tensor]:
    """A tiny model's teacher logits, student logits and synthesised images on `device` (deterministic)."""
    torch.manual_seed(0)
    spec = ModelSpec("test_resnet", num_classes=4, input_size=(3, 32, 32))
    teacher = load_teacher(spec, device)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    student = create_student(teacher.model, QuantSpec(8, 8), x[:2], teacher.classifier)
    if channels_last:
        channels_last_(teacher.model)
        channels_last_(student)
    calibrate_(student, [x])
    with torch.no_grad():
        out = dict(teacher_logits=teacher.model(x).cpu(), student_logits=student(x).cpu())
    # the pixel basis: in the spectral one (the default) a pixel held at the range's bound comes back from the
    # projection (decode, clamp, encode) a rounding error above, at or below it, and the clamp then passes it
    # none, half or all of its gradient, so two devices' images part after one step even when every forward
    # agrees (1e-5 after the first step, 0.15 after the second on this model)
    cfg = SynthConfig(num_images=8, holdout_images=0, batch_size=8, steps=steps, warmup_steps=steps,
                      image_param=ImageParam.PIXEL, image_basis=ImageBasis.PIXEL, preview_every=10_000)
    gen = iter_synthesize(teacher, {}, cfg, device, seed=0)
    try:
        while True:
            next(gen)
    except StopIteration as e:
        out["images"] = e.value.images.mean.detach().cpu()
    return out


def consistency(device: torch.device) -> bool:
    """Tiny model on `device` against the CPU (against the CPU in channels_last when `device` is the CPU)."""
    other = _tiny_run(device, channels_last=device.type == "cpu")
    ref = _tiny_run(torch.device("cpu"), channels_last=False)
    label = "CUDA" if device.type == "cuda" else "CPU channels_last"
    ok = True
    print(f"\n{label} against CPU on a tiny model (timm test_resnet, 32 px):")
    for k, tol in TOLERANCE.items():
        diff = (other[k] - ref[k]).abs().max().item()
        ok &= diff <= tol
        print(f"  {k:<15} max |diff| {diff:.2e}  (tolerance {tol:g})  {'ok' if diff <= tol else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm architecture (224 px)")
    p.add_argument("--checkpoint", help="local weights for --model (default: random weights)")
    p.add_argument("--steps", type=int, default=10, help="timed synthesis steps per row")
    p.add_argument("--batch", type=int, default=PRESETS["gpu"]["synth"]["batch_size"])
    p.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU through the same code")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.dry_run:
        device = torch.device("cuda" if cuda else "cpu")
        spec, size, batch, steps = ModelSpec("test_resnet", num_classes=4, input_size=(3, 32, 32)), None, 8, 2
    elif not cuda:
        print("no CUDA GPU on this machine: nothing measured (GPU speed, mixed precision and CUDA-vs-CPU are "
              "unmeasured here; --dry-run runs the same code on a tiny model on the CPU)")
        return 0
    else:
        device = torch.device("cuda")
        spec = ModelSpec(args.model, checkpoint=args.checkpoint)
        size, batch, steps = (3, 224, 224), args.batch, args.steps
    if not cuda:
        print("no CUDA GPU: the table below is the CPU's; GPU speed and CUDA-vs-CPU are unmeasured")
    speed_table(spec, size, batch, steps, device)
    ok = consistency(device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
