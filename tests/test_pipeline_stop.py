"""Stopping a run inside a forward or backward pass (gzq.pipeline.StopHooks, RunStopped)."""
from __future__ import annotations

import threading

import pytest
import timm
import torch

import gzq
from gzq.events import Progress, StageStarted, Stopped
from gzq.pipeline import RunStopped, StopHooks, iter_run
from gzq.presets import make_config


def test_forward_raises_once_the_flag_is_set_and_hooks_come_off():
    model = timm.create_model("test_resnet", num_classes=4).eval()
    flag = threading.Event()
    hooks = StopHooks(flag.is_set, model)
    model(torch.randn(1, 3, 32, 32))  # flag clear: a normal pass
    flag.set()
    with pytest.raises(RunStopped):
        model(torch.randn(1, 3, 32, 32))
    hooks.remove()
    model(torch.randn(1, 3, 32, 32))  # no hooks left


def test_backward_raises_once_the_flag_is_set_after_the_forward():
    model = timm.create_model("test_resnet", num_classes=4).train()  # in-place ReLUs after BN, as in real nets
    flag = threading.Event()
    hooks = StopHooks(flag.is_set, model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None
    loss = model(x).sum()
    flag.set()  # set between the forward and the backward: the backward is abandoned at its first layer
    with pytest.raises(RunStopped):
        loss.backward()
    hooks.remove()


@pytest.mark.slow
def test_a_stop_inside_a_synthesis_pass_ends_the_run_with_stopped(tmp_path):
    cfg = make_config("cpu", device="cpu", synth=dict(num_images=16, holdout_images=2, batch_size=16, steps=50,
                                                      warmup_steps=5), train=dict(epochs=1))
    calls = {"n": 0, "armed": False}

    def stop() -> bool:  # becomes true in the middle of step 3's pass (many calls per pass)
        calls["n"] += 1
        return calls["armed"] and calls["n"] > 20

    events = []
    for ev in iter_run(cfg, tmp_path / "run", stop):
        events.append(ev)
        if isinstance(ev, Progress) and ev.stage == "synthesis" and ev.step == 2:
            calls["n"], calls["armed"] = 0, True
    assert isinstance(events[-1], Stopped) and events[-1].stage == "synthesis" and events[-1].step == 2
    assert any(isinstance(e, StageStarted) and e.stage == "synthesis" for e in events)
    with pytest.raises(RunStopped, match="stopped during load"):   # the one-call form raises instead
        gzq.run(cfg, tmp_path / "run2", stop=lambda: True)
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run2.partial").exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.slow
def test_feature_kd_runs_under_the_apps_stop_event(tmp_path):
    """Unit-output KD needs a BN-folded copy of the teacher; made after the stop hooks (which hold the app's
    threading.Event) it could not be copied. The run finishes and its W4A4 student trained."""
    cfg = make_config("cpu", device="cpu", students=["w4a4"],
                      synth=dict(num_images=16, holdout_images=2, batch_size=16, steps=4, warmup_steps=4),
                      train=dict(epochs=2, feature_kd=1.0), export=dict(formats=[]))
    report = gzq.run(cfg, tmp_path / "run", stop=threading.Event())
    (row,) = report["students"]
    assert row["name"] == "w4a4" and row["finetune"] == "kd" and 0 < row["accuracy"] <= 100
