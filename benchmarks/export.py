"""Exported ONNX students against the FP32 ONNX teacher: file size, onnxruntime CPU latency, integer
kernels, accuracy; with onnxruntime's own `quantize_static` as the peer.

    python benchmarks/export.py                      # default model (about 2 min)
    python benchmarks/export.py --resnet18           # + timm resnet18 at 224 px, random weights (about 6 min)
    python benchmarks/export.py --no-default --timm mobilenetv3_large_100,efficientnet_b0 --students w8a8
    python benchmarks/export.py --threads 1,2 --json benchmarks/results/export.json

Everything is measured side by side in one run, on the same machine: each thread count gets its own
sessions, and the variants are timed in turn, `rounds` times over, each taking the median of its pooled
samples, so that load from other processes falls on all of them alike. Latency is given as a ratio to
the FP32 file (0.5x: twice as fast). Students are calibrated on 256 real training images (timm models: 32
Gaussian images); size and speed do not depend on how the students were trained.

Variants:
    FP32            the float model (TorchScript export, the FP32 teacher of a run)
    <bits>          a student of the all_layers protocol (the conv/linear inputs quantized, the network input,
                    residual adds and pooling in float)
    <bits>_dep      the deployable protocol: every tensor an integer runtime reads or writes quantized
    ort_static      onnxruntime.quantization.quantize_static of the FP32 file, QDQ, per-channel int8 weights,
                    uint8 activations, MinMax calibration on the same calibration images (W8A8)
    <bits> fold     (--fold) the same file with `session.disable_quant_qdq = 1`: no QDQ fusion, weight
                    DequantizeLinear constant-folded at load (float weights, float QDQ arithmetic)

Kernel columns count, in the graph onnxruntime runs (its QDQ fusions at ORT_ENABLE_EXTENDED, written to
`session.optimized_model_filepath`), the convs that became integer kernels (QLinearConv) out of all convs,
and the fused QLinearAdd, QGemm and QLinearGlobalAveragePool.
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
from gzq.config import Protocol, QuantSpec  # noqa: E402
from gzq.export import export_fp32_onnx, export_onnx, onnx_session, run_onnx  # noqa: E402
from gzq.quant import calibrate_, create_student  # noqa: E402

CONV_OPS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger")
FUSED = ("QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool")


def session(path: Path, threads: int, optimized: Path | None = None, fold: bool = False):
    """A session at `threads`; with `optimized`, the QDQ -> integer-kernel fusions are written there."""
    return onnx_session(path, threads, "extended" if optimized is not None else "all", optimized, fold)


def kernel_counts(path: Path, fold: bool = False) -> dict[str, int]:
    """Op counts of the optimised graph: integer convs, all convs, and each fused integer op."""
    import onnx
    opt = path.with_suffix(".opt.onnx")
    session(path, 1, opt, fold)
    ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    opt.unlink()
    return dict(convs=sum(ops[k] for k in CONV_OPS), **{k: ops[k] for k in FUSED})


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


def ort_quantize_static(fp32: Path, out: Path, calib: torch.Tensor, batch: int = 32) -> Path:
    """onnxruntime's own static quantization of the FP32 file: what a user would reach for."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + batch].numpy()} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()
    return out


def bench_model(label: str, fp32: torch.nn.Module, students: dict, input_size, calib: torch.Tensor,
                threads: list[int], work: Path, real: tuple[torch.Tensor, torch.Tensor] | None, min_seconds: float,
                fold: bool = False, min_runs: int = 10, rounds: int = 3) -> list[dict]:
    """One row per variant, latency at each thread count."""
    fp32_path = Path(export_fp32_onnx(fp32, work / f"{label}_fp32.onnx", input_size)["path"])
    runs = [("FP32", fp32_path, False)]
    for name, s in students.items():
        runs.append((name, Path(export_onnx(s, work / f"{label}_{name}.onnx", input_size)["path"]), False))
    runs.append(("ort_static", ort_quantize_static(fp32_path, work / f"{label}_ort_static.onnx", calib), False))
    if fold:
        runs += [(f"{name} fold", path, True) for name, path, _ in runs[1:] if name in students]
    g = torch.Generator().manual_seed(0)
    xs = {"b1": torch.randn(1, *input_size, generator=g), "b32": torch.randn(32, *input_size, generator=g)}
    rows = [dict(model=label, variant=name, bytes=path.stat().st_size, **kernel_counts(path, fold))
            for name, path, fold in runs]
    for t in threads:
        sessions = [session(path, t, fold=fold) for _, path, fold in runs]
        samples = [{k: [] for k in xs} for _ in runs]
        for _ in range(rounds):
            for sess, smp in zip(sessions, samples):
                for k, x in xs.items():
                    smp[k] += latency_samples(sess, x, max(min_runs // rounds, 1), min_seconds / rounds)
        for row, smp in zip(rows, samples):
            for k in xs:
                row[f"{k}_ms_t{t}"] = statistics.median(smp[k])
        if real is not None and t == threads[0]:
            for row, sess in zip(rows, sessions):
                out = run_onnx(sess, real[0], batch=1000)
                row["accuracy"] = round(100.0 * (out.argmax(1) == real[1]).float().mean().item(), 2)
    base = rows[0]
    for r in rows:
        r["size_ratio"] = base["bytes"] / r["bytes"]
        for t in threads:
            for k in xs:
                r[f"{k}_x_t{t}"] = r[f"{k}_ms_t{t}"] / base[f"{k}_ms_t{t}"]   # latency as a fraction of FP32
    return rows


def format_table(rows: list[dict], threads: list[int]) -> str:
    import onnxruntime
    lat = "".join(f"{f'b1 ms {t}t':>10}{'xFP32':>9}{f'b32 ms {t}t':>12}{'xFP32':>9}" for t in threads)
    head = (f"{'model':<20}{'variant':<13}{'ONNX KB':>8}{'smaller':>8}{lat}"
            f"{'int conv':>9}{'QAdd':>5}{'QGemm':>6}{'QGAP':>5}{'top-1 %':>8}")
    lines = [f"onnxruntime {onnxruntime.__version__} CPU; latency: median ms and ratio to FP32 (lower is faster)",
             head, "-" * len(head)]
    for r in rows:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        lat = "".join(f"{r[f'b1_ms_t{t}']:>10.2f}{r[f'b1_x_t{t}']:>8.2f}x{r[f'b32_ms_t{t}']:>12.2f}{r[f'b32_x_t{t}']:>8.2f}x"
                      for t in threads)
        lines.append(f"{r['model']:<20}{r['variant']:<13}{r['bytes'] / 1024:>8.0f}{r['size_ratio']:>7.1f}x{lat}"
                     f"{r['QLinearConv']:>5}/{r['convs']:<3}{r['QLinearAdd']:>5}{r['QGemm']:>6}"
                     f"{r['QLinearGlobalAveragePool']:>5}{acc:>8}")
    return "\n".join(lines)


def _students(teacher: torch.nn.Module, specs: list[QuantSpec], input_size, calib: torch.Tensor, classifier) -> dict:
    out = {}
    for spec in specs:
        s = create_student(teacher, spec, torch.zeros(2, *input_size), classifier)
        calibrate_(s, [calib])
        out[spec.name] = s.eval()
    return out


def _random_timm(arch: str, size=(3, 224, 224)) -> tuple[torch.nn.Module, tuple]:
    """timm `arch` with random weights (1000 classes) and BN running statistics from Gaussian images."""
    import timm
    torch.manual_seed(0)
    m = timm.create_model(arch, num_classes=1000)
    with torch.no_grad():             # no zero-initialised BN (equal weights would be de-duplicated)
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
        m.train()(torch.randn(8, *size))  # BN running statistics
    return m.eval(), size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", default="w8a8,w4a4,w3a5")
    p.add_argument("--protocols", default="all_layers,deployable")
    p.add_argument("--threads", default="1,2", help="onnxruntime intra-op thread counts, e.g. 1,2")
    p.add_argument("--resnet18", action="store_true", help="also timm resnet18 at 224 px (random weights)")
    p.add_argument("--timm", default="", help="also these timm architectures at 224 px (random weights), "
                                              "comma-separated, e.g. mobilenetv3_large_100,efficientnet_b0")
    p.add_argument("--no-default", action="store_true", help="skip the bundled default model")
    p.add_argument("--fold", action="store_true", help="also each student with the QDQ fusions off")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timing per measurement")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(threads))
    specs = [QuantSpec.parse(s, Protocol(pr)) for pr in args.protocols.split(",")
             for s in args.students.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.no_default:
            from gzq.data import load_fashion_mnist, to_model_input
            from gzq.models import load_teacher
            t = load_teacher("default")
            train, _ = load_fashion_mnist("train")
            test, labels = load_fashion_mnist("test")
            calib = to_model_input(train[:256], t.mean, t.std, t.input_size)
            students = _students(t.model, specs, t.input_size, calib, t.classifier)
            real = (to_model_input(test, t.mean, t.std, t.input_size), labels)
            rows += bench_model("default (28 px)", t.model, students, t.input_size, calib, threads, work, real,
                                args.seconds, args.fold)
        archs = [a for a in args.timm.split(",") if a] + (["resnet18"] if args.resnet18 else [])
        for arch in dict.fromkeys(archs):
            m, size = _random_timm(arch)
            calib = torch.randn(32, *size)
            students = _students(m, specs, size, calib, m.pretrained_cfg["classifier"])
            rows += bench_model(f"{arch} (224 px)", m, students, size, calib, threads, work, None,
                                args.seconds / 4, args.fold, min_runs=3, rounds=3)
    print(format_table(rows, threads))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
