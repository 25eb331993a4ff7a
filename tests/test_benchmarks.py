"""The benchmarks' quick modes, so they cannot rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow   # each runs a benchmark in a subprocess

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_benchmark_quick(tmp_path):
    out = tmp_path / "acc.json"
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    methods = {row["method"] for row in rows if row["bits"] == "w4a4"}
    assert methods == {"noise", "mse", "gznq_m0", "gznq_m1", "gznq_m3", "pixel_m1", "real"}
    assert all(0 < row["mean"] <= 100 and row["wall_s"] > 0 for row in rows)
    assert "vs real" in r.stdout


def test_architectures_benchmark_runs_a_network_end_to_end_and_checks_its_files(tmp_path):
    out = tmp_path / "arch.json"
    r = subprocess.run([sys.executable, "benchmarks/architectures.py", "--archs", "resnet18,no_such_net",
                        "--size", "32", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1, r.stderr[-3000:]                   # one row fails, so the run says so
    rows = {row["arch"]: row for row in json.loads(out.read_text())["rows"]}
    ok = rows["resnet18"]
    assert ok["ok"] and ok["bn_layers"] == 20
    for name in ("w4a4", "w8a8"):
        assert ok[name]["onnx"]["agree"] >= 98 and ok[name]["int_file"]["max_rel"] <= 1e-4
    assert not rows["no_such_net"]["ok"] and rows["no_such_net"]["error"].startswith("build:")
    assert "1 of 2 architectures pass" in r.stdout and ok["close"]


def test_architectures_benchmark_checks_the_students_float_form(tmp_path):
    out = tmp_path / "fold.json"
    r = subprocess.run([sys.executable, "benchmarks/architectures.py", "--fold", "--archs", "test_resnet,no_such_net",
                        "--size", "32", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, missing = json.loads(out.read_text())["rows"]
    assert ok["ok"] and 0 < ok["folded"] <= ok["bn_layers"] and ok["fold"]["max_rel"] < 1e-5
    assert not missing["ok"] and "no_such_net" in missing["error"]


def test_architectures_benchmark_reports_the_weights_each_student_leaves_float(tmp_path):
    out = tmp_path / "float.json"
    r = subprocess.run([sys.executable, "benchmarks/architectures.py", "--float-weights", "--archs",
                        "resnet18,ecaresnet26t,rdnet_tiny,no_such_net", "--size", "32", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["arch"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["resnet18"]["float_weights_pct"] == 0 and rows["resnet18"]["modules"] == []
    assert 0 < rows["ecaresnet26t"]["float_weights_pct"] < 0.01 and rows["ecaresnet26t"]["modules"] == ["Conv1d"]
    assert rows["rdnet_tiny"]["modules"] == ["no BatchNorm: refused"]
    assert rows["no_such_net"]["float_weights_pct"] is None and rows["no_such_net"]["modules"][0].startswith("failed")


def test_speed_benchmark_quick():
    r = subprocess.run([sys.executable, "benchmarks/speed.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step/floor" in r.stdout and r.stdout.count("default") == 4   # 2 synthesis rows, evaluation, training
    row = r.stdout.split("speed-up")[1].splitlines()[1].split()            # default 28 500 teacher ste short ...
    assert row[:3] == ["default", "28", "500"] and all(float(v) > 0 for v in row[3:])
    # default 28 64, then kept MiB per image (composed, node, ratio) for a student and a synthesis step, step s
    row = r.stdout.split("(node)  ratio")[-1].splitlines()[1].split()
    assert row[:3] == ["default", "28", "64"] and float(row[5]) < 0.7 and float(row[8]) < 0.8
    r = subprocess.run([sys.executable, "benchmarks/speed.py", "--quick", "--train-only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0 and "step/floor" not in r.stdout and r.stdout.count("default") == 1, r.stderr[-3000:]


def test_step_memory_benchmark_quick(tmp_path):
    out = tmp_path / "mem.json"
    r = subprocess.run([sys.executable, "benchmarks/step_memory.py", "--archs", "resnet18", "--size", "32",
                        "--batches", "2,6", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    row, = json.loads(out.read_text())["rows"]
    assert 0 < row["node"]["kept_mib"] < 0.7 * row["composed"]["kept_mib"]
    assert "resnet18" in r.stdout and "peak/kept" in r.stdout


def test_accuracy_benchmark_set_overrides(tmp_path):
    out = tmp_path / "acc.json"
    cmd = [sys.executable, "benchmarks/accuracy.py", "--quick", "--methods", "gznq_m0", "--out", str(out)]
    r = subprocess.run(cmd + ["--set", "synth.init_log_scale=-1", "--set", "train.lr=2e-4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    budget = json.loads(out.read_text())["budget"]
    assert budget["set"] == ["synth.init_log_scale=-1", "train.lr=2e-4"]   # applied by gzq.config.override
    bad = subprocess.run(cmd + ["--set", "synth.lr"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "must look like synth.lr=0.1" in bad.stderr


def test_stages_benchmark_quick(tmp_path):
    out = tmp_path / "stages.json"
    r = subprocess.run([sys.executable, "benchmarks/stages.py", "--quick", "--model", "default", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 10 and {(row["calibration"], row["kd"]) for row in rows} >= {("real", "gznq"), ("gznq", None)}
    assert all(0 < row["mean"] <= 100 for row in rows)


def test_zoo_benchmark_quick():
    """A tiny zoo run end to end (a teacher trained on 640 images, a few synthesis steps): the tables print both
    sets apart and every method reports both bit-widths and the synthesis health."""
    r = subprocess.run([sys.executable, "benchmarks/zoo.py", "--quick", "--models", "regnetx_32",
                        "--methods", "gznq,real"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Tuning set" in r.stdout and "Held-out set" in r.stdout
    out = Path(r.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    assert out.exists() and "benchmarks/results" not in str(out)
    (row,) = json.loads(out.read_text())["tuning"]
    assert row["model"] == "regnetx_32" and 0 <= row["gznq_label_agreement"] <= 100
    assert all(0 < row[k] <= 100 for k in ("gznq_w4a4", "gznq_w8a8", "real_w4a4", "real_w8a8"))


def test_zoo_sets_split_the_zoo_and_every_model_is_a_bn_classifier():
    """Each zoo model is in exactly one of the tuning, held-out, confirmation and five fresh sets, and each fresh model
    builds in timm at its input size with BatchNorm layers and 10 outputs."""
    import timm

    sys.path.insert(0, str(ROOT / "scripts"))
    import train_zoo

    from gzq.models import find_bn_layers
    fresh = tuple(train_zoo.FRESH_SETS.values())
    assert fresh == (train_zoo.FRESH, train_zoo.FRESH2, train_zoo.FRESH3, train_zoo.FRESH4, train_zoo.FRESH5,
                     train_zoo.FRESH6)
    sets = (train_zoo.TUNING, train_zoo.HELD_OUT, train_zoo.CONFIRMATION) + fresh
    assert sorted(n for s in sets for n in s) == sorted(train_zoo.ZOO)
    assert len(train_zoo.TUNING) <= 3 and len(train_zoo.HELD_OUT) >= 5
    assert [len(s) for s in fresh] == [4, 4, 4, 3, 2, 2]
    for name in sum(fresh, ()):
        m = train_zoo.ZOO[name]
        model = timm.create_model(m.arch, num_classes=10, in_chans=m.input_size[0], **m.model_kwargs).eval()
        assert find_bn_layers(model), name
        with torch.no_grad():
            assert model(torch.zeros(1, *m.input_size)).shape == (1, 10), name


def test_train_zoo_epochs_override_trains_longer_and_says_so(tmp_path, monkeypatch):
    """`--epochs` trains a zoo model for that many epochs (into the folder GZQ_ZOO_DIR names), writes the command
    into its card, and leaves the zoo's own epoch count alone without it; a bad count is refused, and so is a folder
    that already holds a teacher trained otherwise."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_zoo

    calls = []
    monkeypatch.setattr(train_zoo, "train", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(train_zoo, "ZOO_DIR", tmp_path)
    train_zoo.main(["--models", "mobileone_48", "--epochs", "6", "--threads", "1"])
    train_zoo.main(["--models", "regnetx_32"])
    assert [c["epochs"] for c in calls] == [6, train_zoo.ZOO["regnetx_32"].epochs]
    assert calls[0]["command"] == "python scripts/train_zoo.py --models mobileone_48 --epochs 6"
    assert calls[0]["train_images"] == train_zoo.ZOO["mobileone_48"].train_images and calls[0]["threads"] == 1
    with pytest.raises(SystemExit):
        train_zoo.main(["--models", "regnetx_32", "--epochs", "0"])
    (tmp_path / "regnetx_32.json").write_text(json.dumps({"train_command": "python scripts/train_zoo.py --models "
                                                                          "regnetx_32"}))
    (tmp_path / "regnetx_32.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):   # the zoo's teacher is there: --epochs would silently not apply
        train_zoo.main(["--models", "regnetx_32", "--epochs", "6"])
    assert len(calls) == 2


def test_finetune_benchmark_quick():
    """KD and block reconstruction on the same images, side by side; a temporary results file."""
    r = subprocess.run([sys.executable, "benchmarks/finetune.py", "--quick", "--models", "default",
                        "--finetune", "kd,recon"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recon/kd time" in r.stdout and "mean gznq w4a4: kd" in r.stdout
    out = Path(r.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    rows = json.loads(out.read_text())["rows"]
    assert {row["finetune"] for row in rows} == {"kd", "recon"} and "benchmarks/results" not in str(out)


def test_gpu_benchmark_dry_run_on_cpu():
    """The GPU check's code path on a tiny model: the speed table with mixed precision off and on, and the
    device-consistency check (CPU against CPU in channels_last where there is no GPU)."""
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith("test_resnet")]
    assert [row[3] for row in rows] == ["off", "on"] and all(float(row[4]) > 0 and float(row[-1]) < 0 for row in rows)
    assert sum(line.rstrip().endswith(" ok") for line in lines) == 3 and "FAILED" not in r.stdout
    if "no CUDA GPU" in r.stdout:
        assert "unmeasured" in r.stdout


def test_distributed_benchmark_quick(tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "benchmarks/distributed.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(s["procs"], s["threads"], s["global_bn"]) for s in res["speed"]] == [
        (1, 1, False), (1, 2, False), (2, 1, True)]
    assert all(s["step_s"] > 0 for s in res["speed"])
    assert [(a["procs"], a["global_bn"]) for a in res["accuracy"]] == [(1, False), (2, True)]
    assert all(0 < a["top1"] <= 100 for a in res["accuracy"])


def test_finetune_benchmark_caches_images_per_synthesis_override(tmp_path):
    """--set synth.* items reach the synthesis of the shared images, and images made with another recipe are
    cached apart instead of being reused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from finetune import synthetic_source

    from gzq.config import ModelSpec
    from gzq.models import load_teacher
    spec = ModelSpec("default")
    spectral = synthetic_source(spec, 16, 2, 0, tmp_path, "default")
    pixel = synthetic_source(spec, 16, 2, 0, tmp_path, "default", ("synth.image_basis=pixel",))
    assert len(list(tmp_path.glob("default_16_2_0_*.pt"))) == 2
    teacher = load_teacher(spec)
    a, b = pixel(teacher, "cpu").images.mean, spectral(teacher, "cpu").images.mean
    assert a.shape == b.shape == (16, 1, 28, 28) and not torch.allclose(a, b)
    # settings that cannot change these images reuse them: a coarse warm-up on a 28-px input, and a field
    # at the value that leaves synthesis as it was
    synthetic_source(spec, 16, 2, 0, tmp_path, "default", ("synth.coarse_scale=0.5", "synth.label_smoothing=0"))
    assert len(list(tmp_path.glob("default_16_2_0_*.pt"))) == 2
    synthetic_source(spec, 16, 2, 0, tmp_path, "default", ("synth.label_smoothing=0.1",))
    assert len(list(tmp_path.glob("default_16_2_0_*.pt"))) == 3
    # synth.band=auto (the default) is resolved before the images are keyed: the band it picked, given
    # explicitly, finds the same images
    bands = {json.loads(p.read_text())["band"] for p in tmp_path.glob("default_16_2_0_*.band.json")}
    assert bands == {1.0}
    synthetic_source(spec, 16, 2, 0, tmp_path, "default", ("synth.band=1",))
    assert len(list(tmp_path.glob("default_16_2_0_*.pt"))) == 3
    # the file names carry the teacher's weights: a teacher of the same name retrained to other last bits
    # gets images of its own
    from finetune import weights_digest
    other = load_teacher(spec).model
    assert weights_digest(other) == weights_digest(teacher.model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(other) != weights_digest(teacher.model)
    assert all(weights_digest(teacher.model) in p.name for p in tmp_path.glob("default_16_2_0_*"))


def test_roll_agreement_tells_a_shift_invariant_model_from_a_position_bound_one():
    """scripts/roll_agreement.py: a conv net with global average pooling reads a rolled image as it reads the image
    (the roll wraps round, so the pooled sum is the same), and keeps every label; a linear layer on the flattened
    pixels ties each class to positions, and loses labels under the roll. An override that cannot change the images
    (not synth.*) is refused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from roll_agreement import main, roll_agreement

    with pytest.raises(SystemExit):   # only synthesis overrides change the images it reads
        main(["--models", "mobileone_48", "--set", "train.shift=false"])

    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    pooled = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 3, padding=1, padding_mode="circular"),
                                 torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    for model, invariant in ((pooled, True), (flat, False)):
        with torch.no_grad():
            labels = model(x).argmax(1)
        r = roll_agreement(model, x, labels, roll=3)
        assert r["plain"] == 1.0 and r["worst"] <= r["rolled"] <= 1.0
        assert (r["rolled"] == 1.0) is invariant, r


def test_reparam_benchmark_compares_the_branched_and_fused_forms(repvgg, tmp_path):
    """benchmarks/reparam.py on a RepVGG with random weights: the fused form computes the same function with half
    the convs, each form gets a calibrated student per bit-width, and both W8A8 files are timed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reparam import format_table, measure

    model = repvgg
    torch.manual_seed(0)
    calib, test = torch.randn(64, 1, 32, 32), torch.randn(128, 1, 32, 32)
    with torch.no_grad():
        labels = model(test).argmax(1)
    row = measure(model, (1, 32, 32), "head.fc", calib, test, labels, tmp_path, seconds=0.1)
    assert row["fp"] == 100.0 and row["fused_fp"] == 100.0   # the same function
    assert row["fused_convs"] * 2 == row["convs"]           # one conv per block instead of 3x3 + 1x1
    assert row["w8a8_branches"] >= 90 and 0 <= row["w4a4_fused"] <= 100
    assert row["ms_fused"] > 0 and row["fused_latency_ratio"] > 0
    assert "w4a4 fused" in format_table([dict(model="r", arch="repvgg_a0", **row)])
