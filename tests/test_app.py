"""app.py without a server: events -> figures/rows/status, form -> RunConfig, safe zip extraction, the run
handler's stop and cleanup."""
from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import app
from gzq.events import Done, Message, Preview, Progress, StageStarted, Stopped


def _events(steps=4, students=("w4a4", "w8a8"), layers=3):
    yield StageStarted("load", 0, "loading default on cpu")
    yield Message("teacher resnet18 on cpu")
    yield StageStarted("synthesis", steps, "64 images")
    for s in range(1, steps + 1):
        kl = {n: 1.0 / s for n in students} if s > 1 else {}
        yield Progress("synthesis", s, steps, 0.5 * s, {"bn": 10.0 / s, "ce": 1.0, "total": 2.0},
                       -float(s), [-float(s) - j for j in range(layers)], kl)
    yield Preview("synthesis", steps, np.full((40, 28, 28, 1), 7, np.uint8), list(range(10)) * 4,
                  [f"c{i}" for i in range(10)])
    yield StageStarted("finetune", 2, "2 epochs")
    for s in (1, 2):
        yield Progress("finetune", s, 2, 0.1 * s, student_kl={n: 0.1 / s for n in students})


REPORT = {
    "teacher": {"name": "default", "architecture": "resnet18", "accuracy": 93.1, "size_bytes": 11_245_096},
    "students": [{"name": "w4a4", "w_bits": 4, "a_bits": 4, "protocol": "all_layers", "agreement": 96.9,
                  "kl": 0.013, "size_bytes": 1_433_024, "accuracy": 92.4, "real_agreement": 95.6}],
}


def _view(**kw):
    v = app.RunView(device="CPU (2 threads)")
    for ev in _events(**kw):
        v.update(ev)
    return v


def test_view_folds_events():
    v = _view(steps=4)
    assert v.stage == "finetune" and (v.step, v.total) == (2, 2)
    assert v.bn_steps == [1, 2, 3, 4] and v.bn_total == [-1.0, -2.0, -3.0, -4.0]
    assert v.bn_layers[1] == [-2.0, -3.0, -4.0]
    xs, ys = v.kl["w4a4"]
    # synthesis steps 2..4, then fine-tuning continues after the 4 synthesis steps
    assert xs == [2, 3, 4, 5, 6] and ys[-1] == pytest.approx(0.05)
    assert v.finetune_offset == 4 and v.preview_version == 1
    assert any("teacher resnet18" in line for line in v.log)


def test_status_line_says_stage_step_device_time_left():
    v = app.RunView(device="CPU (2 threads)")
    assert app.status_markdown(v).startswith("**Ready.**") and "CPU (2 threads)" in app.status_markdown(v)
    for ev in list(_events(steps=10))[:6]:  # into synthesis, step 3 of 10 at 1.5 s
        v.update(ev)
    s = app.status_markdown(v)
    assert "Synthesising images" in s and "step 3/10" in s and "CPU (2 threads)" in s
    assert "~4 s left" in s  # eta = 1.5 / 3 * 7 = 3.5 -> rounds to 4
    v.update(Stopped("synthesis", 4))
    assert app.status_markdown(v).startswith("**Stopped**") and "step 4" in app.status_markdown(v)
    v.error = "unknown model 'x'"
    assert app.status_markdown(v) == "**Could not run.** unknown model 'x'"


def test_progress_fraction_runs_over_stages():
    v = app.RunView()
    v.update(StageStarted("synthesis", 10))
    assert app.overall_fraction(v) == pytest.approx(0.05)
    v.update(Progress("synthesis", 5, 10, 1.0))
    assert app.overall_fraction(v) == pytest.approx(0.05 + 0.75 * 0.5)
    v.update(StageStarted("finetune", 4))
    assert app.overall_fraction(v) == pytest.approx(0.82)
    v.update(Done({}, None))
    assert app.overall_fraction(v) == 1.0
    assert 'style="width:100.0%"' in app.progress_html(v)


def test_bn_figure_has_mean_and_one_trace_per_layer():
    fig = app.bn_figure(_view(steps=4, layers=3))
    assert [t.name for t in fig.data] == ["per layer (3)", "BN layer 2", "BN layer 3", "mean over layers"]
    assert list(fig.data[-1].y) == [-1.0, -2.0, -3.0, -4.0]
    assert list(fig.data[2].y) == [-3.0, -4.0, -5.0, -6.0]
    empty = app.bn_figure(app.RunView())
    assert not empty.data and "appears when synthesis starts" in empty.layout.annotations[0].text


def test_kl_figure_one_line_per_student_and_finetune_marker():
    fig = app.kl_figure(_view(steps=4))
    assert sorted(t.name for t in fig.data) == ["w4a4", "w8a8"]
    assert list(fig.data[0].x) == [2, 3, 4, 5, 6]
    assert fig.layout.yaxis.type == "log"  # 0.5 down to 0.05: a decade
    narrow = app.RunView()
    narrow.update(Progress("synthesis", 1, 2, 0.1, student_kl={"w4a4": 0.2}))
    narrow.update(Progress("synthesis", 2, 2, 0.2, student_kl={"w4a4": 0.1}))
    assert app.kl_figure(narrow).layout.yaxis.type == "linear"
    assert any(s.x0 == 4.5 for s in fig.layout.shapes)  # the fine-tune boundary


def test_long_histories_are_strided(monkeypatch):
    monkeypatch.setattr(app, "PLOT_MAX_POINTS", 50)
    fig = app.bn_figure(_view(steps=500, layers=2))
    assert len(fig.data[-1].x) == 50 and fig.data[-1].x[0] == 1


def test_losses_table():
    md = app.losses_markdown(_view(steps=4))
    assert "| BN (−log-likelihood) | 2.5 |" in md and "| cross-entropy | 1 |" in md
    assert "appear once synthesis starts" in app.losses_markdown(app.RunView())


def test_gallery_items_limit_enlarge_and_caption():
    items = app.gallery_items(_view(steps=4), max_images=32, min_side=96)
    assert len(items) == 32
    img, caption = items[11]
    assert img.shape == (84, 84) and img.dtype == np.uint8 and caption == "c1"
    assert app.gallery_items(app.RunView()) == []


def test_results_frame_teacher_then_students():
    df = app.results_frame(REPORT)
    assert list(df["model"]) == ["teacher resnet18 (FP32)", "student w4a4"]
    row = df.iloc[1]
    assert row["W/A bits"] == "4/4" and row["protocol"] == "all_layers"
    assert row["agreement (%)"] == 96.9 and row["KL"] == 0.013
    assert row["real accuracy (%)"] == 92.4 and row["size"] == "1.37 MB" and row["compression"] == "7.8×"
    no_labels = json.loads(json.dumps(REPORT))
    no_labels["teacher"]["accuracy"] = None
    no_labels["students"][0]["accuracy"] = None
    assert "real accuracy (%)" not in app.results_frame(no_labels).columns
    assert app.results_frame(None).empty


def test_run_files_lists_downloads_and_zips_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0000_1.png").write_bytes(b"png")
    (tmp_path / "students").mkdir()
    for f in ("w4a4.safetensors", "w4a4.json", "w4a4.onnx", "w4a4_int.safetensors"):
        (tmp_path / "students" / f).write_bytes(b"x")
    for f in ("report.json", "config.json"):
        (tmp_path / f).write_text("{}")
    names = [Path(p).name for p in app.run_files(tmp_path)]
    assert names == ["report.json", "config.json", "synthetic_images.zip", "w4a4.json", "w4a4.onnx",
                     "w4a4.safetensors", "w4a4_int.safetensors"]
    with zipfile.ZipFile(tmp_path / "synthetic_images.zip") as zf:
        assert zf.namelist() == ["synthetic_images/0000_1.png"]
    assert app.run_files(None) == [] and app.run_files(tmp_path / "missing") == []


# ----------------------------------------------------------------------------------------- form -> config

def test_build_config_quick_preset_and_students():
    cfg = app.build_config("default", w_bits=4, a_bits=4, protocol="first_last_8bit", extra_students="w8a8, w3a3;w8a8",
                           preset="quick CPU")
    assert cfg.model.name == "default" and cfg.preset == "cpu"
    assert (cfg.synth.num_images, cfg.synth.steps, cfg.train.epochs, cfg.eval.max_real_images) == (64, 40, 3, 2000)
    assert [s.name for s in cfg.students] == ["w4a4_fl8", "w8a8_fl8", "w3a3_fl8"]


def test_build_config_scales_with_advanced_values():
    cfg = app.build_config("resnet18", preset="quick CPU", steps=80, num_images=16, epochs=1, seed=3, lambda_adv=0,
                           bn_loss="mse", num_classes=10, in_chans=1, data_dir="/some/folder")
    s = cfg.synth
    assert (s.steps, s.warmup_steps) == (80, 30)
    assert (s.num_images, s.holdout_images, s.batch_size) == (16, 2, 16)
    assert s.lambda_adv == 0 and s.bn_loss.value == "mse" and cfg.seed == 3 and cfg.train.epochs == 1
    assert (cfg.model.num_classes, cfg.model.in_chans) == (10, 1)
    assert cfg.eval.data == "/some/folder" and cfg.eval.max_real_images is None


def test_preset_fields_follow_presets():
    assert app.preset_fields("quick CPU")["steps"] == 40
    assert app.preset_fields("standard")["steps"] == 300
    assert app.preset_fields("paper-scale GPU")["num_images"] == 1024
    assert len(app.apply_preset("standard")) == len(app.ADVANCED_KEYS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_bits=9), "weight bits must be in 2..8, got 9"),
    (dict(a_bits=1), "activation bits must be in 2..8, got 1"),
    (dict(w_bits=4.5), "weight bits must be a whole number"),
    (dict(extra_students="w4x4"), "not of the form w<bits>a<bits>"),
    (dict(extra_students="w9a4"), "w_bits must be in 2..8, got 9"),
    (dict(model="  "), "pick a model"),
    (dict(preset="huge"), "unknown preset 'huge'"),
    (dict(num_images=1), "image count must be at least 2, got 1"),
])
def test_build_config_rejects_bad_values_with_a_message(kwargs, message):
    args = dict(model="default", preset="quick CPU")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.").replace("?", r"\?")):
        app.build_config(**args)


# --------------------------------------------------------------------------------------- labelled-data zip

def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _png() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_zip_extracts_class_folders_directly_or_under_one_top_folder(tmp_path):
    flat = _zip(tmp_path / "flat.zip", {"a/1.png": _png(), "b/2.png": _png(), "__MACOSX/a/._1.png": b"junk"})
    root = app.extract_image_folder_zip(flat, tmp_path / "x1")
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    nested = _zip(tmp_path / "nested.zip", {"data/a/1.png": _png(), "data/b/2.png": _png()})
    root = app.extract_image_folder_zip(nested, tmp_path / "x2")
    assert root.name == "data" and sorted(p.name for p in root.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("entries, message", [
    ({"../evil/1.png": b"x"}, "unsafe path"),
    ({"/abs/1.png": b"x"}, "unsafe path"),
    ({"1.png": b"x", "2.png": b"x"}, "not an image folder"),
    ({"a/readme.txt": b"x"}, "not an image folder"),
    ({"a/1.png": b"0" * 5000}, "more than 0 MB"),
])
def test_zip_refuses_unsafe_or_non_image_folders(tmp_path, entries, message):
    z = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(ValueError, match=message):
        app.extract_image_folder_zip(z, tmp_path / "out", max_bytes=4000)
    assert not (tmp_path / "evil").exists()


def test_zip_refuses_non_zip_and_links(tmp_path):
    notzip = tmp_path / "data.zip"
    notzip.write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="is not a zip file"):
        app.extract_image_folder_zip(notzip, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("a/1.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="contains a link"):
        app.extract_image_folder_zip(link, tmp_path / "out2")


# ------------------------------------------------------------------------------------- the run handler

RUN_ARGS = dict(model="default", checkpoint=None, num_classes=0, in_chans=0, pretrained=False, w_bits=4, a_bits=4,
                protocol="all_layers", extra_students="", preset="quick CPU", steps=200, num_images=16, epochs=1,
                num_students=0, seed=0, lambda_bn=None, lambda_ce=None, lambda_adv=None, lambda_tv=None,
                lambda_l2=None, bn_loss=None, image_param=None, labelled_zip=None)


class _Request:
    session_hash = "test-session"


def test_stop_flag_ends_the_run_within_a_step_and_removes_the_run_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(app.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(app, "UI_INTERVAL_S", 0.0)
    assert app.stop_gzq(_Request())[0] == "**Ready.** No run was going."
    gen = app.run_gzq(**RUN_ARGS, request=_Request())
    updates, answer = [], []
    stopper = threading.Thread(target=lambda: answer.append(app.stop_gzq(_Request())))
    for upd in gen:
        updates.append(upd)
        if "step 3/200" in upd[0]:
            assert list(tmp_path.glob("gzq_run_*/run.partial"))  # the run is writing its partial folder
            stopper.start()  # Stop answers only once the run has wound down
            time.sleep(0.2)
            assert not answer
    stopper.join(timeout=30)
    assert answer and answer[0][0].startswith("**Stopped**") and answer[0][2]["interactive"] is True
    last = updates[-1]
    assert last[0].startswith("**Stopped** during synthesising images at step 4"), last[0]
    assert last[9]["interactive"] is True and last[10]["interactive"] is False  # Run on, Stop off
    assert not list(tmp_path.glob("gzq_run_*")), "a stopped run leaves nothing behind"
    assert "test-session" not in app._RUNS


def test_handler_turns_bad_input_into_a_message(monkeypatch, tmp_path):
    monkeypatch.setattr(app.tempfile, "tempdir", str(tmp_path))
    updates = list(app.run_gzq(**{**RUN_ARGS, "model": "resnet18x"}, request=_Request()))
    assert updates[-1][0].startswith("**Could not run.** unknown model 'resnet18x'")
    assert "did you mean" in updates[-1][0]
    assert not list(tmp_path.glob("gzq_run_*"))
