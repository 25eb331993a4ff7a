import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub downloads cannot succeed here; fail fast instead of retrying

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _coarse_weight_grid():
    """Students built in-process search 20 clipping ranges per weight channel instead of the library's 80:
    four times faster to build, and what the tests check (exact export, agreement of a file with its
    student, training that lowers a loss) holds for any range. Subprocesses keep the library's grid."""
    from gzq.quant import modules
    default, modules.WEIGHT_GRID = modules.WEIGHT_GRID, 20
    yield
    modules.WEIGHT_GRID = default


@pytest.fixture(scope="session")
def repvgg():
    """timm's RepVGG-A0 for 1x32x32 inputs and 10 classes with random weights, its BN scales drawn from U(0.5, 1.5)
    and running statistics from three batches of noise, so that fusing its branches has work to do."""
    import timm
    torch.manual_seed(0)
    m = timm.create_model("repvgg_a0", num_classes=10, in_chans=1).train()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
        for _ in range(3):
            m(torch.randn(16, 1, 32, 32))
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def cond_net():
    """A small 1x8x8 network with timm's CondConv block (EfficientNet-CondConv's: pointwise, depthwise and pointwise
    CondConv layers, each image convolved with its own mix of 3 expert kernels), experts that differ, and BN
    statistics from a batch of noise."""
    from timm.layers import CondConv2d
    from timm.models._efficientnet_blocks import CondConvResidual
    from torch import nn

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.block = CondConvResidual(8, 8, exp_ratio=2.0, num_experts=3)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.block(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))

    torch.manual_seed(0)
    m = Cond().train()
    for c in m.modules():
        if isinstance(c, CondConv2d):
            nn.init.normal_(c.weight, std=0.3)
    with torch.no_grad():
        m(torch.randn(16, 1, 8, 8))
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def default_teacher():
    from gzq.models import load_teacher
    return load_teacher("default")


@pytest.fixture(scope="session")
def fmnist(default_teacher):
    """Fashion-MNIST for the bundled model: 256 training images to calibrate on, the 10,000 test images."""
    from gzq.data import load_fashion_mnist, to_model_input
    t = default_teacher
    train, _ = load_fashion_mnist("train")
    test, labels = load_fashion_mnist("test")
    return dict(calib=to_model_input(train[:256], t.mean, t.std, t.input_size),
                test=to_model_input(test, t.mean, t.std, t.input_size), labels=labels)


@pytest.fixture(scope="session")
def new_student(default_teacher):
    """new_student("w4a4") -> a fresh, uncalibrated student of the bundled model, as create_student makes it.

    Building a student runs a calibration grid over every weight (seconds each); each configuration is built
    once per session and handed out as copies, which tests may train in place."""
    from gzq.config import QuantSpec
    from gzq.quant import create_student
    t = default_teacher
    built = {}

    def make(name: str):
        if name not in built:
            built[name] = create_student(t.model, QuantSpec.parse(name), torch.zeros(2, *t.input_size), t.classifier)
        return copy.deepcopy(built[name])
    return make


@pytest.fixture(scope="session")
def default_students(new_student, fmnist):
    """W8A8, W4A4 and W3A5 students of the bundled model, calibrated on real images; read-only."""
    from gzq.quant import calibrate_
    out = {}
    for name in ("w8a8", "w4a4", "w3a5"):
        s = new_student(name)
        calibrate_(s, [fmnist["calib"]])
        out[name] = s.eval()
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
