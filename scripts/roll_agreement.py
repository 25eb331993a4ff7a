"""Does the teacher keep the synthetic images' labels when fine-tuning shifts them?

    python scripts/roll_agreement.py --models mobileone_48,lcnet_128 --seeds 0,1,2

For each zoo model and seed with cached harness images (benchmarks/finetune.py's default 128 x 150 set; seeds
without one are skipped and nothing is synthesised, unless --set asks for other images), the teacher's top-1
agreement with the images' own labels: on the images as they are, and under 16 random rolls of the size KD
gives each batch (synth.jitter of the shorter side, drawn by gzq.augment.augment as KD draws it), the mean and
the worst of them. The synthesis flip check (gzq.synthesis.flip_check) measures one such roll on the images as
they form; this is 16 on the finished ones.
With `--set synth.FIELD=VALUE` (as benchmarks/finetune.py takes it), the images of that synthesis instead, made
and cached first where the harness has not made them (a few minutes per model and seed):

    python scripts/roll_agreement.py --models mobileone_48 --seeds 0 --set synth.lambda_bn=0

A teacher that keeps few labels under the roll is taught by KD mostly on images it reads as other classes
(README, "The roll in KD"). One line per model and seed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch
from finetune import model_spec, synthetic_source

from gzq.augment import augment, jitter_pixels
from gzq.config import SynthConfig
from gzq.models import load_teacher

IMAGES, STEPS, ROLLS = 128, 150, 16


def roll_agreement(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, roll: int,
                   rolls: int = ROLLS, seed: int = 0) -> dict[str, float]:
    """The model's agreement with `labels` on x, and under `rolls` random rolls of up to `roll` pixels, each drawn
    as KD draws its roll (gzq.augment.augment without flips)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        plain = (model(x).argmax(1) == labels).float().mean().item()
        rolled = []
        for _ in range(rolls):
            rolled.append((model(augment(x, roll, False, g)).argmax(1) == labels).float().mean().item())
    return {"plain": plain, "rolled": sum(rolled) / len(rolled), "worst": min(rolled)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated zoo model names")
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[], metavar="synth.FIELD=VALUE",
                   help="a synthesis override; the images it gives are made and cached where missing")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_cache")
    args = p.parse_args(argv)
    wrong = [s for s in args.set if not s.startswith("synth.")]
    if wrong:
        p.error(f"--set {wrong[0]}: only synthesis fields (synth.FIELD=VALUE) change the images")
    torch.set_num_threads(1)
    for name in args.models.split(","):
        spec = model_spec(name, False, args.cache_dir / "zoo")
        teacher = load_teacher(spec, torch.device("cpu"))
        teacher.model.eval()
        roll = jitter_pixels(SynthConfig().jitter, teacher.input_size)
        for seed in (int(s) for s in args.seeds.split(",")):
            if not args.set and not any(args.cache_dir.glob(f"{name}_{IMAGES}_{STEPS}_{seed}_*.pt")):
                print(f"{name} seed {seed}: no cached images, skipped")
                continue
            synth = synthetic_source(spec, IMAGES, STEPS, seed, args.cache_dir, name, tuple(args.set))(teacher, "cpu")
            x = synth.images(torch.arange(IMAGES), noise=False)
            r = roll_agreement(teacher.model, x, synth.images.labels, roll)
            what = "".join(f" {s}" for s in args.set)
            print(f"{name:16s} seed {seed}{what} roll {roll:2d} px: plain {r['plain']:.3f}, rolled {r['rolled']:.3f} "
                  f"(worst of {ROLLS} {r['worst']:.3f})", flush=True)


if __name__ == "__main__":
    main()
