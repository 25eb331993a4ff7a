import contextlib
import copy
import itertools

import pytest
import torch

from gzq.config import ImageParam, SynthConfig, TrainConfig
from gzq.distill import iter_distill
from gzq.models import find_bn_layers
from gzq.events import Preview, Progress, StageStarted, Stopped, drain
from gzq.losses import ensemble_log_probs, kl_teacher_student
from gzq.synthesis import balanced_labels, iter_synthesize


def test_synthesis_raises_bn_log_likelihood(default_teacher):
    cfg = SynthConfig(num_images=32, holdout_images=0, batch_size=32, steps=25, warmup_steps=25, preview_every=5,
                      band=1.0)
    events, result = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu"), seed=0))
    progress = [e for e in events if isinstance(e, Progress)]
    assert isinstance(events[0], StageStarted) and len(progress) == 25
    first, last = progress[0], progress[-1]
    assert last.bn_log_likelihood > first.bn_log_likelihood + 1.0
    assert len(last.layer_log_likelihood) == len(find_bn_layers(default_teacher.model)) == 21
    assert last.losses["ce"] < first.losses["ce"]
    previews = [e for e in events if isinstance(e, Preview)]
    assert len(previews) == 5 and previews[-1].images.shape == (32, 28, 28, 1)
    assert previews[-1].images.dtype.name == "uint8"
    assert result.steps_done == 25


@pytest.mark.slow
def test_students_join_after_warmup_and_holdout_is_kept_apart(default_teacher, new_student):
    students = {n: new_student(n) for n in ("w4a4", "w8a8")}
    cfg = SynthConfig(num_images=40, holdout_images=8, batch_size=20, steps=6, warmup_steps=3)
    events, result = drain(iter_synthesize(default_teacher, students, cfg, torch.device("cpu"), seed=0))
    progress = [e for e in events if isinstance(e, Progress)]
    assert all(not p.student_kl for p in progress[:3])
    assert all(set(p.student_kl) == {"w4a4", "w8a8"} and "kl_ens" in p.losses for p in progress[3:])
    assert result.students_calibrated
    assert len(result.holdout_idx) == 8 and not set(result.holdout_idx.tolist()) & set(result.train_idx.tolist())


def test_synthesis_is_deterministic_and_stops_within_a_step(default_teacher):
    cfg = SynthConfig(num_images=16, holdout_images=0, batch_size=16, steps=3, warmup_steps=3)
    a = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu"), seed=3))[1]
    b = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu"), seed=3))[1]
    assert torch.equal(a.images.mean, b.images.mean)
    calls = []
    stop = lambda: (calls.append(1), len(calls) > 2)[1]  # noqa: E731
    events, result = drain(iter_synthesize(default_teacher, {}, SynthConfig(num_images=16, holdout_images=0, steps=50,
                                                                          band=1.0), torch.device("cpu"), stop=stop))
    assert isinstance(events[-1], Stopped) and result.steps_done == 2
    calls.clear()   # a stop during the band probe (synth.band=auto) stops the run before its first step
    probing = SynthConfig(num_images=32, holdout_images=0, steps=200)
    assert probing.probes_band
    events, result = drain(iter_synthesize(default_teacher, {}, probing, torch.device("cpu"), stop=stop))
    assert isinstance(events[-1], Stopped) and result.steps_done == 0 and len(calls) <= 4
    assert all(not m._forward_pre_hooks for m in default_teacher.model.modules())   # hooks freed


def test_spectral_basis_round_trips_favours_low_frequencies_and_ends_in_pixels(default_teacher):
    from gzq.config import ImageBasis
    from gzq.images import SyntheticImages, dct_matrix, spectral_scale
    d = dct_matrix(9)
    assert torch.allclose(d @ d.T, torch.eye(9), atol=1e-5)                    # orthonormal
    for h, w in ((28, 28), (224, 160)):                                         # unit mean square at any size
        s = spectral_scale(h, w, 1.0)
        assert abs(s.pow(2).mean().item() - 1) < 1e-4 and s[0, 0] > 10 * s[-1, -1]
    lo, hi = default_teacher.pixel_bounds
    images = SyntheticImages(torch.arange(4), (1, 28, 28), (lo, hi), ImageParam.REPARAM, -2.5,
                             torch.Generator().manual_seed(0), ImageBasis.SPECTRAL)
    x = images(torch.arange(4), noise=False)
    assert x.shape == (4, 1, 28, 28) and (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
    assert torch.allclose(images._coefficients(images.pixels(images.mean)), images.mean, atol=1e-3)
    # a unit step in one coefficient moves the pixels along that frequency only, more at the low ones
    step = torch.zeros(1, 1, 28, 28)
    step[..., 1, 0] = 1.0
    low = images.pixels(step).norm()
    step.zero_()
    step[..., 20, 20] = 1.0
    assert low > 5 * images.pixels(step).norm()
    cfg = SynthConfig(num_images=16, holdout_images=0, batch_size=16, steps=15, warmup_steps=15,
                      image_basis=ImageBasis.SPECTRAL)
    events, result = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu"), seed=0))
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].bn_log_likelihood > progress[0].bn_log_likelihood + 1.0
    pixels = result.images
    assert not pixels.spectral and (pixels.mean >= lo - 1e-5).all() and (pixels.mean <= hi + 1e-5).all()
    before = pixels.mean.clone()
    assert torch.equal(pixels(torch.arange(16), noise=False), before.clamp(lo, hi))


def test_mix_pairs_blends_within_the_batch_and_stays_in_range():
    from gzq.augment import mix_pairs
    x = torch.rand(64, 1, 4, 4)
    assert mix_pairs(x, 0.0) is x
    g = torch.Generator().manual_seed(0)
    y = mix_pairs(x, 1.0, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert (y >= x.min() - 1e-6).all() and (y <= x.max() + 1e-6).all()      # convex blends
    assert torch.equal(y, mix_pairs(x, 1.0, torch.Generator().manual_seed(0)))   # reproducible
    # each output is l x_i + (1 - l) x_j for one partner j: the blend of flat images stays flat
    flat = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 3, 3)
    out = mix_pairs(flat, 0.5, g)
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))
    with pytest.raises(ValueError, match="mixup"):
        TrainConfig(mixup=-0.1)


def test_random_crops_zoom_each_image_by_its_own_crop_of_the_stated_area():
    from gzq.augment import random_crops
    side = 64
    ramp = torch.arange(side, dtype=torch.float32)
    x = torch.stack([ramp.view(1, side).expand(side, side), ramp.view(side, 1).expand(side, side)]).unsqueeze(0)
    x = x.repeat(32, 1, 1, 1)              # channel 0 counts columns, channel 1 rows
    assert random_crops(x, 1.0) is x
    g = torch.Generator().manual_seed(0)
    y = random_crops(x, 0.5, g)
    assert y.shape == x.shape and (y >= 0).all() and (y <= side - 1).all()
    width = (y[:, 0, 0, -1] - y[:, 0, 0, 0]) / (side - 1)      # the fraction of each side the crop kept
    height = (y[:, 1, -1, 0] - y[:, 1, 0, 0]) / (side - 1)
    area = width * height
    assert (area > 0.5 - 0.05).all() and (area < 1 + 1e-4).all() and area.std() > 0.05   # one crop per image
    assert (width / height).min() > 0.7 and (width / height).max() < 1.45
    assert torch.equal(y, random_crops(x, 0.5, torch.Generator().manual_seed(0)))        # reproducible
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(crop_scale=0.0)


def test_pixel_option_and_clamping(default_teacher):
    cfg = SynthConfig(num_images=8, holdout_images=0, batch_size=8, steps=2, warmup_steps=2,
                      image_param=ImageParam.PIXEL, lr=5.0)
    _, result = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu")))
    assert result.images.log_scale is None
    lo, hi = default_teacher.pixel_bounds
    assert (result.images.mean >= lo - 1e-6).all() and (result.images.mean <= hi + 1e-6).all()


@pytest.mark.slow
def test_students_kl_falls_during_finetuning(default_teacher, new_student):
    students = {"w3a3": new_student("w3a3")}
    cfg = SynthConfig(num_images=48, holdout_images=0, batch_size=48, steps=15, warmup_steps=15)
    _, synth = drain(iter_synthesize(default_teacher, students, cfg, torch.device("cpu")))
    from gzq.quant import calibrate_
    calibrate_(students["w3a3"], [synth.images(synth.train_idx, noise=False)])
    events, steps = drain(iter_distill(default_teacher, students, synth.images, synth.train_idx,
                                      TrainConfig(epochs=8, batch_size=16, lr=3e-4), torch.device("cpu")))
    kls = [e.student_kl["w3a3"] for e in events if isinstance(e, Progress)]
    assert steps == 24 and len(kls) == 24
    assert sum(kls[-6:]) / 6 < 0.7 * sum(kls[:6]) / 6


def test_helpers():
    g = torch.Generator().manual_seed(0)
    labels = balanced_labels(25, 10, g)
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    p = torch.log_softmax(torch.randn(5, 3), 1)
    assert abs(kl_teacher_student(p, p).item()) < 1e-6
    q1, q2 = torch.randn(5, 3), torch.randn(5, 3)
    ens = ensemble_log_probs([q1, q2])
    # appendix 1.2: the ensemble KL is a lower bound of the mean per-student KL
    mean_kl = (kl_teacher_student(p, torch.log_softmax(q1, 1)) + kl_teacher_student(p, torch.log_softmax(q2, 1))) / 2
    assert kl_teacher_student(p, ens) <= mean_kl + 1e-6


def test_single_student_fused_backward_equals_two_pass_reference(default_teacher, new_student):
    """With M = 1 one backward (gradient reversal) gives exactly the two objectives' gradients."""
    import copy

    from gzq.config import ImageParam
    from gzq.synthesis import SyntheticImages, _adversarial_backward_
    torch.manual_seed(0)
    student = new_student("w4a4")
    from gzq.quant import calibrate_
    images = SyntheticImages(torch.arange(8) % 10, (1, 28, 28), default_teacher.pixel_bounds, ImageParam.REPARAM,
                             -1.0, torch.Generator().manual_seed(0))
    calibrate_(student, [images(torch.arange(8), noise=False)])
    ref_student = copy.deepcopy(student)
    lam = 0.7
    z = torch.Generator().manual_seed(1)
    x = images(torch.arange(8), z)
    logits_t = default_teacher.model(x)
    base = x.pow(2).mean()
    _adversarial_backward_(base, x, logits_t, {"s": student}, images, lam, {})
    got_img = [images.mean.grad.clone(), images.log_scale.grad.clone()]
    got_w = [p.grad.clone() for p in student.parameters()]
    # reference: two separate objectives with autograd.grad
    images.zero_grad()
    x = images(torch.arange(8), torch.Generator().manual_seed(1))
    logits_t = default_teacher.model(x)
    p_log = torch.log_softmax(logits_t, 1)
    q_log = torch.log_softmax(ref_student(x), 1)
    img_obj = x.pow(2).mean() - lam * kl_teacher_student(p_log, q_log)
    ref_img = torch.autograd.grad(img_obj, [images.mean, images.log_scale], retain_graph=True)
    ref_w = torch.autograd.grad(kl_teacher_student(p_log.detach(), q_log), list(ref_student.parameters()))
    for g, r in zip(got_img, ref_img):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    for g, r in zip(got_w, ref_w):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_pipeline_finetunes_fresh_students_unless_asked_to_keep_them(monkeypatch, new_student):
    """After synthesis the adversaries are set back to their initial weights and calibrated on the final
    images; extra seeds of a configuration end with synthesis. keep_students carries them all on."""
    import gzq
    import gzq.pipeline as pipeline
    seen = {}
    real_distill = pipeline.iter_distill

    def spy(teacher, students, *a, **k):
        seen["names"] = list(students)
        seen["weights"] = {n: s.get_submodule("conv1").module.weight.detach().clone() for n, s in students.items()}
        return (yield from real_distill(teacher, students, *a, **k))

    monkeypatch.setattr(pipeline, "iter_distill", spy)
    synth = dict(num_images=24, holdout_images=4, batch_size=24, steps=6, warmup_steps=2, num_students=2)
    for keep in (False, True):
        cfg = gzq.make_config("cpu", "cpu", students=["w4a4"], synth=dict(synth, keep_students=keep),
                              train=dict(epochs=1, method="kd"), eval=dict(max_real_images=200))
        report = gzq.run(cfg)   # the one-call form: iter_run drained, its report returned
        names = [s["name"] for s in report["students"]]
        assert names == seen["names"] == (["w4a4", "w4a4_s1"] if keep else ["w4a4"])
        fresh = new_student("w4a4").get_submodule("conv1").module.weight
        assert torch.equal(seen["weights"]["w4a4"], fresh) != keep   # trained during synthesis only if kept


def test_coarse_warmup_shows_the_teacher_smaller_images_then_full_size(default_teacher):
    from gzq.augment import coarse_size
    assert coarse_size((3, 224, 224), 0.5, 64) == (112, 112)
    assert coarse_size((3, 96, 128), 0.5, 32) == (48, 64)
    assert coarse_size((1, 64, 64), 0.5, 64) is None    # small inputs keep their size
    assert coarse_size((3, 224, 224), 1.0, 64) is None
    seen = []
    hook = default_teacher.model.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    cfg = SynthConfig(num_images=16, holdout_images=0, batch_size=16, steps=5, warmup_steps=3, coarse_scale=0.5,
                      coarse_min_side=8, augment_check_at=1.0, band=1.0)
    try:
        _, result = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu"), seed=0))
    finally:
        hook.remove()
    assert seen[:5] == [(14, 14)] * 3 + [(28, 28)] * 2    # then the flip check at the last step, at full size
    assert set(seen[5:]) == {(28, 28)}
    assert result.images(torch.arange(16), noise=False).shape[-2:] == (28, 28)
    with pytest.raises(ValueError, match="coarse_scale"):
        SynthConfig(coarse_scale=0.01)


def test_label_smoothing_keeps_the_class_without_saturating_the_teacher(default_teacher):
    def top_probs(smoothing):
        cfg = SynthConfig(num_images=32, holdout_images=0, batch_size=32, steps=30, warmup_steps=30,
                          label_smoothing=smoothing)
        _, res = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu"), seed=0))
        with torch.no_grad():
            p = default_teacher.model(res.images(torch.arange(32), noise=False)).softmax(1)
        return p.max(1).values.mean().item(), (p.argmax(1) == res.images.labels).float().mean().item()
    (sharp, agree_sharp), (smooth, agree_smooth) = top_probs(0.0), top_probs(0.5)
    assert agree_sharp >= 0.9 and agree_smooth >= 0.9
    assert smooth < sharp - 0.05, (smooth, sharp)
    with pytest.raises(ValueError, match="label_smoothing"):
        SynthConfig(label_smoothing=1.0)


def _images_and_calibrated_student(teacher, new_student):
    """(48 synthetic images of the bundled model, their means, a W3A3 student calibrated on them)."""
    from gzq.quant import calibrate_
    cfg = SynthConfig(num_images=48, holdout_images=0, batch_size=48, steps=15, warmup_steps=15)
    _, synth = drain(iter_synthesize(teacher, {}, cfg, torch.device("cpu")))
    x = synth.images(synth.train_idx, noise=False)
    base = new_student("w3a3")
    calibrate_(base, [x])
    return synth, x, base


def _error_after_kd(teacher, base, synth, error, **train) -> float:
    """error(student) after a short KD of a copy of `base` on the images, with TrainConfig fields `train`."""
    s = copy.deepcopy(base)
    drain(iter_distill(teacher, {"s": s}, synth.images, synth.train_idx,
                       TrainConfig(epochs=6, batch_size=16, lr=3e-4, **train), torch.device("cpu")))
    return error(s)


def test_feature_kd_fits_the_unit_outputs_of_the_folded_teacher(default_teacher, new_student):
    """train.feature_kd: the folded reference computes the teacher's function, its units are the students',
    and KD with the unit term leaves the student nearer the teacher inside the network than KD on logits."""
    from gzq.distill import folded_reference, unit_outputs
    from gzq.losses import feature_loss
    synth, x, base = _images_and_calibrated_student(default_teacher, new_student)
    ref, units = folded_reference(default_teacher, {"s": base}, x[:2])
    assert len(units) >= 5
    with torch.no_grad():
        assert torch.allclose(ref(x), default_teacher.model(x), atol=1e-4, rtol=1e-4)

    def unit_error(student):
        with torch.no_grad(), unit_outputs(ref, units) as t, unit_outputs(student, units) as s:
            ref(x), student(x)
            return feature_loss(s, t).item()

    errors = {w: _error_after_kd(default_teacher, base, synth, unit_error, feature_kd=w) for w in (0.0, 5.0)}
    assert errors[5.0] < 0.8 * errors[0.0], errors
    with pytest.raises(ValueError, match="feature_kd"):
        TrainConfig(feature_kd=-1)


def test_stats_kd_moves_the_students_channel_moments_toward_the_teachers(default_teacher, new_student):
    """train.stats_kd: the term is zero for the teacher's own moments, does not change when a channel and its
    real-data variance are rescaled together, and KD with it leaves the student's per-channel batch moments at
    the folded convs nearer the teacher's than KD on the logits alone."""
    from gzq.distill import folded_conv_scales, folded_copy, output_moments
    from gzq.losses import moment_loss
    m, v = torch.randn(8), torch.rand(8) + 0.5
    g = torch.rand(8) + 0.1
    assert moment_loss({"a": (m, v)}, {"a": (m, v)}, {"a": g}).item() == 0
    m2, v2 = m + 0.3, v * 1.5
    k = 7.0   # a channel scaled by k: its moments by k and k^2, its real-data variance by k^2
    assert moment_loss({"a": (k * m2, k * k * v2)}, {"a": (k * m, k * k * v)}, {"a": k * k * g}).item() == \
        pytest.approx(moment_loss({"a": (m2, v2)}, {"a": (m, v)}, {"a": g}).item(), rel=1e-5)

    synth, x, base = _images_and_calibrated_student(default_teacher, new_student)
    scales = folded_conv_scales(default_teacher.model, {"s": base}, x[:2])
    assert len(scales) >= 5 and all(bool((g > 0).all()) for g in scales.values())
    ref = folded_copy(default_teacher, x[:2])

    def moment_error(student):
        with torch.no_grad(), output_moments(ref, list(scales)) as t, output_moments(student, list(scales)) as s:
            ref(x), student(x)
            return moment_loss(s, t, scales).item()

    errors = {w: _error_after_kd(default_teacher, base, synth, moment_error, stats_kd=w) for w in (0.0, 10.0)}
    assert errors[10.0] < 0.8 * errors[0.0], errors
    with pytest.raises(ValueError, match="stats_kd"):
        TrainConfig(stats_kd=-1)


def test_band_limited_images_hold_no_frequency_above_the_band(default_teacher):
    """synth.band: the images (means and their draws' means) carry no DCT power above the kept share."""
    from gzq.images import SyntheticImages, dct_matrix
    cfg = SynthConfig(num_images=8, holdout_images=0, batch_size=8, steps=3, warmup_steps=3, band=0.25)
    _, result = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu")))
    d = dct_matrix(28)

    def high_share(x):   # share of the DCT power outside the lowest 7 of 28 frequencies on either axis
        c = d @ x @ d.T
        return ((c[..., 7:, :].pow(2).sum() + c[..., :7, 7:].pow(2).sum()) / c.pow(2).sum()).item()

    assert high_share(result.images(torch.arange(8), noise=False)) < 0.01   # only clamping to the pixel range leaks
    raw = SyntheticImages(torch.zeros(4, dtype=torch.long), (1, 28, 28), default_teacher.pixel_bounds, "reparam",
                          -2.5, torch.Generator().manual_seed(0), "spectral", 1.0, band=0.25)
    assert high_share(raw.pixels(raw.mean.detach())) < 1e-10
    full = SynthConfig(num_images=8, holdout_images=0, batch_size=8, steps=3, warmup_steps=3)
    _, r_full = drain(iter_synthesize(default_teacher, {}, full, torch.device("cpu")))
    assert high_share(r_full.images(torch.arange(8), noise=False)) > 0.05
    with pytest.raises(ValueError, match="band"):
        SynthConfig(band=0.5, image_basis="pixel")
    with pytest.raises(ValueError, match="band"):
        SynthConfig(band=0)


def test_decorrelated_colour_images_vary_in_luminance_more_than_in_hue():
    """synth.decorrelate_colour: for 3-channel inputs the image parameters are decorrelated colour components
    (luminance first), so images of random parameters have strongly correlated RGB channels where one parameter
    per channel gives independent ones; the transform inverts exactly, holds the images' mean square, and leaves
    1-channel inputs as they were."""
    from gzq.images import SyntheticImages
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])   # timm's ImageNet
    bounds = ((-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1))

    def images(channels, colour):
        b = bounds if channels == 3 else (bounds[0][:, :1], bounds[1][:, :1])
        return SyntheticImages(torch.zeros(16, dtype=torch.long), (channels, 32, 32), b, "reparam", -2.5,
                               torch.Generator().manual_seed(0), "spectral", 1.0, decorrelate_colour=colour)

    def rgb_correlation(im):   # mean over images of the correlation of R and G pixel values
        px = im.pixels(im.mean.detach()) * std.view(1, 3, 1, 1)
        return torch.stack([torch.corrcoef(p.flatten(1))[0, 1] for p in px]).mean().item()

    plain, colour = images(3, False), images(3, True)
    assert abs(rgb_correlation(plain)) < 0.1 and rgb_correlation(colour) > 0.8
    x = colour.pixels(colour.mean.detach())
    assert torch.allclose(colour.pixels(colour._coefficients(x)), x, atol=1e-5)
    assert x.pow(2).mean().item() == pytest.approx(plain.pixels(plain.mean.detach()).pow(2).mean().item(), rel=0.3)
    grey, grey_colour = images(1, False), images(1, True)
    assert grey_colour.colour is None and torch.equal(grey.pixels(grey.mean), grey_colour.pixels(grey_colour.mean))
    with pytest.raises(ValueError, match="decorrelate_colour"):
        SynthConfig(decorrelate_colour=True, image_basis="pixel", band=1)


@pytest.mark.slow
def test_band_auto_keeps_the_full_band_natively_and_narrows_it_for_an_upsampled_teacher(default_teacher,
                                                                                         monkeypatch):
    """synth.band=auto: the bundled 28-px model needs its fine frequencies; the same network reading a
    downsized view of 112-px inputs (a teacher of upsampled images) is matched better by narrower images."""
    import dataclasses

    import gzq.config
    monkeypatch.setattr(gzq.config, "BAND_PROBE_SHARE", 100.0)   # a full probe ahead of a 4-step synthesis

    import torch.nn.functional as F
    from torch import nn

    from gzq.events import Message
    from gzq.synthesis import choose_band

    class Downsized(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False))

    cfg = SynthConfig(num_images=32, holdout_images=0, batch_size=32, steps=4, warmup_steps=4, band="auto")
    events, result = drain(iter_synthesize(default_teacher, {}, cfg, torch.device("cpu")))
    assert result.band == 1.0 and set(result.band_probe) == {1.0, 0.5}
    assert result.band_probe[1.0] < result.band_probe[0.5]
    assert any(isinstance(e, Message) and "image band: 1 " in e.text for e in events)
    big = dataclasses.replace(default_teacher, model=Downsized(default_teacher.model).eval(), input_size=(1, 112, 112))
    band, losses = choose_band(big, cfg, torch.device("cpu"))
    assert band < 1 and losses[band] < losses[1.0]
    assert SynthConfig(band="0.25").band == 0.25
    with pytest.raises(ValueError, match="band"):
        SynthConfig(band="wide")


def test_band_auto_needs_no_probe_in_the_pixel_basis_or_without_steps(default_teacher):
    from gzq.synthesis import choose_band
    pixel = SynthConfig(num_images=8, holdout_images=0, batch_size=8, steps=2, warmup_steps=2, image_basis="pixel")
    assert pixel.band == "auto" and choose_band(default_teacher, pixel, torch.device("cpu")) == (1.0, {})
    _, result = drain(iter_synthesize(default_teacher, {}, pixel, torch.device("cpu")))
    assert result.band == 1.0 and result.band_probe == {}
    idle = SynthConfig(num_images=8, holdout_images=0, batch_size=8, steps=0, warmup_steps=0)
    assert choose_band(default_teacher, idle, torch.device("cpu")) == (1.0, {})


def test_band_probe_is_sized_by_the_synthesis_and_skipped_where_it_would_dominate(default_teacher):
    """The probe holds at most BAND_PROBE_SHARE of the synthesis's images x steps: the benchmark budgets keep
    its 32 images, a budget fitted to a slow 224-px model gets a smaller one, and the smallest runs none
    (full band, said in a message)."""
    from gzq.config import BAND_CANDIDATES, BAND_PROBE_MIN_IMAGES, BAND_PROBE_STEPS
    from gzq.events import Message
    assert SynthConfig(num_images=128, steps=150).band_probe_images() == 32
    assert SynthConfig(num_images=256, steps=300).band_probe_images() == 32
    assert SynthConfig(num_images=130, steps=76).band_probe_images() == 18
    assert SynthConfig(num_images=32, steps=40).band_probe_images() == 0      # the budget fit's floor
    assert (SynthConfig(num_images=130, steps=76).band_probe_image_steps()
            == 18 * BAND_PROBE_STEPS * len(BAND_CANDIDATES))
    for cfg in (SynthConfig(band=0.5), SynthConfig(image_basis="pixel"), SynthConfig(steps=0, warmup_steps=0)):
        assert cfg.band_probe_images() == 0 and not cfg.probes_band and cfg.band_probe_image_steps() == 0
    small = SynthConfig(num_images=16, holdout_images=0, batch_size=16, steps=3, warmup_steps=3)
    assert small.band == "auto" and small.band_probe_images() < BAND_PROBE_MIN_IMAGES and not small.probes_band
    events, result = drain(iter_synthesize(default_teacher, {}, small, torch.device("cpu")))
    assert result.band == 1.0 and not result.band_probe
    assert any(isinstance(e, Message) and "not probed" in e.text for e in events)


def test_anchor_keeps_the_kd_weights_near_the_teachers(default_teacher, new_student):
    """train.anchor: after KD with the weights pulled back toward their starting (BN-folded teacher) values,
    the quantized layers' weights have drifted far less than after KD without; biases stay free."""
    from gzq.quant.convert import quant_wrappers
    synth, _, base = _images_and_calibrated_student(default_teacher, new_student)
    start = {n: (w.module.weight.detach().clone(), w.module.bias.detach().clone()) for n, w in quant_wrappers(base)}

    def drift(student):
        wrappers = dict(quant_wrappers(student))
        return sum((wrappers[n].module.weight - w0).pow(2).sum().item() for n, (w0, _) in start.items()), \
            sum((wrappers[n].module.bias - b0).pow(2).sum().item() for n, (_, b0) in start.items())

    (w_free, b_free), (w_anchored, b_anchored) = (_error_after_kd(default_teacher, base, synth, drift, anchor=a)
                                                  for a in (0.0, 0.3))
    assert w_free > 0 and w_anchored < 0.2 * w_free, (w_free, w_anchored)
    assert b_anchored > 0.2 * b_free, (b_free, b_anchored)
    with pytest.raises(ValueError, match="anchor"):
        TrainConfig(anchor=1.5)


def test_act_warmup_phases_activation_quantization_in(default_teacher, new_student, monkeypatch):
    """train.act_warmup: under act_dropout each element of a quantizer's output is its float input with
    probability p (p 1: the float-activation network, p 0: the quantized one, p 0.5: about half the elements);
    in KD p falls linearly from 0.5 to 0 over the warm-up's share of the steps, and no hook outlives KD."""
    from gzq import distill
    from gzq.quant import ActQuantizer
    synth, x, base = _images_and_calibrated_student(default_teacher, new_student)
    quantizers = [m for m in base.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad():
        quantized = base(x)
        for q in quantizers:
            q.forward = lambda t: t
        float_acts = base(x)
        for q in quantizers:
            del q.forward
        gen = torch.Generator().manual_seed(0)
        with distill.act_dropout([base], gen) as box:
            assert torch.equal(base(x), quantized)
            box["p"] = 1.0
            assert torch.equal(base(x), float_acts)
            box["p"] = 0.5
            q = quantizers[2]
            seen = {}
            h = q.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
            out = q(torch.randn(4, 64, 7, 7) * 3)
            h.remove()
            kept = (out == seen["in"]).float().mean().item()
            assert 0.45 < kept < 0.6, kept     # half kept float, plus the few values the grid holds exactly
        assert torch.equal(base(x), quantized)

    shares = []

    class Box(dict):
        def __setitem__(self, k, v):
            shares.append(v)
            super().__setitem__(k, v)

    real = distill.act_dropout

    @contextlib.contextmanager
    def recording(models, gen):
        with real(models, gen) as box:
            rec = Box(box)
            yield rec
            box.update(rec)

    monkeypatch.setattr(distill, "act_dropout", recording)
    s = copy.deepcopy(base)
    drain(distill.iter_distill(default_teacher, {"s": s}, synth.images, synth.train_idx,
                               TrainConfig(epochs=4, batch_size=16, act_warmup=0.5), torch.device("cpu")))
    assert len(shares) == 12 and shares[0] == 0.5 and shares[6] == 0 and shares[-1] == 0, shares
    assert all(a > b for a, b in itertools.pairwise(shares[:7])), shares
    assert not any(q._forward_hooks for q in s.modules() if isinstance(q, ActQuantizer))
    with pytest.raises(ValueError, match="act_warmup"):
        TrainConfig(act_warmup=-0.1)


def test_refit_rounds_train_again_only_the_students_that_have_not_fit(default_teacher, new_student):
    """train.refit_rounds: a student that gives the teacher's class on under refit_below % of the training images
    after KD gets another round (a Message says so, the step count grows), one that fits is left as it was after
    the first round, and with nobody under the threshold the run is bit-identical to one round."""
    from gzq.distill import fit_agreement
    from gzq.events import Message
    from gzq.quant import calibrate_
    synth, x, _ = _images_and_calibrated_student(default_teacher, new_student)
    base = {}
    for name in ("w8a8", "w2a2"):
        base[name] = new_student(name)
        calibrate_(base[name], [x])

    def kd(names, **train):
        students = {n: copy.deepcopy(base[n]) for n in names}
        events = list(iter_distill(default_teacher, students, synth.images, synth.train_idx,
                                   TrainConfig(**{"epochs": 2, "batch_size": 16, **train}), torch.device("cpu")))
        steps = [e.step for e in events if isinstance(e, Progress)]
        return students, steps, [e.text for e in events if isinstance(e, Message)]

    one, steps_one, _ = kd(["w8a8", "w2a2"])
    fits = {n: fit_agreement(default_teacher.model, s, synth.images, synth.train_idx, torch.device("cpu"))
            for n, s in one.items()}
    assert fits["w8a8"] >= 90 > fits["w2a2"], fits
    same, steps_same, notes = kd(["w8a8", "w2a2"], refit_rounds=2, refit_below=0)
    assert steps_same == steps_one and not notes
    assert all(torch.equal(a, b) for n in one for a, b in zip(one[n].state_dict().values(),
                                                              same[n].state_dict().values()))
    more, steps_more, notes = kd(["w8a8", "w2a2"], refit_rounds=1, refit_below=90)
    assert len(steps_more) == 2 * len(steps_one) and len(notes) == 1 and "w2a2" in notes[0] and "w8a8" not in notes[0]
    assert all(torch.equal(a, b) for a, b in zip(one["w8a8"].state_dict().values(), more["w8a8"].state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(one["w2a2"].state_dict().values(),
                                                     more["w2a2"].state_dict().values()))
    assert kd(["w2a2"], epochs=0, refit_rounds=2, refit_below=100)[1:] == ([], [])   # no KD: no rounds either
    with pytest.raises(ValueError, match="refit_rounds"):
        TrainConfig(refit_rounds=-1)
