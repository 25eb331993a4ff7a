"""Does the recipe transfer? GZNQ on a zoo of timm BN classifiers it was not tuned on.

    python benchmarks/zoo.py                              # every zoo model, seeds 0,1,2 (hours on 2 cores)
    python benchmarks/zoo.py --models regnetx_32 --seeds 0 --methods gznq,real
    python benchmarks/zoo.py --set synth.ce_target=0      # every method with a changed default
    python benchmarks/zoo.py --quick                      # smoke test: tiny budget and teacher, one model, one
                                                          # seed; writes to a temporary folder

The zoo (scripts/train_zoo.py) was split into a tuning set (TUNING) and a held-out set (HELD_OUT) before any
default was tuned; the two are reported in separate tables, and only the held-out one is evidence. A third
set (CONFIRMATION), added later, tests a candidate default that was chosen with the held-out set in view; a
fourth (FRESH) holds families the others lack and is run only under rules written before its runs; a fifth
(FRESH2) and a sixth (FRESH3) hold four more such families each, each measured once with every default, and a
seventh (FRESH4) three more, with teachers trained three times as long as the others', an eighth (FRESH5) two
more trained so, and a ninth (FRESH6), added last, two more.

Methods, each with the same quantizer, calibration and fine-tuning at the same budget:
    gznq    the default recipe with students w4a4 and w8a8 (one synthesis serves both, as `--students w4a4,w8a8`)
    mse     squared-error BN loss (DeepInversion / ZeroQ), no students, the same CE and augmentation policy
    fixed   the recipe before it was made scale-free: raw likelihood (lambda_bn 0.01), fixed CE weight, flips
            on, 2-px jitter
    real    the same pipeline on as many real training images: the real-data bound

Budget: fixed, the same for every model, method and seed (ZOO_BUDGET: 128 images x 150 synthesis steps,
30 epochs of KD, half the CPU preset's synthesis), so results do not depend on the machine's load. With
--budget-s the CPU preset is instead shrunk by gzq.budget.fit_budget to that many seconds per model (what a
user's preset does); the fit is measured once per model and cached, so every method and seed shares it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy import add_overrides, real_source, recipe_digest  # noqa: E402
from train_zoo import CONFIRMATION, FRESH_SETS, HELD_OUT, TUNING, ZOO, ensure_trained  # noqa: E402

from gzq.budget import measure_costs, plan_run  # noqa: E402
from gzq.config import FinetuneMethod, ModelSpec, override, student_specs  # noqa: E402
from gzq.models import load_teacher  # noqa: E402
from gzq.pipeline import run as run_pipeline  # noqa: E402
from gzq.presets import make_config, resolve_device  # noqa: E402
from gzq.quant import create_student  # noqa: E402

BITS = ["w4a4", "w8a8"]   # --bits
METHODS = {
    "gznq": {},
    "mse": dict(bn_loss="mse", lambda_bn=0.05, adversarial=False),
    "fixed": dict(bn_normalize=False, lambda_bn=0.01, ce_target=0.0, flip="on", jitter=2 / 28, lr=0.1,
                  augment_check_at=0.75),
    "real": None,
}
RESULTS = ROOT / "benchmarks" / "results"
#: the table title of each fresh set (scripts/train_zoo.py FRESH_SETS)
FRESH_TITLES = {"fresh": "Fresh set (each run only under a rule written before it)",
                "fresh2": "Second fresh set (measured once with every default)",
                "fresh3": "Third fresh set (measured once with every default)",
                "fresh4": "Fourth fresh set (teachers trained 6 epochs; measured once with every default)",
                "fresh5": "Fifth fresh set (teachers trained 6 epochs; measured once with every default)",
                "fresh6": "Sixth fresh set (added last; teachers trained 6 epochs; measured once with every default)"}
ZOO_BUDGET = {"synth": dict(num_images=128, holdout_images=16, batch_size=64, steps=150, warmup_steps=50),
              "train": dict(epochs=30), "eval": {}}


def fitted_budget(name: str, spec: ModelSpec, base: dict, seconds: float, device: str) -> dict:
    """The preset's synthesis budget fitted to `seconds` for this model (measured here, once)."""
    cfg = override(make_config("cpu", device, model=spec, students=BITS, synth=base["synth"], train=base["train"],
                               eval=base["eval"]), *base.get("set", []))
    dev = resolve_device(device)
    teacher = load_teacher(spec, dev)
    example = torch.zeros(2, *teacher.input_size, device=dev)
    students = {n: create_student(teacher.model, s, example, teacher.classifier) for n, s in student_specs(cfg)}
    costs = measure_costs(teacher, students, cfg, dev)
    fitted, est = plan_run(cfg, costs, len(students), seconds, cfg.eval.max_real_images or 0)
    keep = ("num_images", "holdout_images", "batch_size", "steps", "warmup_steps")
    print(f"  {name}: {est.text}", flush=True)
    cut = {"batch_size": fitted.train.batch_size} if fitted.train.batch_size != cfg.train.batch_size else {}
    return {**base, "synth": {**base["synth"], **{k: getattr(fitted.synth, k) for k in keep}},
            "train": {**base["train"], **cut}, "estimate_s": round(est.seconds, 1)}


def run(spec: ModelSpec, method: str, seed: int, budget: dict, device: str, bits: list[str]) -> dict:
    synth = dict(budget["synth"])
    if METHODS[method] is not None:
        synth.update(METHODS[method])
    cfg = make_config("cpu", device, model=spec, students=bits, seed=seed, synth=synth, train=budget["train"],
                      eval=budget["eval"])
    cfg = dataclasses.replace(override(cfg, *budget.get("set", [])), time_budget_s=None)
    source = real_source(cfg.synth.num_images, cfg.synth.holdout_images, seed) if method == "real" else None
    t = time.perf_counter()
    report = run_pipeline(cfg, synth_source=source)
    return dict(teacher=report["teacher"], students=report["students"], health=report["synthesis"]["health"],
                secs=round(time.perf_counter() - t, 1))


def run_key(name: str, method: str, seed: int, budget: dict, bits: list[str]) -> str:
    """A run's cache key: what was asked for, plus a digest of the library's default synthesis and training
    recipe, so a run cached before a default changed is never reported as a run of the new recipe."""
    return json.dumps([name, method, seed, budget, bits, recipe_digest()], sort_keys=True)


def _with_finetune(budget: dict, finetune: str) -> dict:
    return {**budget, "set": list(budget.get("set", [])) + [f"train.method={finetune}"]}


def label(method: str, finetune: str) -> str:
    """A method's column name: the image source, with the fine-tuning method unless it is KD."""
    return method if finetune == "kd" else f"{method}+{finetune}"


def summarise(records: list[dict], names: list[str], bits: list[str] = BITS) -> list[dict]:
    rows = []
    for name in names:
        recs = [r for r in records if r["model"] == name]
        if not recs:
            continue
        row = dict(model=name, arch=ZOO[name].arch, input=ZOO[name].input_size, flip_trained=ZOO[name].flip,
                   fp=recs[0]["teacher"]["accuracy"], seeds=sorted({r["seed"] for r in recs}))
        for method in dict.fromkeys(r["method"] for r in recs):
            mrecs = [r for r in recs if r["method"] == method]
            if not method.startswith("real"):
                row[f"{method}_label_agreement"] = round(statistics.mean(
                    r["teacher"]["synthetic_label_agreement"] for r in mrecs), 1)
                row[f"{method}_flip"] = [r["health"]["flip"] for r in mrecs]
            for b in bits:
                accs = [s["accuracy"] for r in mrecs for s in r["students"] if s["name"] == b]
                if accs:
                    row[f"{method}_{b}"] = round(statistics.mean(accs), 2)
                    row[f"{method}_{b}_seeds"] = accs
            row[f"{method}_secs"] = round(statistics.mean(r["secs"] for r in mrecs), 1)
        rows.append(row)
    return rows


def print_table(title: str, rows: list[dict], finetune: str = "kd") -> None:
    """One set's summary, for the images of each method fitted by `finetune` (the first --finetune method)."""
    tag = "" if finetune == "kd" else f"+{finetune}"
    rows = [{**r, **{k.replace(f"{m}{tag}_", f"{m}_"): v for k, v in r.items() for m in METHODS
                     if tag and k.startswith(f"{m}{tag}_")}} for r in rows]
    print(f"\n{title}")
    hdr = (f"{'model':<17}{'input':>12}{'FP':>7}{'agree%':>8}{'W4A4':>7}{'mse':>7}{'fixed':>7}{'real':>7}"
           f"{'-real':>7}{'-FP':>7}{'W8A8':>7}{'W8-FP':>7}{'s/run':>8}")
    print(hdr)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        g4, g8, real4 = r.get("gznq_w4a4"), r.get("gznq_w8a8"), r.get("real_w4a4")
        size = "x".join(str(v) for v in r["input"])
        print(f"{r['model']:<17}{size:>12}{r['fp']:>7.2f}{fmt(r.get('gznq_label_agreement')):>8}{fmt(g4):>7}"
              f"{fmt(r.get('mse_w4a4')):>7}{fmt(r.get('fixed_w4a4')):>7}{fmt(real4):>7}"
              f"{fmt(None if g4 is None or real4 is None else g4 - real4):>7}"
              f"{fmt(None if g4 is None else g4 - r['fp']):>7}{fmt(g8):>7}"
              f"{fmt(None if g8 is None else g8 - r['fp']):>7}{fmt(r.get('gznq_secs')):>8}")
    if rows:
        for key in ("gznq_w4a4", "mse_w4a4", "fixed_w4a4", "real_w4a4", "gznq_w8a8", "gznq_label_agreement"):
            vals = [r[key] for r in rows if key in r]
            if len(vals) == len(rows):
                print(f"  mean {key}: {statistics.mean(vals):.2f}")


def print_finetune_table(title: str, rows: list[dict], labels: list[str], bits: list[str]) -> None:
    """Accuracy by fine-tuning method: one column per (images+method, bits), and the mean over the models."""
    cols = [(lab, b) for b in bits for lab in labels if any(f"{lab}_{b}" in r for r in rows)]
    if not rows or len({lab for lab, _ in cols}) < 2:
        return
    print(f"\n{title}")
    print(f"{'model':<17}{'FP':>7}" + "".join(f"{lab + ' ' + b:>18}" for lab, b in cols))
    for r in rows:
        print(f"{r['model']:<17}{r['fp']:>7.2f}" + "".join(f"{r.get(f'{lab}_{b}', float('nan')):>18.2f}"
                                                          for lab, b in cols))
    means = [statistics.mean(r[f"{lab}_{b}"] for r in rows) if all(f"{lab}_{b}" in r for r in rows) else float("nan")
             for lab, b in cols]
    print(f"{'mean':<17}{statistics.mean(r['fp'] for r in rows):>7.2f}" + "".join(f"{m:>18.2f}" for m in means))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ZOO))
    p.add_argument("--methods", default="gznq,mse,real")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bits", default=",".join(BITS), help="student configurations, e.g. w4a4,w3a3")
    p.add_argument("--finetune", default="kd", help="comma-separated fine-tuning methods, each a column: kd, "
                                                     "recon (block reconstruction), recon+kd, auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-s", type=float, help="instead of ZOO_BUDGET, fit the CPU preset to this many seconds "
                                                   "per model, measured here")
    p.add_argument("--quick", action="store_true", help="tiny budget, first model, one seed (a smoke test)")
    p.add_argument("--cached-only", action="store_true", help="print the tables from the runs in --cache; run nothing")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/zoo.json; a temporary file "
                                          "with --quick)")
    p.add_argument("--cache", type=Path, default=RESULTS / "zoo_runs.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    base = {k: dict(v) for k, v in ZOO_BUDGET.items()} if args.budget_s is None else {"synth": {}, "train": {}, "eval": {}}
    names = [n for n in args.models.split(",") if n]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    bits = [b for b in args.bits.split(",") if b]
    finetunes = [f for f in args.finetune.split(",") if f]
    if args.quick:
        base = {"synth": dict(num_images=24, holdout_images=4, batch_size=24, steps=6, warmup_steps=2),
                "train": dict(epochs=1, recon_steps=2), "eval": dict(max_real_images=200)}
        names, seeds = names[:1], seeds[:1]
        args.cache = Path(tempfile.mkdtemp()) / "zoo_runs.jsonl"   # smoke runs never touch the results
        args.out = args.out or args.cache.with_name("zoo.json")
    add_overrides(base, args.set, p)
    bad = [n for n in names if n not in ZOO] + [m for m in methods if m not in METHODS] + \
        [f for f in finetunes if f not in {m.value for m in FinetuneMethod}]
    if bad:
        p.error(f"unknown models or methods {bad}; models: {', '.join(ZOO)}; methods: {', '.join(METHODS)}")
    cache: dict[str, dict] = {}
    if args.cache.exists():
        for line in args.cache.read_text().splitlines():
            rec = json.loads(line)
            cache[rec["key"]] = rec
    records = []
    for name in names:
        if args.cached_only:
            budget = {**base, "eval": {"max_real_images": ZOO[name].max_real_images, **base["eval"]}}
            for method, ft in ((m, f) for m in methods for f in finetunes):
                for seed in seeds:
                    rec = cache.get(run_key(name, method, seed, _with_finetune(budget, ft), bits))
                    if rec is not None:
                        records.append({**rec, "method": label(method, ft)})
            continue
        ckpt = ensure_trained(name, folder=args.cache.parent / "zoo", train_images=640) if args.quick else ensure_trained(name)
        spec = ModelSpec(ZOO[name].arch, checkpoint=str(ckpt))
        model_base = {**base, "eval": {"max_real_images": ZOO[name].max_real_images, **base["eval"]}}
        if args.budget_s is None:
            budget = model_base
        else:
            bkey = json.dumps(["budget", name, model_base, args.budget_s], sort_keys=True)
            if bkey not in cache:
                cache[bkey] = dict(key=bkey, budget=fitted_budget(name, spec, model_base, args.budget_s, args.device))
                args.cache.parent.mkdir(parents=True, exist_ok=True)
                with args.cache.open("a") as f:
                    f.write(json.dumps(cache[bkey]) + "\n")
            budget = cache[bkey]["budget"]
        for method, ft in ((m, f) for m in methods for f in finetunes):
            run_budget = _with_finetune(budget, ft)
            for seed in seeds:
                key = run_key(name, method, seed, run_budget, bits)
                if key not in cache:
                    rec = dict(key=key, model=name, method=method, finetune=ft, seed=seed,
                               **run(spec, method, seed, run_budget, args.device, bits))
                    args.cache.parent.mkdir(parents=True, exist_ok=True)
                    with args.cache.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    cache[key] = rec
                rec = {**cache[key], "method": label(method, ft)}
                records.append(rec)
                print(f"  {name} {label(method, ft)} seed {seed}: " + ", ".join(f"{s['name']} {s['accuracy']}" for s in
                      rec["students"]) + f"; label agreement {rec['teacher']['synthetic_label_agreement']}, "
                      f"flip {rec['health']['flip']} ({rec['secs']:.0f}s)", flush=True)
    tuning = summarise(records, [n for n in names if n in TUNING], bits)
    held = summarise(records, [n for n in names if n in HELD_OUT], bits)
    print_table("Tuning set (defaults were chosen on these)", tuning, finetunes[0])
    print_table("Held-out set (never tuned on)", held, finetunes[0])
    confirmation = summarise(records, [n for n in names if n in CONFIRMATION], bits)
    if confirmation:
        print_table("Confirmation set (added after the held-out set was measured)", confirmation, finetunes[0])
    fresh = {key: summarise(records, [n for n in names if n in members], bits) for key, members in FRESH_SETS.items()}
    for key, title in FRESH_TITLES.items():
        if fresh[key]:
            print_table(title, fresh[key], finetunes[0])
    labels = [label(m, f) for m in methods for f in finetunes]
    print_finetune_table("Fine-tuning methods, tuning set", tuning, labels, bits)
    print_finetune_table("Fine-tuning methods, held-out set", held, labels, bits)
    print("agree% = the teacher's top-1 agreement with the synthetic images' labels (fresh draws of held-out "
          "images); -real / -FP: W4A4 GZNQ minus the real-data bound / full precision; W8-FP: W8A8 minus FP")
    args.out = args.out or RESULTS / "zoo.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(budget=base, budget_s=args.budget_s, overrides=args.set, seeds=seeds,
                                        bits=bits, finetune=finetunes, tuning=tuning, held_out=held,
                                        confirmation=confirmation, **fresh), indent=2) + "\n")
    print(f"wrote {args.out}")
    return tuning, held


if __name__ == "__main__":
    main()
