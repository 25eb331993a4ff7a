"""The app (gzq/ui) without a server: events -> figures/rows/status/HTML, form -> RunConfig, the honest
model choice, the measured estimate, the run handler's stop, cleanup and memory, results after a reload."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gzq.events import Done, Message, Preview, Progress, StageStarted, Stopped
from gzq.ui import estimate, figures, form, handlers, runner, view


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
    v = view.RunView(device="CPU (2 threads)")
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
    v = view.RunView(device="CPU (2 threads)")
    assert view.status_markdown(v).startswith("**Ready.**") and "CPU (2 threads)" in view.status_markdown(v)
    for ev in list(_events(steps=10))[:6]:  # into synthesis, step 3 of 10 at 1.5 s
        v.update(ev)
    s = view.status_markdown(v)
    assert "Synthesising images" in s and "step 3/10" in s and "elapsed" in s
    assert "~4 s left" in s  # eta = 1.5 / 3 * 7 = 3.5 -> rounds to 4
    loading = view.RunView(stage="load", estimate=60.0)
    loading.started -= 10  # ten seconds into loading, no step yet: the clock and the estimate still speak
    assert "10 s elapsed" in view.status_markdown(loading) and "about 50 s left" in view.status_markdown(loading)
    v.update(Stopped("synthesis", 4))
    assert view.status_markdown(v).startswith("**Stopped**") and "step 4" in view.status_markdown(v)
    v.error = "unknown model 'x'"
    assert view.status_markdown(v) == "**Could not run.** unknown model 'x'"


def test_progress_fraction_runs_over_stages():
    v = view.RunView()
    v.update(StageStarted("synthesis", 10))
    assert view.overall_fraction(v) == pytest.approx(0.05)
    v.update(Progress("synthesis", 5, 10, 1.0))
    assert view.overall_fraction(v) == pytest.approx(0.05 + 0.75 * 0.5)
    v.update(StageStarted("finetune", 4))
    assert view.overall_fraction(v) == pytest.approx(0.82)
    v.update(Done({}, None))
    assert view.overall_fraction(v) == 1.0
    assert 'style="width:100.0%"' in view.progress_html(v)


def test_bn_figure_has_mean_and_one_line_per_layer():
    fig = figures.bn_figure(_view(steps=4, layers=3))
    assert [t.name for t in fig.data] == ["per layer (3)", "mean over layers"]
    assert list(fig.data[-1].y) == [-1.0, -2.0, -3.0, -4.0]
    per_layer = fig.data[0]   # one trace, its lines separated by gaps, each point named by its layer
    nan = float("nan")
    np.testing.assert_array_equal(per_layer.x, [1, 2, 3, 4, nan] * 3)
    np.testing.assert_array_equal(per_layer.y[10:15], [-3.0, -4.0, -5.0, -6.0, nan])   # layer 3
    assert list(per_layer.customdata) == [1] * 5 + [2] * 5 + [3] * 5
    empty = figures.bn_figure(view.RunView())
    assert not empty.data and "appears when synthesis starts" in empty.layout.annotations[0].text


def test_kl_figure_one_line_per_student_and_finetune_marker():
    fig = figures.kl_figure(_view(steps=4))
    assert sorted(t.name for t in fig.data) == ["w4a4", "w8a8"]
    assert list(fig.data[0].x) == [2, 3, 4, 5, 6]
    assert fig.layout.yaxis.type == "log"  # 0.5 down to 0.05: a decade
    narrow = view.RunView()
    narrow.update(Progress("synthesis", 1, 2, 0.1, student_kl={"w4a4": 0.2}))
    narrow.update(Progress("synthesis", 2, 2, 0.2, student_kl={"w4a4": 0.1}))
    assert figures.kl_figure(narrow).layout.yaxis.type == "linear"
    assert any(s.x0 == 4.5 for s in fig.layout.shapes)  # the fine-tune boundary
    # a run fitted by KD (the 4-bit default) has no block-by-block plot: its placeholder says how to get one
    empty = figures.recon_figure(_view(steps=4))
    assert not empty.data and "recon" in empty.layout.annotations[0].text


def test_long_histories_are_strided(monkeypatch):
    monkeypatch.setattr(figures, "PLOT_MAX_POINTS", 50)
    fig = figures.bn_figure(_view(steps=500, layers=2))
    assert len(fig.data[-1].x) == 50 and fig.data[-1].x[0] == 1


def test_losses_table():
    md = view.losses_markdown(_view(steps=4))
    assert "| BN (−log-likelihood) | 2.5 |" in md and "| cross-entropy | 1 |" in md
    assert "appear once synthesis starts" in view.losses_markdown(view.RunView())


def test_gallery_shows_every_image_with_its_label_under_it():
    v = _view(steps=4)
    items = view.gallery_items(v.preview.images, v.preview.labels, v.preview.class_names, v.preview.step)
    assert len(items.uris) == 40 and items.labels == sorted(items.labels)  # all of them, one class together
    assert items.uris[0].startswith("data:image/png;base64,")              # 28 px: sent as is, enlarged by CSS
    page = view.gallery_html(items)
    assert page.count("<figure>") == 40 and page.count("<figcaption") == 40 and "all 40 images" in page
    assert "<figcaption title=\"c0\">c0</figcaption>" in page
    only = view.gallery_html(items, only="c3")
    assert only.count("<figure>") == 4 and "4 of 40 images" in only
    assert items.classes()[:3] == [view.ALL_CLASSES, "c0", "c1"]
    assert "appear here" in view.gallery_html(None)


def test_large_images_become_small_jpeg_thumbnails():
    big = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    items = view.gallery_items(big, [0, 1, 2], None)
    assert all(u.startswith("data:image/jpeg;base64,") for u in items.uris)
    assert items.name(2) == "class 2"


def _run_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0000_1.png").write_bytes(b"png")
    (tmp_path / "students").mkdir()
    for f, size in (("w4a4.safetensors", 900), ("w4a4.json", 10), ("w4a4.onnx", 321), ("w4a4_int.safetensors", 200),
                    ("w4a4_int.json", 10)):
        (tmp_path / "students" / f).write_bytes(b"x" * size)
    (tmp_path / "teacher_fp32.onnx").write_bytes(b"x" * 2568)
    for f in ("report.json", "config.json"):
        (tmp_path / f).write_text("{}")
    report = json.loads(json.dumps(REPORT))
    report["students"][0]["files"] = {"onnx": {"path": "students/w4a4.onnx", "bytes": 321}}
    report["teacher"]["files"] = {"onnx": {"path": "teacher_fp32.onnx", "bytes": 2568}}
    return report


def test_results_frame_plain_words_and_real_file_sizes(tmp_path):
    report = _run_folder(tmp_path)
    df = view.results_frame(report, tmp_path)
    assert list(df.columns) == ["Model", "Bits", "Agreement %", "Accuracy %", "File size", "Smaller"]
    assert list(df["Model"]) == ["original resnet18", "quantized w4a4"]
    row = df.iloc[1]
    assert row["Bits"] == "4" and row["Agreement %"] == 96.9 and row["Accuracy %"] == 92.4
    assert row["File size"] == "321 B" and row["Smaller"] == "8.0×"   # the ONNX files on disk: 2568 / 321
    no_labels = json.loads(json.dumps(REPORT))
    no_labels["teacher"]["accuracy"] = None
    no_labels["students"][0]["accuracy"] = None
    assert "Accuracy %" not in view.results_frame(no_labels).columns
    assert view.results_frame(None).empty
    assert "| w4a4 | all_layers | 0.013 |" in view.technical_markdown(REPORT)
    healthy = {**REPORT, "synthesis": {"health": {"converged": True}}}
    assert "Synthesis health: converged True" in view.technical_markdown(healthy)


def test_primary_download_is_the_onnx_file_with_its_real_size(tmp_path):
    report = _run_folder(tmp_path)
    report["warnings"] = ["The images did not converge."]
    page = view.downloads_html(report, tmp_path)
    assert 'data-bytes="321"' in page and "w4a4.onnx" in page and "321 B" in page
    assert "Quantized model (ONNX, runs in onnxruntime)" in page
    assert page.index("did not converge") < page.index("gzq-primary")   # warnings first, prominently
    assert f'href="gradio_api/file={(tmp_path / "students" / "w4a4.onnx").resolve()}"' in page
    assert view.downloads_html(None, tmp_path) == ""


def test_all_files_are_listed_with_a_line_each_and_images_zipped(tmp_path):
    _run_folder(tmp_path)
    files = view.run_files(tmp_path)
    names = [Path(p).name for p in files]
    assert names == ["report.json", "config.json", "synthetic_images.zip", "w4a4.json", "w4a4.onnx",
                     "w4a4.safetensors", "w4a4_int.json", "w4a4_int.safetensors", "teacher_fp32.onnx"]
    with zipfile.ZipFile(tmp_path / "synthetic_images.zip") as zf:
        assert zf.namelist() == ["synthetic_images/0000_1.png"]
    page = view.files_html(files)
    assert page.count("<li>") == len(files) and page.count('class="gzq-file-note"></div>') == 0  # a note each
    assert view.file_note("w4a4.onnx").startswith("The quantized model as ONNX")
    assert view.file_note("teacher_fp32.onnx").startswith("The original model")
    assert view.file_note("w4a4_int.safetensors").startswith("Integer weights")
    assert view.run_files(None) == [] and view.run_files(tmp_path / "missing") == []


# ----------------------------------------------------------------------------------------- form -> config

def test_build_config_quick_preset_and_students():
    cfg = form.build_config("default", w_bits=4, a_bits=4, protocol="first_last_8bit", extra_students="w8a8, w3a3;w8a8",
                           preset="quick CPU")
    assert cfg.model.name == "default" and cfg.preset == "cpu"
    assert (cfg.synth.num_images, cfg.synth.steps, cfg.train.epochs, cfg.eval.max_real_images) == (64, 40, 3, 2000)
    assert [s.name for s in cfg.students] == ["w4a4_fl8", "w8a8_fl8", "w3a3_fl8"]
    assert "deployable" in dict((v, k) for k, v in form.PROTOCOLS)          # the integer-runtime download
    cfg = form.build_config("default", w_bits=8, a_bits=8, protocol="deployable", preset="quick CPU")
    assert [s.name for s in cfg.students] == ["w8a8_dep"]


def test_build_config_scales_with_advanced_values():
    cfg = form.build_config("resnet18", preset="quick CPU", steps=80, num_images=16, epochs=1, seed=3, lambda_adv=0,
                           bn_loss="mse", num_classes=10, in_chans=1, data_dir="/some/folder")
    s = cfg.synth
    assert (s.steps, s.warmup_steps) == (80, 30)
    assert (s.num_images, s.holdout_images, s.batch_size) == (16, 2, 16)
    assert s.lambda_adv == 0 and s.bn_loss.value == "mse" and cfg.seed == 3 and cfg.train.epochs == 1
    assert (cfg.model.num_classes, cfg.model.in_chans) == (10, 1)
    assert cfg.eval.data == "/some/folder" and cfg.eval.max_real_images is None
    # the shift checkbox: unticked turns off the roll fine-tuning gives each batch; left as None, the preset's
    assert form.build_config("resnet18", shift=False).train.shift is False
    assert form.build_config("resnet18", shift=None).train.shift is form.preset_fields("quick CPU")["shift"] is True
    # fusing re-parameterisable branches: ticked by default, chosen per run for every student; unticked, never
    assert not any(s.fuse_branches for s in form.build_config("repvgg_a0", extra_students="w8a8",
                                                              fuse_branches=False).students)
    fused = form.build_config("repvgg_a0", extra_students="w8a8, w3a3").students   # ticked by default
    assert [s.name for s in fused] == ["w4a4", "w8a8", "w3a3"] and all(s.fuse_branches == "auto" for s in fused)


def test_preset_fields_follow_presets():
    assert form.preset_fields("quick CPU")["steps"] == 40
    assert form.preset_fields("standard")["steps"] == 300
    assert form.preset_fields("paper-scale GPU")["num_images"] == 1024
    assert len(form.preset_fields("standard")) == len(form.ADVANCED_KEYS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_bits=9), "weight bits must be in 2..8, got 9"),
    (dict(a_bits=1), "activation bits must be in 2..8, got 1"),
    (dict(w_bits=4.5), "weight bits must be a whole number"),
    (dict(extra_students="w4x4"), "not of the form w<bits>a<bits>"),
    (dict(extra_students="w9a4"), "w_bits must be in 2..8, got 9"),
    (dict(model="  "), "pick a model"),
    (dict(preset="huge"), "unknown preset 'huge'"),
    (dict(num_images=1), "image count must be at least 2, got 1"),
    (dict(checkpoint="/some/file.safetensors"), "the bundled example takes no checkpoint"),
])
def test_build_config_rejects_bad_values_with_a_message(kwargs, message):
    args = dict(model="default", preset="quick CPU")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.").replace("?", r"\?")):
        form.build_config(**args)


# ------------------------------------------------------------------------------- the honest model choice

def test_model_without_weights_is_refused_unless_random_weights_are_asked_for():
    cfg = form.build_config("resnet50", preset="quick CPU")
    message = form.weights_problem(cfg)
    assert message.startswith("resnet50 has no trained weights here") and "random weights (for testing)" in message
    assert form.weights_problem(cfg, random_weights=True) is None
    assert form.weights_problem(form.build_config("resnet50", pretrained=True)) is None
    assert form.weights_problem(form.build_config("resnet50", checkpoint="/x.safetensors")) is None
    assert form.weights_problem(form.build_config("default")) is None
    # unknown names and models without BatchNorm get the loader's own message instead
    assert form.weights_problem(form.build_config("resnet18x")) is None
    assert form.weights_problem(form.build_config("vit_tiny_patch16_224")) is None
    assert all("needs internet" in label or "internet" in label for label, v in form.MODEL_CHOICES if v != "default")


def test_picker_labels_map_back_to_timm_names():
    assert form.model_name(form.DEFAULT_MODEL_LABEL) == "default"
    assert form.model_name(form.MODEL_CHOICES[1][0]) == form.MODEL_CHOICES[1][1]
    assert form.model_name(" resnet18 ") == "resnet18"


@pytest.mark.slow
def test_estimate_is_measured_for_the_model_and_scales_with_the_budget():
    small = estimate.estimate(form.build_config("default", preset="quick CPU", device="cpu"))
    large = estimate.estimate(form.build_config("default", preset="standard", device="cpu"))
    # the stages' own times (on a loaded machine both totals can reach their preset's time cap)
    assert 0 < small.seconds <= large.seconds and 0 < small.per_stage["synthesis"] < large.per_stage["synthesis"]
    assert set(small.per_stage) >= {"load", "synthesis", "finetune"} and "measured" in small.text
    # a preset whose full budget would pass its time cap on this device: the run will fit the cap, and so
    # does the estimate, saying why
    from dataclasses import replace
    capped = estimate.estimate(replace(form.build_config("default", preset="standard", device="cpu"),
                                       time_budget_s=large.seconds / 4))
    assert capped.seconds == pytest.approx(large.per_stage["load"] + large.seconds / 4)
    assert "fewer images and steps" in capped.text and "full budget would take" in capped.text
    probe = estimate._PROBES[estimate.probe_key(form.build_config("default", preset="quick CPU", device="cpu"))]
    assert probe.teacher_step > 0 and probe.student_step > 0 and probe.real_images == 10_000
    # synth.band=auto (the default) adds its band probe: up to 4 bands x 40 teacher-only steps of the probe's images
    from gzq.config import override
    for preset in ("quick CPU", "standard"):   # the quick preset's synthesis is too small to spare a probe
        cfg = form.build_config("default", preset=preset, device="cpu")
        assert cfg.synth.band_probe_images() == (0 if preset == "quick CPU" else 32)
        probed = estimate.estimate_seconds(cfg)["synthesis"] - estimate.estimate_seconds(
            override(cfg, "synth.band=1"))["synthesis"]
        assert probed == pytest.approx(4 * 40 * cfg.synth.band_probe_images() * 1.5 * probe.teacher_step)
    # calibration: two passes of the training images through every student when they join the adversarial
    # synthesis, and through each configuration again after it, with a fused copy of each one
    # students.fuse_branches=auto may fuse (none on the default ResNet, which has nothing to fuse)
    cfg = form.build_config("default", preset="standard", device="cpu")
    assert cfg.synth.adversarial and not cfg.synth.keep_students and cfg.synth.steps > cfg.synth.warmup_steps
    one = 2 * (cfg.synth.num_images - cfg.synth.holdout_images) * probe.student_step / 3
    students = max(cfg.synth.num_students, len(cfg.students))
    calibrations = students + len(cfg.students)
    assert not probe.branches and estimate.estimate_seconds(cfg)["calibration"] == pytest.approx(calibrations * one)
    from dataclasses import replace
    estimate._PROBES[estimate.probe_key(cfg)] = replace(probe, branches=True)
    try:
        fused = len(cfg.students)   # the extra seeds end with the adversarial synthesis
        assert estimate.estimate_seconds(cfg)["calibration"] == pytest.approx((calibrations + fused) * one)
    finally:
        estimate._PROBES[estimate.probe_key(cfg)] = probe
    # extra seeds end with adversarial synthesis; without it they are fine-tuned too
    def finetune(*changes):
        return estimate.estimate_seconds(override(cfg, *changes))["finetune"]
    assert finetune("synth.num_students=3") == pytest.approx(finetune("synth.num_students=2"))
    assert finetune("synth.num_students=3", "synth.adversarial=false") > finetune("synth.adversarial=false")
    # where no batch holds two training images the students never join synthesis: the teacher's steps alone
    def synthesis(*changes):
        return estimate.estimate_seconds(override(cfg, "synth.batch_size=1", *changes))["synthesis"]
    assert synthesis() == pytest.approx(synthesis("synth.adversarial=false"))
    assert synthesis("synth.batch_size=2") > synthesis("synth.batch_size=2", "synth.adversarial=false")


# ------------------------------------------------------------------------------------- the run handler

RUN_VALUES = dict(model="default", checkpoint=None, num_classes=0, in_chans=0, pretrained=False,
                  random_weights=False, w_bits=4, a_bits=4, protocol="all_layers", extra_students="",
                  preset="quick CPU", steps=200, num_images=16, epochs=1, num_students=0, seed=0, lambda_bn=None,
                  lambda_ce=None, lambda_adv=None, lambda_tv=None, lambda_l2=None, bn_loss=None, image_param=None,
                  labelled_zip=None)


def _runs(tmp):
    return list(Path(tmp).glob("gzq_run_*"))


@pytest.mark.slow
def test_stop_ends_the_run_inside_a_step_and_removes_the_run_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "RUNS_ROOT", tmp_path)
    assert handlers.stop_updates("test-session")["status"].startswith("**Stopped**")  # nothing was going
    updates, answer = [], []
    gen = handlers.run_updates(dict(RUN_VALUES), "test-session")
    stopper = threading.Thread(target=lambda: answer.append(handlers.stop_updates("test-session")))
    for upd in gen:
        updates.append(upd)
        if "step 3/200" in upd.get("status", "") and not stopper.is_alive() and not answer:
            assert list(tmp_path.glob("gzq_run_*/run.partial"))  # the run is writing its partial folder
            t0 = time.monotonic()
            stopper.start()
    stopper.join(timeout=30)
    assert time.monotonic() - t0 < handlers.STOP_WAIT_S + 1
    assert answer and answer[0]["status"].startswith("**Stopped**") and answer[0]["run"]["interactive"] is True
    last = updates[-1]
    assert last["status"].startswith("**Stopped** during synthesising images at step"), last["status"]
    assert last["run"]["interactive"] is True and last["stop"]["interactive"] is False  # Run on, Stop off
    assert not _runs(tmp_path), "a stopped run leaves nothing behind"
    assert not runner.RUNNER.busy("test-session")


def test_bad_input_and_missing_weights_are_messages_and_the_log_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "RUNS_ROOT", tmp_path)
    updates = list(handlers.run_updates({**RUN_VALUES, "model": "resnet18x"}, "s1"))
    assert updates[-1]["status"].startswith("**Could not run.** unknown model 'resnet18x'")
    assert "did you mean" in updates[-1]["status"]
    assert "could not run: unknown model" in updates[-1]["log"].splitlines()[-1]
    updates = list(handlers.run_updates({**RUN_VALUES, "model": "resnet50"}, "s1"))
    assert len(updates) == 1 and "has no trained weights here" in updates[-1]["status"]  # refused at once
    assert not _runs(tmp_path)
    # the click itself answers at once (outside the queue): the reason, or Run off and Stop on
    armed = handlers.arm_updates({**RUN_VALUES, "model": "resnet_nonexistent"})
    assert armed["status"].startswith("**Could not run.** unknown model") and armed["run"]["interactive"] is True
    armed = handlers.arm_updates(dict(RUN_VALUES))
    assert armed["status"] == "**Starting…**" and armed["stop"]["interactive"] is True


@pytest.mark.slow
def test_a_finished_run_comes_back_after_a_reload(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "RUNS_ROOT", tmp_path)
    t0 = time.monotonic()
    updates = list(handlers.run_updates({**RUN_VALUES, "steps": 4, "epochs": 1}, "s2"))
    elapsed = time.monotonic() - t0
    final = updates[-1]
    assert final["status"].startswith("**Done**"), final["status"]
    # the plots are rebuilt at most once per PLOT_INTERVAL_S (and at each new stage), the status at every event
    plotted = [u for u in updates if "bn_plot" in u]
    stages = {"load", "synthesis", "calibration", "reconstruct", "finetune", "evaluate", "save", "done"}
    assert plotted[-1] is final and len(plotted) < len(updates)
    assert len(plotted) <= elapsed / handlers.PLOT_INTERVAL_S + len(stages) + 2, (len(plotted), elapsed)
    token = final["last_run"]
    assert (tmp_path / token / "run" / "report.json").exists()
    restored = handlers.restore_updates(token, "s3")   # a new page: a new session, the browser's token
    assert restored["status"].startswith("**Results of your last run**")
    assert restored["results"].equals(final["results"]) and 'id="gzq-primary-download"' in restored["downloads"]
    assert restored["gallery"].count("<figure>") == 16
    assert handlers.restore_updates("gzq_run_unknown", "s3") == {} and handlers.restore_updates(None, "s3") == {}


def test_zerogpu_caps_every_preset_to_the_gpu_call():
    from gzq.ui.form import UI_PRESETS, preset_config
    from gzq.ui.runner import fit_zerogpu
    for preset in UI_PRESETS:
        cfg = fit_zerogpu(preset_config(preset), seconds=120)
        assert cfg.time_budget_s == 90.0
    short = dataclasses.replace(preset_config("standard"), time_budget_s=30.0)
    assert fit_zerogpu(short, seconds=120).time_budget_s == 30.0
