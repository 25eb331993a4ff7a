"""Real-data accuracy of GZNQ against its baselines, on models trained on Fashion-MNIST.

    python benchmarks/accuracy.py                       # default model, W4A4, 3 seeds, every method
    python benchmarks/accuracy.py --bits w8a8,w4a4,w3a3,w4a4_fl8 --models default,mobilenetv2
    python benchmarks/accuracy.py --bits w8a8,w4a4,w8a8_dep,w4a4_dep --methods gznq_m0   # protocol cost
    python benchmarks/accuracy.py --quick               # smoke test (tiny budget, one seed)
    python benchmarks/accuracy.py --set synth.lambda_bn=0.02   # every method with a changed default

Methods (every row: same quantizer, same calibration, same KD fine-tuning recipe and budget; only the
images differ):
    noise       Gaussian-noise images, no synthesis
    mse         DeepInversion / ZeroQ synthesis: squared-error BN loss + CE, no students
    gznq_m0     GZNQ BN likelihood + CE, no students (M = 0)
    gznq_m1     GZNQ with one student of the target configuration (M = 1, the default for one configuration)
    gznq_m3     GZNQ with three students (the target configuration and two bootstrap seeds of it; the
                seeds are adversaries during synthesis only)
    pixel_m1    gznq_m1 with plain-pixel images instead of the reparameterised f_I(z)
    vemp_m1     gznq_m1 with V = the batch's empirical 4th moment (instead of 2 sigma^4)   [on request]
    nb_m1       gznq_m1 with N = the batch size (instead of batch x height x width)        [on request]
    real        N real training images (N = the synthetic image count): the upper bound
Methods without students share one run across all requested bit-widths (one set of images, one student
per configuration). Prints one table (mean, spread over seeds, wall time) and writes it as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gzq.config import (AUTO_METHODS, AUTO_PERCENTILE_BITS, FinetuneMethod, ImageParam, ModelSpec,  # noqa: E402
                        Protocol, QuantSpec, SynthConfig, TrainConfig, override)
from gzq.data import load_dataset, to_model_input  # noqa: E402
from gzq.pipeline import run  # noqa: E402
from gzq.presets import make_config  # noqa: E402
from gzq.synthesis import SynthResult, SyntheticImages  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODELS = {
    "default": ModelSpec("default"),
    "mobilenetv2": ModelSpec("mobilenetv2_050", checkpoint=str(ASSETS / "mobilenetv2_fmnist.safetensors")),
}
SHARED = {  # methods without students: one run serves every bit-width
    "noise": dict(steps=0, image_param="pixel", adversarial=False),
    "mse": dict(bn_loss="mse", adversarial=False),
    "gznq_m0": dict(adversarial=False),
    "real": None,
}
PER_BITS = {
    "gznq_m1": dict(num_students=1),
    "gznq_m3": dict(num_students=3),
    "pixel_m1": dict(num_students=1, image_param="pixel"),
    "vemp_m1": dict(num_students=1, v_rule="empirical"),
    "nb_m1": dict(num_students=1, n_rule="batch"),
}
METHODS = ["noise", "mse", "gznq_m0", "gznq_m1", "gznq_m3", "pixel_m1", "real"]
OPTIONS = ["vemp_m1", "nb_m1"]  # the likelihood's V and N rules, run on request (--methods)
MSE_LAMBDA_BN = 0.05  # squared-error norms are ~10x smaller than the likelihood's NLL at the start


def parse_bits(text: str) -> QuantSpec:
    """'w4a4' (all layers), 'w4a4_fl8' (first/last 8 bit), 'w4a4_dep' (deployable)."""
    for suffix, protocol in (("_fl8", Protocol.FIRST_LAST_8BIT), ("_dep", Protocol.DEPLOYABLE)):
        if text.endswith(suffix):
            return QuantSpec.parse(text[:-len(suffix)], protocol)
    return QuantSpec.parse(text)


def real_source(num: int, holdout: int, seed: int):
    """A SynthResult holding `num` real training images of the teacher's data set (labels kept), as plain pixels."""
    def make(teacher, device) -> SynthResult:
        xs, ys = load_dataset(teacher.dataset, "train")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ys), generator=g)[:num]
        x = to_model_input(xs[idx], teacher.mean, teacher.std, teacher.input_size)
        images = SyntheticImages(ys[idx], teacher.input_size, teacher.pixel_bounds, ImageParam.PIXEL, 0.0, g)
        with torch.no_grad():
            images.mean.copy_(x)
        all_idx = torch.arange(num)
        return SynthResult(images.to(device), all_idx[:num - holdout], all_idx[num - holdout:], False, 0, {"bn_ll": [], "ce": []})
    return make


def digest(obj) -> str:
    """A short stable digest of a JSON-able object (configs as dicts), for cache keys and file names."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


#: training and synthesis fields added after runs were cached, at the values that leave those runs as they were
TRAIN_NEUTRAL = {"crop_scale": 1.0, "stats_kd": 0.0, "anchor": 0.0, "act_warmup": 0.0, "shift": True,
                 "refit_rounds": 0, "refit_below": 50.0}
SYNTH_NEUTRAL = {"decorrelate_colour": False}


def _away_from(neutral: dict, cfg) -> dict:
    """cfg's fields as a dict, less those added later that still hold their neutral value."""
    return {k: v for k, v in cfg.to_dict().items() if k not in neutral or v != neutral[k]}


def recipe_digest() -> str:
    """A digest of the library's default synthesis, quantizer and training recipe, part of every cached run's
    key: a run cached before a default changed is never reported as a run of the new recipe (a field added
    later counts only away from its TRAIN_NEUTRAL or SYNTH_NEUTRAL value)."""
    return digest([_away_from(SYNTH_NEUTRAL, SynthConfig()), _away_from(TRAIN_NEUTRAL, TrainConfig()),
                   {str(k): v.value for k, v in
                   AUTO_METHODS.items()}, QuantSpec().to_dict(), AUTO_PERCENTILE_BITS])


def add_overrides(budget: dict, items: list[str], parser: argparse.ArgumentParser) -> None:
    """Record --set items in `budget` (applied by gzq.config.override after each method's own fields; part of
    the cache key); a malformed one ends the program with the parser's error."""
    try:
        override(make_config("cpu", "cpu"), *items)
    except ValueError as e:
        parser.error(str(e))
    if items:
        budget["set"] = list(items)


def run_once(model: str | ModelSpec, students: list[QuantSpec], method: str, seed: int, budget: dict, device: str,
             method_overrides: dict | None = None) -> tuple[dict, float]:
    """One pipeline run of `method` at a fixed budget (no time fitting), returning (report, wall seconds)."""
    synth = dict(budget["synth"])
    synth.update((method_overrides or {}).get(method) or SHARED.get(method) or PER_BITS.get(method)
                 or dict(adversarial=False))
    if method == "mse":
        synth["lambda_bn"] = MSE_LAMBDA_BN
    spec = MODELS[model] if isinstance(model, str) else model
    cfg = make_config(budget.get("preset", "cpu"), device, model=spec, students=students, seed=seed,
                      synth=synth, train=budget.get("train", {}), eval=budget.get("eval", {}))
    cfg = dataclasses.replace(override(cfg, *budget.get("set", [])), time_budget_s=None)  # one fixed budget
    source = real_source(cfg.synth.num_images, cfg.synth.holdout_images, seed) if method == "real" else None
    t = time.perf_counter()
    report = run(cfg, synth_source=source)
    return report, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--finetune", default="kd", help="comma-separated fine-tuning methods (train.method), each a "
                                                     "column: kd, recon, recon+kd, auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny budget, one seed: checks the benchmark runs")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="change a default for every method, e.g. --set synth.init_log_scale=-1 (repeatable; "
                        "part of the cache key)")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/accuracy.json; with --quick a "
                                          "temporary file, so smoke runs never overwrite measured results)")
    p.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / "results" / "accuracy_runs.jsonl",
                   help="finished runs (JSON lines); runs already there are not repeated")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp()) if args.quick else Path(__file__).resolve().parent / "results") / "accuracy.json"
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    budget = {"preset": "cpu", "synth": {}, "train": {}, "eval": {}}
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        budget = {"preset": "cpu", "synth": dict(num_images=24, holdout_images=4, batch_size=24, steps=6, warmup_steps=2),
                  "train": dict(epochs=1, recon_steps=2), "eval": dict(max_real_images=300)}
        seeds = seeds[:1]
    add_overrides(budget, args.set, p)
    bits = [parse_bits(b) for b in args.bits.split(",")]
    methods = args.methods.split(",")
    finetunes = [f for f in args.finetune.split(",") if f]
    bad_ft = [f for f in finetunes if f not in {m.value for m in FinetuneMethod}]
    if bad_ft:
        p.error(f"unknown fine-tuning methods {bad_ft}; known: {', '.join(m.value for m in FinetuneMethod)}")
    unknown = set(methods) - set(METHODS + OPTIONS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {METHODS + OPTIONS}")
    rows: dict[tuple, dict] = {}
    fp: dict[str, list] = {}
    cache = {}  # finished runs, so an interrupted benchmark resumes where it stopped
    if args.cache.exists() and not args.quick:
        for line in args.cache.read_text().splitlines():
            rec = json.loads(line)
            cache[rec["key"]] = rec
    for model in args.models.split(","):
        if model not in MODELS:
            p.error(f"unknown model {model!r}; known: {list(MODELS)}")
        for method, ft in ((m, f) for m in methods for f in finetunes):
            groups = [bits] if method in SHARED else [[b] for b in bits]
            run_budget = {**budget, "set": budget.get("set", []) + [f"train.method={ft}"]}
            for group in groups:
                for seed in seeds:
                    key = json.dumps([model, [b.name for b in group], method, seed, run_budget, recipe_digest()],
                                     sort_keys=True)
                    if key in cache:
                        report, secs = cache[key]["report"], cache[key]["secs"]
                    else:
                        report, secs = run_once(model, group, method, seed, run_budget, args.device)
                        report = {"teacher": report["teacher"], "students": report["students"]}
                        if not args.quick:
                            args.cache.parent.mkdir(parents=True, exist_ok=True)
                            with args.cache.open("a") as f:
                                f.write(json.dumps({"key": key, "report": report, "secs": secs}) + "\n")
                    fp.setdefault(model, []).append(report["teacher"]["accuracy"])
                    for s in report["students"]:
                        if s["name"] not in {b.name for b in group}:
                            continue  # only the requested configurations are fine-tuned and reported
                        key = (model, s["name"], method, ft)
                        r = rows.setdefault(key, {"acc": [], "agree": [], "secs": []})
                        r["acc"].append(s["accuracy"])
                        r["agree"].append(s["real_agreement"])
                        r["secs"].append(secs)
                    print(f"  {model} {method} ({ft}) {'+'.join(b.name for b in group)} seed {seed}: "
                          + ", ".join(f"{s['name']} {s['accuracy']}" for s in report["students"])
                          + f" ({secs:.0f}s)", flush=True)
    table = []
    for (model, name, method, ft), r in rows.items():
        table.append(dict(model=model, bits=name, method=method, finetune=ft, fp=fp[model][0],
                          mean=round(statistics.mean(r["acc"]), 2),
                          spread=round(statistics.pstdev(r["acc"]), 2) if len(r["acc"]) > 1 else 0.0,
                          min=min(r["acc"]), seeds=r["acc"], real_agreement=round(statistics.mean(a for a in r["agree"] if a is not None), 2)
                          if any(a is not None for a in r["agree"]) else None,
                          wall_s=round(statistics.mean(r["secs"]), 1), shared_run=method in SHARED))
    order = {m: i for i, m in enumerate(METHODS + OPTIONS)}
    table.sort(key=lambda t: (t["model"], t["bits"], order[t["method"]], finetunes.index(t["finetune"])))
    print(f"\n{'model':<12}{'bits':<10}{'method':<10}{'finetune':<10}{'top-1 mean':>11}{'spread':>8}{'min':>7}"
          f"{'FP':>7}{'vs real':>9}{'wall s':>8}")
    for t in table:
        real = next((u["mean"] for u in table if u["model"] == t["model"] and u["bits"] == t["bits"]
                     and u["method"] == "real" and u["finetune"] == t["finetune"]), None)
        gap = f"{t['mean'] - real:+.2f}" if real is not None else "-"
        print(f"{t['model']:<12}{t['bits']:<10}{t['method']:<10}{t['finetune']:<10}{t['mean']:>11.2f}"
              f"{t['spread']:>8.2f}{t['min']:>7.2f}{t['fp']:>7.2f}{gap:>9}{t['wall_s']:>8.1f}"
              f"{' *' if t['shared_run'] else ''}")
    print("vs real: minus the real-data bound, the same pipeline and fine-tuning method on as many real images")
    print("* one run served every bit-width; its wall time covers all of them")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, budget=budget, seeds=seeds,
                                        rows=table), indent=2) + "\n")
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
