"""Command line: `python -m gzq run --model default --w-bits 4 --a-bits 4 --out runs/x`.

Under `torchrun --nproc_per_node N -m gzq run ...` the same command runs as N processes of one run
(gzq.dist): rank 0 prints and writes, the others stay quiet.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from .config import FinetuneMethod, ModelSpec, Protocol, QuantSpec, override
from .events import Done, Message, Preview, Progress, StageStarted, Stopped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gzq", description="Data-free quantization of timm CNNs (GZNQ).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="synthesise images, train quantized students, evaluate, save")
    r.add_argument("--model", default="default", help="'default' (bundled Fashion-MNIST ResNet) or a timm name")
    r.add_argument("--checkpoint", help="local weights for --model (safetensors or a torch state dict)")
    r.add_argument("--pretrained", action="store_true", help="download --model's pretrained weights from the hub")
    r.add_argument("--num-classes", type=int)
    r.add_argument("--in-chans", type=int)
    r.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    r.add_argument("--mean", type=float, nargs="+")
    r.add_argument("--std", type=float, nargs="+")
    r.add_argument("--w-bits", type=int, default=4)
    r.add_argument("--a-bits", type=int, default=4)
    r.add_argument("--students", help="comma-separated configurations from one synthesis, e.g. w4a4,w8a8 "
                                      "(overrides --w-bits/--a-bits)")
    r.add_argument("--protocol", default="all_layers", choices=[p_.value for p_ in Protocol])
    r.add_argument("--num-students", type=int, help="M; extra students are seeds of the first configuration")
    r.add_argument("--preset", choices=["cpu", "gpu"], help="budget preset (default: by device)")
    r.add_argument("--steps", type=int, help="synthesis steps")
    r.add_argument("--images", type=int, help="number of synthetic images")
    r.add_argument("--epochs", type=int, help="fine-tuning epochs")
    r.add_argument("--finetune", choices=[m.value for m in FinetuneMethod],
                   help="how the quantized students are fitted: kd (end-to-end distillation), recon (block "
                        "reconstruction: learnt rounding, QDrop), recon+kd (both), calibrate (step sizes only, no "
                        "training), auto (default: calibrate for 8-bit students, kd for narrower ones)")
    r.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="shrink images and steps to fit about this many seconds, measured on this device before the "
                        "run (presets: cpu 600, gpu 3600; 0 = run the budget as given)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any config field, e.g. --set synth.bn_loss=mse --set train.lr=3e-4 --set students.act_init=mse "
                        "(repeatable)")
    r.add_argument("--data", help="labelled ImageFolder (a folder, or a .zip of one) for real accuracy "
                                  "(the default model uses its test set)")
    r.add_argument("--max-real-images", type=int)
    r.add_argument("--export", default="onnx,safetensors",
                   help="downloads to write: comma-separated onnx,safetensors, or 'none' (default: both)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda")
    r.add_argument("--amp", action="store_true", help="bf16 mixed precision for synthesis and KD (for a GPU)")
    r.add_argument("--channels-last", action="store_true", help="NHWC memory format (for a GPU)")
    r.add_argument("--compile", action="store_true", help="torch.compile the fine-tuning forwards")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True, help="run folder to write")
    r.add_argument("-q", "--quiet", action="store_true")
    ls = sub.add_parser("list-models", help="timm architectures with BatchNorm")
    ls.add_argument("pattern", nargs="?", default="resnet*")
    return p


def build_config(args):
    from .presets import make_config
    if args.model == "default" and args.checkpoint:
        from .models import read_model_card
        if not read_model_card(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint} has no model card ({args.checkpoint.rsplit('.', 1)[0]}"
                             ".json naming its architecture), so 'default' cannot tell what network it holds; "
                             "name its timm architecture with --model, e.g. --model resnet18")
    if args.students:
        students = [QuantSpec.parse(s, args.protocol) for s in args.students.split(",") if s.strip()]
    else:
        students = [QuantSpec(args.w_bits, args.a_bits, Protocol(args.protocol))]
    model = ModelSpec(name=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                      num_classes=args.num_classes, in_chans=args.in_chans, input_size=args.input_size,
                      mean=args.mean, std=args.std)
    synth, train, evalc = {}, {}, {"data": args.data, "max_real_images": args.max_real_images}
    if args.num_students is not None:
        synth["num_students"] = args.num_students
    if args.epochs is not None:
        train["epochs"] = args.epochs
    if args.finetune is not None:
        train["method"] = args.finetune
    formats = [] if args.export.strip().lower() == "none" else [f.strip() for f in args.export.split(",") if f.strip()]
    cfg = make_config(args.preset, args.device, model=model, students=students, seed=args.seed, synth=synth,
                      train=train, eval=evalc, export={"formats": formats}, amp=args.amp or None,
                      channels_last=args.channels_last or None, compile=args.compile or None)
    budget = {f"synth.{k}": v for k, v in (("num_images", args.images), ("steps", args.steps)) if v is not None}
    cfg = override(cfg, budget, *args.set)   # hold-out, batch and warm-up follow a new image or step count
    if args.time_budget is not None or args.steps is not None or args.images is not None:
        # an explicit budget is run as given unless a time budget is asked for too
        cfg = dataclasses.replace(cfg, time_budget_s=args.time_budget or None)
    return cfg


def _format_table(report: dict) -> str:
    t = report["teacher"]
    fmt = lambda v, suffix="": "-" if v is None else f"{v}{suffix}"  # noqa: E731
    lines = [f"{'model':<16}{'bits':>7}{'protocol':>17}{'top-1 %':>9}{'agree %':>9}{'KL':>9}{'size KB':>9}",
             f"{'teacher (FP32)':<16}{'32/32':>7}{'-':>17}{fmt(t['accuracy']):>9}{'100':>9}{'0':>9}"
             f"{t['size_bytes'] // 1024:>9}"]
    for s in report["students"]:
        lines.append(f"{s['name']:<16}{str(s['w_bits']) + '/' + str(s['a_bits']):>7}{s['protocol']:>17}"
                     f"{fmt(s['accuracy']):>9}{s['agreement']:>9}{s['kl']:>9.4f}{s['size_bytes'] // 1024:>9}")
    return "\n".join(lines)


def _format_health(report: dict) -> str:
    h = report.get("synthesis", {}).get("health")
    if not h:
        return "synthetic images: from a given source"
    ll = h["final_bn_log_likelihood"]
    line = (f"synthetic images: the teacher gives {h['label_agreement']:.1f} % of them their intended class; "
            f"BN log-likelihood {'-' if ll is None else f'{ll:.2f}'}; flips {'on' if h['flip'] else 'off'}"
            + (f"; frequency band {h['band']:g}" if h.get("band", 1) != 1 else ""))
    return "\n".join([line] + [f"WARNING: {w}" for w in report.get("warnings", [])])


def cmd_run(args) -> int:
    import tempfile
    from pathlib import Path

    from .data import extract_image_folder_zip
    if args.data and args.data.lower().endswith(".zip") and Path(args.data).is_file():
        with tempfile.TemporaryDirectory(prefix="gzq_data_") as tmp:
            try:
                args.data = str(extract_image_folder_zip(args.data, tmp))
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            return cmd_run(args)
    try:
        cfg = build_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from . import dist
    if dist.env_world_size() > 1:
        return _cmd_run_distributed(args, cfg)
    return _cmd_run(args, cfg)


def _cmd_run_distributed(args, cfg) -> int:
    """One process of a torchrun job: join the group, run quietly unless rank 0, leave the group.

    torchrun stops the other processes with SIGTERM when one fails; SIGTERM then raises SystemExit, so the
    pipeline's cleanup (the half-written folder) runs before the process ends.
    """
    import signal

    from . import dist
    from .presets import resolve_device

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        dist.init_from_env(resolve_device(cfg.device))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, terminate)
    args.quiet = args.quiet or not dist.is_main()
    finished = False
    try:
        code = _cmd_run(args, cfg)
        finished = True
        return code
    except RuntimeError as e:   # a collective failed: another process died or failed first
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"error: process {dist.rank()} of {dist.world_size()} stopped: {first}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown(sync=finished)


def _cmd_run(args, cfg) -> int:
    from .pipeline import iter_run
    last_print = 0.0
    try:
        for ev in iter_run(cfg, args.out):
            if args.quiet:
                continue
            if isinstance(ev, StageStarted):
                print(f"== {ev.stage} {ev.message}", flush=True)
            elif isinstance(ev, Message):
                print(("WARNING: " if ev.level == "warning" else "") + ev.text, flush=True)
            elif isinstance(ev, Progress) and (time.time() - last_print > 2 or ev.step == ev.total_steps):
                last_print = time.time()
                parts = [f"{ev.stage} {ev.step}/{ev.total_steps}", f"eta {ev.eta:.0f}s"]
                if ev.block:
                    parts.append(f"block {ev.block}")
                if ev.bn_log_likelihood is not None:
                    parts.append(f"bn_ll {ev.bn_log_likelihood:.2f}")
                parts += [f"{k} {v:.4g}" for k, v in ev.losses.items() if k != "total"]
                parts += [f"KL[{k}] {v:.4f}" for k, v in ev.student_kl.items()]
                print("  ".join(parts), flush=True)
            elif isinstance(ev, Stopped):
                print(f"stopped during {ev.stage} at step {ev.step}")
                return 1
            elif isinstance(ev, Done):
                print(_format_table(ev.report))
                print(_format_health(ev.report))
                print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ev.report["timings"].items()))
                print(f"wrote {ev.out_dir}")
            elif isinstance(ev, Preview):
                pass
    except ValueError as e:  # bad model name, checkpoint, data folder: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "list-models":
        from .models import list_bn_models
        print("\n".join(list_bn_models(args.pattern)))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
