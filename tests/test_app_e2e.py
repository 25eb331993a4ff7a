"""The launched app through gradio_client: a live quick run (streamed gallery and plots, final table,
downloads that rebuild and reproduce the reported numbers) and every kind of bad input, each followed
by a valid run."""
from __future__ import annotations

import io
import json
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from gzq.ui import runner  # noqa: E402
from gzq.ui.handlers import API_OUTPUTS  # noqa: E402

pytestmark = pytest.mark.slow

# outputs of /run, in the order API clients receive them
STATUS, GALLERY, BN_PLOT, KL_PLOT, LOSSES, TABLE, FILES, DOWNLOADS = (
    API_OUTPUTS.index(n) for n in ("status", "gallery", "bn_plot", "kl_plot", "losses", "results", "files",
                                   "downloads"))
TINY = dict(steps=8, num_images=16, epochs=1)  # the smallest sensible run: a few seconds on the default model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    demo = app.create_ui()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=app.CSS, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture()
def client(server, tmp_path_factory):
    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def run(client: Client, **kwargs):
    """Submit /run and return (all streamed outputs, final outputs)."""
    args = dict(checkpoint=None, labelled_zip=None)
    args.update(kwargs)
    job = client.submit(**args, api_name="/run")
    final = job.result(timeout=240)
    return job.outputs(), final


def is_plot(v) -> bool:
    return isinstance(v, dict) and v.get("type") == "plotly"


def run_dirs() -> set[Path]:
    return set(runner.RUNS_ROOT.glob("gzq_run_*"))


def test_quick_run_streams_and_downloads_reproduce_the_report(client, tmp_path):
    outs, final = run(client, preset="quick CPU")

    running = [o for o in outs[:-1] if "Synthesising images" in o[STATUS]]
    assert len(running) >= 3, "the status streams while synthesis runs"
    galleries = [o[GALLERY] for o in running if isinstance(o[GALLERY], str) and "<figure>" in o[GALLERY]]
    assert len(galleries) >= 2, "the gallery updates while the images form"
    assert all(g.count("<figure>") == 64 and g.count("<figcaption") == 64 for g in galleries), "every image, labelled"
    bn = [json.loads(o[BN_PLOT]["plot"]) for o in running if is_plot(o[BN_PLOT])]
    kl = [json.loads(o[KL_PLOT]["plot"]) for o in outs[:-1] if is_plot(o[KL_PLOT])]
    assert bn and any(t["name"] == "mean over layers" for t in bn[-1]["data"])
    assert [t["name"] for t in bn[-1]["data"]][0].startswith("per layer ("), "every BN layer's line, then the mean"
    assert any(any(t["name"] == "w4a4" for t in fig["data"]) for fig in kl), "KL curve of the student"
    assert any("| BN (−log-likelihood) |" in o[LOSSES] for o in running if isinstance(o[LOSSES], str))

    assert final[STATUS].startswith("**Done**")
    table = final[TABLE]
    assert table["headers"][:2] == ["Model", "Bits"] and "Accuracy %" in table["headers"]
    assert [r[0] for r in table["data"]] == ["original resnet18", "quantized w4a4"]

    files = {Path(p).name: Path(p) for p in final[FILES]}
    assert {"report.json", "config.json", "synthetic_images.zip", "w4a4.safetensors", "w4a4.json",
            "w4a4.onnx"} <= set(files)
    report = json.loads(files["report.json"].read_text())
    student = report["students"][0]
    # the primary download is the student's ONNX, and the size shown is that file's size
    assert f'data-bytes="{files["w4a4.onnx"].stat().st_size}"' in final[DOWNLOADS]
    size_col = table["headers"].index("File size")
    assert table["data"][1][size_col] in final[DOWNLOADS]
    acc_col = table["headers"].index("Accuracy %")
    assert table["data"][1][acc_col] == student["accuracy"]
    with zipfile.ZipFile(files["synthetic_images.zip"]) as zf:
        assert sum(n.endswith(".png") for n in zf.namelist()) == 64

    # the downloaded student, rebuilt from its two files alone, reproduces the reported real-data numbers
    from gzq.data import load_fashion_mnist, to_model_input
    from gzq.evaluate import agreement, predict_logits, top1
    from gzq.models import load_teacher
    from gzq.checkpoint import load_student
    for name in ("w4a4.safetensors", "w4a4.json"):
        shutil.copy(files[name], tmp_path / name)
    model, spec, dc = load_student(tmp_path / "w4a4.safetensors")
    assert (spec.w_bits, spec.a_bits) == (4, 4)
    n = report["config"]["eval"]["max_real_images"]
    images, labels = load_fashion_mnist("test")
    x = to_model_input(images[:n], dc["mean"], dc["std"], dc["input_size"])
    s_logits = predict_logits(model, x, torch.device("cpu"))
    t_logits = predict_logits(load_teacher("default").model, x, torch.device("cpu"))
    assert round(top1(s_logits, labels[:n]), 2) == pytest.approx(student["accuracy"], abs=0.051)
    assert round(agreement(t_logits, s_logits), 2) == pytest.approx(student["real_agreement"], abs=0.051)


def _checkpoint_of_wrong_shape(path: Path) -> Path:
    shutil.copy(Path(app.__file__).resolve().parent / "assets" / "default_model.safetensors", path)
    return path


def _not_an_image_folder_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes/readme.txt", "no images here")
        zf.writestr("loose.png", b"\x89PNG")
    return path


def _fashion_mnist_zip(path: Path, per_class: int = 3) -> Path:
    from PIL import Image

    from gzq.data import load_fashion_mnist
    images, labels = load_fashion_mnist("test")
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(10):
            for k, i in enumerate(torch.nonzero(labels == c).flatten()[:per_class].tolist()):
                buf = io.BytesIO()
                Image.fromarray(images[i].numpy()).save(buf, "PNG")
                zf.writestr(f"fmnist/class_{c}/{k}.png", buf.getvalue())
    return path


BAD_INPUTS = {
    "unknown timm name": (dict(model="resnet18x"), "unknown model 'resnet18x'"),
    "model without BatchNorm": (dict(model="vit_tiny_patch16_224"), "has no BatchNorm layers"),
    "checkpoint that does not fit": (dict(model="resnet34", checkpoint="wrong"), "does not fit resnet34"),
    "corrupt checkpoint": (dict(model="resnet18", checkpoint="corrupt"), "could not be read"),
    "bits out of range (extra students)": (dict(extra_students="w9a4"), "w_bits must be in 2..8, got 9"),
    "timm model without weights": (dict(model="resnet50"), "resnet50 has no trained weights here"),
    "bundled model with a checkpoint": (dict(model="default", checkpoint="corrupt"),
                                        "the bundled example takes no checkpoint"),
    "zip that is not an image folder": (dict(labelled_zip="notfolder"), "is not an image folder"),
    "upload that is not a zip": (dict(labelled_zip="notzip"), "is not a zip file"),
    "image folder with more classes than the model": (dict(labelled_zip="toomany"),
                                                      "class folders but the model has 10"),
}


def _materialise(kwargs: dict, tmp: Path) -> dict:
    kw = dict(kwargs)
    if kw.get("checkpoint") == "wrong":
        kw["checkpoint"] = handle_file(str(_checkpoint_of_wrong_shape(tmp / "mine.safetensors")))
    elif kw.get("checkpoint") == "corrupt":
        (tmp / "broken.safetensors").write_bytes(b"\x00garbage" * 100)
        kw["checkpoint"] = handle_file(str(tmp / "broken.safetensors"))
    if kw.get("labelled_zip") == "notfolder":
        kw["labelled_zip"] = handle_file(str(_not_an_image_folder_zip(tmp / "data.zip")))
    elif kw.get("labelled_zip") == "notzip":
        (tmp / "data.zip").write_bytes(b"PK? not really")
        kw["labelled_zip"] = handle_file(str(tmp / "data.zip"))
    elif kw.get("labelled_zip") == "toomany":
        with zipfile.ZipFile(tmp / "data.zip", "w") as zf:
            for c in range(12):
                zf.writestr(f"c{c:02d}/0.png", _png_bytes())
        kw["labelled_zip"] = handle_file(str(tmp / "data.zip"))
    return kw


def _png_bytes() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_inputs_give_a_message_and_leave_nothing_behind(client, tmp_path):
    before = run_dirs()
    for case, (kwargs, message) in BAD_INPUTS.items():
        outs, final = run(client, **TINY, **_materialise(kwargs, tmp_path))
        status = final[STATUS]
        assert status.startswith("**Could not run.**"), f"{case}: {status}"
        assert message in status, f"{case}: {status}"
        assert "Traceback" not in status and "File \"" not in status
        assert final[FILES] in (None, []) or isinstance(final[FILES], dict)
        assert run_dirs() == before, f"{case} left a run folder behind"


def test_bits_out_of_range_through_the_api_are_refused_clearly(client):
    # the sliders themselves refuse values outside 2..8 before the handler runs
    with pytest.raises(Exception, match="greater than maximum value 8"):
        run(client, w_bits=9, **TINY)


def test_a_valid_run_with_labelled_data_follows_bad_inputs(client, tmp_path):
    run(client, model="resnet18x", **TINY)  # a failure first, in the same session
    zip_path = _fashion_mnist_zip(tmp_path / "fmnist.zip")
    outs, final = run(client, labelled_zip=handle_file(str(zip_path)), extra_students="w8a8", **TINY)
    assert final[STATUS].startswith("**Done**"), final[STATUS]
    table = final[TABLE]
    assert [r[0] for r in table["data"]] == ["original resnet18", "quantized w4a4", "quantized w8a8"]
    report = json.loads(next(Path(p) for p in final[FILES] if p.endswith("report.json")).read_text())
    assert report["labelled_data"].startswith("image folder") and "(30 images)" in report["labelled_data"]
    acc = table["headers"].index("Accuracy %")
    assert table["data"][1][acc] == report["students"][0]["accuracy"] is not None
