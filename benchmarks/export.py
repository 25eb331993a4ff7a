"""Exported ONNX students against the FP32 ONNX teacher: file size, onnxruntime CPU latency, accuracy.

    python benchmarks/export.py                      # default model: FP32, W8A8, W4A4, W3A5 (about 45 s)
    python benchmarks/export.py --resnet18           # + timm resnet18 at 224 px, random weights (about 2 min)
    python benchmarks/export.py --threads 2 --json results/export.json

Everything is measured side by side in one run, on the same machine and thread count. Students are
calibrated on 256 real training images (size and speed do not depend on how the students were trained).

Which QDQ patterns onnxruntime's CPU provider runs as integer kernels (DESIGN 6): an 8-bit unit, i.e.
uint8 activation QDQ and int8 weight DQ around a Conv/Gemm/MatMul whose output is re-quantized, becomes
QLinearConv / QLinearMatMul / QGemm (int8 arithmetic, int32 accumulation, the float bias rounded to int32);
so can a unit of another width whose codes are stored as int8 (Quantize -> Clip -> Dequantize).
Everything else runs dequantize-then-float: int4/uint4 weights (a smaller file, no speed-up), most layers
of other widths, and 8-bit layers whose output is not followed by a quantizer (e.g. before a residual Add,
the classifier) or whose input is float (the stem). The table's "int kernels" column counts, after onnxruntime's graph
optimisation, how many Conv/Gemm of the graph became integer kernels.

Rows "<student> fold" run the same file with the session option `session.disable_quant_qdq = 1`:
onnxruntime then skips the QDQ fusions and constant-folds every weight DequantizeLinear once at load
(float weights in memory, activations still quantize-dequantized: the float QDQ arithmetic of the
PyTorch simulation, no integer kernels). By default it keeps weight DequantizeLinear in the graph and dequantizes the int4
weights on every run.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gzq.config import QuantSpec  # noqa: E402
from gzq.export import export_fp32_onnx, export_onnx, run_onnx  # noqa: E402
from gzq.quant import calibrate_, create_student  # noqa: E402

INT_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def session(path: Path, threads: int, optimized: Path | None = None, fold: bool = False):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if fold:                              # no QDQ fusion: weight DequantizeLinear is constant-folded at load
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized is not None:             # EXTENDED: the QDQ -> integer-kernel fusions, no hardware layout
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernel_counts(path: Path, threads: int, fold: bool = False) -> tuple[int, int]:
    """(integer kernels, float Conv/Gemm/MatMul) after onnxruntime's graph optimisation."""
    import onnx
    opt = path.with_suffix(".opt.onnx")
    session(path, threads, opt, fold)
    ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    opt.unlink()
    return sum(ops[k] for k in INT_KERNELS), sum(ops[k] for k in FLOAT_KERNELS)


def latency_samples(sess, x: torch.Tensor, min_runs: int, min_seconds: float) -> list[float]:
    """Wall times (ms) of sess.run on x, after warm-up."""
    feed = {sess.get_inputs()[0].name: x.numpy()}
    sess.run(None, feed)
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(1000 * (time.perf_counter() - t))
        if len(times) >= 200:
            break
    return times


def bench_model(label: str, fp32: torch.nn.Module, students: dict, input_size, threads: int, work: Path,
                real: tuple[torch.Tensor, torch.Tensor] | None, min_seconds: float, min_runs: int = 10,
                rounds: int = 3) -> list[dict]:
    """One row per variant. Latency: the variants are timed in turn, `rounds` times over, and each gets the
    median of its pooled samples, so that load from other processes falls on all of them alike."""
    files = {"FP32": export_fp32_onnx(fp32, work / f"{label}_fp32.onnx", input_size)["path"]}
    for name, s in students.items():
        files[name] = export_onnx(s, work / f"{label}_{name}.onnx", input_size)["path"]
    g = torch.Generator().manual_seed(0)
    xs = {"b1": torch.randn(1, *input_size, generator=g), "b32": torch.randn(32, *input_size, generator=g)}
    runs = [(name, Path(path), False) for name, path in files.items()]
    runs += [(f"{name} fold", Path(files[name]), True) for name in students]
    sessions = [session(path, threads, fold=fold) for _, path, fold in runs]
    samples = [{k: [] for k in xs} for _ in runs]
    for _ in range(rounds):
        for sess, smp in zip(sessions, samples):
            for k, x in xs.items():
                smp[k] += latency_samples(sess, x, max(min_runs // rounds, 1), min_seconds / rounds)
    rows = []
    for (name, path, fold), sess, smp in zip(runs, sessions, samples):
        row = dict(model=label, variant=name, bytes=path.stat().st_size,
                   b1_ms=statistics.median(smp["b1"]), b32_ms=statistics.median(smp["b32"]))
        row["int_kernels"], row["float_kernels"] = kernel_counts(path, threads, fold)
        if real is not None:
            out = run_onnx(sess, real[0], batch=1000)
            row["accuracy"] = round(100.0 * (out.argmax(1) == real[1]).float().mean().item(), 2)
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["size_ratio"] = base["bytes"] / r["bytes"]
        r["b1_speedup"] = base["b1_ms"] / r["b1_ms"]
        r["b32_speedup"] = base["b32_ms"] / r["b32_ms"]
    return rows


def format_table(rows: list[dict], threads: int) -> str:
    head = (f"{'model':<27}{'variant':<11}{'ONNX KB':>9}{'smaller':>8}{'b1 ms':>8}{'speedup':>8}{'b32 ms':>9}"
            f"{'speedup':>8}{'int kernels':>13}{'top-1 %':>9}")
    lines = [f"onnxruntime {__import__('onnxruntime').__version__} CPU, {threads} thread(s); speedup = FP32 / variant",
             head, "-" * len(head)]
    for r in rows:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        kern = f"{r['int_kernels']}/{r['int_kernels'] + r['float_kernels']}"
        lines.append(f"{r['model']:<27}{r['variant']:<11}{r['bytes'] / 1024:>9.0f}{r['size_ratio']:>7.1f}x"
                     f"{r['b1_ms']:>8.2f}{r['b1_speedup']:>7.2f}x{r['b32_ms']:>9.2f}{r['b32_speedup']:>7.2f}x"
                     f"{kern:>13}{acc:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", default="w8a8,w4a4,w3a5")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--resnet18", action="store_true", help="also timm resnet18 at 224 px (random weights)")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timing per measurement")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [QuantSpec.parse(s) for s in args.students.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from gzq.data import load_fashion_mnist, to_model_input
        from gzq.models import load_teacher
        t = load_teacher("default")
        train, _ = load_fashion_mnist("train")
        test, labels = load_fashion_mnist("test")
        calib = to_model_input(train[:256], t.mean, t.std, t.input_size)
        students = {}
        for spec in specs:
            s = create_student(t.model, spec, torch.zeros(2, *t.input_size), t.classifier)
            calibrate_(s, [calib])
            students[spec.name] = s.eval()
        real = (to_model_input(test, t.mean, t.std, t.input_size), labels)
        rows += bench_model("default (28 px)", t.model, students, t.input_size, args.threads, work, real, args.seconds)
        if args.resnet18:
            import timm
            torch.manual_seed(0)
            m = timm.create_model("resnet18", num_classes=1000)
            size = (3, 224, 224)
            with torch.no_grad():             # no zero-initialised BN (equal weights would be de-duplicated)
                for mod in m.modules():
                    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                        mod.weight.uniform_(0.5, 1.5)
                m.train()(torch.randn(8, *size))  # BN running statistics
            m.eval()
            calib = torch.randn(8, *size)
            students = {}
            for spec in specs:
                s = create_student(m, spec, torch.zeros(2, *size), "fc")
                calibrate_(s, [calib])
                students[spec.name] = s.eval()
            rows += bench_model("resnet18 (224 px, random)", m, students, size, args.threads, work, None,
                                args.seconds / 4, min_runs=3, rounds=3)
    print(format_table(rows, args.threads))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
