import json

import pytest

from gzq.config import ActInit, BNLoss, ModelSpec, Protocol, QuantSpec, RunConfig, SynthConfig, override, student_specs
from gzq.presets import make_config


def test_round_trip_through_json():
    cfg = make_config("cpu", "cpu", students=["w4a4", "w8a8"], synth=dict(bn_loss="mse", num_students=3),
                      model=ModelSpec("resnet18", input_size=(3, 64, 64)))
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.synth.bn_loss is BNLoss.MSE and again.model.input_size == (3, 64, 64)
    assert [n for n, _ in student_specs(cfg)] == ["w4a4", "w8a8", "w4a4_s1"]


@pytest.mark.parametrize("kwargs, msg", [
    (dict(w_bits=9), "w_bits must be in 2..8, got 9"),
    (dict(a_bits=1), "a_bits must be in 2..8, got 1"),
    (dict(protocol="nope"), "'nope' is not a valid Protocol"),
])
def test_quant_spec_validates(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        QuantSpec(**kwargs)


def test_parse_students():
    assert QuantSpec.parse("W3A5").name == "w3a5"
    assert QuantSpec.parse("w4a4", Protocol.FIRST_LAST_8BIT).name == "w4a4_fl8"
    with pytest.raises(ValueError, match="not of the form w<bits>a<bits>"):
        QuantSpec.parse("int4")


def test_other_validation():
    with pytest.raises(ValueError, match="num_images must be > 0"):
        SynthConfig(num_images=0)
    with pytest.raises(ValueError, match="must exceed holdout_images"):
        make_config("cpu", "cpu", synth=dict(num_images=16, holdout_images=16))
    with pytest.raises(ValueError, match="student configurations repeat"):
        make_config("cpu", "cpu", students=["w4a4", "w4a4"])
    with pytest.raises(ValueError, match="unknown preset 'tpu'"):
        make_config("tpu")
    with pytest.raises(ValueError, match="unknown SynthConfig fields: \\['stepz'\\]"):
        SynthConfig.from_dict({"stepz": 3})


def test_override_scales_derived_fields_by_one_rule():
    cfg = make_config("cpu", "cpu")                                   # 256 images / 32 held out, 300 / 100 steps
    o = override(cfg, "synth.steps=80", "synth.num_images=64", "train.lr=3e-4", "seed=2")
    assert (o.synth.steps, o.synth.warmup_steps) == (80, 27)           # the same share of the steps
    assert (o.synth.num_images, o.synth.holdout_images, o.synth.batch_size) == (64, 8, 64)
    assert o.train.lr == 3e-4 and o.seed == 2 and cfg.synth.steps == 300   # a copy; the original is kept
    given = override(cfg, {"synth.steps": 80, "synth.warmup_steps": 5})  # a derived field given wins
    assert (given.synth.steps, given.synth.warmup_steps) == (80, 5)
    assert override(cfg, "synth.lr=0.2").synth.warmup_steps == 100      # other fields move nothing
    assert [s.name for s in override(cfg, "students=w4a4,w8a8").students] == ["w4a4", "w8a8"]
    assert override(cfg, "synth.bn_loss=mse").synth.bn_loss.value == "mse"
    for bad in ("synth.nope=1", "nope.lr=1", "synth.lr", "synth.steps=-1"):
        with pytest.raises(ValueError):
            override(cfg, bad)


def test_cli_and_app_budgets_agree():
    from gzq.cli import _parser, build_config
    from gzq.ui.form import build_config as form_config
    cli = build_config(_parser().parse_args(["run", "--model", "resnet18", "--preset", "cpu", "--steps", "80",
                                             "--images", "24", "--out", "x"]))
    app = form_config("resnet18", preset="standard", steps=80, num_images=24)
    keep = ("num_images", "holdout_images", "batch_size", "steps", "warmup_steps")
    assert [getattr(cli.synth, k) for k in keep] == [getattr(app.synth, k) for k in keep] == [24, 3, 24, 80, 27]


def test_override_sets_a_field_of_every_student():
    cfg = make_config("cpu", "cpu", students=["w4a4", "w8a8"])
    assert {s.act_init for s in cfg.students} == {ActInit.AUTO}
    got = override(cfg, "students.act_init=mse", "students.act_percentile=99.99")
    assert [(s.name, s.act_init, s.act_percentile) for s in got.students] == [
        ("w4a4", ActInit.MSE, 99.99), ("w8a8", ActInit.MSE, 99.99)]
    assert [s.name for s in override(cfg, "students=w3a3", "students.act_init=mse").students] == ["w3a3"]
    with pytest.raises(ValueError, match="each student has: .*act_init"):
        override(cfg, "students.bogus=1")
    with pytest.raises(ValueError, match="act_percentile must be in"):
        override(cfg, "students.act_percentile=20")
    assert [s.act_percentile for s in override(cfg, "students.act_percentile=auto").students] == ["auto", "auto"]
    assert QuantSpec.from_dict(override(cfg, "students.act_percentile=AUTO").students[0].to_dict()).act_percentile \
        == "auto"
    with pytest.raises(ValueError, match="act_percentile must be a number in 50..100 or 'auto', got 'best'"):
        override(cfg, "students.act_percentile=best")
