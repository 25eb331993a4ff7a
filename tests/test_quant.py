import copy

import pytest
import timm
import torch
from torch import nn

from gzq.config import ActInit, Protocol, QuantSpec
from gzq.quant import (ActQuantizer, QuantWrapper, calibrate_, create_student, dequantize, fake_quantize, fold_bn_,
                       quant_range, quantize)
from gzq.quant.convert import (IdentityTaps, SplitConv, folded_bn_moments, model_size_bytes, quant_wrappers,
                               split_identity_)
from gzq.quant.graph import tensor_quantizers
from gzq.quant import primitives
from gzq.quant.primitives import fake_quantize_composed, fake_quantize_ste


def test_quant_range():
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(4, False) == (0, 15)
    assert quant_range(2, True) == (-2, 1)
    with pytest.raises(ValueError, match="bits must be in 2..8, got 9"):
        quant_range(9, True)


def test_fake_quantize_matches_formula_exactly():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    scale, zp = torch.tensor(0.07), torch.tensor(5.0)
    for qmin, qmax in [(0, 15), (-8, 7), (0, 255), (-128, 127), (0, 3)]:
        ref = (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale
        assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax), ref)
        assert torch.equal(dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp), ref)
    # round half to even, like ONNX QuantizeLinear
    assert quantize(torch.tensor([0.5, 1.5, 2.5]), torch.tensor(1.0), torch.tensor(0.0), -8, 7).tolist() == [0, 2, 2]


@pytest.mark.parametrize("qmin,qmax", [(0, 15), (-8, 7), (0, 255), (-(2 ** 31), 2 ** 31 - 1)])
def test_fake_quantize_node_matches_autograd_ops_bit_for_bit(qmin, qmax):
    """The training path is one autograd node that keeps only its inputs; its values and its gradients to x,
    the step and the zero point are those of the same maths in autograd's own ops, bit for bit: per tensor and
    per channel, fractional zero points, values clipped and values exactly at the range's ends (where torch.clamp
    passes no gradient)."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 6, 5, 5) * 4
    x0[0, :, 0, 0] = torch.tensor([qmin, qmax, qmin + 1, qmax - 1, 0, 0], dtype=torch.float32) * 0.5
    for s0, z0 in [(torch.rand(1, 6, 1, 1) + 0.05, torch.rand(1, 6, 1, 1) * 10),
                   (torch.rand(4, 1, 1, 1) + 0.05, torch.zeros(4, 1, 1, 1)), (torch.tensor(0.5), torch.tensor(0.0))]:
        for frozen in (True, False):   # a frozen student: only x wants a gradient (the node keeps a mask)
            grads = []
            for fq in (fake_quantize_ste, fake_quantize_composed):
                x, s, z = (t.clone().requires_grad_(not frozen or t is x0) for t in (x0, s0, z0))
                y = fq(x, s, z, qmin, qmax)
                y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
                grads.append((y.detach(), x.grad, s.grad, z.grad))
            for a, b in zip(*grads):
                assert (a is None and b is None) if frozen and a is None else torch.equal(a, b)
    ends = grads[0][1][0, :4, 0, 0].tolist()   # per tensor: x / step at qmin, qmax, qmin + 1, qmax - 1
    passes = primitives._CLAMP_PASSES_ENDS     # as torch.clamp does in this torch release
    assert (ends[:2] == [0.0, 0.0]) != passes and (qmax > 2 ** 16 or 0.0 not in ends[2:])


def test_the_fake_quantizer_imports_with_gradients_off():
    """The fake quantizer asks torch once how clamp's gradient treats the range's ends; a first import inside
    inference mode (an inference script's) must still work."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import torch\nwith torch.inference_mode():\n    import gzq.quant.primitives as p\n"
            "print(p._CLAMP_PASSES_ENDS)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(primitives._CLAMP_PASSES_ENDS)


def test_a_student_step_keeps_less_with_the_fake_quantize_node():
    """A student's training step: the same gradients with the one-node fake quantizer as with autograd's own
    ops, and about half the memory kept for the backward (gzq.budget's count, which sizes a run's batches)."""
    from gzq.budget import _kept_bytes
    model = _models()[1]
    x = torch.randn(8, 3, 32, 32)
    student = create_student(model, QuantSpec(4, 4), x[:2], model.pretrained_cfg.get("classifier"))
    calibrate_(student, [x])
    kept, grads = {}, {}
    try:
        for name, fq in (("composed", fake_quantize_composed), ("node", fake_quantize_ste)):
            primitives.fake_quantize_ste = fq   # the training path gzq's fake_quantize takes
            student.zero_grad(set_to_none=True)
            kept[name] = _kept_bytes(lambda: student(x.clone().requires_grad_(True)).logsumexp(1).mean().backward(), 8)
            grads[name] = [p.grad for p in student.parameters()]
    finally:
        primitives.fake_quantize_ste = fake_quantize_ste
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads["composed"], grads["node"]))
    assert kept["node"] < 0.7 * kept["composed"]


def test_fake_quantize_without_gradients_gives_the_same_values_as_with():
    """Evaluation takes a shorter path (no straight-through terms); its values must be the training path's,
    bit for bit, for per-channel steps, fractional zero points and clipped values alike."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 4
    scale = (torch.rand(1, 6, 1, 1) + 0.05).requires_grad_(True)
    zp = (torch.rand(1, 6, 1, 1) * 10).requires_grad_(True)
    for qmin, qmax in [(0, 15), (-8, 7), (0, 255)]:
        trained = fake_quantize(x.requires_grad_(True), scale, zp, qmin, qmax)
        assert trained.requires_grad and trained.grad_fn is not None
        assert torch.equal(trained, fake_quantize_ste(x, scale, zp, qmin, qmax))
        with torch.no_grad():
            evaluated = fake_quantize(x, scale, zp, qmin, qmax)
        assert not evaluated.requires_grad and torch.equal(evaluated, trained.detach())
        frozen = fake_quantize(x.detach(), scale.detach(), zp.detach(), qmin, qmax)   # no input wants a gradient
        assert torch.equal(frozen, trained.detach())


def test_fake_quantize_straight_through_and_lsq_gradients():
    x = torch.tensor([-1.3, 0.2, 0.45, 5.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize(x, scale, torch.tensor(0.0), -2, 1)          # codes -2..1: range [-1, 0.5]
    assert y.tolist() == [-1.0, 0.0, 0.5, 0.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]                 # STE inside the range, zero where clipped
    # LSQ: d/ds [s * round(clamp(x/s))] = round(x/s) - x/s inside, qmin / qmax where clipped
    expected = -2.0 + (round(0.4) - 0.4) + (round(0.9) - 0.9) + 1.0
    assert scale.grad.item() == pytest.approx(expected, abs=1e-6)


def _models():
    torch.manual_seed(0)
    out = []
    for name in ("test_resnet", "test_efficientnet"):
        m = timm.create_model(name, num_classes=7)
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(8, 3, 32, 32))
        out.append(m.eval())
    return out


@pytest.mark.parametrize("idx", [0, 1])
def test_fold_bn_leaves_outputs_unchanged(idx):
    model = _models()[idx]
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    folded = copy.deepcopy(model)
    pairs = fold_bn_(folded, x[:1])
    assert len(pairs) > 0
    remaining = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(remaining) < len([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
    torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-4)


class _SharedOutputs(nn.Module):
    """A conv whose output feeds a shortcut and a pre-norm BN (CoAtNet's first MBConv block), a BN that reads a
    conv's output after an in-place activation, and one plain conv -> BN pair: only the last may be folded."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pre_norm = BatchNormAct2d(8, act_layer=nn.SiLU, inplace=True)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.bn_after_act = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = self.stem(x)
        x = nn.functional.avg_pool2d(x, 1) + self.conv(self.pre_norm(x))
        x = self.bn2(self.conv2(self.bn_after_act(self.act(self.conv_b(x)))))
        return self.fc(x.mean((2, 3)))


def test_fold_bn_leaves_a_conv_output_that_others_read_as_it_is():
    """Folding a BN into a conv whose output something else also reads (a pre-norm block's shortcut) would hand
    the normalised values to that reader too; so would folding a BN that reads the output after an in-place
    activation. Neither is folded; the students built on such a model train (an in-place activation left behind on
    the shared output broke its backward)."""
    torch.manual_seed(0)
    model = _SharedOutputs().eval()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    folded = copy.deepcopy(model)
    assert fold_bn_(folded, x[:2]) == [("conv2", "bn2")]
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    student = create_student(model, QuantSpec(8, 8), x[:2], "fc")
    xg = x.clone().requires_grad_(True)
    student(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


class _ReusedConv(nn.Module):
    """A forward that scales its input in place, a conv called twice (once into a BN), and a conv whose output is
    both a BN's input and one of the model's outputs: none of the BNs may be folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head, self.bn_head = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        for bn in (self.bn, self.bn_head):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x.mul_(1.0)
        x = self.bn(self.conv(x)) + self.conv(x)
        h = self.head(x)
        return self.bn_head(h).mean((2, 3)), h.mean((2, 3))


def test_fold_bn_leaves_a_reused_conv_and_a_returned_output_as_they_are():
    torch.manual_seed(0)
    model = _ReusedConv().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x.clone())
    folded = copy.deepcopy(model)
    assert fold_bn_(folded, x.clone()) == []
    for a, b in zip(folded(x.clone()), ref):
        torch.testing.assert_close(a, b)


class _Concatenated(nn.Module):
    """BNs after channel concatenations: of two convs (MixNet's MixedConv2d), foldable into each conv's channels;
    of a conv and the input, of a conv whose output a shortcut also reads, and a concatenation a shortcut also
    reads: not foldable. One more BN is called on a conv's output and again on a sum: not foldable either."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn_mixed = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 5, padding=2), nn.BatchNorm2d(8)
        self.c, self.bn_with_input = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(12)
        self.d, self.e, self.bn_shared = nn.Conv2d(12, 6, 1), nn.Conv2d(12, 6, 1), nn.BatchNorm2d(12)
        self.f, self.g, self.bn_cat_read = nn.Conv2d(12, 6, 1), nn.Conv2d(12, 6, 1), nn.BatchNorm2d(12)
        self.h, self.bn_twice = nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.bn_mixed(torch.cat([self.a(x), self.b(x)], 1))
        x = self.bn_with_input(torch.cat([self.c(x), x], 1))
        d = self.d(x)
        x = self.bn_shared(torch.cat([d, self.e(x)], 1)) + d.repeat(1, 2, 1, 1)
        cat = torch.cat([self.f(x), self.g(x)], -3)
        x = self.bn_cat_read(cat) + cat
        x = self.bn_twice(self.h(x))
        return self.bn_twice(x + 1).mean((2, 3))


def test_fold_bn_folds_a_bn_after_concatenated_convs_into_each():
    torch.manual_seed(0)
    model = _Concatenated().eval()
    x = torch.randn(3, 4, 8, 8)
    ref = model(x)
    folded = copy.deepcopy(model)
    assert fold_bn_(folded, x[:2]) == [("a", "bn_mixed"), ("b", "bn_mixed")]
    assert isinstance(folded.bn_mixed, nn.Identity) and isinstance(folded.bn_twice, nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    moments = folded_bn_moments(model, x[:2])
    assert set(moments) == {"a", "b"} and [v.shape[0] for v in moments["b"]] == [5, 5]
    torch.testing.assert_close(moments["b"][0], model.bn_mixed.bias[3:])


def test_fold_bn_leaves_a_bn_without_running_statistics():
    """A BN that normalises with each batch's own statistics at inference has nothing to fold."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    folded = copy.deepcopy(model)
    assert fold_bn_(folded, torch.randn(2, 3, 8, 8)) == [("2", "3")]
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("protocol", list(Protocol))
def test_quantize_wraps_every_layer_generically(protocol):
    model = _models()[1]
    x = torch.randn(4, 3, 32, 32)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    student = create_student(model, QuantSpec(4, 3, protocol), x[:2], model.pretrained_cfg.get("classifier"))
    wrappers = dict(quant_wrappers(student))
    assert len(wrappers) == n_layers
    first, last = "conv_stem", "classifier"
    assert wrappers[first].a_quant is None                      # the network input stays float (or is a tensor's)
    expect = 8 if protocol == Protocol.FIRST_LAST_8BIT else 4
    assert wrappers[first].w_quant.bits == expect and wrappers[last].w_quant.bits == expect
    others = [w for n, w in wrappers.items() if n not in (first, last)]
    assert all(w.w_quant.bits == 4 for w in others)
    if protocol == Protocol.DEPLOYABLE:                         # activations quantized per tensor, not per layer
        assert all(w.a_quant is None for w in wrappers.values())
        assert {q.bits for _, q in tensor_quantizers(student)} == {8, 3}
    else:
        assert wrappers[last].a_quant.bits == (8 if protocol == Protocol.FIRST_LAST_8BIT else 3)
        assert all(w.a_quant.bits == 3 for w in others)
    calibrate_(student, [x])
    assert torch.isfinite(student(x)).all()
    # deployed size: 4-bit weights are about 8x smaller than float ones
    assert model_size_bytes(student) < 0.4 * sum(p.numel() * 4 for p in model.parameters())


def test_quantized_weights_take_at_most_2_pow_bits_values():
    model = _models()[0]
    x = torch.randn(2, 3, 32, 32)
    student = create_student(model, QuantSpec(3, 3), x)
    for _, w in quant_wrappers(student):
        wq = w.quantized_weight().detach()
        for row in wq.flatten(1)[:4]:
            assert len(torch.unique(row)) <= 8


def test_w8a8_student_tracks_the_teacher():
    model = _models()[0]
    x = torch.randn(16, 3, 32, 32)
    student = create_student(model, QuantSpec(8, 8), x[:2])
    calibrate_(student, [x])
    ref, out = model(x), student(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_act_quantizer_calibration_methods():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(10000))
    for method in ("mse", "percentile"):
        q = _calibrated(ActQuantizer(4), [x[:5000], x[5000:]], method, 99.9)
        assert q.zero_point.item() == 0.0                           # non-negative input: zero maps to code 0
        err = (q(x) - x).pow(2).mean()
        assert err < 0.01 * x.pow(2).mean()
    with pytest.raises(RuntimeError, match="saw no data"):
        ActQuantizer(4).init_from_calibration_()
    with pytest.raises(RuntimeError, match="saw no data"):
        ActQuantizer(4).start_histogram_()


def test_default_calibration_follows_the_bulk_at_4_bits_and_keeps_the_tail_at_8():
    """Synthetic image sets can carry a BN layer's variance in one image whose activations are far above the
    rest. At 4 bits the default range follows the other images (a squared-error range would stretch to the
    outlier); at 8 bits, where levels are cheap, it stays the squared-error range."""
    torch.manual_seed(0)
    bulk = torch.relu(torch.randn(127, 64, 8, 8))
    outlier = torch.zeros(1, 64, 8, 8)
    outlier[0, :2] = 100 * torch.rand(2, 8, 8)              # 2 of 64 channels of one image, 0.02 % of the values
    x = torch.cat([bulk, outlier])
    spec = QuantSpec()
    assert spec.act_init.resolve(4) == ActInit.PERCENTILE and spec.act_init.resolve(8) == ActInit.MSE
    clean = _calibrated(ActQuantizer(4), [bulk], spec.act_init, spec.act_percentile).scale.item()
    default = _calibrated(ActQuantizer(4), [x], spec.act_init, spec.act_percentile).scale.item()
    mse = _calibrated(ActQuantizer(4), [x], ActInit.MSE).scale.item()
    assert default < 1.2 * clean and mse > 2 * default
    assert (_calibrated(ActQuantizer(8), [x], spec.act_init, spec.act_percentile).scale.item()
            == _calibrated(ActQuantizer(8), [x], ActInit.MSE).scale.item())


def test_choose_percentile_leaves_the_default_only_on_a_clear_signal():
    from gzq.config import AUTO_PERCENTILE_FALLBACK, AUTO_PERCENTILES
    from gzq.quant.convert import choose_percentile
    assert QuantSpec().act_percentile == "auto" and AUTO_PERCENTILE_FALLBACK in AUTO_PERCENTILES
    assert QuantSpec.parse("w4a4").probes_percentile and not QuantSpec.parse("w8a8").probes_percentile
    assert not QuantSpec(act_percentile=99.9).probes_percentile
    assert choose_percentile({99.5: 0.5, 99.9: 1.0, 99.99: 0.9}) == 99.5     # under 0.75 x the default's KL
    assert choose_percentile({99.5: 0.8, 99.9: 1.0, 99.99: 0.9}) == 99.9     # lower, but not clearly
    assert choose_percentile({99.5: 0.2, 99.9: 1.0, 99.99: 0.1}) == 99.99    # the lowest of the clear ones
    assert choose_percentile({99.5: 3.0, 99.9: float("nan"), 99.99: 2.0}) == 99.99   # no default to compare
    assert choose_percentile({}) == choose_percentile({99.9: float("inf")}) == 99.9


def test_auto_percentile_calibrates_once_and_keeps_the_ranges_of_its_pick(new_student, default_teacher, fmnist):
    """students.act_percentile=auto: one pass of calibration, then each candidate percentile scored by the
    student's KL to the teacher; the student ends with exactly the ranges a calibration at the chosen
    percentile gives, and an 8-bit student (squared-error ranges) is not probed."""
    from gzq.config import AUTO_PERCENTILES
    from gzq.evaluate import kl_score, mean_kl, predict_logits
    t, calib, held = default_teacher.model, [fmnist["calib"][:128], fmnist["calib"][128:]], fmnist["test"][:256]

    def scales(m):
        return [a.scale.clone() for a in m.modules() if isinstance(a, ActQuantizer)]

    fixed = {}
    for p in AUTO_PERCENTILES:
        fixed[p] = new_student("w4a4")
        assert calibrate_(fixed[p], calib, percentile=p) is None
    assert not all(torch.equal(a, b) for a, b in zip(scales(fixed[99.5]), scales(fixed[99.99])))
    score = kl_score(t, held)
    want = {p: mean_kl(predict_logits(t, held, held.device), predict_logits(s, held, held.device))
            for p, s in fixed.items()}
    assert score(fixed[99.9]) == pytest.approx(want[99.9], rel=1e-4)

    auto = new_student("w4a4")
    got = calibrate_(auto, calib, percentile="auto", score=score)
    assert list(got["scores"]) == list(AUTO_PERCENTILES)
    assert got["scores"] == pytest.approx(want, rel=1e-4)
    assert all(map(torch.equal, scales(auto), scales(fixed[got["percentile"]])))
    # the pick follows the scores: one that prefers 99.99 clearly gets its ranges
    order = iter([3.0, 2.0, 1.0])
    forced = new_student("w4a4")
    assert calibrate_(forced, calib, percentile="auto", score=lambda m: next(order))["percentile"] == 99.99
    assert all(map(torch.equal, scales(forced), scales(fixed[99.99])))
    # nothing to judge by: the default percentile, no scores
    plain = new_student("w4a4")
    assert calibrate_(plain, calib, percentile="auto") == {"percentile": 99.9, "scores": {}}
    assert all(map(torch.equal, scales(plain), scales(fixed[99.9])))
    w8, w8_auto = new_student("w8a8"), new_student("w8a8")
    calibrate_(w8, calib)
    assert calibrate_(w8_auto, calib, percentile="auto", score=score) == {"percentile": 99.9, "scores": {}}
    assert all(map(torch.equal, scales(w8_auto), scales(w8)))


def _calibrated(q: ActQuantizer, batches, method="mse", percentile=99.99) -> ActQuantizer:
    q.calibrating = True
    for x in batches:
        q(x)
    q.start_histogram_()
    for x in batches:
        q(x)
    q.calibrating = False
    q.init_from_calibration_(method, percentile)
    return q


def test_act_calibration_histogram_matches_exhaustive_search():
    """The histogram search finds the clipping an exhaustive search over every sample finds, for skewed,
    signed and 8-bit data, and the percentile method clips where torch.quantile says."""
    from gzq.quant.primitives import mse_search
    torch.manual_seed(0)
    cases = [(torch.relu(torch.randn(40000)) ** 3, 4), (torch.randn(40000) * 2 - 0.5, 4),
             (torch.relu(torch.randn(40000)), 8)]
    for x, bits in cases:
        q = _calibrated(ActQuantizer(bits), list(x.chunk(3)))
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        ref_scale, ref_zp = mse_search(x[None], lo[None], hi[None], q.qmin, q.qmax, False, bits)
        assert abs(q.scale.item() - ref_scale.item()) <= 0.03 * ref_scale.item()
        ref_err = (fake_quantize(x, ref_scale[0], ref_zp[0], q.qmin, q.qmax) - x).pow(2).mean()
        assert (q(x) - x).pow(2).mean() <= 1.02 * ref_err
    x = torch.relu(torch.randn(100000))
    q = _calibrated(ActQuantizer(8), [x], "percentile", 99.0)
    assert abs(q.scale.item() * 255 - torch.quantile(x, 0.99).item()) < 0.01


def test_quant_wrapper_handles_linear():
    lin = nn.Linear(6, 3)
    w = QuantWrapper(lin, 8, 8)
    x = torch.randn(5, 6)
    calibrate_(w, [x])
    torch.testing.assert_close(w(x), lin(x), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- deployable protocol: where the quantizers go

_COMMUTING = (nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d)


def _through(gm, node):
    """The node whose value `node` carries, looking back through ops that commute with quantization."""
    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), _COMMUTING):
        node = node.args[0]
    return node


def _is_quantizer(gm, node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActQuantizer)


@pytest.mark.parametrize("arch", ["test_resnet", "mobilenetv2_050", "tinynet_e"])
def test_deployable_quantizes_every_tensor_an_integer_runtime_touches(arch, monkeypatch):
    """Residual adds (ResNet `x += shortcut` then ReLU, MobileNetV2 / EfficientNet `x + shortcut`): both
    inputs and the output quantized; the network input at 8 bit; every conv / linear input and the pooled
    features quantized; no tensor quantized twice in a row. Found from the graph, no per-model list."""
    import operator

    from gzq.quant import modules
    monkeypatch.setattr(modules, "WEIGHT_GRID", 80)   # the library's search: top-1 of a random net on 4 inputs
    torch.manual_seed(0)                             # (checked below) turns on the exact ranges
    model = timm.create_model(arch, num_classes=7).eval()
    x = torch.randn(4, 3, 32, 32)
    gm = create_student(model, QuantSpec(4, 4, Protocol.DEPLOYABLE), x[:2], model.pretrained_cfg.get("classifier"))
    nodes = list(gm.graph.nodes)
    adds = [n for n in nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)]
    assert len(adds) >= 1
    for add in adds:
        assert all(_is_quantizer(gm, _through(gm, a)) for a in add.args[:2]), add.format_node()
        (user,) = add.users
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.ReLU):
            (user,) = user.users                                # the quantizer's clamp at zero point 0 is the ReLU
        assert _is_quantizer(gm, user), add.format_node()
    for n in nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (QuantWrapper, nn.AdaptiveAvgPool2d)):
            assert _is_quantizer(gm, _through(gm, n.args[0])), n.format_node()
        if _is_quantizer(gm, n):
            assert not _is_quantizer(gm, n.args[0])
    (inp,) = [n for n in nodes if n.op == "placeholder"]
    assert all(_is_quantizer(gm, u) and gm.get_submodule(u.target).bits == 8 for u in inp.users)
    calibrate_(gm, [x])
    ref, out = model(x), gm(x)
    assert torch.isfinite(out).all() and (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.5
    assert set(gm.state_dict()) == set(create_student(model, QuantSpec(4, 4, Protocol.DEPLOYABLE), x[:2]).state_dict())


@pytest.mark.parametrize("arch,first_act", [("resnet10t", "relu"), ("mobilenetv2_050", "relu6"),
                                            ("mobilenetv3_small_050", "hardswish"), ("efficientnet_b0", "silu")])
def test_bn_ranges_match_data_ranges_where_the_data_follow_the_bn_statistics(arch, first_act):
    """gzq.quant.convert.bn_ranges_: on Gaussian inputs the stem conv's outputs are Gaussian per channel, so
    after setting the BN statistics from those inputs, the range it derives for the quantizer that reads the
    stem's activation (found through the right activation, ReLU6 told from ReLU) is the range calibration on
    the inputs gives; quantizers it does not match keep their calibrated ranges."""
    from gzq.quant.convert import bn_ranges_
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5)
    x = torch.randn(256, 3, 32, 32)
    for m in model.modules():   # the BN running statistics of exactly these inputs
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.running_mean, m.running_var = torch.zeros_like(m.running_mean), torch.ones_like(m.running_var)
            m.num_batches_tracked.zero_()
            nn.init.uniform_(m.weight, 0.5, 2.0), nn.init.uniform_(m.bias, -1.0, 1.0)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    spec = QuantSpec(4, 4, act_init=ActInit.MSE)
    student = create_student(model, spec, x[:2])
    calibrate_(student, [x], spec.act_init)
    data_steps = {n: q.effective_scale().item() for n, q in student.named_modules() if isinstance(q, ActQuantizer)}
    found = bn_ranges_(student, model, x[:4], spec.act_init, samples=8192)
    steps = {n: q.effective_scale().item() for n, q in student.named_modules() if isinstance(q, ActQuantizer)}
    assert len(found) >= 3, found
    first = min(found, key=list(steps).index)     # the stem's consumer: the first matched quantizer
    assert found[first][1] == first_act, found
    assert steps[first] == pytest.approx(data_steps[first], rel=0.1), (steps[first], data_steps[first])
    assert all(steps[n] == data_steps[n] for n in steps if n not in found)
    assert any(steps[n] != data_steps[n] for n in found)


def test_split_identity_keeps_the_function_and_splits_only_dominant_diagonals():
    """A conv whose centre tap of input channel o in output channel o dominates (what fusing an identity BN gives),
    dense, grouped or depthwise, becomes conv(W - D) + depthwise-1x1(D) computing the same; a conv without such a
    diagonal, one where channels do not pair up (stride 2) or one that is all diagonal stays as it is."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1),
             nn.Conv2d(8, 8, 1, groups=8)]   # the last is all diagonal: nothing would be left to split from
    with torch.no_grad():
        for c in convs[:3] + convs[4:5]:
            c.weight[torch.arange(8), torch.arange(8) % c.weight.shape[1], 1, 1] += 3.0
    model, x = nn.Sequential(*convs), torch.randn(2, 8, 16, 16)
    o = torch.arange(8)
    diag = convs[1].weight[o, o % 4, 1, 1].detach().clone()
    with torch.no_grad():
        ref = model(x)
        assert split_identity_(copy.deepcopy(model), 8, min_gain=float("inf")) == []
        assert split_identity_(model, 8) == ["0", "1", "2"]
        assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-4)
    assert isinstance(model[1], SplitConv) and isinstance(model[1].taps, IdentityTaps) and model[1].conv.groups == 2
    assert torch.equal(model[1].taps.weight.flatten(), diag) and not model[1].conv.weight[o, o % 4, 1, 1].any()
    assert all(type(model[i]) is nn.Conv2d for i in (3, 4, 5))


def test_fused_student_keeps_identity_taps_apart_and_is_nearer_its_teacher(repvgg):
    """students.fuse_branches on a RepVGG: the fused convs of the blocks with an identity BN keep its taps apart, and
    the W8A8 student computes nearer the teacher than the one that fuses everything into each conv."""
    calib, x = torch.randn(64, 1, 32, 32), torch.randn(128, 1, 32, 32)
    ref, err, taps = repvgg(x), {}, {}
    for gain in (float("inf"), None):
        kw = {} if gain is None else {"split_min_gain": gain}
        s = create_student(repvgg, QuantSpec(8, 8, Protocol.DEPLOYABLE, fuse_branches=True), x[:2], "head.fc", **kw)
        with torch.no_grad():
            calibrate_(s, [calib])
            err[gain] = float((s(x) - ref).norm() / ref.norm())
        taps[gain] = sum(isinstance(w.module, IdentityTaps) for _, w in quant_wrappers(s))
    assert taps[float("inf")] == 0 and taps[None] == 17      # RepVGG-A0's blocks with an identity branch
    assert err[None] < 0.6 * err[float("inf")], err


@pytest.mark.parametrize("protocol", [Protocol.ALL_LAYERS, Protocol.DEPLOYABLE])
def test_students_of_nets_that_cache_attention_biases_train_and_stay_current(protocol):
    """LeViT (like TinyViT, EfficientFormer and MSRA's EfficientViT) caches its attention bias table in eval mode,
    the mode a student is trained in: the student recomputes it each forward, so a second backward works, a
    trained student can be copied (as export does), and a forward after an update reads the updated biases."""
    torch.manual_seed(0)
    m = timm.create_model("levit_128s", img_size=64, num_classes=10).eval().requires_grad_(False)
    biases = [p for n, p in m.named_parameters() if "attention_biases" in n]
    for p in biases:
        p.copy_(torch.randn_like(p))   # timm starts them at zero
    x = torch.randn(4, 3, 64, 64)
    s = create_student(m, QuantSpec(8, 8, protocol), x[:2], "head")
    calibrate_(s, [x])
    opt = torch.optim.SGD([p for n, p in s.named_parameters() if "attention_biases" in n], lr=10.0)
    for _ in range(2):
        opt.zero_grad()
        s(x).square().mean().backward()
        opt.step()
    copy.deepcopy(s)
    with torch.no_grad():
        before = s(x)
        for p in opt.param_groups[0]["params"]:
            p.copy_(5 * torch.randn_like(p))
        assert not torch.allclose(s(x), before)   # not the table cached before the change


def test_weights_without_a_quantized_form_are_reported_and_warned_about():
    """A layer GZQ has no quantized form for (here a Conv1d, as in ECA gates) stays float: the student row says how
    much of the model that is, and a run warns when it is more than a sliver."""
    from gzq.evaluate import MAX_FLOAT_WEIGHTS, health_warnings
    from gzq.quant.convert import float_weights

    class Gated(nn.Module):
        def __init__(self, gate: int):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.gate, self.fc = nn.Conv1d(1, 1, gate, padding=gate // 2, bias=False), nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            g = torch.sigmoid(self.gate(x.mean((2, 3)).unsqueeze(1))).squeeze(1)
            return self.fc((x * g[:, :, None, None]).mean((2, 3)))

    x = torch.randn(2, 3, 8, 8)
    for gate, warned in ((3, False), (101, True)):
        student = create_student(Gated(gate).eval(), QuantSpec(4, 4), x)
        share, kinds = float_weights(student)
        assert share == pytest.approx(100 * gate / (gate + 16 * 27 + 16 * 10)) and kinds == ["Conv1d"]
        assert (share > MAX_FLOAT_WEIGHTS) is warned
        row = {"name": "w4a4", "agreement": 90.0, "float_weights_pct": round(share, 2), "float_weight_modules": kinds}
        msgs = health_warnings({}, [row])
        assert len(msgs) == warned and (not warned or "no quantized form for (Conv1d)" in msgs[0])
    plain = create_student(_models()[0], QuantSpec(4, 4), torch.randn(2, 3, 32, 32))
    assert float_weights(plain) == (0.0, [])
