"""gzq.export: ONNX QDQ and integer safetensors reproduce the fake-quant student (docs/design.md 2.7).

onnxruntime is run twice: with graph optimisations off (what the ONNX graph means: equal to PyTorch up to
float summation order, which can flip a rare rounding) and with its defaults (what a user gets: 8-bit QDQ
units become integer kernels that requantize in fixed point, one activation step at most).
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import json

import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from gzq.config import ExportConfig, ExportFormat, ModelSpec, Protocol, QuantSpec, RunConfig
from gzq.checkpoint import load_int_weights, save_int_weights
from gzq.export import _after_op, export_fp32_onnx, export_onnx, export_run, onnx_session, run_onnx
from gzq.quant.integer import effective_scale, find_layer_quants
from gzq.quant.convert import IdentityTaps, calibrate_, create_student, quant_wrappers
from gzq.quant.modules import QuantWrapper
from gzq.quant.primitives import fake_quantize

SPECS = [QuantSpec(8, 8), QuantSpec(4, 4), QuantSpec(3, 5)]
EFF_INPUT = (3, 64, 64)


def _session(path, optimise: bool = True):
    return onnx_session(path, threads=1, optimization="all" if optimise else "none")


def _assert_logits_match(onnx_out: torch.Tensor, ref: torch.Tensor, exact_frac: float, p95_rel: float):
    """Most images equal to float precision; the rest within a rounding flip; top-1 nearly always equal."""
    scale = ref.abs().max().item()
    per_image = (onnx_out - ref).abs().amax(1)                          # (N,)
    exact = (per_image <= 1e-4 * scale).float().mean().item()
    p95 = per_image.quantile(0.95).item()
    agree = (onnx_out.argmax(1) == ref.argmax(1)).float().mean().item()
    msg = f"exact {exact:.3f}, p95 {p95:.3g}, max {per_image.max():.3g}, logit scale {scale:.3g}, agree {agree:.3f}"
    assert exact >= exact_frac, msg
    assert p95 <= p95_rel * scale, msg
    assert per_image.max() <= 0.25 * scale, msg
    assert agree >= 0.98, msg


# ------------------------------------- fixtures: students of two architectures (the bundled model's: conftest)

@pytest.fixture(scope="module")
def eff_teacher():
    """timm's tiny EfficientNet (SiLU, squeeze-excite, depthwise, edge residuals), random weights with BN
    running statistics from a few train-mode batches."""
    import timm
    torch.manual_seed(0)
    m = timm.create_model("test_efficientnet", num_classes=10, in_chans=EFF_INPUT[0])
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, *EFF_INPUT))
    dc = dict(architecture="test_efficientnet", model_kwargs=dict(num_classes=10, in_chans=EFF_INPUT[0]),
              input_size=list(EFF_INPUT), mean=[0.5] * 3, std=[0.25] * 3, num_classes=10, class_names=None,
              first_conv="conv_stem", classifier="classifier")
    return m.eval().requires_grad_(False), dc


@pytest.fixture(scope="module")
def eff_students(eff_teacher):
    model, dc = eff_teacher
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(64, *EFF_INPUT, generator=g)
    out = {}
    for spec in SPECS:
        s = create_student(model, spec, torch.zeros(2, *EFF_INPUT), dc["classifier"])
        calibrate_(s, [calib])
        out[spec.name] = s.eval()
    return out


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory, default_teacher, default_students, eff_teacher, eff_students):
    d = tmp_path_factory.mktemp("onnx")
    files = {}
    for name, s in default_students.items():
        files["default", name] = export_onnx(s, d / f"default_{name}.onnx", default_teacher.input_size, 21,
                                             default_teacher.data_config(), QuantSpec.parse(name))
    for name, s in eff_students.items():
        files["eff", name] = export_onnx(s, d / f"eff_{name}.onnx", EFF_INPUT, 21, eff_teacher[1])
    return files


def _inputs(arch, fmnist):
    if arch == "default":
        return fmnist["test"][:128]
    return torch.randn(128, *EFF_INPUT, generator=torch.Generator().manual_seed(2))


def _students(arch, default_students, eff_students):
    return default_students if arch == "default" else eff_students


# ---------------------------------------------------------------- ONNX

@pytest.mark.parametrize("arch", ["default", "eff"])
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_onnx_matches_fake_quant_model(arch, name, onnx_files, default_students, eff_students, fmnist):
    s = _students(arch, default_students, eff_students)[name]
    x = _inputs(arch, fmnist)
    with torch.no_grad():
        ref = s(x)
    path = onnx_files[arch, name]["path"]
    # what the graph means: the same arithmetic, float summation order aside
    _assert_logits_match(run_onnx(_session(path, optimise=False), x), ref, exact_frac=0.5, p95_rel=1e-2)
    # what onnxruntime runs by default (8-bit convs as QLinearConv, which the students' int32 biases match):
    # most images exact, the rest within about one activation step
    _assert_logits_match(run_onnx(_session(path), x), ref, exact_frac=0.6 if name == "w8a8" else 0.8,
                         p95_rel=0.03)


@pytest.mark.parametrize("arch", ["default", "eff"])
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_onnx_graph_holds_integer_weights_and_qdq(arch, name, onnx_files, default_students, eff_students):
    s = _students(arch, default_students, eff_students)[name]
    spec = QuantSpec.parse(name)
    m = onnx.load(onnx_files[arch, name]["path"])
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain: o.version for o in m.opset_import}.get("", None) == 21
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    w_type = {8: TensorProto.INT8, 4: TensorProto.INT4}.get(spec.w_bits, TensorProto.INT8)
    a_type = {8: TensorProto.UINT8, 4: TensorProto.UINT4}.get(spec.a_bits, TensorProto.INT8)
    layers = find_layer_quants(s)
    for lq in layers:
        codes = inits[f"{lq.name}.weight_quantized"]
        assert codes.data_type == w_type
        arr = numpy_helper.to_array(codes).astype("int64")
        assert arr.min() >= lq.w_qmin and arr.max() <= lq.w_qmax
        assert _is_kernel_window(torch.from_numpy(arr), lq.codes)   # all taps, or those that read the input
        assert inits[f"{lq.name}.weight_scale"].data_type == TensorProto.FLOAT
        assert list(inits[f"{lq.name}.weight_scale"].dims) == [lq.codes.shape[0]]       # per channel
        if lq.a_bits is not None:   # 4-bit codes read after a MaxPool are clipped int8 (onnxruntime, see below)
            q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear"
                     and n.input[2] == f"{lq.name}.input_zero_point")
            after_pool = _after_op(q.input[0], producer, ("MaxPool",))
            expect = TensorProto.INT8 if after_pool and spec.a_bits == 4 else a_type
            assert inits[f"{lq.name}.input_zero_point"].data_type == expect
    # no float copy of a quantized weight is left behind
    shapes = {tuple(lq.codes.shape) for lq in layers}
    assert not any(i.data_type == TensorProto.FLOAT and tuple(i.dims) in shapes and len(i.dims) > 1
                   for i in m.graph.initializer)
    if spec.a_bits not in (4, 8):
        assert "Clip" in ops                                     # Quantize -> Clip -> Dequantize
    assert sum(n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")
               for n in m.graph.node) == len(layers)


def _is_kernel_window(stored: torch.Tensor, full: torch.Tensor) -> bool:
    """Whether `stored` (O, I, kh', kw') is a contiguous spatial window of `full` (O, I, kh, kw)."""
    if stored.ndim < 4:
        return torch.equal(stored, full)
    kh, kw = stored.shape[2:]
    return any(torch.equal(stored, full[:, :, r:r + kh, c:c + kw])
               for r in range(full.shape[2] - kh + 1) for c in range(full.shape[3] - kw + 1))


def test_onnx_batch_axis_is_dynamic(onnx_files, default_students, fmnist):
    path = onnx_files["default", "w4a4"]["path"]
    m = onnx.load(path)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = onnx_session(path, threads=1)
    with torch.no_grad():
        for n in (1, 3):
            x = fmnist["test"][:n]
            assert run_onnx(sess, x).shape == (n, 10)
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["quant_spec"])["w_bits"] == 4 and json.loads(meta["mean"]) == [0.286]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w4a4", "w8a8"])
def test_onnx_real_accuracy_and_agreement_on_10k(name, onnx_files, default_students, fmnist):
    """The acceptance number: the downloaded file, run by onnxruntime with its defaults (integer kernels for
    W8A8), reproduces the student on all 10k Fashion-MNIST test images."""
    from gzq.evaluate import predict_logits, top1
    s = default_students[name]
    x, y = fmnist["test"], fmnist["labels"]
    ref = predict_logits(s, x, torch.device("cpu"), batch=1000)
    out = run_onnx(onnx_session(onnx_files["default", name]["path"], threads=1), x, batch=1000)
    agree = 100.0 * (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 99.5
    assert abs(top1(out, y) - top1(ref, y)) <= 0.1
    assert top1(ref, y) > 80.0                                   # a working student, not a degenerate one


def _readme_block(marker: str) -> str:
    """The ```python block of README.md that contains `marker`."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_snippet_runs_the_download_with_plain_onnxruntime(onnx_files, default_students):
    """The README's onnxruntime snippet, read from README.md and run as written on an exported file: numpy
    preprocessing from the file's own metadata gives the fake-quant student's predictions."""
    import numpy as np
    from gzq.data import load_fashion_mnist, to_model_input
    snippet = _readme_block("onnxruntime as ort")
    assert '"runs/x/students/w4a4.onnx"' in snippet
    images_u8 = load_fashion_mnist("test")[0][:500].numpy()
    scope = {"images_u8": images_u8}
    exec(snippet.replace('"runs/x/students/w4a4.onnx"', repr(str(onnx_files["default", "w4a4"]["path"]))), scope)
    labels, meta = scope["labels"], scope["meta"]
    with torch.no_grad():
        ref = default_students["w4a4"](to_model_input(torch.from_numpy(images_u8), meta["mean"], meta["std"],
                                                      meta["input_size"]))
    assert len(labels) == len(images_u8)
    agree = np.mean([a == meta["class_names"][b] for a, b in zip(labels, ref.argmax(1).tolist())])
    assert agree >= 0.99 and meta["quant_spec"]["a_bits"] == 4


def test_out_of_range_zero_points_fall_back_exactly(default_teacher, default_students, fmnist, tmp_path):
    """LSQ can move a zero point outside the code range; the exporter then widens the code type and keeps
    the clamp (int8 + Clip, or int16 + float Clip), so the graph still means the same."""
    import copy
    s8, s4 = copy.deepcopy(default_students["w8a8"]), copy.deepcopy(default_students["w4a4"])
    ws8, ws4 = [w for _, w in quant_wrappers(s8) if w.a_quant is not None], \
        [w for _, w in quant_wrappers(s4) if w.a_quant is not None]
    with torch.no_grad():
        ws8[0].a_quant.zero_point.fill_(-2.0)         # 8-bit, zp < 0: int16 codes, float Clip after DQ
        ws4[0].a_quant.zero_point.fill_(-3.0)         # 4-bit, zp < 0: int8 codes, Clip(0, 15)
        ws4[1].a_quant.zero_point.fill_(20.0)         # 4-bit, zp > 15: int8 codes, Clip(0, 15)
    x = fmnist["test"][:64]
    for s, name in ((s8, "w8a8"), (s4, "w4a4")):
        info = export_onnx(s, tmp_path / f"{name}.onnx", default_teacher.input_size)
        types = {v["input"] for v in info["layers"].values()}
        assert ("int16" if name == "w8a8" else "int8") in types
        with torch.no_grad():
            ref = s(x)
        _assert_logits_match(run_onnx(_session(info["path"], optimise=False), x), ref, 0.5, 1e-2)


def test_equal_weights_leave_no_float_copy(default_teacher, default_students, tmp_path):
    """The TorchScript exporter de-duplicates equal tensors through Identity nodes; none may survive."""
    import copy
    s = copy.deepcopy(default_students["w8a8"])
    with torch.no_grad():
        a, b = s.get_submodule("layer1.0.conv2"), s.get_submodule("layer1.1.conv2")
        b.module.weight.copy_(a.module.weight)
        b.w_quant.scale.copy_(a.w_quant.scale)
    info = export_onnx(s, tmp_path / "dup.onnx", default_teacher.input_size)
    m = onnx.load(info["path"])
    assert not any(i.data_type == TensorProto.FLOAT and len(i.dims) == 4 for i in m.graph.initializer)
    assert "Identity" not in {n.op_type for n in m.graph.node}


def test_asymmetric_weights_use_unsigned_codes(default_teacher, fmnist, tmp_path):
    t = default_teacher
    spec = QuantSpec(4, 4, w_symmetric=False)
    s = create_student(t.model, spec, torch.zeros(2, *t.input_size), t.classifier)
    calibrate_(s, [fmnist["calib"]])
    s.eval()
    info = export_onnx(s, tmp_path / "asym.onnx", t.input_size)
    assert {v["weight"] for v in info["layers"].values()} == {"uint4"}
    x = fmnist["test"][:64]
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(info["path"], optimise=False), x), ref, 0.5, 1e-2)


def test_low_opset_stores_4bit_codes_as_int8(default_students, default_teacher, fmnist, tmp_path):
    s = default_students["w4a4"]
    info = export_onnx(s, tmp_path / "w4a4_op17.onnx", default_teacher.input_size, opset=17)
    assert {v["weight"] for v in info["layers"].values()} == {"int8"}
    assert {v["input"] for v in info["layers"].values()} <= {"int8", None}
    x = fmnist["test"][:64]
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(info["path"], optimise=False), x), ref, 0.5, 1e-2)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(s, tmp_path / "bad.onnx", default_teacher.input_size, opset=11)


def test_fp32_teacher_onnx_matches(default_teacher, fmnist, tmp_path):
    t = default_teacher
    info = export_fp32_onnx(t.model, tmp_path / "teacher.onnx", t.input_size, data_config=t.data_config())
    x = fmnist["test"][:64]
    with torch.no_grad():
        ref = t.model(x)
    out = run_onnx(onnx_session(info["path"], threads=1), x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    m = onnx.load(info["path"])
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in m.graph.node}
    # the last stage runs on 1x1 maps: its three 3x3 convs keep only the centre tap, its strided 3x3 conv
    # (2x2 -> 1x1) the 2x2 taps that read the input; the rest reads only padding
    kernels = collections.Counter(tuple(i.dims[2:]) for i in m.graph.initializer if len(i.dims) == 4)
    torch_kernels = collections.Counter(tuple(c.weight.shape[2:]) for c in t.model.modules()
                                        if isinstance(c, torch.nn.Conv2d))
    assert kernels[(3, 3)] == torch_kernels[(3, 3)] - 4
    assert kernels[(1, 1)] == torch_kernels[(1, 1)] + 3 and kernels[(2, 2)] == 1


# ---------------------------------------------------------------- deployable protocol

DEP_SPECS = [QuantSpec(8, 8, Protocol.DEPLOYABLE), QuantSpec(4, 4, Protocol.DEPLOYABLE),
             QuantSpec(3, 5, Protocol.DEPLOYABLE)]
INT_OPS = ("QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool")


@pytest.fixture(scope="module")
def mnv2_teacher():
    """The bundled MobileNetV2 (ReLU6 as Clip, depthwise convs, 10 residual adds without activation)."""
    from gzq.models import ASSETS, load_teacher
    return load_teacher(ModelSpec("mobilenetv2_050", checkpoint=str(ASSETS / "mobilenetv2_fmnist.safetensors")))


def _calibrated(teacher, spec, calib):
    s = create_student(teacher.model, spec, torch.zeros(2, *teacher.input_size), teacher.classifier)
    calibrate_(s, [calib])
    return s.eval()


@pytest.fixture(scope="module")
def dep_files(tmp_path_factory, default_teacher, mnv2_teacher, fmnist):
    """(arch, name) -> (student, export info): deployable students of both bundled models."""
    d = tmp_path_factory.mktemp("dep")
    out = {}
    for arch, t in (("default", default_teacher), ("mnv2", mnv2_teacher)):
        for spec in DEP_SPECS if arch == "default" else DEP_SPECS[:2]:
            s = _calibrated(t, spec, fmnist["calib"])
            out[arch, spec.name] = s, export_onnx(s, d / f"{arch}_{spec.name}.onnx", t.input_size, 21,
                                                  t.data_config(), spec)
    return out


def _optimised_ops(path, tmp_path) -> collections.Counter:
    """Op counts of the graph onnxruntime runs (its QDQ fusions, before the hardware-specific layout)."""
    onnx_session(path, optimization="extended", optimized_path=tmp_path / "optimised.onnx")
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node)


@pytest.mark.parametrize("arch,name", [("default", "w8a8_dep"), ("default", "w4a4_dep"), ("default", "w3a5_dep"),
                                       ("mnv2", "w8a8_dep"), ("mnv2", "w4a4_dep")])
def test_deployable_onnx_matches_fake_quant_model(arch, name, dep_files, fmnist):
    s, info = dep_files[arch, name]
    x = fmnist["test"][:128]
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(info["path"], optimise=False), x), ref, exact_frac=0.5, p95_rel=1e-2)
    _assert_logits_match(run_onnx(_session(info["path"]), x), ref, exact_frac=0.0 if name == "w8a8_dep" else 0.8,
                         p95_rel=0.03)


@pytest.mark.parametrize("arch", ["default", "mnv2"])
def test_deployable_w8a8_is_all_integer_kernels(arch, dep_files, tmp_path):
    """What quantize_static gives: every conv a QLinearConv, every residual add a QLinearAdd, the pooling a
    QLinearGlobalAveragePool, the classifier a QGemm; no float conv, add or gemm is left but the float bias
    of the logits."""
    import operator
    s, info = dep_files[arch, "w8a8_dep"]
    ops = _optimised_ops(info["path"], tmp_path)
    convs = sum(isinstance(w.module, torch.nn.Conv2d) for _, w in quant_wrappers(s))
    adds = sum(n.op == "call_function" and n.target in (operator.add, operator.iadd) for n in s.graph.nodes)
    assert (ops["QLinearConv"], ops["QLinearAdd"], ops["QGemm"], ops["QLinearGlobalAveragePool"]) == \
        (convs, adds, 1, 1), ops
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "DequantizeLinear"} & set(ops), ops
    assert ops["QuantizeLinear"] == 1 and ops["Add"] == 1                  # the network input; the logits' bias
    assert set(info["tensors"].values()) == {"uint8"}
    assert all(t == {"weight": "int8", "input": "uint8"} for t in info["layers"].values())


@pytest.mark.parametrize("arch,gates", [("tinynet_e", "QLinearSigmoid"), ("mobilenetv3_small_050", "HardSigmoid")])
def test_deployable_w8a8_of_silu_and_hard_swish_nets_runs_every_conv_as_an_integer_kernel(arch, gates, tmp_path):
    """EfficientNet's SiLU and squeeze-excite gates, MobileNetV3's hard-swish and timm's own Linear classifier:
    the convs before those activations write quantized outputs, so onnxruntime fuses every conv into a
    QLinearConv, the SiLUs and gates into QLinearSigmoid / QLinearMul (onnxruntime has no integer hard
    sigmoid: it stays float between the integer ops), the classifier into a QGemm; and the file still
    computes what the student does."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10)
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        model.train()(x)                     # BN running statistics of these inputs
    model.eval()
    s = create_student(model, QuantSpec(8, 8, Protocol.DEPLOYABLE), x[:2], model.pretrained_cfg["classifier"])
    calibrate_(s, [x])
    info = export_onnx(s, tmp_path / "dep.onnx", (3, 64, 64))
    ops = _optimised_ops(info["path"], tmp_path)
    convs = sum(isinstance(w.module, torch.nn.Conv2d) for _, w in quant_wrappers(s))
    assert ops["QLinearConv"] == convs and ops["QGemm"] == 1 and ops["QLinearMul"] >= 1 and ops[gates] >= 1, ops
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "Sigmoid"} & set(ops), ops
    with torch.no_grad():
        ref = s(x)
    out = run_onnx(_session(info["path"]), x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in DEP_SPECS])
def test_deployable_real_accuracy_on_10k(name, dep_files, fmnist):
    """The number the app reports is the number the file gives, for 8 bit, 4 bit and an odd width."""
    from gzq.evaluate import predict_logits, top1
    s, info = dep_files["default", name]
    x, y = fmnist["test"], fmnist["labels"]
    ref = predict_logits(s, x, torch.device("cpu"), batch=1000)
    out = run_onnx(onnx_session(info["path"], threads=1), x, batch=1000)
    assert abs(top1(out, y) - top1(ref, y)) <= 0.1
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.995
    assert top1(ref, y) > 80.0


def test_w8a8_file_of_a_depthwise_net_reproduces_the_student_under_default_optimisations(mnv2_teacher, fmnist,
                                                                                         tmp_path):
    """The research protocol's W8A8 MobileNetV2: onnxruntime runs its 8-bit convs as QLinearConv, which adds
    the bias as int32 codes; the student adds it so too, so the file gives the student's predictions."""
    from gzq.evaluate import predict_logits
    t = mnv2_teacher
    s = _calibrated(t, QuantSpec(8, 8), fmnist["calib"])
    assert all(w.bias_scale() is not None for _, w in quant_wrappers(s)
               if isinstance(w.module, torch.nn.Conv2d) and w.module.bias is not None and w.a_quant is not None)
    info = export_onnx(s, tmp_path / "mnv2_w8a8.onnx", t.input_size, 21, t.data_config(), QuantSpec(8, 8))
    x = fmnist["test"][:2000]
    ref = predict_logits(s, x, torch.device("cpu"), batch=1000)
    out = run_onnx(onnx_session(info["path"], threads=1), x, batch=1000)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.997
    per_image = (out - ref).abs().amax(1)
    assert (per_image <= 1e-4 * ref.abs().max()).float().mean() >= 0.9


def test_dynamo_exporter_gives_the_same_graph(dep_files, default_teacher, default_students, fmnist, tmp_path):
    """The maintained exporter (torch.export + onnxscript, where installed) yields the same fused integer
    graph and the same numbers; TorchScript stays the default (it exports about 40x faster)."""
    pytest.importorskip("onnxscript")
    x = fmnist["test"][:128]
    t = default_teacher
    s, info = dep_files["default", "w8a8_dep"]
    report = {"students": [{"name": "w8a8_dep"}]}
    export_run(tmp_path, ExportConfig(formats=["onnx"], exporter="dynamo"), report, t, {"w8a8_dep": s},
               {"w8a8_dep": QuantSpec.parse("w8a8", "deployable")})
    d = tmp_path / report["students"][0]["files"]["onnx"]["path"]
    fused = {k: v for k, v in _optimised_ops(d, tmp_path).items() if k in INT_OPS}
    assert fused == {k: v for k, v in _optimised_ops(info["path"], tmp_path).items() if k in INT_OPS}
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(d, optimise=False), x), ref, exact_frac=0.5, p95_rel=1e-2)
    fp32 = {"path": tmp_path / report["teacher"]["files"]["onnx"]["path"]}
    with torch.no_grad():
        assert (run_onnx(onnx_session(fp32["path"], threads=1), x) - t.model(x)).abs().max() <= 1e-4 * 20
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(default_students["w8a8"], tmp_path / "x.onnx", t.input_size, exporter="tflite")


def test_deployable_int_safetensors_round_trip_is_exact(dep_files, default_teacher, fmnist, tmp_path):
    s, _ = dep_files["default", "w4a4_dep"]
    info = save_int_weights(s, tmp_path / "dep_int.safetensors", QuantSpec(4, 4, Protocol.DEPLOYABLE),
                            default_teacher.data_config())
    meta = json.loads((tmp_path / "dep_int.json").read_text())
    assert meta["quant_spec"]["protocol"] == "deployable" and meta["tensors"]["act_quant.x"]["bits"] == 8
    rebuilt, spec, _ = load_int_weights(info["path"])
    x = fmnist["test"][:32]
    with torch.no_grad():
        assert spec.name == "w4a4_dep" and torch.equal(rebuilt(x), s(x))


def test_a_deployable_file_with_other_tensor_quantizers_is_refused_clearly(dep_files, default_teacher, tmp_path):
    """A file whose tensor quantizers are not the ones this version places (a deployable file of a SiLU net
    written before conv outputs and gates were quantized) is refused with what to do, for both formats."""
    from safetensors.torch import load_file, save_file

    from gzq.checkpoint import load_student, save_student
    s, _ = dep_files["default", "w4a4_dep"]
    spec, dc = QuantSpec(4, 4, Protocol.DEPLOYABLE), default_teacher.data_config()
    save_student(tmp_path / "f.safetensors", s, spec, dc)
    save_int_weights(s, tmp_path / "i.safetensors", spec, dc)
    sd = load_file(str(tmp_path / "f.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("act_quant.x.")}, str(tmp_path / "f.safetensors"))
    meta = json.loads((tmp_path / "i.json").read_text())
    meta["tensors"]["act_quant.extra"] = meta["tensors"]["act_quant.x"]
    (tmp_path / "i.json").write_text(json.dumps(meta))
    for load, name in ((load_student, "f.safetensors"), (load_int_weights, "i.safetensors")):
        with pytest.raises(ValueError, match=r"does not fit .* tensors differ \(act_quant\..*quantize the model again"):
            load(tmp_path / name)


# ---------------------------------------------------------------- integer safetensors

def test_effective_scale_is_what_the_forward_uses(default_students, fmnist):
    """The exporter's step sizes (LSQ's gradient-scaled parameter) reproduce each quantizer exactly."""
    s = default_students["w4a4"]
    for _, w in quant_wrappers(s):
        wq = w.w_quant
        view = (-1,) + (1,) * (w.module.weight.ndim - 1)
        with torch.no_grad():
            expect = fake_quantize(w.module.weight, effective_scale(wq).view(view), wq.zero_point.view(view),
                                   wq.qmin, wq.qmax)
            assert torch.equal(wq(w.module.weight), expect)
            if w.a_quant is not None:
                x = torch.randn(1000) * 3
                aq = w.a_quant
                assert torch.equal(aq(x), fake_quantize(x, effective_scale(aq), aq.zero_point, aq.qmin, aq.qmax))


@pytest.mark.parametrize("arch", ["default", "eff"])
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_int_safetensors_round_trip_is_exact(arch, name, default_teacher, default_students, eff_teacher,
                                             eff_students, fmnist, tmp_path):
    from safetensors.torch import load_file
    s = _students(arch, default_students, eff_students)[name]
    dc = default_teacher.data_config() if arch == "default" else eff_teacher[1]
    info = save_int_weights(s, tmp_path / f"{name}_int.safetensors", QuantSpec.parse(name), dc)
    tensors = load_file(info["path"])
    layers = find_layer_quants(s)
    for lq in layers:
        codes = tensors[f"{lq.name}.weight"]
        assert codes.dtype == torch.int8                        # symmetric codes: int8 storage
        assert torch.equal(codes.long(), lq.codes)
        assert tensors[f"{lq.name}.weight_scale"].shape == (lq.codes.shape[0],)
        assert tensors[f"{lq.name}.weight_zero_point"].dtype == torch.int32
        assert (f"{lq.name}.input_scale" in tensors) == (lq.a_bits is not None)
    meta = json.loads((tmp_path / f"{name}_int.json").read_text())
    assert meta["quant_spec"]["w_bits"] == QuantSpec.parse(name).w_bits and len(meta["layers"]) == len(layers)
    rebuilt, spec, dc2 = load_int_weights(info["path"])
    assert spec.name == name and dc2["architecture"] == dc["architecture"]
    x = _inputs(arch, fmnist)[:32]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), s(x))                    # bit for bit


@pytest.mark.parametrize("arch", ["default", "eff"])
def test_float_checkpoint_round_trip_is_exact(arch, default_teacher, default_students, eff_teacher, eff_students,
                                              fmnist, tmp_path):
    """students/<name>.safetensors + .json rebuild the same student (rebuild_student, the path both formats take)."""
    from gzq.checkpoint import load_student, save_student
    s = _students(arch, default_students, eff_students)["w4a4"]
    dc = default_teacher.data_config() if arch == "default" else eff_teacher[1]
    save_student(tmp_path / "w4a4.safetensors", s, QuantSpec(4, 4), dc, "teacher")
    rebuilt, spec, dc2 = load_student(tmp_path / "w4a4.safetensors")
    assert spec == QuantSpec(4, 4) and dc2 == json.loads(json.dumps(dc))
    x = _inputs(arch, fmnist)[:32]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), s(x))


def test_w8a8_checkpoints_keep_their_bias_form(default_teacher, default_students, fmnist, tmp_path):
    """Both formats rebuild the int32 biases of a W8A8 student exactly; files written before 8-bit convs had
    them outside the deployable protocol (no `int_bias_layers` in the float checkpoint's JSON, `int_bias`
    false per layer in the integer file's) rebuild the float-bias student they held."""
    from gzq.checkpoint import load_int_weights, load_student, save_int_weights, save_student
    s, spec, dc = default_students["w8a8"], QuantSpec(8, 8), default_teacher.data_config()
    assert any(w.has_int_bias for _, w in quant_wrappers(s))
    x = fmnist["test"][:32]
    save_student(tmp_path / "f.safetensors", s, spec, dc)
    save_int_weights(s, tmp_path / "i.safetensors", spec, dc)
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "f.safetensors")[0](x), s(x))
        assert torch.equal(load_int_weights(tmp_path / "i.safetensors")[0](x), s(x))
    for path, forget in ((tmp_path / "f.json", lambda m: m.pop("int_bias_layers")),
                         (tmp_path / "i.json", lambda m: [lm.update(int_bias=False) for lm in m["layers"].values()])):
        meta = json.loads(path.read_text())
        forget(meta)
        path.write_text(json.dumps(meta))
    for load, path in ((load_student, tmp_path / "f.safetensors"), (load_int_weights, tmp_path / "i.safetensors")):
        old = load(path)[0]
        assert not any(w.has_int_bias for _, w in quant_wrappers(old))


def test_int_safetensors_rejects_a_foreign_json(tmp_path, default_students, default_teacher):
    info = save_int_weights(default_students["w8a8"], tmp_path / "w_int.safetensors", QuantSpec(8, 8),
                            default_teacher.data_config())
    (tmp_path / "w_int.json").write_text(json.dumps({"quant_spec": {}}))
    with pytest.raises(ValueError, match="gzq-int"):
        load_int_weights(info["path"])


# ---------------------------------------------------------------- run folder, config, CLI

def test_export_run_writes_and_records_files(tmp_path, default_teacher, default_students):
    students = {n: default_students[n] for n in ("w8a8", "w4a4")}
    specs = {n: QuantSpec.parse(n) for n in students}
    report = dict(teacher=dict(name="default"), students=[dict(name=n) for n in students])
    export_run(tmp_path, ExportConfig(), report, default_teacher, students, specs)
    assert (tmp_path / "teacher_fp32.onnx").exists()
    assert report["teacher"]["files"]["onnx"]["path"] == "teacher_fp32.onnx"
    for row in report["students"]:
        f = row["files"]
        assert f["onnx"]["path"] == f"students/{row['name']}.onnx"
        assert f["onnx"]["bytes"] == (tmp_path / f["onnx"]["path"]).stat().st_size
        assert (tmp_path / f["safetensors_int"]["path"]).exists() and (tmp_path / f["safetensors_int"]["json"]).exists()
    sizes = {r["name"]: r["files"]["onnx"]["bytes"] for r in report["students"]}
    fp32 = report["teacher"]["files"]["onnx"]["bytes"]
    assert sizes["w4a4"] < sizes["w8a8"] < fp32 / 3              # int4 packs two codes a byte
    assert fp32 / sizes["w4a4"] >= 7.5 and fp32 / sizes["w8a8"] >= 3.7   # fixed costs (scales, graph) stay small

    only = tmp_path / "only_st"
    report2 = dict(students=[dict(name="w8a8")])
    export_run(only, ExportConfig(formats=["safetensors"]), report2, default_teacher,
               {"w8a8": default_students["w8a8"]}, {"w8a8": QuantSpec(8, 8)})
    assert set(report2["students"][0]["files"]) == {"safetensors_int"} and not (only / "teacher_fp32.onnx").exists()


def test_export_config_validates_and_round_trips():
    cfg = RunConfig()
    assert cfg.export.formats == [ExportFormat.ONNX, ExportFormat.SAFETENSORS] and cfg.export.opset == 21
    d = cfg.to_dict()
    assert d["export"] == {"formats": ["onnx", "safetensors"], "opset": 21, "exporter": "torchscript"}
    d["export"] = {"formats": ["safetensors"], "opset": 17}
    back = RunConfig.from_dict(d)
    assert back.export.formats == [ExportFormat.SAFETENSORS] and back.export.opset == 17
    legacy = cfg.to_dict()
    legacy.pop("export")                                         # config.json of runs written before export
    assert RunConfig.from_dict(legacy).export == ExportConfig()
    with pytest.raises(ValueError, match="tflite"):
        ExportConfig(formats=["tflite"])
    with pytest.raises(ValueError, match="opset"):
        ExportConfig(opset=9)
    with pytest.raises(ValueError, match="torchscript or dynamo"):
        ExportConfig(exporter="tflite")


def test_dynamo_exporter_needs_onnxscript_said_plainly(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    with pytest.raises(ValueError, match="pip install onnxscript"):
        ExportConfig(exporter="dynamo")


def test_cli_export_flag():
    from gzq.cli import _parser, build_config
    p = _parser()
    cfg = build_config(p.parse_args(["run", "--out", "x", "--device", "cpu"]))
    assert cfg.export.formats == [ExportFormat.ONNX, ExportFormat.SAFETENSORS]
    cfg = build_config(p.parse_args(["run", "--out", "x", "--device", "cpu", "--export", "none"]))
    assert cfg.export.formats == []
    cfg = build_config(p.parse_args(["run", "--out", "x", "--device", "cpu", "--export", "onnx",
                                     "--set", "export.opset=17"]))
    assert cfg.export.formats == [ExportFormat.ONNX] and cfg.export.opset == 17
    with pytest.raises(ValueError, match="export formats"):
        build_config(p.parse_args(["run", "--out", "x", "--device", "cpu", "--export", "tflite"]))


def test_4bit_codes_after_a_maxpool_load_in_onnxruntime(tmp_path):
    """A quantizer that reads a MaxPool's output (CSPNet's and DLA's stems): onnxruntime moves the
    QuantizeLinear back across the MaxPool and would run the pool on uint4 codes, which it has no kernel for,
    so the file must not store those codes as uint4."""
    from torch import nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.MaxPool2d(3, 2, 1),
                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 10))
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32))
    s = create_student(m.eval(), QuantSpec(4, 4), torch.zeros(2, 3, 32, 32), "9")
    calibrate_(s, [torch.randn(32, 3, 32, 32)])
    dc = dict(architecture="sequential", model_kwargs={}, input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3,
              num_classes=10, class_names=None, first_conv="0", classifier="9")
    info = export_onnx(s.eval(), tmp_path / "maxpool.onnx", (3, 32, 32), 21, dc)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(info["path"]), x), ref, exact_frac=0.95, p95_rel=0.02)
    g = onnx.load(info["path"]).graph
    assert {n.op_type for n in g.node} >= {"MaxPool", "QuantizeLinear"}


def test_adaptive_pools_to_sizes_their_input_does_not_divide_export(tmp_path):
    """timm's VGG head pools an input under 224 px up to 7 x 7 with adaptive average pooling, which torch's
    tracing exporter cannot write where the sizes do not divide: the export writes it as averaging MatMuls with
    the same values (up or down, either side), and pools (average or max) to sizes that divide as fixed-kernel
    pools, and leaves torch as it was."""
    from torch import nn

    from gzq.export import _exportable_adaptive_pools
    original = torch.nn.functional.adaptive_avg_pool2d
    x = torch.randn(2, 3, 10, 6)
    original_max = torch.nn.functional.adaptive_max_pool2d
    for size in [(3, 5), (7, 7), 4, (None, 4), (5, 3), (2, 1), 1]:
        with _exportable_adaptive_pools():
            y = torch.nn.functional.adaptive_avg_pool2d(x, size)
            y_max = torch.nn.functional.adaptive_max_pool2d(x, size)
        torch.testing.assert_close(y, original(x, size), rtol=1e-6, atol=1e-6)
        assert torch.equal(y_max, original_max(x, size))
    assert torch.nn.functional.adaptive_avg_pool2d is original
    assert torch.nn.functional.adaptive_max_pool2d is original_max
    # another thread, meanwhile, gets torch's own pool: an fx trace of it (the deployable protocol's) still works
    class Pooled(nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 1) + torch.nn.functional.adaptive_max_pool2d(x, 2)

    with _exportable_adaptive_pools(), concurrent.futures.ThreadPoolExecutor(1) as ex:
        traced = ex.submit(torch.fx.symbolic_trace, Pooled()).result()
        assert {n.target for n in traced.graph.nodes if n.op == "call_function"} >= {original, original_max}
        assert torch.equal(ex.submit(torch.nn.functional.adaptive_avg_pool2d, x, (3, 5)).result(), original(x, (3, 5)))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                      nn.AdaptiveAvgPool2d(7), nn.Conv2d(8, 8, 7), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8, 10)).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8))
    s = create_student(m.eval(), QuantSpec(8, 8), torch.zeros(2, 1, 8, 8), "9")
    calibrate_(s, [torch.randn(32, 1, 8, 8)])
    dc = {"architecture": "sequential", "model_kwargs": {}, "input_size": [1, 8, 8], "mean": [0.5], "std": [0.25],
          "num_classes": 10, "class_names": None, "first_conv": "0", "classifier": "9"}
    info = export_onnx(s.eval(), tmp_path / "pool.onnx", (1, 8, 8), 21, dc)
    assert torch.nn.functional.adaptive_avg_pool2d is original
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(info["path"]), x), ref, exact_frac=0.95, p95_rel=0.02)
    ops = collections.Counter(n.op_type for n in onnx.load(info["path"]).graph.node)
    assert ops["MatMul"] == 2 and not ops["ScatterND"]   # the averaging matrices are constants in the file


def _calibrated_w8a8(model_cls, name: str) -> tuple:
    """A calibrated W8A8 student of a small 1x8x8 model (a `conv`, a BN, a classifier `fc`; BN statistics from a
    train-mode batch of noise) and its data config."""
    torch.manual_seed(0)
    m = model_cls().train()
    with torch.no_grad():
        m(torch.randn(16, 1, 8, 8))
    s = create_student(m.eval(), QuantSpec(8, 8), torch.zeros(2, 1, 8, 8), "fc")
    calibrate_(s, [torch.randn(32, 1, 8, 8)])
    dc = {"architecture": name, "model_kwargs": {}, "input_size": [1, 8, 8], "mean": [0.5], "std": [0.25],
          "num_classes": 10, "class_names": None, "first_conv": "conv", "classifier": "fc"}
    return s, dc


def test_a_model_that_reads_its_layers_attributes_is_quantized_and_exported(tmp_path):
    """Some models read a layer's attributes in their own forward (XCiT's positional encoding reads its conv's
    weight.device): the wrappers that stand in for the layer in the student and in the export pass them on."""
    from torch import nn

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

        def forward(self, x):
            w = self.conv.weight
            pos = torch.linspace(0, 1, self.conv.out_channels, device=w.device, dtype=w.dtype).view(1, -1, 1, 1)
            return self.fc(torch.relu(self.bn(self.conv(x)) + pos).mean((2, 3)))

    s, dc = _calibrated_w8a8(Reads, "reads")
    assert isinstance(s.conv, QuantWrapper) and s.conv.out_channels == 8 and s.conv.weight is s.conv.module.weight
    info = export_onnx(s.eval(), tmp_path / "reads.onnx", (1, 8, 8), 21, dc)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(info["path"]), x), ref, exact_frac=0.95, p95_rel=0.02)


def test_a_model_the_tracing_exporter_cannot_write_falls_back_to_dynamo(tmp_path, monkeypatch):
    """HaloNet-style blocks (an Unfold after a Pad) lose their shape in torch's tracing exporter: a run's export
    then tries the dynamo exporter (onnxscript installed), whose file matches the student; without onnxscript the
    error says what to install."""
    import functools

    from torch import nn

    from gzq.export import _with_fallback

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 10)

        def forward(self, x):
            x = torch.nn.functional.pad(torch.relu(self.bn(self.conv(x))), [1, 1, 1, 1])
            return self.fc(x.unfold(2, 4, 2).unfold(3, 4, 2).mean((2, 3, 4, 5)))

    s, dc = _calibrated_w8a8(Blocks, "blocks")
    write = functools.partial(export_onnx, s.eval(), tmp_path / "blocks.onnx", (1, 8, 8), 21, dc)
    with pytest.raises(Exception, match="Unfold"):
        write(exporter="torchscript")
    info = _with_fallback(write, tmp_path / "blocks.onnx", "torchscript", 21, "blocks")
    assert info["exporter"] == "dynamo"
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = s(x)
    _assert_logits_match(run_onnx(_session(info["path"]), x), ref, exact_frac=0.95, p95_rel=0.02)
    path = tmp_path / "blocks.onnx"
    with pytest.raises(RuntimeError, match="opset >= 18"):
        _with_fallback(functools.partial(export_onnx, s.eval(), path, (1, 8, 8), 17, dc), path, "torchscript", 17, "b")
    assert not path.exists()   # nothing half-written is left behind
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="pip install onnxscript"):
        _with_fallback(write, path, "torchscript", 21, "blocks")


def test_fused_branches_student_rebuilds_exactly_and_exports_fewer_convs(repvgg, tmp_path):
    """students.fuse_branches on a RepVGG: the student is the fused inference form (one conv per block instead of
    3x3 + 1x1 + identity BN), its integer file rebuilds it bit for bit (the spec carries the choice, so the
    rebuild fuses too), and its ONNX file holds half the convs of the branched student's, plus one depthwise 1x1
    conv per identity block (its taps kept apart), and runs in onnxruntime."""
    m, kwargs = repvgg, {"num_classes": 10, "in_chans": 1}
    dc = {"architecture": "repvgg_a0", "model_kwargs": kwargs, "input_size": [1, 32, 32], "mean": [0.5], "std": [0.25],
          "num_classes": 10, "class_names": None, "first_conv": "stem.conv_kxk.conv", "classifier": "head.fc"}
    calib, x = torch.randn(64, 1, 32, 32), torch.randn(32, 1, 32, 32)
    convs = {}
    for fuse in (False, True):
        spec = QuantSpec(8, 8, Protocol.DEPLOYABLE, fuse_branches=fuse)
        s = create_student(m, spec, torch.zeros(2, 1, 32, 32), dc["classifier"])
        calibrate_(s, [calib])
        info = export_onnx(s.eval(), tmp_path / f"fuse{fuse}.onnx", (1, 32, 32), 21, dc)
        convs[fuse] = sum(n.op_type == "Conv" for n in onnx.load(info["path"]).graph.node)
        assert run_onnx(_session(info["path"]), x).shape == (32, 10)
    taps = sum(isinstance(w.module, IdentityTaps) for _, w in quant_wrappers(s))   # the identity blocks' taps apart
    assert convs[True] - taps == convs[False] // 2 == 22 and taps == 17
    info = save_int_weights(s, tmp_path / "fused_int.safetensors", spec, dc)
    rebuilt, spec2, _ = load_int_weights(info["path"])
    assert spec2.fuse_branches
    with torch.no_grad():
        assert torch.equal(rebuilt(x), s(x))


@pytest.mark.parametrize("protocol", [Protocol.ALL_LAYERS, Protocol.DEPLOYABLE])
def test_cond_conv_blocks_are_quantized_and_exported(protocol, cond_net, tmp_path):
    """timm's CondConv (each image convolved with its own mix of expert kernels, EfficientNet-CondConv) is no
    Conv2d, and its per-image kernel has no fixed shape for an exporter: a student holds the experts as one
    ordinary conv and mixes their outputs instead (the same function), which quantizes, exports, and runs as an
    integer conv in the deployable file."""
    from timm.layers import CondConv2d

    from gzq.quant.convert import ExpertConv, expand_cond_convs_, float_weights
    for kw in ({"groups": 2, "bias": True, "padding": "same", "stride": 2}, {"groups": 6, "bias": True, "padding": ""}):
        cond = CondConv2d(6, 4 if kw["groups"] == 2 else 6, 3, num_experts=3, **kw)
        torch.nn.init.normal_(cond.bias)
        xs, routing = torch.randn(5, 6, 11, 13), torch.rand(5, 3)
        with torch.no_grad():   # grouped, with biases, TF "same" padding (a Conv2dSame inside)
            assert torch.allclose(ExpertConv(cond)(xs, routing), cond(xs, routing), atol=1e-5), kw
    m = cond_net
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    expanded = copy.deepcopy(m)
    assert expand_cond_convs_(expanded) == 3
    with torch.no_grad():
        assert torch.allclose(expanded(x), m(x), atol=1e-5)   # the same function
    s = create_student(m, QuantSpec(8, 8, protocol=protocol), torch.zeros(2, 1, 8, 8), "fc")
    convs = {n: w.module for n, w in quant_wrappers(s) if n.startswith("block.")}
    assert sorted(convs) == ["block.conv_dw.conv", "block.conv_pw.conv", "block.conv_pwl.conv", "block.routing_fn"]
    assert convs["block.conv_dw.conv"].out_channels == 3 * 16   # depthwise: 16 channels x 3 experts
    assert float_weights(s) == (0.0, [])   # every weight in a quantized layer (87 % are CondConv experts)
    calibrate_(s, [torch.randn(32, 1, 8, 8)])
    dc = {"architecture": "cond", "model_kwargs": {}, "input_size": [1, 8, 8], "mean": [0.5], "std": [0.25],
          "num_classes": 10, "class_names": None, "first_conv": "conv", "classifier": "fc"}
    info = export_onnx(s.eval(), tmp_path / "cond.onnx", (1, 8, 8), 21, dc)
    with torch.no_grad():
        ref = s(x)
        assert (s(x).argmax(1) == m(x).argmax(1)).float().mean() > 0.9
    _assert_logits_match(run_onnx(_session(info["path"]), x), ref, exact_frac=0.0 if protocol == Protocol.DEPLOYABLE
                         else 0.95, p95_rel=0.03)
    if protocol == Protocol.DEPLOYABLE:
        ops = _optimised_ops(info["path"], tmp_path)
        assert ops["QLinearConv"] == 4 and not ops["Conv"], ops
    else:   # the float teacher's file too
        fp = export_fp32_onnx(m, tmp_path / "cond_fp32.onnx", (1, 8, 8), 21, dc)
        with torch.no_grad():
            assert torch.allclose(run_onnx(_session(fp["path"]), x), m(x), atol=1e-4)
