import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub downloads cannot succeed here; fail fast instead of retrying

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def default_teacher():
    from gzq.models import load_teacher
    return load_teacher("default")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
