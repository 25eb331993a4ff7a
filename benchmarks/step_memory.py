"""What a synthesis step with students holds in memory, against what gzq.budget counts when it sizes batches.

    python benchmarks/step_memory.py                                  # three 224-px architectures, ~6 min
    python benchmarks/step_memory.py --archs resnet18 --batches 4,12  # any timm BN architecture

A run cuts its batches so that the tensors a step keeps for its backward (gzq.budget._kept_bytes, per image)
take at most MEMORY_SHARE of the free memory; the step's peak is above them (the backward's own temporaries,
the allocator). For each architecture (random weights, 10 classes) and each way of writing the fake
quantizers -- gzq's one autograd node (`fake_quantize_ste`) and the same maths in autograd's own ops
(`fake_quantize_composed`, which keeps two more tensors of each quantized tensor's size) -- one process per
batch size runs one step as synthesis does (the teacher and students W4A4 and W8A8, gradients to the input
and the students' weights) and reports its peak resident memory (ru_maxrss). Columns: kept MiB per image,
the peak's growth per added image between the two batch sizes, and their ratio; "node/composed" compares
the two ways. Writes benchmarks/results/step_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = ["resnet18", "mobilenetv3_large_100", "efficientnet_b0"]
PATHS = ("composed", "node")


def child(arch: str, size: int, batch: int, path: str) -> dict:
    """One synthesis-style step at `batch` in this process: its peak memory and the kept bytes per image."""
    import timm
    import torch

    from gzq.budget import _kept_bytes
    from gzq.config import QuantSpec
    from gzq.quant import calibrate_, create_student, primitives

    if path == "composed":   # gzq's fake_quantize takes whichever this name holds where gradients are on
        primitives.fake_quantize_ste = primitives.fake_quantize_composed
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10).eval().requires_grad_(False)
    x = torch.randn(batch, 3, size, size)
    students = [create_student(teacher, QuantSpec.parse(b), x[:2], teacher.pretrained_cfg.get("classifier"))
                for b in ("w4a4", "w8a8")]
    for s in students:
        calibrate_(s, [x[:4]])

    def loss():
        xi = x.clone().requires_grad_(True)
        return teacher(xi).logsumexp(1).mean() + sum(s(xi).logsumexp(1).mean() for s in students)
    loss().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak, "kept_per_image": _kept_bytes(loss, batch) / batch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", default="8,24", help="the two batch sizes, comma-separated")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_memory.json")
    p.add_argument("--child", nargs=3, metavar=("ARCH", "BATCH", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.size, int(args.child[1]), args.child[2])))
        return None
    b1, b2 = (int(b) for b in args.batches.split(","))
    rows = []
    for arch in (a for a in args.archs.split(",") if a):
        row = {"arch": arch, "size": args.size, "batches": [b1, b2]}
        for path in PATHS:
            res = []
            for b in (b1, b2):
                r = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", arch, str(b), path],
                                   capture_output=True, text=True, check=False)
                if r.returncode:
                    raise SystemExit(f"{arch} {path} batch {b} failed:\n{r.stderr[-2000:]}")
                res.append(json.loads(r.stdout.strip().splitlines()[-1]))
            row[path] = {"kept_mib": res[1]["kept_per_image"] / 2**20,
                         "peak_per_image_mib": (res[1]["peak"] - res[0]["peak"]) / (b2 - b1) / 2**20,
                         "peak_gib": [r["peak"] / 2**30 for r in res]}
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"synthesis step (teacher + W4A4 + W8A8 students), {args.size} px, batches {b1} and {b2}; MiB per image")
    print(f"{'architecture':<24}" + "".join(f"{p + ' kept':>15}{'peak':>8}{'peak/kept':>10}" for p in PATHS)
          + f"{'node/composed kept':>20}{'peak':>8}")
    for r in rows:
        c, n = r["composed"], r["node"]
        print(f"{r['arch']:<24}" + "".join(f"{d['kept_mib']:>15.1f}{d['peak_per_image_mib']:>8.1f}"
                                             f"{d['peak_per_image_mib'] / d['kept_mib']:>10.2f}" for d in (c, n))
              + f"{n['kept_mib'] / c['kept_mib']:>20.2f}{n['peak_per_image_mib'] / c['peak_per_image_mib']:>8.2f}")
    return rows


if __name__ == "__main__":
    main()
