import json

import pytest

from gzq.config import BNLoss, ModelSpec, Protocol, QuantSpec, RunConfig, SynthConfig
from gzq.config import student_specs
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
