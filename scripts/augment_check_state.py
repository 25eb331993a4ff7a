"""What the augmentation check sees: the teacher's agreement with the labels of the image means at the check
step (half the synthesis steps by default), upright, mirrored and rolled, and on the augmented batches.

    python scripts/augment_check_state.py --models mobilenetv2_64,regnetx_32 --seeds 0

Synthesis as benchmarks/finetune.py runs it (128 images x 150 steps, no student ensemble), stopped just after
the check; zoo models come from scripts/train_zoo.py. One line per model and seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_zoo import ZOO, ensure_trained  # noqa: E402

from gzq.config import ModelSpec, SynthConfig  # noqa: E402
from gzq.events import Progress  # noqa: E402
from gzq.models import load_teacher  # noqa: E402
from gzq.synthesis import iter_synthesize  # noqa: E402


def check_state(name: str, seed: int, images: int = 128, steps: int = 150) -> dict[str, float]:
    teacher = load_teacher(ModelSpec(ZOO[name].arch, checkpoint=str(ensure_trained(name))), "cpu")
    cfg = SynthConfig(num_images=images, holdout_images=images // 8, batch_size=min(64, images), steps=steps,
                      warmup_steps=steps // 3, adversarial=False)
    check_step = max(int(cfg.augment_check_at * steps), 1)
    done = [0]
    it = iter_synthesize(teacher, {}, cfg, torch.device("cpu"), seed, stop=lambda: done[0] > check_step)
    try:
        while True:
            e = next(it)
            if isinstance(e, Progress):
                done[0] = e.step
    except StopIteration as s:
        return s.value.flip_check


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ZOO))
    p.add_argument("--seeds", default="0")
    args = p.parse_args(argv)
    cols = ("label_agreement", "flipped_label_agreement", "rolled_label_agreement", "augmented_agreement")
    print(f"{'model':18s} seed " + " ".join(f"{c.replace('_agreement', ''):>14s}" for c in cols))
    for name in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            st = check_state(name, seed)
            print(f"{name:18s} {seed:4d} " + " ".join(f"{100 * st.get(c, float('nan')):14.1f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
