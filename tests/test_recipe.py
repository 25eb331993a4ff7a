"""The synthesis recipe's balance does not depend on resolution, batch or class count; flips are used only where
the teacher tolerates them; budgets follow the model's measured cost; unhealthy images are reported."""

import json
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from gzq.bn import BNStatsRecorder, bn_losses
from gzq.budget import MEMORY_SHARE, MIN_BATCH, StepCosts, estimate, fit_budget, fit_memory, plan_run
from gzq.config import BNLoss, FlipMode, ImageParam, NRule, RunConfig, SynthConfig, override, scaled_synth
from gzq.events import Message, drain
from gzq.models import Teacher
from gzq.evaluate import health_warnings
from gzq.presets import make_config

from gzq.augment import augment, jitter_pixels
from gzq.synthesis import SyntheticImages, flip_check, flips_are_valid, iter_synthesize


def _bn_terms(model, x, normalize):
    with BNStatsRecorder(model) as rec:
        model(x)
        loss, _ = bn_losses(rec, BNLoss.LIKELIHOOD, NRule.BATCH_SPATIAL, normalize=normalize)
    return loss.item()


def test_normalised_bn_loss_is_resolution_and_batch_invariant():
    """The same model and the same images at 32 and 64 px (and at two batch sizes) give normalised BN terms of the
    same order, while the raw likelihood grows with the number of values behind each statistic."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(16, 32, 64, 128)).eval()
    x32 = torch.randn(16, 1, 32, 32) * 0.7 + 0.3
    x64 = F.interpolate(x32, scale_factor=2, mode="nearest")
    norm32, norm64 = _bn_terms(model, x32, True), _bn_terms(model, x64, True)
    raw32, raw64 = _bn_terms(model, x32, False), _bn_terms(model, x64, False)
    assert 0.5 < norm64 / norm32 < 2.0
    assert raw64 / raw32 > 3.0                       # ~4x the values per statistic
    norm_b8, raw_b8 = _bn_terms(model, x32[:8], True), _bn_terms(model, x32[:8], False)
    assert 0.5 < norm_b8 / norm32 < 2.0 and raw32 / raw_b8 > 1.5


class _Chirality(nn.Module):
    """Class 0 when the left half is brighter than the right, class 1 otherwise: not mirror-invariant."""
    def forward(self, x):
        d = x[..., : x.shape[-1] // 2].mean((1, 2, 3)) - x[..., x.shape[-1] // 2:].mean((1, 2, 3))
        return torch.stack([d, -d], 1) * 10


class _Symmetric(nn.Module):
    """Class by total brightness: mirror-invariant."""
    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([m, -m], 1) * 10


def _images(labels, chiral):
    """Class 0: bright left half (chiral) or bright everywhere; class 1: bright right half or dark everywhere."""
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.full((1, 1, 1, 1), -3.0), torch.full((1, 1, 1, 1), 3.0)
    imgs = SyntheticImages(labels, (1, 8, 8), (lo, hi), ImageParam.PIXEL, 0.0, g)
    with torch.no_grad():
        imgs.mean.zero_()
        for i, y in enumerate(labels.tolist()):
            if chiral:
                imgs.mean[i, :, :, slice(0, 4) if y == 0 else slice(4, 8)] = 1.0
            else:
                imgs.mean[i] = 1.0 if y == 0 else -1.0
    return imgs


def test_flip_check_tells_mirror_invariant_teachers_apart():
    labels = torch.tensor([0, 1] * 8)
    chiral = flip_check(_Chirality(), _images(labels, True), labels)
    assert chiral["label_agreement"] == 1.0 and chiral["flipped_label_agreement"] < 0.1
    assert not flips_are_valid(chiral)
    sym = flip_check(_Symmetric(), _images(labels, False), labels)
    assert sym["label_agreement"] == sym["flipped_label_agreement"] == 1.0 and sym["consistency"] == 1.0
    assert flips_are_valid(sym)
    assert "rolled_label_agreement" not in sym


def test_flip_check_measures_the_teachers_hold_under_the_roll():
    """With jitter, flip_check also reports the share of labels the teacher keeps on rolled image means: a
    roll by half the side swaps the bright half (labels lost), one of any size leaves total brightness."""
    labels = torch.tensor([0, 1] * 8)
    g = torch.Generator().manual_seed(0)
    rolls = [flip_check(_Chirality(), _images(labels, True), labels, batch=2, jitter=4, generator=g)
             ["rolled_label_agreement"] for _ in range(5)]
    assert min(rolls) < 1.0 and all(0.0 <= r <= 1.0 for r in rolls)
    sym = flip_check(_Symmetric(), _images(labels, False), labels, jitter=4, generator=g)
    assert sym["rolled_label_agreement"] == 1.0


def test_augment_flips_and_rolls_for_real():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float).view(2, 1, 4, 6)
    g = torch.Generator().manual_seed(3)
    y = augment(x, 0, True, g)
    for i in range(2):  # each image is itself or its mirror, and over a few draws both happen
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))
    seen = {bool(torch.equal(augment(x, 0, True, g)[0], x[0])) for _ in range(20)}
    assert seen == {True, False}
    shifts = set()
    for _ in range(20):   # every roll is one shift of the whole batch within +-2 px, and the shifts vary
        r = augment(x, 2, False, g)
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(r, torch.roll(x, (dy, dx), (2, 3)))]
        assert matches
        shifts.add(matches[0])
    assert len(shifts) > 3
    assert jitter_pixels(0.07, (1, 28, 28)) == 2 and jitter_pixels(0.07, (3, 224, 224)) == 16


def _toy_teacher(model, size=8):
    return Teacher(model=model, name="toy", architecture="toy", model_kwargs={}, input_size=(1, size, size),
                   mean=(0.5,), std=(0.25,), num_classes=2)


class _ChiralBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1).eval()
        self.head = _Chirality()

    def forward(self, x):
        return self.head(self.bn(x))


def test_augmentation_check_drops_flips_for_a_chiral_teacher_and_ce_weight_adapts():
    teacher = _toy_teacher(_ChiralBN())
    cfg = SynthConfig(num_images=16, holdout_images=0, batch_size=16, steps=12, warmup_steps=6, adversarial=False,
                      flip="auto", lambda_bn=1.0, ce_adapt_rate=0.5)
    events, res = drain(iter_synthesize(teacher, {}, cfg, torch.device("cpu")))
    # under flips a chiral teacher cannot hold the labels: the check at 3/4 of the steps drops flips and jitter
    assert res.flip_check["augmented_agreement"] < 0.9 and res.flip is False and res.jitter == 0
    assert any(isinstance(e, Message) and "jitter and flips off from here" in e.text for e in events)
    weights = res.history["ce_weight"]
    assert len(weights) == 12 and all(1.0 <= w <= cfg.ce_max_scale for w in weights)
    # fixed during the warm-up; then it moves only by the adaptation factor per step, up while labels are
    # missed, down once they hold
    assert weights[:cfg.warmup_steps] == [1.0] * cfg.warmup_steps
    for a, b, agree in list(zip(weights, weights[1:], res.history["agreement"][1:]))[cfg.warmup_steps - 1:]:
        assert b == pytest.approx(min(a * 1.5, 100.0)) if agree < cfg.ce_target else b == pytest.approx(max(a / 1.5, 1.0))
    fixed = SynthConfig(num_images=16, holdout_images=0, batch_size=16, steps=3, warmup_steps=1, adversarial=False,
                        flip="on", ce_target=0.0)
    sym = _toy_teacher(nn.Sequential(nn.BatchNorm2d(1).eval(), _Symmetric()))
    kept = SynthConfig(num_images=16, holdout_images=0, batch_size=16, steps=30, warmup_steps=20, adversarial=False,
                       lambda_bn=0.01, ce_adapt_rate=0.5)
    _, res = drain(iter_synthesize(sym, {}, kept, torch.device("cpu")))
    assert res.flip is True and res.jitter == 1 and res.flip_check["augmented_agreement"] >= 0.9
    _, res = drain(iter_synthesize(teacher, {}, fixed, torch.device("cpu")))
    assert res.flip is True and set(res.history["ce_weight"]) == {1.0}   # flips asked for stay on


def test_flip_mode_accepts_booleans_and_validates():
    assert SynthConfig(flip=True).flip == FlipMode.ON and SynthConfig(flip=False).flip == FlipMode.OFF
    assert SynthConfig.from_dict(SynthConfig(flip="auto").to_dict()).flip == FlipMode.AUTO
    with pytest.raises(ValueError):
        SynthConfig(flip="sometimes")
    with pytest.raises(ValueError, match="ce_target"):
        SynthConfig(ce_target=1.5)
    with pytest.raises(ValueError, match="jitter"):
        SynthConfig(jitter=2)       # a share of the side, not pixels


def test_budget_fits_the_time_and_keeps_the_derived_fields_in_proportion():
    cfg = override(make_config("cpu"), "synth.band=1")
    b, kb = cfg.synth.batch_size, cfg.train.batch_size
    costs = StepCosts(synth_image=1.0 / b, kd_image=0.2 / kb, forward_image=1e-3)
    full = estimate(cfg, costs, num_students=2)
    assert full.per_stage["synthesis"] == pytest.approx(300.0) and full.seconds > 300
    # 224 train images in batches of 64 (3 full ones) for 40 epochs
    assert full.per_stage["finetune"] == pytest.approx(40 * 3 * 0.2)
    # warm-up steps (the teacher alone, at the coarse size where there is one) priced at their own cost
    cheap_warmup = StepCosts(synth_image=1.0 / b, kd_image=0.2 / kb, forward_image=1e-3, warmup_image=0.25 / b)
    assert estimate(cfg, cheap_warmup, 2).per_stage["synthesis"] == pytest.approx(100 * 0.25 + 200 * 1.0)
    # synth.band=auto first probes up to 4 bands with 32 images x 40 teacher-only steps each
    assert override(cfg, "synth.band=auto").synth.band_probe_images() == 32
    probe = 4 * 40 * 32 * 0.25 / b
    assert (estimate(override(cfg, "synth.band=auto"), cheap_warmup, 2).per_stage["synthesis"]
            == pytest.approx(probe + 100 * 0.25 + 200 * 1.0))
    fitted, est = fit_budget(cfg, costs, 2, seconds=full.seconds / 3)
    assert est.seconds <= full.seconds / 3 and fitted.synth.steps < 300 and fitted.synth.num_images < 256
    assert fitted.synth.warmup_steps == round(fitted.synth.steps / 3)
    assert fitted.synth.holdout_images == fitted.synth.num_images // 8
    assert fitted.synth.batch_size <= fitted.synth.num_images
    same, est_same = fit_budget(cfg, costs, 2, seconds=full.seconds * 2)
    assert same is cfg and est_same.scale == 1.0
    tiny, tiny_est = fit_budget(cfg, costs, 2, seconds=1.0)   # never below the floors
    assert tiny.synth.steps == 40 and tiny.synth.num_images == 32
    # ... where a step holds 32 images, not the preset's 96: it is priced at the batch it runs
    assert tiny_est.per_stage["synthesis"] == pytest.approx(40 * 32 / b)
    # the images' own update (Adam over every image held, whatever the batch) follows the images, not the batch
    with_update = StepCosts(synth_image=1.0 / b, kd_image=0.2 / kb, forward_image=1e-3, update_image=1e-3)
    assert (estimate(tiny, with_update, 2).per_stage["synthesis"] - tiny_est.per_stage["synthesis"]
            == pytest.approx(40 * 32 * 1e-3))
    assert tiny_est.per_stage["finetune"] == pytest.approx(40 * 28 * 0.2 / kb)
    assert scaled_synth(cfg.synth, 64, 90) == dict(num_images=64, holdout_images=8, batch_size=64, steps=90,
                                                      warmup_steps=30)
    with pytest.raises(ValueError, match="time_budget_s"):
        RunConfig(time_budget_s=-1)


def test_batches_are_cut_to_the_free_memory():
    cfg = override(make_config("cpu"), "synth.band=1")
    gib = 2**30
    costs = StepCosts(synth_image=0.01, kd_image=0.01, forward_image=1e-3, synth_image_bytes=gib // 4,
                      kd_image_bytes=gib // 16, memory=20 * gib, memory_share=0.2)
    # a fifth of 20 GiB for what a step keeps: 16 images at 1/4 GiB each, 64 at 1/16
    assert StepCosts(0.01, 0.01, 1e-3).memory_share == MEMORY_SHARE["cpu"] < 0.2
    cut, note = fit_memory(cfg, costs)
    assert cut.synth.batch_size == 16 and cut.train.batch_size == 64 and cfg.synth.batch_size == 96
    assert "20.0 GiB" in note and "synthesis batch 96 -> 16" in note and "fine-tuning" not in note
    # a sixth of the batch, six times the steps (the warm-up keeps its share): each image as many updates
    assert cut.synth.steps == 6 * 300 and cut.synth.warmup_steps == 600 and cut.synth.num_images == 256
    # ... in the same time; the time fit then works on the cut config
    fitted, est = plan_run(cfg, costs, 2, seconds=1e9)
    assert fitted.synth.batch_size == 16 and note in est.text
    assert est.per_stage["synthesis"] == pytest.approx(300 * 96 * 0.01)
    fitted, est = plan_run(cfg, costs, 2, seconds=60)
    assert fitted.synth.batch_size == 16 and fitted.synth.steps < 1800 and est.seconds <= 60
    # the floor is 32 images with 40 updates each: 80 steps of 16
    floor, _ = plan_run(cfg, costs, 2, seconds=1)
    assert (floor.synth.num_images, floor.synth.batch_size, floor.synth.steps) == (32, 16, 80)
    # plenty of memory, or none measured: nothing changes
    roomy = StepCosts(0.01, 0.01, 1e-3, synth_image_bytes=gib // 4, kd_image_bytes=gib // 16, memory=1024 * gib)
    assert fit_memory(cfg, roomy) == (cfg, "")
    assert fit_memory(cfg, StepCosts(0.01, 0.01, 1e-3, synth_image_bytes=gib)) == (cfg, "")
    # never below MIN_BATCH, and the note says memory is still short
    short = StepCosts(0.01, 0.01, 1e-3, synth_image_bytes=gib, kd_image_bytes=gib, memory=gib)
    cut, note = fit_memory(cfg, short)
    assert cut.synth.batch_size == cut.train.batch_size == MIN_BATCH and "still more than memory holds" in note


def test_measured_costs_count_each_images_memory_and_time_the_batch_that_fits(monkeypatch):
    import gzq.budget
    from gzq.budget import available_memory, measure_costs
    monkeypatch.setattr(gzq.budget, "FULL_BATCH_TIMING_S", 1e9)   # whatever the load: the run's batch is timed
    from gzq.config import student_specs
    from gzq.models import load_teacher
    from gzq.quant.convert import create_student
    assert available_memory(torch.device("cpu")) > 2**28
    per_image = {}
    for side in (32, 64):
        cfg = make_config("cpu", "cpu", model={"name": "resnet10t", "num_classes": 10, "input_size": (3, side, side)},
                          students=["w4a4"], export={"formats": []}, train={"epochs": 2, "batch_size": 32},
                          synth={"num_images": 64, "holdout_images": 8, "batch_size": 32, "steps": 20, "warmup_steps": 5})
        teacher = load_teacher(cfg.model, torch.device("cpu"))
        ex = torch.zeros(2, *teacher.input_size)
        students = {n: create_student(teacher.model, s, ex, teacher.classifier) for n, s in student_specs(cfg)}
        costs = measure_costs(teacher, students, cfg, torch.device("cpu"))
        assert costs.synth_image > 0 and costs.kd_image > 0 and costs.synth_image_bytes > costs.kd_image_bytes > 0
        assert costs.update_image > 0
        assert costs.timed_batch == {"synthesis": 32, "warmup": 32, "finetune": 32}
        per_image[side] = costs.synth_image_bytes
        # memory for a batch of 12 only: the steps are timed at 12, and the run's batches cut to it
        memory = int(12.5 * costs.synth_image_bytes / MEMORY_SHARE["cpu"])
        tight = measure_costs(teacher, students, cfg, torch.device("cpu"), memory=memory)
        assert tight.timed_batch["synthesis"] == 12 and tight.memory == memory
        assert fit_memory(cfg, tight)[0].synth.batch_size == 12
        if side == 32:   # a step too slow to time at the run's batch is priced from the small batch alone
            monkeypatch.setattr(gzq.budget, "FULL_BATCH_TIMING_S", 0.0)
            assert measure_costs(teacher, students, cfg, torch.device("cpu")).timed_batch["synthesis"] == 16
            monkeypatch.setattr(gzq.budget, "FULL_BATCH_TIMING_S", 1e9)
        assert not any(p.grad is not None for s in students.values() for p in s.parameters())
    # activations grow with the pixels: 4x the pixels, about 4x the memory per image
    assert 3.0 < per_image[64] / per_image[32] < 4.5


def test_health_warning_only_when_images_lose_their_class():
    assert health_warnings(dict(label_agreement=97.0)) == []
    (w,) = health_warnings(dict(label_agreement=42.0))
    assert "42 %" in w and "90 %" in w


def test_health_warning_names_a_collapsed_student():
    """A quantized model that gives the teacher's class on under half the held-out synthetic images is named."""
    rows = [{"name": "w8a8", "agreement": 100.0}, {"name": "w4a4", "agreement": 29.69},
            {"name": "w3a3", "agreement": None}]
    (w,) = health_warnings({"label_agreement": 99.0}, rows)
    assert w.startswith("the w4a4 model") and "30 %" in w and "50 %" in w
    assert "train.shift=false" not in w   # fine-tuning did not shift: nothing to turn off
    (w,) = health_warnings({"label_agreement": 99.0, "finetune_shift_pixels": 2}, rows)
    assert "--set train.shift=false" in w and "shift the images while the small model learns" in w
    assert health_warnings({"label_agreement": 99.0}, rows[:1]) == []


@pytest.mark.slow
def test_a_run_warns_of_its_collapsed_student_and_of_no_other(tmp_path):
    """End to end on the bundled model: a 2-bit student after one epoch of KD on a few images is far from the
    teacher, and the run's report, events and summary say so by name; the 8-bit student is not named. With
    train.refit_rounds=1 the 2-bit student, which has not fit its training images, gets a second round of KD and
    the report says so."""
    from gzq.pipeline import iter_run
    cfg = make_config("cpu", "cpu", students=["w2a2", "w8a8"], time_budget_s=None, export={"formats": []},
                      synth={"num_images": 32, "holdout_images": 8, "batch_size": 32, "steps": 10,
                             "warmup_steps": 3, "band": 1},
                      train={"epochs": 1, "batch_size": 16, "refit_rounds": 1}, eval={"max_real_images": 500})
    events = list(iter_run(cfg, tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {r["name"]: r for r in report["students"]}
    assert rows["w2a2"]["agreement"] < 50 <= rows["w8a8"]["agreement"]
    assert rows["w2a2"]["kd_rounds"] == 2 and "kd_rounds" not in rows["w8a8"]   # 8 bits: calibration alone
    assert any(isinstance(e, Message) and "another 1 epochs for w2a2" in e.text for e in events)
    (w,) = [w for w in report["warnings"] if "collapsed" in w]
    assert w.startswith("the w2a2 model")
    # KD shifted each batch by 2 px (7 % of 28): the warning names the switch that turns it off
    assert report["synthesis"]["health"]["finetune_shift_pixels"] == 2 and "--set train.shift=false" in w
    assert any(isinstance(e, Message) and e.level == "warning" and "w2a2" in e.text for e in events)


def test_a_run_with_auto_percentile_reports_its_pick_per_student(tmp_path):
    """students.act_percentile=auto, the default, on the bundled model: the 4-bit student's ranges are chosen by
    its KL on the held-out synthetic images, which the log and report.json give per candidate; the 8-bit
    student, with no percentile ranges, is not probed."""
    from gzq.config import AUTO_PERCENTILES
    from gzq.pipeline import iter_run
    cfg = make_config("cpu", "cpu", students=["w4a4", "w8a8"], time_budget_s=None, export={"formats": []},
                      synth={"num_images": 24, "holdout_images": 8, "batch_size": 24, "steps": 4,
                             "warmup_steps": 2, "band": 1},
                      train={"epochs": 0}, eval={"max_real_images": 200})
    events = list(iter_run(cfg, tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {r["name"]: r for r in report["students"]}
    kl = rows["w4a4"]["act_percentile_kl"]
    assert list(kl) == [f"{p:g}" for p in AUTO_PERCENTILES] and all(v >= 0 for v in kl.values())
    assert rows["w4a4"]["act_percentile"] in AUTO_PERCENTILES and "act_percentile" not in rows["w8a8"]
    (msg,) = [e.text for e in events if isinstance(e, Message) and "activation ranges at percentile" in e.text]
    assert msg.startswith(f"w4a4: activation ranges at percentile {rows['w4a4']['act_percentile']:g}")
    assert report["config"]["students"][0]["act_percentile"] == "auto"


def test_train_shift_false_fine_tunes_on_unshifted_images(tmp_path, monkeypatch):
    """KD rolls every batch by up to synth.jitter by default; train.shift=false fine-tunes on the images as they
    are, whatever synthesis did; a value that is not true or false is refused by name."""
    import gzq.distill
    from gzq.pipeline import iter_run
    real_augment, rolls = gzq.distill.augment, []

    def spy(x, jitter, flip, generator=None):
        rolls[-1].add(jitter)
        return real_augment(x, jitter, flip, generator)

    monkeypatch.setattr(gzq.distill, "augment", spy)
    for shift in (True, False):
        rolls.append(set())
        cfg = make_config("cpu", "cpu", students=["w4a4"], time_budget_s=None, export={"formats": []},
                          synth={"num_images": 16, "holdout_images": 4, "batch_size": 16, "steps": 2,
                                 "warmup_steps": 1, "band": 1},
                          train={"epochs": 1, "batch_size": 4, "shift": shift}, eval={"max_real_images": 100})
        drain(iter_run(cfg, tmp_path / f"run_{shift}"), keep=False)
    assert rolls == [{jitter_pixels(SynthConfig().jitter, (1, 28, 28))}, {0}] and SynthConfig().jitter > 0
    with pytest.raises(ValueError, match="train.shift is true or false, got 'maybe'"):
        override(RunConfig(), "train.shift=maybe")


@pytest.mark.slow
def test_estimate_run_measures_the_bundled_model():
    from gzq.pipeline import estimate_run
    # by default (train.method=auto) the 4-bit student is fitted by KD and the 8-bit one only calibrated: no
    # block reconstruction is timed or counted
    cfg = make_config("cpu", students=["w4a4", "w8a8"], synth=dict(num_images=64, holdout_images=8, steps=20,
                      warmup_steps=5), train=dict(epochs=2), eval=dict(max_real_images=100), export=dict(formats=[]))
    est = estimate_run(cfg)
    assert set(est.per_stage) >= {"load", "synthesis", "reconstruct", "finetune", "evaluate"}
    assert est.seconds == pytest.approx(sum(est.per_stage.values()))
    assert est.costs.synth_image > 0 and est.costs.kd_image > 0 and est.per_stage["finetune"] > 0
    assert 0 < est.costs.warmup_image < est.costs.synth_image   # the warm-up runs the teacher without students
    assert est.costs.synth_image_bytes > 0 and est.costs.memory > 0
    assert "64 images, 20 synthesis steps, 2 fine-tuning epochs" in est.text
    assert est.costs.recon_units == 0 and est.per_stage["reconstruct"] == 0 and "block reconstruction" not in est.text
    # block reconstruction asked for: its units are counted and timed, and no KD stage is
    est = estimate_run(override(cfg, "train.method=recon"))
    assert est.costs.kd_image == 0 and est.per_stage["finetune"] == 0 and "fine-tuning epochs" not in est.text
    assert est.costs.recon_units == 10 and est.per_stage["reconstruct"] > 0 and "block reconstruction" in est.text


def test_a_run_on_a_machine_short_of_memory_cuts_its_batches_and_says_so(monkeypatch, tmp_path):
    import gzq.budget
    from gzq.pipeline import iter_run
    monkeypatch.setattr(gzq.budget, "available_memory", lambda device: 1)   # not even MIN_BATCH images fit
    cfg = make_config("cpu", "cpu", students=["w4a4"], time_budget_s=None, export={"formats": []},
                      synth={"num_images": 32, "holdout_images": 4, "batch_size": 32, "steps": 10,
                             "warmup_steps": 3, "band": 1},
                      train={"epochs": 1, "batch_size": 16}, eval={"max_real_images": 100})
    events = list(iter_run(cfg, tmp_path / "run"))
    (note,) = [e.text for e in events if isinstance(e, Message) and e.text.startswith("estimated time")]
    assert "synthesis batch 32 -> 8, still more than memory holds" in note
    assert "fine-tuning batch 16 -> 8" in note
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    synth = report["config"]["synth"]
    # a quarter of the batch, four times the steps (the warm-up keeps its share): what ran, and what was saved
    assert (synth["batch_size"], synth["steps"], synth["warmup_steps"]) == (8, 40, 12)
    assert report["config"]["train"]["batch_size"] == 8 and report["budget"]["steps"] == 40


def test_counting_the_kept_bytes_leaves_no_graph_alive():
    import weakref

    from gzq.budget import _kept_bytes
    refs = []

    def fn():
        x = torch.randn(4, 8, requires_grad=True)
        y = torch.relu(x * 2)            # relu saves its own output for the backward
        refs.append(weakref.ref(y))
        return (y * y).sum()
    assert _kept_bytes(fn, 4) >= 4 * 8 * 4
    assert refs[0]() is None, "a reference cycle kept the measured graph alive"


@pytest.mark.parametrize("slack", [1e9, -1e9])
def test_fuse_branches_auto_chooses_by_the_held_out_kl_and_the_files_follow(repvgg, tmp_path, monkeypatch, slack):
    """students.fuse_branches=auto on a RepVGG: each student's fused copy is calibrated and scored on the held-out
    synthetic images beside it; the report and log give both KLs, the saved spec says which form won, and the saved
    student rebuilds in that form. The run gets a threading.Event for its stop flag, as the app's runs do: the fused
    copies are made from a teacher that carries no stop hooks (a copied Event cannot be). FUSE_KL_SLACK is forced
    here so that each outcome is exercised: a huge slack always fuses, a hugely negative one never does."""
    from safetensors.torch import save_file

    from gzq.checkpoint import load_student
    from gzq.pipeline import iter_run
    monkeypatch.setattr("gzq.pipeline.FUSE_KL_SLACK", slack)
    save_file(repvgg.state_dict(), str(tmp_path / "repvgg.safetensors"))
    cfg = make_config("cpu", "cpu", model={"name": "repvgg_a0", "checkpoint": str(tmp_path / "repvgg.safetensors"),
                                           "num_classes": 10, "in_chans": 1, "input_size": (1, 32, 32)},
                      students=[{"w_bits": 8, "a_bits": 8}], time_budget_s=None,   # fuse_branches: auto by default
                      export={"formats": []},
                      synth={"num_images": 16, "holdout_images": 8, "batch_size": 16, "steps": 2, "warmup_steps": 1,
                             "band": 1}, train={"epochs": 0})
    events = list(iter_run(cfg, tmp_path / "run", threading.Event()))   # a stop flag as the app passes it
    (row,) = json.loads((tmp_path / "run" / "report.json").read_text())["students"]
    fused = slack > 0
    assert row["fuse_branches"] is fused and set(row["fuse_branches_kl"]) == {"branches", "fused"}
    (msg,) = [e.text for e in events if isinstance(e, Message) and "re-parameterisable branches" in e.text]
    assert msg.startswith(f"w8a8: {'fused' if fused else 'kept'} the re-parameterisable branches")
    student, spec, _ = load_student(tmp_path / "run" / "students" / "w8a8.safetensors")
    assert spec.fuse_branches is fused
    convs = sum(isinstance(x, torch.nn.Conv2d) for x in student.modules())
    assert convs == (22 + 17 if fused else 44)   # fused: the 17 identity blocks keep their taps apart


def test_the_estimate_counts_each_calibration_of_each_student():
    """Adversarial synthesis calibrates every student when they join it (extra seeds included), and, unless it keeps
    them, the configurations once more after it; without it the students are calibrated once, after synthesis.
    Evaluation and saving count the students left after synthesis."""
    from gzq.budget import StepCosts, estimate, student_counts
    cfg = make_config("cpu", students=["w4a4", "w8a8"])
    assert cfg.synth.adversarial and not cfg.synth.keep_students and cfg.synth.steps > cfg.synth.warmup_steps
    no_join = f"synth.warmup_steps={cfg.synth.steps}"
    cases = {(): (2 + 2, 2), ("synth.num_students=3",): (3 + 2, 2),
             ("synth.num_students=3", "synth.keep_students=true"): (3, 3),
             ("synth.num_students=3", "synth.adversarial=false"): (3, 3),
             ("synth.num_students=3", "synth.keep_students=true", no_join): (3, 3),
             ("synth.num_students=3", no_join): (2, 2),
             ("synth.num_students=3", "synth.batch_size=1"): (2, 2),   # no batch holds two training images
             ("synth.num_students=3", f"synth.holdout_images={cfg.synth.num_images - 1}"): (2, 2)}
    costs = StepCosts(synth_image=1e-3, kd_image=1e-3, forward_image=1e-3)
    for changes, (calibrated, kept) in cases.items():
        c = override(cfg, *changes)
        every = max(c.synth.num_students, 2)
        assert student_counts(c, every)[:2] == (calibrated, kept), changes
        stages = estimate(c, costs, every).per_stage
        train = c.synth.num_images - c.synth.holdout_images
        assert stages["calibration"] == pytest.approx(2 * train * 1e-3 * calibrated), changes
        fresh = c.synth.holdout_images * c.eval.fresh_draws
        assert stages["evaluate"] == pytest.approx(fresh * 1e-3 * (1 + kept)), changes
    # a run given its images (the benchmarks' real-data bound) calibrates and keeps every student once
    c = override(cfg, "synth.num_students=3")
    assert student_counts(c, 3, given_images=True)[:2] == (3, 3)
    given = StepCosts(synth_image=1e-3, kd_image=1e-3, forward_image=1e-3, given_images=True)
    train = c.synth.num_images - c.synth.holdout_images
    assert estimate(c, given, 3).per_stage["calibration"] == pytest.approx(2 * train * 1e-3 * 3)


def test_the_fine_tuning_step_is_timed_over_the_students_fine_tuned(default_teacher):
    """Extra seeds that adversarial synthesis ends take no part in the timed fine-tuning step, nor in the timed
    forward that prices block reconstruction; kept, or where the run's images are given, they do (every student
    joins the timed synthesis step either way)."""
    from gzq.budget import measure_costs
    from gzq.config import student_specs
    from gzq.quant.convert import create_student
    t, ex = default_teacher, torch.zeros(2, *default_teacher.input_size)
    cfg = make_config("cpu", "cpu", students=["w4a4", "w8a8"], export={"formats": []},
                      synth={"num_images": 32, "holdout_images": 4, "batch_size": 16, "steps": 4, "warmup_steps": 2,
                             "num_students": 3}, train={"epochs": 1, "batch_size": 16})
    for changes, given, seed_kd in (((), False, False), (("synth.keep_students=true",), False, True),
                                    ((), True, True)):
        c = override(cfg, *changes)
        students = {n: create_student(t.model, s, ex, t.classifier) for n, s in student_specs(c)}
        calls = {n: [0, 0] for n in students}   # forwards without, with gradients
        for n, s in students.items():
            s.register_forward_hook(lambda m, a, o, c=calls[n]: c.__setitem__(torch.is_grad_enabled(),
                                                                             c[torch.is_grad_enabled()] + 1))
        costs = measure_costs(t, students, override(c, "train.method=recon"), torch.device("cpu"), memory=0,
                              given_images=given)
        assert (calls["w4a4_s1"][0] > 0) is seed_kd and calls["w4a4"][0] > 0, (changes, given, calls)
        assert costs.recon_units > 0 and costs.student_forward_image > 0
        for v in calls.values():
            v[:] = [0, 0]
        costs = measure_costs(t, students, c, torch.device("cpu"), memory=0, given_images=given)
        assert (calls["w4a4_s1"][1] == calls["w4a4"][1]) is seed_kd, (changes, given, calls)
        assert not any(calls[n][0] for n in students), calls   # no student is reconstructed
        assert costs.recon_units == 0 and costs.student_forward_image == 0
    # where no batch holds two training images the students never join synthesis: its timed step leaves them out
    for v in calls.values():
        v[:] = [0, 0]
    measure_costs(t, students, override(cfg, "synth.batch_size=1"), torch.device("cpu"), memory=0)
    assert calls["w4a4_s1"] == [0, 0] and calls["w4a4"][1] > 0, calls   # the configuration: KD only


def test_the_estimate_prices_the_fused_copies_that_auto_calibrates(repvgg):
    """students.fuse_branches=auto calibrates a fused copy beside each student it may fuse: the estimate's
    calibration stage counts them (none without anything to fuse, for block reconstruction, or with the branches
    kept), and no other stage changes."""
    from gzq.budget import StepCosts, estimate, fused_copies
    from gzq.quant.convert import has_branches
    cfg = make_config("cpu", students=["w4a4", "w8a8"])
    plain = timm.create_model("resnet18", num_classes=10, in_chans=1)
    assert has_branches(repvgg) and not has_branches(plain)
    assert fused_copies(cfg, True) == 2 and fused_copies(cfg, False) == 0
    assert fused_copies(override(cfg, "train.method=recon"), True) == 0
    assert fused_copies(override(cfg, "students.fuse_branches=false"), True) == 0
    # students kept from adversarial synthesis were calibrated there; extra seeds outlive plain synthesis only
    assert fused_copies(override(cfg, "synth.keep_students=true"), True) == 0
    assert fused_copies(override(cfg, "synth.num_students=3"), True) == 2
    assert fused_copies(override(cfg, "synth.num_students=3", "synth.adversarial=false"), True) == 3
    # a fused copy is weighed only where the students are calibrated after synthesis: not where adversarial
    # synthesis calibrated them and keeps them, but where it kept them without their joining it
    unjoined = override(cfg, "synth.keep_students=true", f"synth.warmup_steps={cfg.synth.steps}")
    assert fused_copies(unjoined, True) == 2
    costs = StepCosts(synth_image=1e-3, kd_image=1e-3, forward_image=1e-3)
    alone = estimate(cfg, costs, 2).per_stage
    costs.fused_copies = 2
    both = estimate(cfg, costs, 2).per_stage
    # four calibrations (both students when they join synthesis and after it), and two fused copies
    assert alone["calibration"] > 0 and both["calibration"] == pytest.approx(alone["calibration"] * 6 / 4)
    del both["calibration"], alone["calibration"]
    assert both == alone


def test_fuse_branches_auto_sees_a_fusion_that_keeps_the_conv_count():
    """RepGhost fuses an identity BN into its depthwise conv: as many convs after fusing as before, yet a different
    student, which the pipeline's check for "nothing re-parameterisable" must not take for an unchanged one."""
    import dataclasses

    from gzq.config import QuantSpec
    from gzq.pipeline import _n_layers
    from gzq.quant import create_student
    torch.manual_seed(0)
    m = timm.create_model("repghostnet_050", num_classes=10, in_chans=1).eval()
    x, spec = torch.zeros(2, 1, 32, 32), QuantSpec.parse("w8a8")
    fused = create_student(m, dataclasses.replace(spec, fuse_branches=True), x, "classifier", split=[])
    branched = create_student(m, spec, x, "classifier")
    convs = [sum(isinstance(q, nn.Conv2d) for q in s.modules()) for s in (fused, branched)]
    assert convs[0] == convs[1] and _n_layers(fused) < _n_layers(branched)
