"""gzq.reconstruct: units found from the structure of any timm CNN, reconstruction that lowers each unit's
output error, learnt rounding that stays exactly on the export's integer grid."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from gzq.config import AUTO_METHODS, FinetuneMethod, Protocol, QuantSpec, TrainConfig
from gzq.quant.convert import calibrate_, create_student, fold_bn_, quant_wrappers
from gzq.reconstruct import ReconSettings, find_units, image_weights, iter_reconstruct, recon_settings


def _covered(model, units):
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return [n for n in layers if any(n == u or n.startswith(u + ".") for u in units)], layers


@pytest.mark.parametrize("arch, expect", [
    # (architecture, units that must be found: residual blocks whole, stages split, stem and head alone)
    ("resnet18", ["conv1", "layer1.0", "layer1.1", "layer4.1", "fc"]),
    ("mobilenetv2_050", ["conv_stem", "blocks.0", "blocks.1.0", "blocks.1.1", "conv_head", "classifier"]),
    ("regnetx_002", ["stem", "s1", "s3.b1", "s4.b7", "head"]),
    pytest.param("densenet121", ["features.conv0", "features.denseblock1", "features.transition1", "classifier"],
                 marks=pytest.mark.slow),
    pytest.param("repvgg_a0", ["stem", "stages.0.0", "stages.2.13", "head"], marks=pytest.mark.slow),
    pytest.param("ghostnet_050", ["conv_stem", "blocks.0", "blocks.9", "classifier"], marks=pytest.mark.slow),
])
def test_units_cover_every_layer_in_execution_order(arch, expect):
    model = timm.create_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    units = find_units(model, x)
    covered, layers = _covered(model, units)
    assert covered == layers                                   # every conv / linear in exactly one unit
    assert all(sum(n == u or n.startswith(u + ".") for u in units) == 1 for n in layers)
    for u in expect:
        assert u in units, (u, units)
    assert [units.index(u) for u in expect] == sorted(units.index(u) for u in expect)
    # the same units in the BN-folded fake-quant student (BN replaced, convs wrapped)
    student = create_student(model, QuantSpec.parse("w4a4"), x)
    assert find_units(student, x) == units


def test_deployable_student_units_are_its_layers(default_teacher):
    """An fx-traced student calls no container module: its units are the layers themselves."""
    t = default_teacher
    x = torch.zeros(2, *t.input_size)
    s = create_student(t.model, QuantSpec(4, 4, protocol=Protocol.DEPLOYABLE), x, t.classifier)
    units = find_units(s, x)
    assert units == [n for n, _ in quant_wrappers(s)]


@pytest.fixture(scope="module")
def tiny():
    """A small trained-statistics ResNet-like timm model and a calibrated W3A3 student."""
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=10, in_chans=1).train()
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):   # no zero-initialised
            bn.weight.uniform_(0.5, 1.5)                                             # residual branches
            bn.bias.uniform_(-0.2, 0.2)
        for _ in range(4):
            m(torch.randn(32, 1, 32, 32))
    m.eval().requires_grad_(False)
    x = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    s = create_student(m, QuantSpec(3, 3), x[:2])
    calibrate_(s, [x])
    ref = copy.deepcopy(m)
    fold_bn_(ref, x[:2])
    return m, ref, s, x


def _unit_errors(ref, student, units, x):
    out = {}
    with torch.no_grad():
        for u in units:
            feats = {}
            mod = ref.get_submodule(u)
            hooks = [mod.register_forward_pre_hook(lambda m, a: feats.__setitem__("in", a[0].clone())),
                     mod.register_forward_hook(lambda m, a, o: feats.__setitem__("out", o.clone()))]
            ref(x)
            for h in hooks:
                h.remove()
            inp, target = feats["in"], feats["out"]
            out[u] = (student.get_submodule(u)(inp) - target).pow(2).mean().item()
    return out


@pytest.mark.slow
def test_reconstruction_lowers_each_units_error_and_keeps_weights_on_the_grid(tiny):
    m, ref, s0, x = tiny
    s = copy.deepcopy(s0)
    units = find_units(s, x[:2])
    before = _unit_errors(ref, s, units, x)
    gen = torch.Generator().manual_seed(3)
    draw = lambda idx: x[idx] + 0.05 * torch.randn(x[idx].shape, generator=gen)   # noqa: E731
    settings = ReconSettings(steps=60, batch_size=16, pool=64, lr_round=3e-2)
    events = list(iter_reconstruct(ref, {"w3a3": s}, draw, torch.arange(len(x)), settings, torch.device("cpu")))
    progress = [e for e in events if type(e).__name__ == "Progress"]
    assert len(progress) == len(units) * settings.steps
    assert [e.block for e in progress[::settings.steps]] == units
    after = _unit_errors(ref, s, units, x)
    assert sum(after.values()) < 0.8 * sum(before.values()), (before, after)
    assert sum(after[u] < before[u] for u in units) >= len(units) - 1, (before, after)
    with torch.no_grad():   # and the network's output, which no unit was fitted to directly
        err0, err1 = ((net(x) - ref(x)).pow(2).mean().item() for net in (s0, s))
    assert err1 < 0.7 * err0, (err0, err1)
    # learnt rounding is baked into the float weight: it lies on its quantizer's grid, codes changed somewhere
    changed = 0
    for (n, w), (_, w0) in zip(quant_wrappers(s), quant_wrappers(s0)):
        assert type(w.w_quant).__name__ == "WeightQuantizer"
        with torch.no_grad():
            torch.testing.assert_close(w.quantized_weight(), w.module.weight, rtol=0, atol=1e-6)
            changed += int((w.quantized_weight() != w0.quantized_weight()).sum())
    assert changed > 0


@pytest.mark.parametrize("protocol", [Protocol.ALL_LAYERS, Protocol.DEPLOYABLE])
def test_reconstruction_reaches_the_expert_convs_of_a_cond_conv_network(protocol, cond_net):
    """A CondConv student holds its experts in ordinary convs (gzq.quant.convert.ExpertConv), and so does the float
    reference it is fitted to: the units of either protocol's student (the block whole, or each layer of the traced
    deployable student) are all in the reference, and reconstruction runs through them."""
    from types import SimpleNamespace

    from gzq.distill import folded_copy
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = folded_copy(SimpleNamespace(model=cond_net), x[:2])
    s = create_student(cond_net, QuantSpec(4, 4, protocol=protocol), x[:2], "fc")
    calibrate_(s, [x])
    units = find_units(s, x[:2])
    assert all(ref.get_submodule(u) is not None for u in units)
    assert ("block.conv_dw.conv" in units) is (protocol == Protocol.DEPLOYABLE) and ("block" in units) is not (
        protocol == Protocol.DEPLOYABLE)
    settings = ReconSettings(steps=3, batch_size=16, pool=16)
    events = list(iter_reconstruct(ref, {"w4a4": s}, lambda idx: x[idx], torch.arange(len(x)), settings,
                                   torch.device("cpu")))
    assert [e.block for e in events if type(e).__name__ == "Progress"][::3] == units


def test_image_weights_count_a_loud_image_as_a_median_one():
    out = torch.ones(8, 4, 3, 3)
    out[0] *= 10.0                      # 100x the energy of the others: 94 % of the batch's squared output
    out[1] *= 0.5                       # quieter than the median: still counts fully
    w = image_weights(out)
    assert w.shape == (8,) and torch.allclose(w[1:], torch.ones(7))
    assert w[0].item() == pytest.approx(0.01)
    e = out.pow(2).flatten(1).sum(1)
    assert (w * e)[0] == pytest.approx(e[2].item())       # its weighted energy is a median image's
    assert torch.equal(image_weights(torch.zeros(4, 2)), torch.ones(4))   # silent outputs: no division by zero


def test_recon_settings_follow_the_config():
    cfg = TrainConfig(method="recon", recon_steps=7, recon_pool=99, recon_drop=0.0, recon_batch_size=32)
    s = recon_settings(cfg, 1000)
    assert (s.steps, s.pool, s.drop) == (7, 56, 0.0)                 # a pool of at most steps x batch / 4
    assert recon_settings(TrainConfig(recon_cap_energy=True), 100).cap_energy
    auto = recon_settings(TrainConfig(epochs=40, recon_batch_size=32), 224)
    assert auto.steps == 140 and auto.pool == 512                     # half the images 40 KD epochs pass
    spec4, spec8 = QuantSpec(4, 4), QuantSpec(8, 8)
    assert cfg.method_for(spec8) == FinetuneMethod.RECON
    auto = TrainConfig()
    for spec in (spec4, spec8, QuantSpec(3, 3), QuantSpec(4, 8)):   # AUTO follows AUTO_METHODS, KD elsewhere
        assert auto.method_for(spec) == AUTO_METHODS.get(min(spec.w_bits, spec.a_bits), FinetuneMethod.KD)
    assert auto.method_for(QuantSpec(4, 4)) == FinetuneMethod.KD and auto.method_for(spec8) == FinetuneMethod.CALIBRATE
    with pytest.raises(ValueError, match="recon_drop"):
        TrainConfig(recon_drop=1.5)
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"method": "adaround"})


@pytest.mark.slow
def test_reconstructed_student_exports_exactly(default_teacher, tmp_path):
    """Learnt rounding changes the weight codes; the ONNX file and the integer safetensors hold those codes,
    so onnxruntime and the rebuilt student give the reconstructed student's outputs."""
    from gzq.data import load_fashion_mnist, to_model_input
    from gzq.checkpoint import load_int_weights, save_int_weights
    from gzq.export import export_onnx, run_onnx
    t = default_teacher
    xs, _ = load_fashion_mnist("train")
    x = to_model_input(xs[:96], t.mean, t.std, t.input_size)
    spec = QuantSpec(4, 4)
    s = create_student(t.model, spec, x[:2], t.classifier)
    calibrate_(s, [x])
    nearest = {n: w.quantized_weight().clone() for n, w in quant_wrappers(s)}
    ref = copy.deepcopy(t.model)
    fold_bn_(ref, x[:2])
    settings = ReconSettings(steps=15, batch_size=16, pool=32, lr_round=5e-2)
    list(iter_reconstruct(ref, {"w4a4": s}, lambda idx: x[idx], torch.arange(len(x)), settings, torch.device("cpu")))
    assert any(not torch.equal(w.quantized_weight(), nearest[n]) for n, w in quant_wrappers(s))
    s.eval().requires_grad_(False)
    test = x[:64]
    with torch.no_grad():
        expect = s(test)
    info = export_onnx(s, tmp_path / "recon.onnx", t.input_size, 21, t.data_config(), spec)
    got = run_onnx(info["path"], test)
    assert (got.argmax(1) == expect.argmax(1)).float().mean() >= 0.98
    assert (got - expect).abs().max() <= 0.05 * expect.abs().max()
    ints = save_int_weights(s, tmp_path / "recon_int.safetensors", spec, t.data_config())
    rebuilt, _, _ = load_int_weights(ints["path"])
    with torch.no_grad():
        assert torch.equal(rebuilt(test), expect)


@pytest.mark.slow
def test_pipeline_runs_block_reconstruction_and_reports_it(tmp_path):
    """train.method=recon+kd through the whole pipeline: a reconstruct stage with one Progress per step naming its
    block, then KD; the report records each student's method; the app's plot folds the events."""
    from gzq.events import Done, Progress, StageStarted
    from gzq.pipeline import iter_run
    from gzq.presets import make_config
    from gzq.ui.figures import recon_figure
    from gzq.ui.view import RunView
    cfg = make_config("cpu", device="cpu", students=["w4a4"], time_budget_s=None,
                      synth=dict(num_images=20, holdout_images=4, batch_size=16, steps=4, warmup_steps=2),
                      train=dict(epochs=1, method="recon+kd", recon_steps=3, recon_pool=16, recon_batch_size=8),
                      eval=dict(max_real_images=200), export=dict(formats=[]))
    view = RunView()
    events = []
    for ev in iter_run(cfg, tmp_path / "run"):
        view.update(ev)
        events.append(ev)
    stages = [e.stage for e in events if isinstance(e, StageStarted)]
    assert stages.index("reconstruct") < stages.index("finetune")
    recon = [e for e in events if isinstance(e, Progress) and e.stage == "reconstruct"]
    assert len(recon) == recon[0].total_steps and len({e.block for e in recon}) == recon[0].total_steps // 3
    report = next(e for e in events if isinstance(e, Done)).report
    assert report["students"][0]["finetune"] == "recon+kd" and report["timings"]["reconstruct"] > 0
    assert report["config"]["train"]["method"] == "recon+kd"
    assert len(view.recon_blocks) == len({e.block for e in recon}) and len(view.recon["w4a4"][0]) == len(recon)
    fig = recon_figure(view)
    assert len(fig.data) == 1 and len(fig.data[0].x) == len(recon)
    assert view.losses == {} or "bn" in view.losses   # the synthesis loss table is not overwritten


def test_reconstruction_of_an_8bit_student_with_int32_biases(tiny):
    """An 8-bit conv of 8-bit input adds its bias as int32 codes of step input scale x weight scale; while its
    unit is reconstructed the learnt rounding gives that weight scale."""
    m, ref, _, x = tiny
    s = create_student(m, QuantSpec(8, 8), x[:2])
    calibrate_(s, [x])
    int_bias = [n for n, w in quant_wrappers(s) if w.has_int_bias]
    assert int_bias
    gen = torch.Generator().manual_seed(3)
    draw = lambda idx: x[idx] + 0.05 * torch.randn(x[idx].shape, generator=gen)   # noqa: E731
    settings = ReconSettings(steps=3, batch_size=16, pool=32)
    list(iter_reconstruct(ref, {"w8a8": s}, draw, torch.arange(len(x)), settings, torch.device("cpu")))
    assert [n for n, w in quant_wrappers(s) if w.has_int_bias] == int_bias
    with torch.no_grad():
        assert (s(x) - ref(x)).pow(2).mean() < 0.05 * ref(x).pow(2).mean()
