"""Typed, self-validating configuration. Every run saves its RunConfig next to its results.

Choices are enums (serialised by value); every dataclass round-trips through to_dict()/from_dict().
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import re
from dataclasses import dataclass, field
from typing import Any


class ImageParam(str, enum.Enum):
    """How a synthetic image is parameterised (docs/design.md 2.1)."""
    REPARAM = "reparam"  # x = m + exp(s) * z, z ~ N(0, I) fresh each step (generative, GZNQ)
    PIXEL = "pixel"      # x = m (ZeroQ / DeepInversion)


class ImageBasis(str, enum.Enum):
    """The coordinates the image means are optimised in (docs/design.md 2.1)."""
    PIXEL = "pixel"      # one parameter per pixel: every spatial frequency moves as fast as any other
    SPECTRAL = "spectral"  # orthonormal 2-D DCT coefficients scaled by 1/f^spectral_decay (normalised to unit
                           # mean square): low frequencies move first, as in natural images (Olah et al., 2017)


class BNLoss(str, enum.Enum):
    """Which BatchNorm-statistics loss drives synthesis (docs/design.md 2.2)."""
    LIKELIHOOD = "likelihood"  # GZNQ appendix 1.1: Gaussian NLL of the batch statistics
    MSE = "mse"                # DeepInversion: ||mu_hat - mu||_2 + ||var_hat - var||_2


class VRule(str, enum.Enum):
    """Variance of the batch-variance statistic, V = Var[(Wx - mu)^2]."""
    GAUSSIAN = "gaussian"    # 2 sigma^4
    EMPIRICAL = "empirical"  # detached 4th central moment of the batch minus var_hat^2


class NRule(str, enum.Enum):
    """Number of samples behind each batch statistic."""
    BATCH = "batch"            # N = B
    BATCH_SPATIAL = "batch_spatial"  # N = B * H * W


class FlipMode(str, enum.Enum):
    """Horizontal flips during synthesis and fine-tuning. Only valid where the teacher is mirror-invariant
    (digits and text are not): AUTO keeps them only while the teacher holds the labels of flipped batches
    (SynthConfig.augment_check)."""
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Protocol(str, enum.Enum):
    """Which layers get the target bits (recorded in every result)."""
    ALL_LAYERS = "all_layers"          # GDFQ / SynQ: every conv and linear at target bits
    FIRST_LAST_8BIT = "first_last_8bit"  # BRECQ / Genie: first conv and last linear at 8 bit
    DEPLOYABLE = "deployable"          # fully quantized: every tensor an integer runtime reads or writes (the
                                       # network input at 8 bit, residual adds, pooling, concatenation), as
                                       # onnxruntime's quantize_static; gzq.quant.graph places the quantizers


class FinetuneMethod(str, enum.Enum):
    """How the students are fitted to the teacher on the synthetic images (docs/design.md 2.5)."""
    AUTO = "auto"            # by bit-width: TrainConfig.method_for
    KD = "kd"                # end-to-end knowledge distillation (KL of the logits)
    RECON = "recon"          # block reconstruction: AdaRound rounding + LSQ steps + QDrop, unit by unit
    RECON_KD = "recon+kd"    # block reconstruction, then KD
    CALIBRATE = "calibrate"  # step sizes calibrated on the synthetic images, no fine-tuning

    @property
    def recon(self) -> bool:
        return self in (FinetuneMethod.RECON, FinetuneMethod.RECON_KD)

    @property
    def kd(self) -> bool:
        return self in (FinetuneMethod.KD, FinetuneMethod.RECON_KD)


class ActInit(str, enum.Enum):
    """How activation step sizes are initialised from synthetic data."""
    MSE = "mse"                  # the range with the least squared error over every calibration value
    PERCENTILE = "percentile"    # the range that holds the central act_percentile % of the values
    AUTO = "auto"                # percentile at <= AUTO_PERCENTILE_BITS-bit activations, MSE at more bits

    def resolve(self, bits: int) -> "ActInit":
        """The method a quantizer of `bits` bits uses (AUTO chosen on the zoo's tuning set, see README)."""
        if self != ActInit.AUTO:
            return self
        return ActInit.PERCENTILE if bits <= AUTO_PERCENTILE_BITS else ActInit.MSE


# Synthetic image sets can carry the BN statistics' variance in a few images whose activations are far above
# the rest; a squared-error range follows those tails, which at 4 bits leaves too few levels for the bulk.
AUTO_PERCENTILE_BITS = 4

#: students.fuse_branches=auto (gzq.pipeline): a calibrated fused student replaces the branched one where its KL to the
#: teacher on the held-out synthetic images exceeds the branched student's by at most this much (nats, mean per
#: image). Set on seed 0 of the zoo's W8A8 deployable runs, fusing each block into one conv: RepViT and FastViT fused
#: -0.0004 / +0.00002 (no loss on real images), RepVGG +0.043 (-4.0 pt) and MobileOne +0.036 (-4.4 pt; a ratio of
#: KLs, 1.16 there, did not tell it). With the identity taps kept apart (SPLIT_MIN_GAIN) all four fuse within it at
#: 8 bits, and FastViT and RepGhost keep their branches at 4 bits
FUSE_KL_SLACK = 1e-3

#: students.fuse_branches (gzq.quant.convert.split_identity_): fusing folds a block's identity BN into one centre tap
#: per output channel (gamma / sqrt(var + eps), often far above the other taps), and a per-channel weight grid then
#: spends its range on that tap. A fused conv keeps those taps apart, as a depthwise 1x1 conv added to its output,
#: where that lowers its weight quantization error (squared, at the student's weight bits) by at least this factor.
#: Trained zoo models' ratios at 8 bits: RepVGG 53-570, MobileOne 1.5-2.3 or 4.6-1544, FastViT 1.02-1.05 or 30-11419,
#: RepViT 1.4-3.9; random-weight ResNet-18 / RegNetX / MobileNetV2 convs 1.00-1.27
SPLIT_MIN_GAIN = 4.0

#: students.act_percentile=auto (gzq.quant.convert.calibrate_): the percentiles tried for the percentile-calibrated
#: (4-bit) activation ranges, judged by the calibrated student's KL to the teacher on held-out synthetic images.
#: AUTO_PERCENTILE_FALLBACK stays unless another gives under AUTO_PERCENTILE_MARGIN times its KL; it is also what
#: a calibration with nothing to judge by uses.
AUTO_PERCENTILES = (99.5, 99.9, 99.99)
AUTO_PERCENTILE_FALLBACK = 99.9
AUTO_PERCENTILE_MARGIN = 0.75


def _check_range(name: str, value, lo, hi):
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")


def _check_positive(name: str, value, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class _Serialisable:
    """to_dict / from_dict for nested dataclasses with enum fields."""

    def to_dict(self) -> dict[str, Any]:
        def conv(v):
            if isinstance(v, enum.Enum):
                return v.value
            if dataclasses.is_dataclass(v):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [conv(i) for i in v]
            return v
        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}; known: {sorted(known)}")
        hints = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            default = hints[k].default
            nested = _NESTED.get((cls.__name__, k))
            if nested is not None:
                v = [nested.from_dict(i) for i in v] if isinstance(v, list) else nested.from_dict(v)
            elif isinstance(default, enum.Enum):
                v = type(default)(v)
            elif isinstance(v, list) and isinstance(default, tuple):
                v = tuple(v)
            out[k] = v
        return cls(**out)


@dataclass
class ModelSpec(_Serialisable):
    """Which teacher to load.

    name: "default" (the bundled Fashion-MNIST model) or a timm architecture name.
    checkpoint: local weights (safetensors or a PyTorch file) for that architecture.
    pretrained: download the architecture's pretrained weights from the hub (ignored with a checkpoint).
    num_classes / in_chans / input_size / mean / std: overrides where the checkpoint differs from timm's config.
    """
    name: str = "default"
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    in_chans: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("model name must be 'default' or a timm architecture name, got an empty name")
        self.name = self.name.strip()
        if self.num_classes is not None:
            _check_positive("num_classes", self.num_classes)
        if self.in_chans is not None:
            _check_range("in_chans", self.in_chans, 1, 4)
        if self.input_size is not None:
            self.input_size = tuple(int(v) for v in self.input_size)
            if len(self.input_size) != 3 or min(self.input_size) < 1 or min(self.input_size[1:]) < 8:
                raise ValueError(f"input_size must be (C, H, W) with H, W >= 8, got {self.input_size}")
        for nm in ("mean", "std"):
            v = getattr(self, nm)
            if v is not None:
                setattr(self, nm, tuple(float(i) for i in v))
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")


_STUDENT_RE = re.compile(r"^w(\d+)a(\d+)$")


@dataclass
class QuantSpec(_Serialisable):
    """One quantized configuration (docs/design.md 2.5).

    Weights: per output channel, symmetric by default. Activations: per tensor, asymmetric,
    learnable step size (LSQ), at the input of every quantized conv/linear but the first (the network
    input stays float), or with the deployable protocol on every tensor an integer runtime reads.
    """
    w_bits: int = 4
    a_bits: int = 4
    protocol: Protocol = Protocol.ALL_LAYERS
    w_symmetric: bool = True
    act_init: ActInit = ActInit.AUTO
    act_percentile: float | str = "auto"   # a percentile, or "auto": chosen per run among AUTO_PERCENTILES
    fuse_branches: bool | str = "auto"   # networks timm re-parameterises (RepVGG, MobileOne, FastViT, RepGhost...):
                                  # True quantizes the fused inference form (timm's reparameterize_model) instead of
                                  # each training branch, a faster file; "auto" (the pipeline) fuses where the
                                  # held-out synthetic KL allows (FUSE_KL_SLACK; README, "Re-parameterisable");
                                  # False keeps every branch

    def __post_init__(self):
        self.w_bits, self.a_bits = int(self.w_bits), int(self.a_bits)
        if isinstance(self.fuse_branches, str) and self.fuse_branches.strip().lower() == "auto":
            self.fuse_branches = "auto"
        elif type(self.fuse_branches) is not bool:
            raise ValueError(f"fuse_branches is true, false or auto, got {self.fuse_branches!r}")
        _check_range("w_bits", self.w_bits, 2, 8)
        _check_range("a_bits", self.a_bits, 2, 8)
        self.protocol = Protocol(self.protocol)
        self.act_init = ActInit(self.act_init)
        if isinstance(self.act_percentile, str) and self.act_percentile.strip().lower() == "auto":
            self.act_percentile = "auto"
        else:
            try:
                self.act_percentile = float(self.act_percentile)
            except (TypeError, ValueError):
                raise ValueError(f"act_percentile must be a number in 50..100 or 'auto', "
                                 f"got {self.act_percentile!r}") from None
            _check_range("act_percentile", self.act_percentile, 50.0, 100.0)

    @property
    def probes_percentile(self) -> bool:
        """Whether calibration chooses this student's percentile per run: act_percentile="auto" with percentile
        ranges at its activation width (the other quantizers of a protocol are at that width or wider)."""
        return self.act_percentile == "auto" and self.act_init.resolve(self.a_bits) == ActInit.PERCENTILE

    @property
    def name(self) -> str:
        suffix = {Protocol.ALL_LAYERS: "", Protocol.FIRST_LAST_8BIT: "_fl8", Protocol.DEPLOYABLE: "_dep"}[self.protocol]
        return f"w{self.w_bits}a{self.a_bits}{suffix}"

    @classmethod
    def parse(cls, text: str, protocol: Protocol | str = Protocol.ALL_LAYERS) -> "QuantSpec":
        """'w4a4' -> QuantSpec(4, 4). Raises a ValueError that says what the format is."""
        m = _STUDENT_RE.match(text.strip().lower())
        if not m:
            raise ValueError(f"student {text!r} is not of the form w<bits>a<bits>, e.g. w4a4 or w8a8")
        return cls(w_bits=int(m.group(1)), a_bits=int(m.group(2)), protocol=protocol)


#: synth.band=auto (gzq.synthesis.choose_band): the bands probed, widest first (the probe stops at the first
#: that matches the BN statistics worse than the one before), and each probe's images (at most) and teacher-only
#: steps. The probe of every band together holds at most BAND_PROBE_SHARE of the synthesis's images x steps, so
#: that a budget fitted to a slow model does not go to the probe; one that would need fewer than
#: BAND_PROBE_MIN_IMAGES images is not run, and the images keep the full band.
BAND_CANDIDATES = (1.0, 0.5, 0.25, 0.125)
BAND_PROBE_IMAGES = 32
BAND_PROBE_STEPS = 40
BAND_PROBE_SHARE = 0.3
BAND_PROBE_MIN_IMAGES = 8


@dataclass
class SynthConfig(_Serialisable):
    """Image synthesis (docs/design.md 2.1-2.4).

    L_img = lambda_bn L_BN + lambda_ce CE - lambda_adv KL_ens + lambda_tv TV + lambda_l2 ||x||^2
    """
    num_images: int = 256
    holdout_images: int = 32       # optimised with the rest but never shown to students: the fresh eval set
    batch_size: int = 96
    steps: int = 300
    warmup_steps: int = 100        # steps before the students and the adversarial term join
    coarse_scale: float = 1.0      # the warm-up shows the teacher the images resized to this share of their side
                                   # (antialiased; coarse to fine, as DeepInversion's multi-resolution synthesis),
                                   # at about coarse_scale^2 of a step's cost; 1 = full size throughout
    coarse_min_side: int = 64      # never coarser than this many pixels on the shorter side (small inputs keep theirs)
    lr: float = 0.25               # Adam on the images; with augment_check_at chosen on the zoo's tuning set
    lr_log_scale: float = 0.05
    image_param: ImageParam = ImageParam.REPARAM
    image_basis: ImageBasis = ImageBasis.SPECTRAL  # chosen on the zoo's confirmation set (README, "Spectral
                                                   # image basis")
    spectral_decay: float = 1.0    # the power of 1/f that scales each DCT coefficient (image_basis=spectral)
    band: float | str = "auto"     # the share of the frequencies along each axis the images may hold (spectral
                                   # basis; 1 = all): 0.125 at 224 px holds what a 28-px image upsampled holds;
                                   # "auto": the band whose images best match the teacher's BN statistics in a
                                   # short probe (gzq.synthesis.choose_band; README "The images' frequency band")
    decorrelate_colour: bool = False  # 3-channel inputs, spectral basis: the parameters hold a decorrelated colour
                                   # basis (gzq.images.colour_matrix, natural images' colour correlation), so a
                                   # step moves luminance more than hue; False = one parameter per RGB channel
    init_log_scale: float = -2.5   # s_0: initial per-pixel log std of f_I(z) noise (exp(-2.5) = 0.08)
    bn_loss: BNLoss = BNLoss.LIKELIHOOD
    v_rule: VRule = VRule.GAUSSIAN
    n_rule: NRule = NRule.BATCH_SPATIAL
    first_bn_weight: float = 1.0   # w_l of the first BN layer (the others are 1); L_BN averages over layers
    bn_normalize: bool = True      # divide the likelihood by the layers' mean N, so its scale does not grow with
                                   # batch or resolution (lambda_bn then weighs per-value z^2 terms, O(1) each)
    lambda_bn: float = 25.0        # on the normalised likelihood; = 0.01 on the raw one for the bundled model
    lambda_ce: float = 1.0
    label_smoothing: float = 0.0   # CE against labels smoothed by this share (the CE is then least at a top
                                   # probability of 1 - share + share / classes, not 1): images that carry their
                                   # class without the saturated confidence real images seldom reach
    ce_target: float = 0.98        # after the warm-up, adapt the CE weight until the teacher agrees with this share
                                   # of the batch's labels (0 = fixed weight): a Lagrange-multiplier-like weight
                                   # that grows while images miss their class and decays back once they carry it
    ce_adapt_rate: float = 0.1     # per-step multiplicative change of the CE weight
    ce_max_scale: float = 100.0    # the adapted CE weight stays within [lambda_ce, ce_max_scale * lambda_ce]
    lambda_adv: float = 0.5
    lambda_tv: float = 1e-4
    lambda_l2: float = 1e-5
    jitter: float = 0.07           # random roll by up to this share of the input side (2 px at 28 px, 16 at 224)
    flip: FlipMode = FlipMode.AUTO
    augment_check: bool = True     # at augment_check_at of the steps, drop jitter (and AUTO flips) for the rest if
    augment_min_agreement: float = 0.9   # the teacher holds fewer than this share of the augmented batches' labels
    augment_check_at: float = 0.5  # the rest of the steps sharpen the class of the images formed under augmentation
    num_students: int = 0          # M; 0 = one per requested configuration; more adds seeds of the first
    adversarial: bool = True       # students join synthesis after warm-up (False: plain synthesis, "M = 0")
    student_lr: float = 1e-4
    student_lr_quant: float = 1e-2  # quantizer step sizes: relative change per Adam step
    keep_students: bool = False    # fine-tune the students trained during synthesis (True), or fresh copies
                                   # calibrated on the final images (False; the adversaries only shape images)
    preview_every: int = 10
    global_bn_stats: bool = False  # with many processes (torchrun): BN statistics of the global batch, summed over
                                   # ranks before the likelihood, so N counts every rank's images (False: each
                                   # rank's likelihood of its own batch)

    def __post_init__(self):
        self.image_param, self.bn_loss = ImageParam(self.image_param), BNLoss(self.bn_loss)
        self.image_basis = ImageBasis(self.image_basis)
        _check_positive("spectral_decay", self.spectral_decay, allow_zero=True)
        if self.band != "auto":
            try:
                self.band = float(self.band)
            except (TypeError, ValueError):
                raise ValueError(f"synth.band must be a number in (0, 1] or auto, got {self.band!r}") from None
            if not 0 < self.band <= 1:
                raise ValueError(f"synth.band must be in (0, 1] (the share of the frequencies the images may hold) "
                                 f"or auto, got {self.band}")
        if ImageBasis(self.image_basis) != ImageBasis.SPECTRAL:
            if self.decorrelate_colour:
                raise ValueError("synth.decorrelate_colour needs synth.image_basis=spectral (the colour basis lives "
                                 "in its coefficients)")
            if self.band not in ("auto", 1):   # auto: the pixel basis has no band to limit, so it keeps all
                raise ValueError("synth.band other than 1 needs synth.image_basis=spectral (it limits the DCT "
                                 "coefficients)")
        self.v_rule, self.n_rule = VRule(self.v_rule), NRule(self.n_rule)
        if isinstance(self.flip, bool):   # flip=true/false from the command line or an older config
            self.flip = FlipMode.ON if self.flip else FlipMode.OFF
        self.flip = FlipMode(self.flip)
        _check_positive("num_images", self.num_images)
        _check_positive("holdout_images", self.holdout_images, allow_zero=True)
        _check_positive("batch_size", self.batch_size)
        _check_positive("steps", self.steps, allow_zero=True)
        _check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        _check_range("coarse_scale", self.coarse_scale, 0.1, 1.0)
        _check_positive("coarse_min_side", self.coarse_min_side)
        _check_positive("num_students", self.num_students, allow_zero=True)
        for nm in ("lr", "lr_log_scale", "student_lr", "student_lr_quant", "first_bn_weight"):
            _check_positive(nm, getattr(self, nm))
        for nm in ("lambda_bn", "lambda_ce", "lambda_adv", "lambda_tv", "lambda_l2"):
            _check_positive(nm, getattr(self, nm), allow_zero=True)
        _check_range("jitter", self.jitter, 0.0, 0.5)
        _check_range("ce_target", self.ce_target, 0.0, 1.0)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 0.9)
        _check_range("augment_min_agreement", self.augment_min_agreement, 0.0, 1.0)
        _check_range("augment_check_at", self.augment_check_at, 0.0, 1.0)
        _check_positive("ce_adapt_rate", self.ce_adapt_rate, allow_zero=True)
        if self.ce_max_scale < 1:
            raise ValueError(f"ce_max_scale must be >= 1, got {self.ce_max_scale}")
        _check_positive("preview_every", self.preview_every)
        if self.num_images < 2:
            raise ValueError(f"num_images must be >= 2 (batch statistics need a batch), got {self.num_images}")

    def band_probe_images(self) -> int:
        """Images each band of the band probe forms (gzq.synthesis.choose_band); 0 where synthesis does not probe:
        a band given, the pixel basis (no band to limit), no steps, or a synthesis too small for a probe of
        BAND_PROBE_MIN_IMAGES within BAND_PROBE_SHARE of its images x steps (the images keep the full band)."""
        if self.band != "auto" or self.image_basis != ImageBasis.SPECTRAL or self.steps <= 0:
            return 0
        share = int(BAND_PROBE_SHARE * self.num_images * self.steps / (len(BAND_CANDIDATES) * BAND_PROBE_STEPS))
        n = min(BAND_PROBE_IMAGES, self.num_images, share)
        return n if n >= BAND_PROBE_MIN_IMAGES else 0

    @property
    def probes_band(self) -> bool:
        """Whether synthesis first probes the images' band (band_probe_images)."""
        return self.band_probe_images() > 0

    def band_probe_image_steps(self) -> int:
        """Images x teacher-only steps the band probe runs at most (every candidate band); 0 without a probe."""
        return len(BAND_CANDIDATES) * BAND_PROBE_STEPS * self.band_probe_images()


@dataclass
class TrainConfig(_Serialisable):
    """Student fine-tuning by distillation on the synthetic set (docs/design.md 2.5)."""
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4          # weights
    lr_quant: float = 1e-2    # step sizes (relative to their magnitude) and zero points
    temperature: float = 1.0
    resample: bool = False    # KD draws fresh z from f_I for every batch (True, reparameterised images only) or
                              # fits the image means (False; chosen on the zoo's tuning set, README "KD on the
                              # image means"); block reconstruction always draws fresh z
    mixup: float = 0.2        # KD on blends of image pairs, weights ~ Beta(mixup, mixup) (gzq.augment.mix_pairs);
                              # 0 = off; 0.2 chosen on the zoo's tuning set (README, "Spectral image basis")
    shift: bool = True        # fine-tuning (KD, reconstruction) rolls each batch by up to synth.jitter, as synthesis
                              # starts out doing; False = the images unshifted (flips stay as synthesis left them).
                              # Some teachers' KD collapses under the roll (README, "The roll in KD")
    crop_scale: float = 1.0   # KD on random crops covering U(crop_scale, 1) of each image's area, resized back
                              # (gzq.augment.random_crops); 1 = off
    feature_kd: float = 0.0   # weight of the unit-output term of KD (gzq.distill): each unit block reconstruction
                              # finds, ||s - t||^2 / ||t||^2 against the BN-folded teacher; 0 = logits alone
    stats_kd: float = 0.0     # weight of the channel-moment term of KD (gzq.distill): at each BN-folded conv output,
                              # the students' per-channel batch mean and variance against the folded teacher's, in
                              # units of the BN's real-data variance (gzq.losses.moment_loss); 0 = off
    anchor: float = 0.0       # after each KD step every quantized layer's weight w moves back toward the BN-folded
                              # teacher's w0 by this share of w - w0 (times the step's learning rate over lr): a
                              # decoupled L2-SP; 0 = off (gzq.distill)
    act_warmup: float = 0.0   # share of the KD steps over which activation quantization phases in: each element of
                              # a quantizer's output stays float with probability 0.5 (1 - t / (act_warmup T)),
                              # QDrop-style (gzq.distill); 0 = quantized throughout
    refit_rounds: int = 0     # KD runs up to this many more rounds (a fresh cosine schedule of `epochs` each) for a
                              # student that gives the teacher's class on under refit_below % of the training images
                              # at the end of a round: a slow one, not yet fit (gzq.distill); 0 = one round
    refit_below: float = 50.0
    method: FinetuneMethod = FinetuneMethod.AUTO
    # block reconstruction (gzq/reconstruct.py), for method recon and recon+kd
    recon_steps: int = 0          # optimisation steps per unit (block); 0 = sized like the KD stage (epochs)
    recon_batch_size: int = 32
    recon_pool: int = 512         # fresh draws of f_I(z) per unit
    recon_lr_round: float = 1e-2  # Adam on AdaRound's rounding variables
    recon_lr_act: float = 1e-3    # Adam on activation step sizes, relative to their magnitude
    recon_drop: float = 0.5       # QDrop: probability that an element of a unit's input stays float
    recon_reg: float = 0.01       # AdaRound's rounding regulariser
    recon_hard_forward: bool = True   # train through the hard codes (straight-through) instead of AdaRound's soft ones
    recon_cap_energy: bool = False    # weigh each image's error down to the pool's median output energy at most

    def __post_init__(self):
        _check_positive("epochs", self.epochs, allow_zero=True)
        _check_positive("mixup", self.mixup, allow_zero=True)
        _check_positive("feature_kd", self.feature_kd, allow_zero=True)
        _check_positive("stats_kd", self.stats_kd, allow_zero=True)
        if not 0 <= self.anchor <= 1:
            raise ValueError("train.anchor is the share of each KD step's weight drift from the teacher's weights "
                             f"taken back: from 0 (off) to 1, got {self.anchor}")
        if not 0 <= self.act_warmup <= 1:
            raise ValueError("train.act_warmup is the share of the KD steps over which activation quantization phases "
                             f"in: from 0 (off) to 1, got {self.act_warmup}")
        if isinstance(self.refit_rounds, bool) or int(self.refit_rounds) != self.refit_rounds or self.refit_rounds < 0:
            raise ValueError("train.refit_rounds is how many more rounds of KD a student that has not fit its "
                             f"training images may get: a whole number, 0 or more, got {self.refit_rounds!r}")
        self.refit_rounds = int(self.refit_rounds)
        _check_range("refit_below", self.refit_below, 0.0, 100.0)
        if not 0 < self.crop_scale <= 1:
            raise ValueError("train.crop_scale is the smallest fraction of an image's area a KD crop keeps: above 0 "
                             f"and at most 1 (1 = no crops), got {self.crop_scale}")
        _check_positive("batch_size", self.batch_size)
        for nm in ("lr", "lr_quant", "temperature", "recon_batch_size", "recon_pool", "recon_lr_round", "recon_lr_act"):
            _check_positive(nm, getattr(self, nm))
        _check_positive("recon_steps", self.recon_steps, allow_zero=True)
        try:
            self.method = FinetuneMethod(self.method)
        except ValueError:
            raise ValueError(f"train.method must be one of {', '.join(m.value for m in FinetuneMethod)}, "
                             f"got {self.method!r}") from None
        _check_range("recon_drop", self.recon_drop, 0.0, 1.0)
        _check_positive("recon_reg", self.recon_reg, allow_zero=True)

    def recon_budget(self, train_images: int) -> tuple[int, int]:
        """(steps per unit, pool of fresh draws per unit) of block reconstruction. recon_steps 0 sizes the stage
        like the KD stage it replaces: all units together pass half as many images as `epochs` of KD over
        `train_images`; the pool holds at most a quarter of the images one unit's steps pass."""
        steps = self.recon_steps or max(MIN_AUTO_RECON_STEPS,
                                        round(self.epochs * train_images / (2 * self.recon_batch_size)))
        return steps, min(self.recon_pool, max(steps * self.recon_batch_size // 4, self.recon_batch_size))

    def method_for(self, spec: "QuantSpec") -> FinetuneMethod:
        """The method a student of `spec` is fitted with: `method`, or for AUTO the one that won at that
        bit-width on the zoo's tuning set (AUTO_METHODS)."""
        if self.method != FinetuneMethod.AUTO:
            return self.method
        return AUTO_METHODS.get(min(spec.w_bits, spec.a_bits), FinetuneMethod.KD)


#: fewest steps per unit when block reconstruction's step count follows the KD budget
MIN_AUTO_RECON_STEPS = 20
#: the method AUTO picks by a student's narrower width (weights or activations); KD where none is listed.
#: Chosen on the zoo's tuning set (README, "Fine-tuning method"). At 8 bits calibration alone matched KD
#: (mean 83.73 against 83.64, within 0.1 pt of full precision) at none of its cost, and KD on a hundred
#: images can only drift from it. At 4 bits, with the percentile activation ranges, KD beat block
#: reconstruction on the tuning set's teachers as scripts/train_zoo.py builds them (3 seeds: 80.28 against
#: 79.74, two models of three) at 0.5-0.6x its time; at 3 bits reconstruction lost on both sets.
AUTO_METHODS: dict[int, FinetuneMethod] = {8: FinetuneMethod.CALIBRATE}


@dataclass
class EvalConfig(_Serialisable):
    """Evaluation (docs/design.md 2.6). data: an ImageFolder path; None = the default model's own test set if any."""
    data: str | None = None
    max_real_images: int | None = None
    fresh_draws: int = 4      # noise draws per held-out synthetic image

    def __post_init__(self):
        _check_positive("fresh_draws", self.fresh_draws)
        if self.max_real_images is not None:
            _check_positive("max_real_images", self.max_real_images)


@dataclass
class RunConfig(_Serialisable):
    """Everything one run needs; saved as config.json in the run folder."""
    model: ModelSpec = field(default_factory=ModelSpec)
    students: list[QuantSpec] = field(default_factory=lambda: [QuantSpec()])
    synth: SynthConfig = field(default_factory=SynthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    preset: str | None = None
    time_budget_s: float | None = None   # fit images and steps to about this many seconds, measured on the device
                                         # before the run (gzq.budget.fit_budget); None = the budget as given
    export: ExportConfig = field(default_factory=lambda: ExportConfig())  # defined below (gzq.export)
    amp: bool = False              # bf16 autocast of synthesis and KD forwards; BN statistics, quantizers, calibration
                                   # and evaluation stay float32 (gzq.accel); unmeasured on a GPU, so off by default
    channels_last: bool = False    # NHWC memory format for the teacher and students (gzq.accel)
    compile: bool = False          # torch.compile the KD fine-tuning forwards (gzq.accel)

    def __post_init__(self):
        if not self.students:
            raise ValueError("at least one student configuration is needed, e.g. w4a4")
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student configurations repeat: {names}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.time_budget_s is not None:
            _check_positive("time_budget_s", self.time_budget_s)
        if self.synth.num_images <= self.synth.holdout_images:
            raise ValueError(
                f"num_images ({self.synth.num_images}) must exceed holdout_images ({self.synth.holdout_images})")


_NESTED = {
    ("RunConfig", "model"): ModelSpec,
    ("RunConfig", "students"): QuantSpec,
    ("RunConfig", "synth"): SynthConfig,
    ("RunConfig", "train"): TrainConfig,
    ("RunConfig", "eval"): EvalConfig,
}


# --- export (gzq/export.py, docs/design.md 2.7) -------------------------------------------------------------------

class ExportFormat(str, enum.Enum):
    """What a run writes next to its float student checkpoints."""
    ONNX = "onnx"                # students/<name>.onnx (QDQ) and teacher_fp32.onnx
    SAFETENSORS = "safetensors"  # students/<name>_int.safetensors (+ .json): integer codes, scales, zero points


@dataclass
class ExportConfig(_Serialisable):
    """Downloads of a run. formats: empty = none; opset: ONNX opset (>= 13; int4/uint4 codes from 21);
    exporter: "torchscript" (torch's tracing exporter, the default: about 40x faster to export) or "dynamo"
    (torch.export + onnxscript, the exporter torch maintains; needs `pip install onnxscript`). Both give the
    same graph (tests/test_export.py)."""
    formats: list[ExportFormat] = field(default_factory=lambda: [ExportFormat.ONNX, ExportFormat.SAFETENSORS])
    opset: int = 21
    exporter: str = "torchscript"

    def __post_init__(self):
        try:
            self.formats = [ExportFormat(f) for f in self.formats]
        except ValueError:
            raise ValueError(f"export formats must be among {[f.value for f in ExportFormat]}, "
                             f"got {list(self.formats)}") from None
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"export formats repeat: {[f.value for f in self.formats]}")
        _check_range("opset", self.opset, 13, 23)
        if self.exporter not in ("torchscript", "dynamo"):
            raise ValueError(f"export.exporter must be torchscript or dynamo, got {self.exporter!r}")
        if self.exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
            raise ValueError("export.exporter=dynamo needs the onnxscript package: pip install onnxscript "
                             "(or keep the default, export.exporter=torchscript)")


_NESTED[("RunConfig", "export")] = ExportConfig


# --- derived fields and overrides --------------------------------------------------------------------------

def student_specs(cfg: RunConfig) -> list[tuple[str, QuantSpec]]:
    """The M students as (name, QuantSpec) pairs: the requested configurations, then extra seeds of the first
    one (named `<config>_s1`, `_s2`, ...) up to synth.num_students."""
    out = [(s.name, s) for s in cfg.students]
    extra = max(cfg.synth.num_students - len(out), 0)
    out += [(f"{cfg.students[0].name}_s{i + 1}", cfg.students[0]) for i in range(extra)]
    return out


def scaled_synth(synth: SynthConfig, num_images: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """The synthesis fields that follow a new image count or step count, by one rule: hold-out = 1/8 of the
    images (none below 3 images), batch <= images, warm-up = the same share of the steps as before.
    Returns the changed fields, drivers included; a driver left None changes nothing."""
    out: dict[str, Any] = {}
    if num_images is not None:
        out.update(num_images=num_images, holdout_images=max(num_images // 8, 1) if num_images > 2 else 0,
                   batch_size=min(synth.batch_size, num_images))
    if steps is not None:
        share = synth.warmup_steps / synth.steps if synth.steps else 0.0
        out.update(steps=steps, warmup_steps=int(round(share * steps)))
    return out


def parse_value(text: str) -> Any:
    """An override's value: JSON where it parses (numbers, true/false, null, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_SECTIONS = ("model", "synth", "train", "eval", "export")


def override(cfg: RunConfig, *items: str | dict[str, Any]) -> RunConfig:
    """A validated copy of `cfg` with "section.field=value" overrides (e.g. "synth.steps=80", "train.lr=3e-4",
    "seed=1", "students.act_init=mse" for every student), or dicts {"section.field": value}. What the CLI's
    --set, the app's form and the benchmarks use.

    A changed synth.num_images or synth.steps moves the fields derived from it (scaled_synth): hold-out
    images, batch size, warm-up steps; a derived field given in the same call keeps the given value.
    """
    values: dict[str, Any] = {}
    for item in items:
        if isinstance(item, dict):
            values.update(item)
            continue
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"override {item!r} must look like synth.lr=0.1 (sections: {', '.join(_SECTIONS)})")
        values[key.strip()] = parse_value(val.strip())
    d = cfg.to_dict()
    given: dict[str, set[str]] = {}
    per_student = {k: v for k, v in values.items() if k.startswith("students.")}
    for key, val in values.items():
        section, dot, fld = key.partition(".")
        if key in per_student:
            continue
        if dot and section in _SECTIONS and fld:
            if fld not in d[section]:
                raise ValueError(f"unknown field {key!r}; {section} has: {', '.join(d[section])}")
            if isinstance(d[section][fld], bool) and not isinstance(val, bool):
                raise ValueError(f"{key} is true or false, got {val!r}")
            d[section][fld] = val
            given.setdefault(section, set()).add(fld)
        elif key == "students":
            names = val.split(",") if isinstance(val, str) else val
            d[key] = [QuantSpec.parse(v).to_dict() if isinstance(v, str) else v for v in names]
        elif not dot and key in d and key not in _SECTIONS:
            d[key] = val
        else:
            raise ValueError(f"override {key!r} must be section.field (sections: {', '.join(_SECTIONS)}) or one "
                             f"of {', '.join(k for k in d if k not in _SECTIONS)}")
    known = [f.name for f in dataclasses.fields(QuantSpec) if f.name not in ("w_bits", "a_bits")]
    for key, val in per_student.items():   # students.act_init=mse: that field of every student
        fld = key.partition(".")[2]
        if fld not in known:
            raise ValueError(f"unknown field {key!r}; each student has: {', '.join(known)}")
        for st in d["students"]:
            st[fld] = val
    old = cfg.synth
    new_images, new_steps = d["synth"]["num_images"], d["synth"]["steps"]
    derived = scaled_synth(old, new_images if new_images != old.num_images else None,
                           new_steps if new_steps != old.steps else None)
    for fld, val in derived.items():
        if fld not in given.get("synth", set()):
            d["synth"][fld] = val
    return RunConfig.from_dict(d)
