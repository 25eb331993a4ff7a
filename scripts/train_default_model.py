"""Train the bundled default teacher: a narrow timm ResNet-18 on Fashion-MNIST.

    python scripts/train_default_model.py            # ~6 min on 2 idle CPU cores, writes assets/default_model.*
    python scripts/train_default_model.py --arch mobilenetv2_050 --name mobilenetv2_fmnist   # benchmark's 2nd family

Deterministic given --seed. The weights go to assets/<name>.safetensors and the model card (architecture,
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
from gzq.data import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_input  # noqa: E402

ARCHS = {  # timm kwargs per architecture trained here
    "resnet18": dict(num_classes=10, in_chans=1, channels=(32, 64, 128, 256), stem_width=32),
}
GENERIC_KWARGS = dict(num_classes=10, in_chans=1)
INPUT_SIZE = (1, 28, 28)
MEAN, STD = (0.2860,), (0.3530,)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 px (zero-padded crop) and horizontal flip. x: (B, C, H, W) normalised."""
    b, _, h, w = x.shape
    pad_value = (0.0 - MEAN[0]) / STD[0]
    xp = F.pad(x, (2, 2, 2, 2), value=pad_value)
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    x = xp[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


@torch.no_grad()
def evaluate(model, x, y, batch=1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def main(argv=None):
    import timm
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="timm architecture with BatchNorm")
    p.add_argument("--name", default="default_model", help="file stem in --out")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    gen = torch.Generator().manual_seed(args.seed)

    xtr_u8, ytr = load_fashion_mnist("train")
    xte_u8, yte = load_fashion_mnist("test")
    xtr, xte = to_model_input(xtr_u8, MEAN, STD, INPUT_SIZE), to_model_input(xte_u8, MEAN, STD, INPUT_SIZE)

    model_kwargs = ARCHS.get(args.arch, GENERIC_KWARGS)
    model = timm.create_model(args.arch, **model_kwargs)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim > 1]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(xtr) // args.batch_size
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))

    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(xtr[idx], gen)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        print(f"epoch {epoch + 1}/{args.epochs} loss {running / steps_per_epoch:.4f} ({time.time() - t0:.0f}s)", flush=True)

    acc = evaluate(model, xte, yte)
    print(f"test top-1: {acc:.2f}% ({time.time() - t0:.0f}s)")
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / f"{args.name}.safetensors"))
    meta = dict(
        architecture=args.arch, model_kwargs=model_kwargs, input_size=list(INPUT_SIZE), mean=list(MEAN), std=list(STD),
        interpolation="bilinear", class_names=list(FASHION_MNIST_CLASSES), dataset="fashion-mnist",
        test_accuracy=round(acc, 2), train_command="python scripts/train_default_model.py "
        f"--arch {args.arch} --name {args.name} --epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr} --seed {args.seed}",
        train_seconds=round(time.time() - t0, 1),
    )
    (args.out / f"{args.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out / (args.name + '.safetensors')}")


if __name__ == "__main__":
    main()
