"""End-to-end runs of `python -m gzq run` (real models, real Fashion-MNIST test images)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gzq import cli

pytestmark = pytest.mark.slow   # most start `python -m gzq` in a subprocess

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "gzq", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_cli_end_to_end_on_default_model(tmp_path):
    out = tmp_path / "run"
    r = _cli("run", "--model", "default", "--students", "w8a8,w4a4", "--steps", "40", "--images", "96",
             "--epochs", "4", "--max-real-images", "2000", "--seed", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "synthesis 40/40" in r.stdout and "teacher (FP32)" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"teacher", "students", "timings", "device", "config", "versions"}
    assert report["device"] == "cpu" and set(report["timings"]) >= {"load", "synthesis", "finetune", "evaluate"}
    fp = report["teacher"]["accuracy"]
    assert 90.0 < fp < 96.0
    rows = {s["name"]: s for s in report["students"]}
    assert set(rows) == {"w8a8", "w4a4"}
    for s in rows.values():
        assert set(s) >= {"w_bits", "a_bits", "protocol", "accuracy", "agreement", "kl"}
        assert s["protocol"] == "all_layers" and 0 <= s["agreement"] <= 100 and s["kl"] >= 0
    # the default method: KD at 4 bits, calibration alone at 8 (no reconstruction stage runs)
    assert {n: r["finetune"] for n, r in rows.items()} == {"w4a4": "kd", "w8a8": "calibrate"}
    assert "reconstruct" not in report["timings"]
    assert rows["w8a8"]["accuracy"] >= fp - 1.0          # even this tiny budget keeps 8-bit near full precision
    assert rows["w4a4"]["accuracy"] >= fp - 10.0
    assert (out / "config.json").exists() and not (tmp_path / "run.partial").exists()
    labels = json.loads((out / "images" / "labels.json").read_text())
    assert len(labels) == 96 and len(list((out / "images").glob("*.png"))) == 96
    # a saved student rebuilds exactly and reproduces the reported real accuracy
    from gzq.config import EvalConfig
    from gzq.evaluate import load_labelled_data, predict_logits, top1
    from gzq.models import load_teacher
    from gzq.checkpoint import load_student
    student, spec, _ = load_student(out / "students" / "w4a4.safetensors")
    assert spec.name == "w4a4"
    x, y, _ = load_labelled_data(load_teacher("default"), EvalConfig(max_real_images=2000))
    assert top1(predict_logits(student, x, torch.device("cpu")), y) == pytest.approx(rows["w4a4"]["accuracy"], abs=0.01)


@pytest.fixture(scope="module")
def other_arch(tmp_path_factory):
    """A second timm family (EfficientNet-style, depthwise convs, BatchNormAct2d), briefly trained on real
    Fashion-MNIST, saved as a local checkpoint, plus a small labelled ImageFolder of test images."""
    import timm

    from gzq.data import load_fashion_mnist, to_model_input
    tmp = tmp_path_factory.mktemp("arch")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
    xs, ys = load_fashion_mnist("train")
    x, ys = to_model_input(xs[:6000], (0.286,), (0.353,), (1, 28, 28)), ys[:6000]
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for i in range(0, 6000, 64):
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), ys[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    data = tmp / "data"
    xt, yt = load_fashion_mnist("test")
    for i in range(200):
        d = data / f"{int(yt[i]):02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(xt[i].numpy()).save(d / f"{i}.png")
    return ckpt, data, model.eval(), xt[:200], yt[:200]


def test_cli_other_architecture_with_checkpoint_and_image_folder(tmp_path, other_arch):
    ckpt, data, model, xt, yt = other_arch
    out = tmp_path / "run"
    r = _cli("run", "--model", "test_efficientnet", "--checkpoint", str(ckpt), "--num-classes", "10",
             "--in-chans", "1", "--input-size", "1", "28", "28", "--mean", "0.286", "--std", "0.353",
             "--data", str(data), "--w-bits", "8", "--a-bits", "8", "--steps", "20", "--images", "48",
             "--epochs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["architecture"] == "test_efficientnet"
    assert "image folder" in report["labelled_data"] and "(200 images)" in report["labelled_data"]
    # the teacher's accuracy on the folder equals an independent computation on the same images
    from gzq.data import to_model_input
    with torch.no_grad():
        ref = (model(to_model_input(xt, (0.286,), (0.353,), (1, 28, 28))).argmax(1) == yt).float().mean() * 100
    assert report["teacher"]["accuracy"] == pytest.approx(ref.item(), abs=0.01)
    assert report["teacher"]["accuracy"] > 40
    s = report["students"][0]
    assert s["name"] == "w8a8" and s["accuracy"] is not None and s["accuracy"] > 30


@pytest.mark.parametrize("args, msg", [
    (["--model", "resnet181"], "unknown model 'resnet181'"),
    (["--model", "test_vit"], "test_vit has no BatchNorm layers"),
    (["--w-bits", "9"], "w_bits must be in 2..8, got 9"),
    (["--students", "w4a4,int8"], "is not of the form w<bits>a<bits>"),
    (["--data", "/nonexistent/folder"], "does not exist or is not a folder"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, msg, capsys):
    # in this process (the entry point itself is run by the end-to-end test; conftest keeps the hub offline):
    # an exception would fail the test
    code = cli.main(["run", *args, "--steps", "2", "--images", "8", "--epochs", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_cli_refuses_to_overwrite_a_folder_that_is_not_a_run(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    r = _cli("run", "--steps", "2", "--images", "8", "--epochs", "1", "--out", str(tmp_path))
    assert r.returncode == 2 and "is not a GZQ run folder" in r.stderr
    assert keep.read_text() == "mine"


def test_cli_default_model_with_a_card_less_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "mine.safetensors"
    save_file({"w": torch.zeros(1)}, str(ckpt))
    r = _cli("run", "--model", "default", "--checkpoint", str(ckpt), "--steps", "2", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "has no model card" in r.stderr and "--model resnet18" in r.stderr


def test_cli_takes_labelled_data_as_a_zip(tmp_path):
    import zipfile

    from gzq.data import load_fashion_mnist
    images, labels = load_fashion_mnist("test")
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(40):
            path = tmp_path / f"{i}.png"
            Image.fromarray(images[i].numpy()).save(path)
            zf.write(path, f"fmnist/{int(labels[i]):02d}/{i}.png")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    r = _cli("run", "--data", str(bad), "--steps", "2", "--images", "8", "--epochs", "1", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "is not a zip file" in r.stderr
    r = _cli("run", "--data", str(archive), "--steps", "4", "--images", "16", "--epochs", "1", "--export", "none",
             "--finetune", "kd", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "image folder" in report["labelled_data"] and "(40 images)" in report["labelled_data"]
