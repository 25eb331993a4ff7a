"""Train the benchmark zoo: timm BN classifiers of many families, input sizes, channel counts and training
augmentations, all on Fashion-MNIST (offline: Debian's dataset-fashion-mnist), deterministically.

    python scripts/train_zoo.py                 # every model missing from the cache (1-7 min per model at 2
                                                # epochs; the fourth fresh set's 6 took 6-26 min at one thread)
    python scripts/train_zoo.py --models regnetx_32 --force

The weights and model cards go to $GZQ_ZOO_DIR (default ~/.cache/gzq/zoo), outside git; benchmarks/zoo.py
calls the same code for any model it is missing. The split into a tuning set and a held-out set was fixed
before any default was tuned on these models: defaults may be chosen on TUNING only, and HELD_OUT is the
evidence that they transfer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default_model import train  # noqa: E402

ZOO_DIR = Path(os.environ.get("GZQ_ZOO_DIR", Path.home() / ".cache" / "gzq" / "zoo"))


@dataclass(frozen=True)
class ZooModel:
    arch: str
    input_size: tuple[int, int, int]   # (C, H, W); 3 channels = tinted RGB Fashion-MNIST
    flip: bool                         # trained with horizontal flips
    epochs: int
    train_images: int                  # random subset of the 60k training images
    model_kwargs: dict = field(default_factory=dict)
    lr: float = 0.1
    max_real_images: int = 5000        # test images the benchmark evaluates on (the first N of 10k)
    note: str = ""


ZOO: dict[str, ZooModel] = {
    # tuning set: the families that failed before (depthwise, grouped) and a 3-channel input
    "mobilenetv2_64": ZooModel("mobilenetv2_050", (1, 64, 64), False, 3, 20000, lr=0.05, note="depthwise, inverted residual"),
    "regnetx_32": ZooModel("regnetx_002", (1, 32, 32), True, 3, 20000, note="grouped convs"),
    "ghostnet_48": ZooModel("ghostnet_050", (3, 48, 48), True, 3, 15000, lr=0.05, note="ghost modules, depthwise, SE, RGB"),
    # held-out set
    "mobilenetv3_224": ZooModel("mobilenetv3_small_050", (3, 224, 224), True, 2, 6000, lr=0.05, max_real_images=2000,
                                note="depthwise, SE, hard-swish, 224 px RGB"),
    "efficientnet_48": ZooModel("efficientnet_b0", (1, 48, 48), False, 2, 10000, lr=0.05, note="depthwise, SE, SiLU"),
    "lcnet_128": ZooModel("lcnet_050", (3, 128, 128), False, 2, 10000, lr=0.05, note="depthwise, hard-swish, 128 px RGB"),
    "regnety_48": ZooModel("regnety_002", (3, 48, 48), False, 2, 12000, note="grouped convs, SE, RGB"),
    "repvgg_32": ZooModel("repvgg_a0", (1, 32, 32), False, 2, 15000, note="multi-branch, BN on the identity branch"),
    "densenet_32": ZooModel("densenet121", (1, 32, 32), True, 2, 12000, note="pre-activation BN, concatenation"),
    # confirmation set: added after the tuning and held-out sets had been measured, to test one candidate
    # default chosen with the held-out models in view (README, "Spectral image basis")
    "mnasnet_96": ZooModel("mnasnet_small", (3, 96, 96), False, 2, 10000, lr=0.05, note="depthwise, SE, 96 px RGB"),
    "mixnet_64": ZooModel("mixnet_s", (1, 64, 64), True, 2, 10000, lr=0.05, note="mixed-kernel depthwise, SE, swish"),
    # fresh set: added after every default above was chosen, and run only under rules written before their
    # first run; families the other sets lack (a plain ResNet, universal inverted bottlenecks, ReXNet, DLA)
    "resnet10t_64": ZooModel("resnet10t", (3, 64, 64), True, 2, 10000, note="plain ResNet, deep stem, RGB"),
    "mobilenetv4_96": ZooModel("mobilenetv4_conv_small", (3, 96, 96), False, 2, 10000, lr=0.05,
                               note="universal inverted bottlenecks, depthwise, 96 px RGB"),
    "rexnet_48": ZooModel("rexnet_100", (1, 48, 48), False, 2, 10000, lr=0.05, note="depthwise, SE, SiLU and ReLU6"),
    "dla_32": ZooModel("dla46x_c", (1, 32, 32), True, 2, 12000, note="grouped convs, hierarchical aggregation"),
    # second fresh set: added after the roll in KD had been studied on the sets above, run once with every default
    # under the zoo's bars written down before their first run; families none of the sets above has
    "vovnet_64": ZooModel("ese_vovnet19b_dw", (1, 64, 64), True, 2, 10000, lr=0.05,
                          note="one-shot aggregation (concatenation), depthwise, eSE"),
    "hgnetv2_96": ZooModel("hgnetv2_b0", (3, 96, 96), False, 2, 10000, lr=0.05,
                           note="PP-HGNetV2 light blocks, depthwise, ESE, 96 px RGB"),
    "cspdarknet_48": ZooModel("cs3darknet_s", (3, 48, 48), True, 2, 10000,
                              note="cross-stage partial, plain convs, RGB"),
    "mobileone_48": ZooModel("mobileone_s0", (1, 48, 48), False, 2, 10000, lr=0.05,
                             note="re-parameterisable multi-branch, depthwise"),
    # third fresh set: the same rules as the second, families none of the sets above has
    "gernet_64": ZooModel("gernet_s", (3, 64, 64), True, 2, 10000, note="GENet (ByobNet): plain, bottleneck and "
                          "depthwise stages, RGB"),
    "repvit_64": ZooModel("repvit_m0_9", (1, 64, 64), False, 2, 10000, lr=0.05,
                          note="RepViT mobile blocks, re-parameterisable depthwise branches, SE"),
    "dpn_32": ZooModel("dpn48b", (3, 32, 32), True, 2, 10000, note="dual path, grouped convs, pre-activation BN, RGB"),
    "resnest_48": ZooModel("resnest14d", (1, 48, 48), False, 2, 10000, note="split attention, grouped convs"),
    # fourth fresh set: the same rules, families none of the sets above has, and teachers trained three times as
    # long as the others' (users bring converged models; the sets above showed 2-epoch teachers behind some misses)
    "skresnet18_32": ZooModel("skresnet18", (3, 32, 32), True, 6, 10000,
                              note="selective kernel: attention over 3x3 and dilated branches, RGB"),
    "starnet_48": ZooModel("starnet_s1", (1, 48, 48), False, 6, 10000, lr=0.05,
                           note="star operation (element-wise product of two branches), depthwise"),
    "fastvit_64": ZooModel("fastvit_t8", (3, 64, 64), False, 6, 10000, lr=0.05,
                           note="RepMixer, re-parameterisable MobileOne-style stem and blocks, RGB"),
    # fifth fresh set: the same rules as the fourth (6-epoch teachers), families none of the sets above has
    "shvit_64": ZooModel("shvit_s1", (1, 64, 64), False, 6, 10000, lr=0.05,
                         note="single-head attention hybrid, BN throughout"),
    "fasternet_48": ZooModel("fasternet_t0", (3, 48, 48), True, 6, 10000, lr=0.05,
                             note="partial convolutions (a quarter of the channels), RGB"),
    # sixth fresh set: the same rules as the fourth and fifth
    "hrnet_64": ZooModel("hrnet_w18_small", (3, 64, 64), True, 6, 10000,
                         note="parallel multi-resolution branches exchanging features at every stage, RGB"),
    "mobilevit_64": ZooModel("mobilevit_xxs", (1, 64, 64), False, 6, 10000, lr=0.05,
                             note="convolutions with BN, transformer blocks with LayerNorm between them"),
}
TUNING = ("mobilenetv2_64", "regnetx_32", "ghostnet_48")
CONFIRMATION = ("mnasnet_96", "mixnet_64")
FRESH = ("resnet10t_64", "mobilenetv4_96", "rexnet_48", "dla_32")
FRESH2 = ("vovnet_64", "hgnetv2_96", "cspdarknet_48", "mobileone_48")
FRESH3 = ("gernet_64", "repvit_64", "dpn_32", "resnest_48")
FRESH4 = ("skresnet18_32", "starnet_48", "fastvit_64")
FRESH5 = ("shvit_64", "fasternet_48")
FRESH6 = ("hrnet_64", "mobilevit_64")
#: the fresh sets by their key in benchmarks/zoo.py's results, in the order they were added
FRESH_SETS = {"fresh": FRESH, "fresh2": FRESH2, "fresh3": FRESH3, "fresh4": FRESH4, "fresh5": FRESH5, "fresh6": FRESH6}
HELD_OUT = tuple(n for n in ZOO if n not in TUNING + CONFIRMATION + sum(FRESH_SETS.values(), ()))


def train_command(name: str, epochs: int | None = None) -> str:
    """The command that trains zoo model `name` (for `epochs` instead of the zoo's own), as its card records it."""
    return f"python scripts/train_zoo.py --models {name}" + (f" --epochs {epochs}" if epochs else "")


def ensure_trained(name: str, force: bool = False, threads: int = 2, folder: Path | None = None,
                   train_images: int | None = None, epochs: int | None = None) -> Path:
    """The checkpoint of zoo model `name` in `folder` (default ZOO_DIR), trained first when it is not there.
    train_images overrides the model's subset size (a smoke test trains on a few images, for one epoch);
    epochs overrides its epoch count (a teacher trained longer than the zoo's, in a folder of its own)."""
    m = ZOO[name]
    folder = folder or ZOO_DIR
    path = folder / f"{name}.safetensors"
    if force or not path.exists() or not path.with_suffix(".json").exists():
        n = train_images or m.train_images
        train(m.arch, name, folder, m.input_size, m.model_kwargs, flip=m.flip,
              epochs=epochs or (m.epochs if n == m.train_images else 1), lr=m.lr, train_images=n, threads=threads,
              command=train_command(name, epochs))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ZOO), help=f"comma-separated, from {', '.join(ZOO)}")
    p.add_argument("--force", action="store_true", help="retrain even when cached")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, help="train for this many epochs instead of the zoo's (with GZQ_ZOO_DIR set "
                   "to a folder of its own: a stronger teacher beside the zoo's, for diagnosis)")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        p.error(f"unknown zoo models {unknown}; known: {', '.join(ZOO)}")
    for n in names:
        card = ZOO_DIR / f"{n}.json"
        if args.epochs and not args.force and card.exists():
            made_by = json.loads(card.read_text()).get("train_command", "")
            if made_by != train_command(n, args.epochs):
                p.error(f"{n} is already in {ZOO_DIR}, made by `{made_by}`, so --epochs {args.epochs} would not "
                        f"apply: set GZQ_ZOO_DIR to another folder for the longer-trained teacher (or add --force "
                        f"to replace this one)")
        print(ensure_trained(n, args.force, args.threads, epochs=args.epochs))


if __name__ == "__main__":
    main()
