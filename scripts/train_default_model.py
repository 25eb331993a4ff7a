"""Train the bundled default teacher: a narrow timm ResNet-18 on Fashion-MNIST (and, through `train()`, the
benchmark zoo's teachers: scripts/train_zoo.py).

    python scripts/train_default_model.py            # ~6 min on 2 idle CPU cores, writes assets/default_model.*
    python scripts/train_default_model.py --arch mobilenetv2_050 --name mobilenetv2_fmnist   # benchmark's 2nd family
    python scripts/train_default_model.py --arch regnetx_002 --input-size 3 32 32 --no-flip --out /tmp/zoo

Deterministic given --seed. 3-channel models train on tinted RGB Fashion-MNIST (`gzq.data.colourise`), and
other input sizes on resized images; mean and std are measured on the training images. The weights go to assets/<name>.safetensors and the model card (architecture,
timm kwargs, input size, mean/std, class names, dataset, measured test accuracy) to assets/<name>.json,
which is everything `gzq.models.load_teacher` needs (ModelSpec(name=arch, checkpoint=...safetensors)).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gzq.data import FASHION_MNIST_CLASSES, load_dataset, to_model_input  # noqa: E402

ARCHS = {  # timm kwargs per architecture trained here
    "resnet18": dict(num_classes=10, in_chans=1, channels=(32, 64, 128, 256), stem_width=32),
}
INPUT_SIZE = (1, 28, 28)
MEAN, STD = (0.2860,), (0.3530,)   # the bundled model's (measured on the 28-px grey training set)


def augment(x: torch.Tensor, gen: torch.Generator, black: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Random shift by up to 1/14 of the side (2 px at 28 px; padded with black) and, optionally, a
    horizontal flip. x: (B, C, H, W) normalised; black: (1, C, 1, 1), a black pixel normalised."""
    b, _, h, w = x.shape
    p = max(round(h / 14), 1)
    xp = F.pad(x - black, (p, p, p, p)) + black
    dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=gen).tolist()
    x = xp[:, :, dy:dy + h, dx:dx + w]
    if not flip:
        return x
    mask = torch.rand(b, generator=gen) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


@torch.no_grad()
def evaluate(model, x, y, batch=500, prep=None) -> float:
    """Top-1 in percent; prep turns a batch of stored images into model input (None: x is model input)."""
    model.eval()
    prep = prep or (lambda b: b)
    correct = sum((model(prep(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def train(arch: str, name: str, out: Path, input_size=INPUT_SIZE, model_kwargs: dict | None = None,
          flip: bool = True, epochs: int = 15, batch_size: int = 128, lr: float = 0.1, train_images: int | None = None,
          seed: int = 0, threads: int = 2, command: str = "") -> dict:
    """Train `arch` on Fashion-MNIST (tinted RGB when input_size has 3 channels) and write
    out/<name>.safetensors and its model card out/<name>.json. Returns the card."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    gen = torch.Generator().manual_seed(seed)
    input_size = tuple(input_size)
    dataset = "fashion-mnist" if input_size[0] == 1 else "fashion-mnist-rgb"
    xtr_u8, ytr = load_dataset(dataset, "train")
    xte_u8, yte = load_dataset(dataset, "test")
    if train_images is not None:
        keep = torch.randperm(len(ytr), generator=gen)[:train_images]
        xtr_u8, ytr = xtr_u8[keep], ytr[keep]
    if input_size == INPUT_SIZE:
        mean, std = MEAN, STD
    else:  # measured on the training images at the model's input size
        px = to_model_input(xtr_u8[:5000], (0.0,) * input_size[0], (1.0,) * input_size[0], input_size)
        mean = tuple(round(v, 4) for v in px.mean((0, 2, 3)).tolist())
        std = tuple(round(v, 4) for v in px.std((0, 2, 3)).tolist())
    # resized per batch: 10k test images at 224 px would be 6 GB as floats
    prep = (lambda u8: to_model_input(u8, mean, std, input_size)) if input_size[1:] != tuple(xtr_u8.shape[-2:]) else None
    xtr, xte = (xtr_u8, xte_u8) if prep else (to_model_input(xtr_u8, mean, std, input_size),
                                              to_model_input(xte_u8, mean, std, input_size))
    black = ((0 - torch.tensor(mean)) / torch.tensor(std)).view(1, -1, 1, 1)

    model_kwargs = dict(model_kwargs or ARCHS.get(arch, {}))
    model_kwargs.update(num_classes=10, in_chans=input_size[0])
    model = timm.create_model(arch, **model_kwargs)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim > 1]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(xtr) // batch_size
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))

    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = prep(xtr[idx]) if prep else xtr[idx]
            loss = F.cross_entropy(model(augment(xb, gen, black, flip)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        print(f"{name} epoch {epoch + 1}/{epochs} loss {running / steps_per_epoch:.4f} ({time.time() - t0:.0f}s)",
              flush=True)

    acc = evaluate(model, xte, yte, prep=prep)
    print(f"{name} test top-1: {acc:.2f}% ({time.time() - t0:.0f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"))
    card = dict(
        architecture=arch, model_kwargs=model_kwargs, input_size=list(input_size), mean=list(mean), std=list(std),
        interpolation="bilinear", class_names=list(FASHION_MNIST_CLASSES), dataset=dataset, trained_with_flips=flip,
        test_accuracy=round(acc, 2), train_command=command, train_seconds=round(time.time() - t0, 1),
    )
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out / (name + '.safetensors')}")
    return card


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="timm architecture with BatchNorm")
    p.add_argument("--name", default="default_model", help="file stem in --out")
    p.add_argument("--input-size", type=int, nargs=3, default=INPUT_SIZE, metavar=("C", "H", "W"),
                   help="1 or 3 channels (3: tinted RGB Fashion-MNIST), any side >= 16")
    p.add_argument("--no-flip", action="store_true", help="train without horizontal flips")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-images", type=int, help="train on a random subset of this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    args = p.parse_args(argv)
    train(args.arch, args.name, args.out, args.input_size, flip=not args.no_flip, epochs=args.epochs,
          batch_size=args.batch_size, lr=args.lr, train_images=args.train_images, seed=args.seed, threads=args.threads,
          command="python scripts/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
