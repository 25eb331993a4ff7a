import pytest
import timm
import torch
from safetensors.torch import save_file

from gzq.config import ModelSpec
from gzq.models import ModelLoadError, has_batchnorm, list_bn_models, load_teacher


def test_default_model_is_bundled(default_teacher):
    t = default_teacher
    assert t.architecture == "resnet18" and t.input_size == (1, 28, 28) and t.num_classes == 10
    assert t.class_names[0] == "T-shirt/top" and t.dataset == "fashion-mnist"
    assert not any(p.requires_grad for p in t.model.parameters()) and not t.model.training


@pytest.mark.slow
def test_default_model_real_accuracy_matches_its_card(default_teacher):
    from gzq.config import EvalConfig
    from gzq.evaluate import load_labelled_data, predict_logits, top1
    x, y, _ = load_labelled_data(default_teacher, EvalConfig())
    assert len(y) == 10000
    acc = top1(predict_logits(default_teacher.model, x, torch.device("cpu")), y)
    assert acc >= 92.0                                                             # measured here
    assert acc == pytest.approx(default_teacher.reference_accuracy, abs=0.01)      # and what the card says


def test_load_timm_name_with_local_checkpoint(tmp_path):
    src = timm.create_model("test_resnet", num_classes=4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    t = load_teacher(ModelSpec("test_resnet", checkpoint=str(path), num_classes=4))
    assert t.num_classes == 4 and t.first_conv and t.classifier
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t.model(x), src.eval()(x))
    # PyTorch pickles load with weights_only=True, also when wrapped in {"state_dict": ...}
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, pth)
    t2 = load_teacher(ModelSpec("test_resnet", checkpoint=str(pth), num_classes=4))
    torch.testing.assert_close(t2.model(x), src(x))


def test_pretrained_path_loads_weights_through_timm(tmp_path):
    """The hub path (pretrained=True) goes through timm's own loader; a local file stands in for the hub."""
    src = timm.create_model("test_resnet")
    path = tmp_path / "hub.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    t = load_teacher(ModelSpec("test_resnet", pretrained=True), pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(t.model(x), src.eval()(x))
    assert t.num_classes == 1000 and t.class_names and len(t.class_names) == 1000


def test_pretrained_without_network_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="could not download pretrained weights for test_resnet"):
        load_teacher(ModelSpec("test_resnet", pretrained=True))


def test_unknown_name_suggests_close_names():
    with pytest.raises(ModelLoadError, match=r"unknown model 'resnet181'.*did you mean.*resnet18"):
        load_teacher("resnet181")


def test_model_without_batchnorm_is_rejected():
    assert not has_batchnorm("test_vit")
    with pytest.raises(ModelLoadError, match="test_vit has no BatchNorm layers"):
        load_teacher("test_vit")


def test_an_input_size_the_network_cannot_take_is_a_clear_error():
    """Too small for Inception-v3's stem, or a side HRNet's branches cannot meet at: the error names the size, the
    reason and the size the network was made for, instead of a traceback from inside the network."""
    with pytest.raises(ModelLoadError, match=r"inception_v3 cannot run on 1x64x64 inputs \(.+\); give an input size "
                                             r"it takes: the one it was made for, 1x299x299"):
        load_teacher(ModelSpec(name="inception_v3", num_classes=10, in_chans=1, input_size=(1, 64, 64)))
    with pytest.raises(ModelLoadError, match=r"hrnet_w18_small cannot run on 3x100x100 inputs .*3x224x224"):
        load_teacher(ModelSpec(name="hrnet_w18_small", num_classes=10, input_size=(3, 100, 100)))
    assert load_teacher(ModelSpec(name="hrnet_w18_small", num_classes=10, input_size=(3, 96, 96))).num_classes == 10


def test_checkpoint_that_does_not_fit(tmp_path):
    src = timm.create_model("test_resnet", num_classes=4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(ModelLoadError, match=r"does not fit test_resnet: 2 shape mismatches .*num_classes"):
        load_teacher(ModelSpec("test_resnet", checkpoint=str(path)))         # 1000 classes by default
    with pytest.raises(ModelLoadError, match="does not fit test_efficientnet"):
        load_teacher(ModelSpec("test_efficientnet", checkpoint=str(path), num_classes=4))


def test_corrupt_or_missing_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_teacher(ModelSpec("test_resnet", checkpoint=str(bad)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_teacher(ModelSpec("test_resnet", checkpoint=str(tmp_path / "nope.pth")))


def test_list_bn_models():
    names = list_bn_models("test_*")
    assert "test_resnet" in names and "test_efficientnet" in names and "test_vit" not in names
