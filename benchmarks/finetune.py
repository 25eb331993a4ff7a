"""Fine-tuning methods side by side on the same images: KD, block reconstruction, both.

    python benchmarks/finetune.py --models mobilenetv2_64,regnetx_32,ghostnet_48 --bits w4a4,w3a3
    python benchmarks/finetune.py --models mobilenetv2 --source gznq,real        # the bundled MobileNetV2
    python benchmarks/finetune.py --quick                                          # smoke test, temporary files

Each model's synthetic images are made once (GZNQ likelihood synthesis without students, `--images` x
`--steps`, cached in --cache-dir) and every fine-tuning method starts from a fresh student calibrated on
them, so the columns differ only in how the student is fitted. "real" runs the same on as many real
training images (the real-data bound of each method). Models: the bundled `default` and `mobilenetv2`, or
any zoo model (scripts/train_zoo.py). Real top-1 on the test set (the first 5,000 images); wall seconds of
the fine-tuning stage itself, so the cost ratio of the methods is measured in one run; and the data-free
signals a run has without real data (each student's KL to the teacher and top-1 agreement on the held-out
synthetic images).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy import MODELS, digest, real_source  # noqa: E402
from train_zoo import ZOO, ensure_trained  # noqa: E402

from gzq.augment import coarse_size
from gzq.config import (  # noqa: E402
    BAND_PROBE_IMAGES,
    FinetuneMethod,
    ImageParam,
    ModelSpec,
    RunConfig,
    SynthConfig,
    override,
)
from gzq.events import drain  # noqa: E402
from gzq.models import load_teacher  # noqa: E402
from gzq.pipeline import run  # noqa: E402
from gzq.presets import make_config, resolve_device  # noqa: E402
from gzq.synthesis import SynthResult, SyntheticImages, choose_band, iter_synthesize  # noqa: E402


def model_spec(name: str, quick: bool, folder: Path) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    if name not in ZOO:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(list(MODELS) + list(ZOO))}")
    ckpt = ensure_trained(name, folder=folder, train_images=640) if quick else ensure_trained(name)
    return ModelSpec(ZOO[name].arch, checkpoint=str(ckpt))


#: synthesis fields added after images were first cached, at the values that leave the images as they were
NEUTRAL = {"label_smoothing": 0.0, "band": 1.0, "decorrelate_colour": False}


def synth_key(cfg: SynthConfig, input_size) -> dict:
    """The synthesis settings that can change this model's images, so that images cached before a field
    existed (at its neutral value, NEUTRAL) or made with a setting that cannot affect this model are reused:
    the coarse warm-up's fields count only where the input is large enough for a coarse size
    (gzq.augment.coarse_size), the colour basis only for 3-channel inputs."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in NEUTRAL or v != NEUTRAL[k]}
    if input_size[0] != 3:
        d.pop("decorrelate_colour", None)
    if coarse_size(input_size, cfg.coarse_scale, cfg.coarse_min_side) is None:
        d.pop("coarse_scale"), d.pop("coarse_min_side")
    return d


def weights_digest(model) -> str:
    """A short digest of a model's weights and buffers, so that images cached for one teacher are never reused
    for another of the same name (a zoo model rebuilt with another thread count differs in the last bits)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def synthetic_source(spec: ModelSpec, images: int, steps: int, seed: int, cache_dir: Path, name: str,
                     synth_set: tuple[str, ...] = ()):
    """The images every method shares: synthesised once per (model, synthesis config, seed) and cached; the
    file name carries a hash of the config, so a changed recipe never reuses images made by an older one.
    synth_set: "synth.FIELD=VALUE" overrides of that synthesis (the --set items of the synth section).
    synth.band=auto is resolved first (its probe cached beside the images), so the images are keyed by the band
    it picked: where that is the full band, the images made before the probe existed are reused."""
    cfg = SynthConfig(num_images=images, holdout_images=max(images // 8, 1), batch_size=min(96, images),
                      steps=steps, warmup_steps=steps // 3, adversarial=False)
    given = override(RunConfig(synth=cfg), *synth_set).synth
    derived = [f for f in ("num_images", "steps", "holdout_images", "batch_size", "warmup_steps")
               if getattr(given, f) != getattr(cfg, f)]
    if derived:
        raise SystemExit(f"--set synth.{derived[0]} does not apply to the cached images; use --images / --steps")
    cfg = given
    dev = resolve_device("auto")
    teacher = load_teacher(spec, dev)
    stem = f"{name}_{images}_{steps}_{seed}_{weights_digest(teacher.model)}"   # retrained teachers: new images
    probe = None
    if cfg.band == "auto":   # resolved first (and cached), so the images are those of the band it picks
        size = cfg.band_probe_images()   # named where it is not the full probe the cached files were made with
        tag = "" if size == BAND_PROBE_IMAGES else f"_probe{size}"
        probe_file = cache_dir / f"{stem}_{digest(synth_key(cfg, teacher.input_size))}{tag}.band.json"
        if not probe_file.exists():
            band, losses = choose_band(teacher, cfg, dev, seed)
            probe_file.parent.mkdir(parents=True, exist_ok=True)
            probe_file.write_text(json.dumps(dict(band=band, losses={str(b): v for b, v in losses.items()})))
        probe = json.loads(probe_file.read_text())
        cfg = dataclasses.replace(cfg, band=probe["band"])
    cache = cache_dir / f"{stem}_{digest(synth_key(cfg, teacher.input_size))}.pt"
    if not cache.exists():
        _, res = drain(iter_synthesize(teacher, {}, cfg, dev, seed), keep=False)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(state=res.images.state_dict(), train=res.train_idx.cpu(), hold=res.holdout_idx.cpu(),
                        flip=res.flip, jitter=res.jitter, steps=res.steps_done), cache)
    saved = torch.load(cache)

    def make(teacher, device) -> SynthResult:
        images = SyntheticImages(saved["state"]["labels"], teacher.input_size, teacher.pixel_bounds,
                                 ImageParam.REPARAM, 0.0, torch.Generator())
        images.load_state_dict(saved["state"])
        return SynthResult(images.to(device), saved["train"], saved["hold"], False, saved["steps"],
                           {"bn_ll": [], "ce": []}, flip=saved["flip"], jitter=saved["jitter"],
                           band=cfg.band, band_probe=probe and {float(b): v for b, v in probe["losses"].items()})
    return make


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenetv2_64,regnetx_32,ghostnet_48")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--finetune", default="kd,recon,recon+kd")
    p.add_argument("--source", default="gznq", help="gznq, real, or both (comma-separated)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--epochs", type=int, default=30, help="KD epochs (block reconstruction is sized from them)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="e.g. --set train.recon_steps=200 (repeatable); synth.* items also apply to the synthesis "
                        "of the cached images")
    p.add_argument("--quick", action="store_true", help="tiny budget, one model, temporary files")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_cache")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/finetune.json; temporary "
                                          "with --quick)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    finetunes = [f for f in args.finetune.split(",") if f]
    bad = [f for f in finetunes if f not in {m.value for m in FinetuneMethod}]
    if bad:
        p.error(f"unknown fine-tuning methods {bad}; known: {', '.join(m.value for m in FinetuneMethod)}")
    if args.quick:
        models, args.images, args.steps, args.epochs = models[:1], 24, 6, 1
        args.cache_dir = Path(tempfile.mkdtemp())
        args.out = args.out or args.cache_dir / "finetune.json"
    args.out = args.out or ROOT / "benchmarks" / "results" / "finetune.json"
    rows = []
    for name in models:
        spec = model_spec(name, args.quick, args.cache_dir / "zoo")
        for source in args.source.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                if source == "real":
                    make = real_source(args.images, max(args.images // 8, 1), seed)
                else:
                    make = synthetic_source(spec, args.images, args.steps, seed, args.cache_dir, name,
                                            tuple(i for i in args.set if i.startswith("synth.")))
                for bits in args.bits.split(","):
                    for ft in finetunes:
                        cfg = make_config("cpu", "auto", model=spec, students=[bits], seed=seed,
                                          synth=dict(num_images=args.images, holdout_images=max(args.images // 8, 1)),
                                          train=dict(method=ft, epochs=args.epochs), export=dict(formats=[]),
                                          eval=dict(max_real_images=200 if args.quick else 5000))
                        cfg.time_budget_s = None   # every method on the branched network (recon fits it)
                        cfg = override(cfg, "students.fuse_branches=false", *args.set)
                        rep = run(cfg, synth_source=make)
                        secs = sum(rep["timings"].get(k, 0.0) for k in ("reconstruct", "finetune"))
                        row = dict(model=name, source=source, seed=seed, bits=bits, finetune=ft,
                                   fp=rep["teacher"]["accuracy"], accuracy=rep["students"][0]["accuracy"],
                                   kl=rep["students"][0]["kl"], agreement=rep["students"][0]["agreement"],
                                   finetune_s=round(secs, 1), band=rep["synthesis"]["health"]["band"],
                                   kd_rounds=rep["students"][0].get("kd_rounds"),
                                   act_percentile=rep["students"][0].get("act_percentile"))
                        rows.append(row)
                        pick = f", percentile {row['act_percentile']:g}" if row["act_percentile"] else ""
                        print(f"  {name} {source} seed {seed} {bits} {ft}: {row['accuracy']} "
                              f"(fine-tuning {secs:.0f} s{pick})", flush=True)
    print(f"\n{'model':<16}{'images':<8}{'bits':<7}{'FP':>7}" + "".join(f"{f:>12}" for f in finetunes)
          + "".join(f"{f + ' s':>12}" for f in finetunes) + f"{'recon/kd time':>15}")
    keys = dict.fromkeys((r["model"], r["source"], r["bits"]) for r in rows)
    for model, source, bits in keys:
        sel = [r for r in rows if (r["model"], r["source"], r["bits"]) == (model, source, bits)]
        acc = {f: statistics.mean(r["accuracy"] for r in sel if r["finetune"] == f) for f in finetunes}
        secs = {f: statistics.mean(r["finetune_s"] for r in sel if r["finetune"] == f) for f in finetunes}
        ratio = f"{secs['recon'] / secs['kd']:.2f}x" if "recon" in secs and secs.get("kd") else "-"
        print(f"{model:<16}{source:<8}{bits:<7}{sel[0]['fp']:>7.2f}" + "".join(f"{acc[f]:>12.2f}" for f in finetunes)
              + "".join(f"{secs[f]:>12.1f}" for f in finetunes) + f"{ratio:>15}")
    for source in dict.fromkeys(r["source"] for r in rows):
        for bits in dict.fromkeys(r["bits"] for r in rows):
            sel = [r for r in rows if r["source"] == source and r["bits"] == bits]
            print(f"mean {source} {bits}: " + ", ".join(
                f"{f} {statistics.mean(r['accuracy'] for r in sel if r['finetune'] == f):.2f}" for f in finetunes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
