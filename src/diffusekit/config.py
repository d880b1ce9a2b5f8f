"""Typed configuration: dataclasses with visible defaults, TOML files, dotted overrides.

One ``Config`` holds eleven sections (``[data]``, ``[model]``, ``[diffusion]``, ``[loss]``, ``[train]``,
``[sample]``, ``[vae]``, ``[latent]``, ``[controlnet]``, ``[distill]``, ``[img2img]``). A run's config is built in three layers, later ones winning:

    defaults (the dataclasses below)  <-  TOML file  <-  ``--set section.key=value`` overrides

Unknown sections and keys are errors (with a "did you mean" suggestion), values are type-checked
against the annotations (ints are accepted for floats, bools are never numbers), ``Literal`` options
must be one of their choices, and ``Config.validate()`` checks ranges. Every problem is reported as a
one-line ``ConfigError`` that names the dotted key. ``save_config`` writes TOML that loads back to an
equal ``Config``; the trainer saves the resolved config into each run folder.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from diffusekit.errors import ConfigError
from diffusekit.io.atomic import read_input_file
from diffusekit.sampling.catalog import DISCRETE_SAMPLERS, GRID_CHOICES, SAMPLER_NAMES, SPACINGS, VARIANCES

__all__ = [
    "DATASET_NAMES", "DATA_KEYS_USED", "IMAGE_DATASETS", "data_keys_used", "DataConfig", "ModelConfig", "DiffusionConfig", "LossConfig", "TrainConfig", "SampleConfig", "VAEConfig", "LatentConfig", "Config",
    "load_config", "config_from_dict", "config_to_dict", "save_config", "format_config", "parse_override",
    "progressive_rounds",
]


# the datasets ``diffusekit.data.load_dataset`` knows (kept equal to ``diffusekit.data.DATASETS`` by a test)
DATASET_NAMES = ("digits", "mnist", "photos", "scenes", "moons", "swiss_roll", "8gaussians", "checkerboard", "gmm",
                 "folder")


# -- the sections ---------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """``[data]``; which keys each dataset reads: ``data_keys_used`` (a folder: docs/data.md)."""

    name: str = "digits"  # digits | mnist | photos | scenes | moons | swiss_roll | 8gaussians | checkerboard | gmm | folder
    path: str = ""  # image folder root (data.name = "folder")
    image_size: int = 0  # folder (0 means 32; a multiple of 4, >= 8), photos (0 means 16), mnist (0 = 28; 14 or 7 pooled), scenes (0 = 32, or 48)
    channels: int = 0  # folder only: 0 = inferred (3 if any image has colour, else 1), 1 (gray) or 3 (RGB)
    n_train: int = 20000  # toys, gmm, photos and scenes only (a folder uses all its images)
    n_test: int = 5000  # toys, gmm, photos and scenes only
    seed: int = 0  # toys, gmm, photos and scenes: each split draws with a seed derived from (seed, split)
    hflip: bool = False  # image data: mirror each training image left-right with probability 1/2
    # scenes: the share of a two-digit training scene's captions that name one of its two digits only (which one
    # at random), so that each clause is also learned alone and prompts can be composed with " AND "
    partial_captions: float = 0.0
    # photos: how the train and test patches divide each photo, "columns" (left 80% / right 20%) or "tiles"
    # (one 32-px tile in five is test); docs/restoration.md, "Which photo split"
    photo_split: str = "columns"


# the [data] keys each dataset reads beyond ``name``; the others are marked "not used" where a config is
# printed or saved (``format_config``), so a folder run does not claim to have used n_train = 20000 examples
_POINT_KEYS = ("n_train", "n_test", "seed")
DATA_KEYS_USED: dict[str, tuple[str, ...]] = {
    "digits": ("hflip",), "mnist": ("image_size", "hflip"),
    "photos": ("image_size", *_POINT_KEYS, "hflip", "photo_split"),
    "scenes": ("image_size", *_POINT_KEYS, "partial_captions"),  # no hflip: a mirrored scene would contradict "on the left"
    "folder": ("path", "image_size", "channels", "hflip"),
    **{name: _POINT_KEYS for name in ("moons", "swiss_roll", "8gaussians", "checkerboard", "gmm")},
}
IMAGE_DATASETS = ("digits", "mnist", "photos", "folder")
PHOTO_PATCH_MAX = {"columns": 26, "tiles": 32}  # the largest photo patch each split's test pixels hold
MNIST_SIZES = (0, 28, 14, 7)  # data.image_size of MNIST: 0 and 28 are its own size, 14 and 7 average-pool it


def data_keys_used(name: str) -> tuple[str, ...]:
    """The [data] keys that dataset ``name`` reads, ``name`` first."""
    return ("name", *DATA_KEYS_USED.get(name, ()))


@dataclass
class ModelConfig:
    kind: str = "unet"  # the model family's kind (diffusekit.families: unet, mlp, vae, mhvae, autoencoder, latent_unet, text_unet, controlnet, img2img)
    prediction: Literal["eps", "x0", "v", "score"] = "eps"
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [4])
    num_heads: int = 1
    dropout: float = 0.0
    time_embedding: Literal["sinusoidal", "fourier"] = "sinusoidal"
    num_classes: int = 0  # > 0: class-conditional (label num_classes is the null label)
    hidden: int = 256  # mlp width
    depth: int = 3  # mlp residual blocks
    norm_groups: int = 8
    # unet, mlp: extra input channels sin/cos(2^k pi x) for each exponent k (Kingma et al. 2021, appendix C); [] = none
    fourier_features: list[int] = field(default_factory=list)
    # unet, mlp, loss.objective = "discrete": the network also outputs v, the reverse variance
    # exp(v log beta_t + (1 - v) log beta_tilde_t), trained by L_simple + loss.vlb_weight L_vlb (Nichol & Dhariwal 2021, sec. 3.1)
    learned_variance: bool = False
    # data on levels in [-1, 1]: the model's x0 is the prediction clipped to [-1, 1]. Discrete objective: in the
    # reverse mean at t >= 2 (likelihood.reverse_x0) of evaluate's bound and the hybrid loss's L_vlb; continuous:
    # everywhere (loss, bound, samplers). Never a looser bound term than the unclipped model's
    bound_clip: bool = False
    # latent_unet, text_unet: the mean of the caption's token features (over its real tokens), through a linear map,
    # is added to the noise-level embedding, beside cross-attention over the tokens (Imagen: Saharia et al. 2022,
    # sec. 2; SDXL: Podell et al. 2023, sec. 2.1)
    pooled_text: bool = False


@dataclass
class DiffusionConfig:
    # logsnr_linear: log-SNR falls linearly from logsnr_max (t = 1) to logsnr_min (t = T), equal steps in log-SNR
    schedule: Literal["linear", "cosine", "sigmoid", "logsnr_linear"] = "linear"
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    # the end points of schedule = "logsnr_linear" and of loss.objective = "continuous" (lambda from logsnr_max at the
    # least noisy step to logsnr_min at the noisiest); ignored by the other discrete schedules
    learned_schedule: bool = False  # learn lambda(t) between the fixed end points (VDM's monotone network)
    logsnr_min: float = -10.0
    logsnr_max: float = 10.0


@dataclass
class LossConfig:
    # continuous: VDM's ELBO / Kingma & Gao's L_w; progressive, consistency: distil the run of [distill]
    objective: Literal["discrete", "continuous", "progressive", "consistency"] = "discrete"
    weighting: Literal["simple", "x0", "v", "elbo", "snr", "min_snr", "truncated_snr", "sigmoid", "edm"] = "simple"
    sigmoid_bias: float = 2.0  # weighting = "sigmoid": w(lambda) = sigmoid(sigmoid_bias - lambda)
    min_snr_gamma: float = 5.0
    # importance (objective = "discrete", model.kind = unet | mlp): t ~ p_t proportional to sqrt(E[L_t^2]), each
    # example weighted by 1 / (T p_t) (Nichol & Dhariwal 2021, sec. 3.3; diffusekit.timestep_proposal); with
    # objective = "continuous" and a fixed schedule, the same over 100 bins of t in [0, 1] (weight 1 / q(t))
    t_sampling: Literal["uniform", "stratified", "importance"] = "uniform"
    importance_history: int = 10  # t_sampling = "importance": last per-example losses kept per t for E[L_t^2]
    importance_uniform: float = 0.001  # t_sampling = "importance": share of the uniform distribution mixed into p_t
    vlb_weight: float = 0.001  # model.learned_variance only: lambda of the hybrid objective L_simple + lambda L_vlb


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    # after the warm-up: "constant" keeps train.lr; "cosine" and "linear" decay it to 0 at train.steps (set steps
    # to what the budget holds: a run stopped early by a limit ends part-way down the curve)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = 1.0  # 0 = no clipping
    ema_decay: float = 0.999
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000  # 0 = never (a final grid is always drawn)
    checkpoint_every: int = 500  # 0 = only at the end
    n_sample: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    class_dropout: float = 0.1  # probability of the null label (classifier-free guidance)
    time_limit_s: float = 0.0  # 0 = none
    cpu_limit_s: float = 0.0  # 0 = none; CPU seconds of this process (all its threads), held-out bounds left out
    # > 0: every N steps (and at the end) the EMA model's bound on the test split's first bound_examples images,
    # in <run>/bound.jsonl and bound_curve.png beside loss_std (diffusion runs; not counted in cpu_s)
    bound_every: int = 0
    bound_examples: int = 256
    # speed (docs/scale.md#speed-on-a-gpu): how the network runs, not what it computes
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast of forward and loss; fp32 weights, EMA and loss
    compile: bool = False  # torch.compile the trained module (eager, with a warning, where the backend is missing)
    channels_last: Literal["auto", "on", "off"] = "auto"  # image batches and weights in NHWC; auto: on with CUDA
    tf32: Literal["auto", "on", "off"] = "auto"  # CUDA fp32 matmuls and convolutions in TF32; auto: on with CUDA
    fused_adamw: Literal["auto", "on", "off"] = "auto"  # AdamW's fused kernel; auto: on with CUDA
    data_on_device: bool = True  # the training set is copied to the device once; false: pinned host memory


SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]  (the names of sampling/catalog.py)
GridName = Literal[GRID_CHOICES]  # type: ignore[valid-type]
SpacingName = Literal[SPACINGS]  # type: ignore[valid-type]
VarianceName = Literal[VARIANCES]  # type: ignore[valid-type]

# Bounds: past them a value is a typo or an attack, not a setting (see docs/guarantees.md); the memory a
# setting needs within them is estimated before the work (``budget``)
MAX_SAMPLE_STEPS = 100_000  # also the largest diffusion.T
MAX_IMAGE_SIZE = 1024
MAX_EXAMPLES = 10_000_000
MAX_WIDTH = 1024  # channels of a network layer
MAX_BATCH_SIZE = 65_536
MAX_GUIDANCE = 100.0
MAX_CLIP_X0 = 1_000.0
MAX_STEP_SIZE = 10.0
MAX_SNR = 10.0
MAX_INNER_STEPS = 1_000  # corrector and Langevin steps per noise level
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision and sample.precision (diffusekit.speed)
FP32_ONLY_KINDS = ("vae", "mhvae", "autoencoder")  # likelihood terms computed inside the network's forward


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _in(lo: float, hi: float, *, open_lo: bool = False, integer: bool = False):
    def test(v: Any) -> bool:
        return (_integer(v) if integer else _number(v)) and (v > lo if open_lo else v >= lo) and v <= hi
    return test


# field -> (test, what it must be): the one validator of every sampler setting, whatever its source
# (a config file, --set, a command-line flag, a settings.json); ``SampleConfig.check`` applies it.
SAMPLE_RULES: dict[str, tuple[Any, str]] = {
    "sampler": (lambda v: v in SAMPLER_NAMES, "one of " + ", ".join(SAMPLER_NAMES)),
    "steps": (_in(0, MAX_SAMPLE_STEPS, integer=True), f"an integer in 0..{MAX_SAMPLE_STEPS} (0 = diffusion.T)"),
    "eta": (_in(0.0, 1.0), "in [0, 1]"),
    "variance": (lambda v: v in VARIANCES, "one of " + ", ".join(VARIANCES)),
    "spacing": (lambda v: v in SPACINGS, "one of " + ", ".join(SPACINGS)),
    "clip_x0": (lambda v: v is None or _in(0.0, MAX_CLIP_X0, open_lo=True)(v),
                f"a number in (0, {MAX_CLIP_X0:g}] (clip x0 to [-C, C]) or off"),
    "grid": (lambda v: v in GRID_CHOICES, "one of " + ", ".join(GRID_CHOICES)),
    "snr": (_in(0.0, MAX_SNR, open_lo=True), f"in (0, {MAX_SNR:g}]"),
    "corrector_steps": (_in(0, MAX_INNER_STEPS, integer=True), f"an integer in 0..{MAX_INNER_STEPS}"),
    "langevin_steps": (_in(1, MAX_INNER_STEPS, integer=True), f"an integer in 1..{MAX_INNER_STEPS}"),
    "step_size": (_in(0.0, MAX_STEP_SIZE, open_lo=True), f"in (0, {MAX_STEP_SIZE:g}]"),
    "rtol": (_in(0.0, 1.0, open_lo=True), "in (0, 1]"),
    "atol": (_in(0.0, 1.0, open_lo=True), "in (0, 1]"),
    "order": (_in(1, 3, integer=True), "1, 2 or 3"),
    "guidance": (_in(0.0, MAX_GUIDANCE), f"a number in [0, {MAX_GUIDANCE:g}] (1 = the conditional model, 0 = "
                                          "unconditional)"),
    "precision": (lambda v: v in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
}


def _sample_key(name: str) -> str:
    return f"sample.{name}"


@dataclass
class SampleConfig:
    """``[sample]``: how a run samples by default (``sampling.SampleSettings`` adds the seeds and batch).

    ``clip_x0`` = C clamps the predicted x0 to [-C, C] in ddpm and ddim (absent or false: off; true, the
    older boolean form, means 1)."""

    sampler: SamplerName = "ddpm"
    steps: int = 0  # 0 = T
    eta: float = 0.0
    variance: VarianceName = "beta_tilde"
    spacing: SpacingName = "trailing"
    clip_x0: float | None = None
    # continuous-time samplers (docs/samplers.md)
    grid: GridName = "auto"
    snr: float = 0.16  # pc: Langevin corrector signal-to-noise ratio
    corrector_steps: int = 1  # pc
    langevin_steps: int = 5  # langevin: steps per noise level
    step_size: float = 1.0  # langevin: step / noise variance
    rtol: float = 1e-4  # rk45
    atol: float = 1e-4  # rk45
    order: int = 2  # unipc: 1-3 (the corrector adds one)
    guidance: float = 1.0  # classifier-free guidance scale s (model.num_classes > 0): 1 = conditional, 0 = unconditional
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # the network under autocast; the sampler stays fp32/fp64
    compile: bool = False  # torch.compile the denoiser (eager, with a warning, where the backend is missing)

    def check(self, key: Callable[[str], str] = _sample_key, T: int | None = None) -> None:
        """Every rule of ``SAMPLE_RULES`` (types included, bools are never numbers), then the rules between
        fields; ``T``, when known, bounds the steps of the discrete samplers. ``key(field)`` names a field
        the way the user wrote it ("sample.steps", "--steps", "settings.json: steps")."""
        for name, (ok, want) in SAMPLE_RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(f"{key(name)} must be {want}; got {value!r}")
        if self.clip_x0 is not None and self.sampler not in DISCRETE_SAMPLERS:
            raise ConfigError(f"{key('clip_x0')} applies to {' and '.join(DISCRETE_SAMPLERS)} only, not sampler "
                              f"{self.sampler!r}")
        if T is not None and self.sampler in DISCRETE_SAMPLERS and self.steps > T:
            raise ConfigError(f"{key('steps')} must lie in 0..{T} (0 = all steps) for {self.sampler}; got {self.steps}")
        if T is not None and T < 2 and self.sampler not in DISCRETE_SAMPLERS:
            raise ConfigError(f"{key('sampler')} = {self.sampler} runs in continuous time between t = 1/T and 1, which "
                              f"needs diffusion.T >= 2 (this model has T = {T}); use {' or '.join(DISCRETE_SAMPLERS)}")


@dataclass
class VAEConfig:
    """The latent-variable families (model.kind = vae | mhvae | autoencoder); MLP widths come from
    model.hidden / model.depth, the autoencoder's from model.base_channels / model.norm_groups."""

    latent_dim: int = 16  # vae, mhvae: latent size of each level
    hierarchy: int = 3  # mhvae: number of latent levels T
    latent_channels: int = 4  # autoencoder: channels of the H/4 x W/4 latent
    decoder: Literal["auto", "gaussian", "bernoulli", "discretized"] = "auto"  # auto: discretized for image data
    kl_weight: float = 1.0  # beta on the latent terms (1 = the ELBO; autoencoders use less)
    iwae_k: int = 1  # importance samples per example in training (1 = ELBO, k > 1 = IWAE bound)
    sample_noise: bool = False  # samples: E[x|z] (false) or a draw of p(x|z) (true)


@dataclass
class LatentConfig:
    """Text-to-image latent diffusion (model.kind = "latent_unet", families.text_latent): a U-Net with
    cross-attention over MiniLM caption features denoises the latents of a trained autoencoder run;
    captions come from the labels (model.num_classes = 10), train.class_dropout is the caption dropout."""

    autoencoder_run: str = "runs/autoencoder_mnist"  # run folder of a model.kind = "autoencoder" run (the codec)


@dataclass
class ControlNetConfig:
    """ControlNet (model.kind = "controlnet", families.controlnet): a trainable copy of the encoder of
    the frozen U-Net of ``base_run`` learns to steer it with a control image computed from each example.
    Over a text-conditioned base (model.kind = "text_unet" or "latent_unet" on scenes) it reads the captions
    too; train.class_dropout is then the caption dropout."""

    base_run: str = "runs/digits_class"  # run folder of a trained unet, text_unet or latent_unet run (kept frozen)
    # edges: Sobel gradient magnitude; edges_lowres: the same at 1/lowres_factor resolution, upsampled;
    # skeleton: the 1-pixel skeleton of the ink; layout: one filled square box per blob of ink (its frame)
    hint: Literal["edges", "edges_lowres", "skeleton", "layout"] = "edges"
    lowres_factor: int = 4  # edges_lowres: the image is average-pooled by this factor (2 or 4) before Sobel


@dataclass
class DistillConfig:
    """Distillation of a trained discrete-time run (the teacher) into a few-step student
    (``loss.objective`` = "progressive" | "consistency"; ``families.progressive``, ``families.consistency``).
    The student has the teacher's architecture ([model], except ``model.prediction``) and [diffusion], and
    starts from the teacher's EMA weights."""

    teacher_run: str = "runs/demo"  # run folder of a trained discrete-time unet or mlp run (kept frozen)
    teacher_steps: int = 64  # progressive: the teacher's DDIM steps of the first round; consistency: the ODE grid N
    student_steps: int = 4  # progressive: the student's steps after the last round (teacher_steps / 2^rounds)
    steps_per_round: int = 500  # progressive: optimizer steps of each halving round
    teacher_solver: Literal["ddim", "heun"] = "heun"  # consistency: the teacher's ODE step between grid neighbours
    grid: Literal["karras", "logsnr", "time"] = "karras"  # consistency: spacing of the N grid times (sampling.ode.time_grid)
    metric: Literal["pseudo_huber", "l2"] = "pseudo_huber"  # consistency: the distance d (Song & Dhariwal 2023, Sec. 3.3)
    step_weighting: Literal["inverse_step", "uniform"] = "inverse_step"  # consistency: lambda = 1 / (sigma_n+1 - sigma_n) or 1


IMG2IMG_TASKS = ("inpaint", "outpaint", "superres", "colorize")  # the degradations of sampling/restore.py it learns


@dataclass
class Img2ImgConfig:
    """Image-to-image diffusion (model.kind = "img2img", families.img2img; SR3: Saharia et al. 2021, Palette:
    Saharia et al. 2022): a U-Net reads the degraded image beside x_t and is trained on pairs made on the fly
    from the data by the operators of ``sampling/restore.py``; several tasks make one multi-task model."""

    tasks: list[str] = field(default_factory=lambda: ["superres"])  # any of inpaint, outpaint, superres, colorize
    superres_factors: list[int] = field(default_factory=lambda: [2])  # superres: average-pooling factors learned
    residual_scale: float = 0.0  # 0: diffuse x itself; s > 0: diffuse the unseen part (x - A+ y) / s, restore A+ y + s r


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    img2img: Img2ImgConfig = field(default_factory=Img2ImgConfig)

    def validate(self) -> "Config":
        """Range checks across the whole config; raises ``ConfigError`` naming the key. Returns self."""
        _validate(self)
        return self


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


# -- types ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> Any:
    """X for an annotation ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp: Any) -> str:
    if _optional(tp) is not None:
        return f"{_type_name(_optional(tp))} (or absent)"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against annotation ``tp`` (ints widen to float); raises ConfigError."""
    inner = _optional(tp)
    if inner is not None:
        if value is None or value is False:  # absent; false is the older boolean form of "off"
            return None
        if value is True and inner is float:  # the older boolean form of sample.clip_x0: true = 1
            return 1.0
        return _coerce(key, value, inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if not isinstance(value, str) or value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        ok = isinstance(value, list) and all(_is_int(v) if item is int else isinstance(v, item) for v in value)
        if ok:
            return list(value)
    elif tp is float:
        if _is_int(value) or isinstance(value, float):
            return float(value)
        ok = False
    elif tp is int:
        ok = _is_int(value)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r} ({type(value).__name__})")
    return value


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else f"; valid: {', '.join(choices)}"


def _suggest_in(section: str, key: str) -> str:
    """A hint for an unknown key of a known section: the closest key there, else the valid ones."""
    names = [f.name for f in fields(SECTIONS[section])]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6) or [
        n for n in names if len(key) >= 2 and (key in n or n in key)]
    if close:
        return f"; did you mean {section}.{close[0]}?"
    return f"; valid keys of [{section}]: {', '.join(names)}"


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def _suggest_dotted(word: str) -> str:
    """A hint for a key given without (or with a wrong) section: 'lr' -> 'did you mean train.lr?'."""
    keys = _all_keys()
    owners = [k for k in keys if k.split(".")[1] == word.split(".")[-1]]
    close = owners or difflib.get_close_matches(word, keys, n=1, cutoff=0.6) or [
        k for k in keys if k.split(".")[1] in difflib.get_close_matches(word, [k.split(".")[1] for k in keys], n=1)]
    return f"; did you mean {close[0]}?" if close else "; keys look like section.key (diffusekit train --dry-run lists them all)"


# -- dict <-> Config ------------------------------------------------------------------------------
def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict ``{section: {key: value}}`` (JSON- and TOML-serialisable)."""
    return asdict(cfg)


def _merge_into(merged: dict[str, dict[str, Any]], d: Any, where: str = "") -> None:
    """Check ``d``'s sections, keys and value types and write the values into ``merged`` in place.
    Errors are prefixed with ``where`` (the file or override they came from)."""
    def fail(msg: str) -> None:
        raise ConfigError(f"{where}{msg}")

    if not isinstance(d, dict):
        fail(f"config must be a table of sections, got {type(d).__name__}")
    for section, table in d.items():
        if section not in SECTIONS:
            if not isinstance(table, dict):  # a key outside any section: point at the section that has it
                fail(f"unknown key {section!r} outside any section{_suggest_dotted(section)}")
            fail(f"unknown section [{section}]{_suggest(section, list(SECTIONS))}")
        if not isinstance(table, dict):
            fail(f"{section} must be a section ([{section}]), got {table!r}")
        hints = _hints(SECTIONS[section])
        for key, value in table.items():
            if key not in hints:
                fail(f"unknown key {section}.{key}{_suggest_in(section, key)}")
            try:
                merged[section][key] = _coerce(f"{section}.{key}", value, hints[key])
            except ConfigError as exc:
                fail(str(exc))


def _build(merged: dict[str, dict[str, Any]]) -> Config:
    return Config(**{s: cls(**merged[s]) for s, cls in SECTIONS.items()}).validate()


def config_from_dict(d: dict[str, Any], base: Config | None = None) -> Config:
    """Merge a nested dict ``{section: {key: value}}`` onto ``base`` (default: the defaults),
    type-check it and validate it (the inverse of ``config_to_dict``)."""
    merged = config_to_dict(base or Config())
    _merge_into(merged, d)
    return _build(merged)


# -- overrides ------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=2e-4"`` -> ("train", "lr", 2e-4). Values are TOML values when they parse as one
    (``2e-4``, ``[1,2]``, ``true``, ``"cosine"``); anything else is taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=2e-4)")
    key, raw = (s.strip() for s in text.split("=", 1))
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key{_suggest_dotted(key)}")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"unknown section [{section}] in override {text!r}{_suggest(section, list(SECTIONS))}")
    valid = [f.name for f in fields(SECTIONS[section])]
    if name not in valid:
        raise ConfigError(f"unknown key {key} in override {text!r}{_suggest_in(section, name)}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if _hints(SECTIONS[section])[name] is str and not isinstance(value, str):
        value = raw  # data.path=2024 is the folder "2024", not a number
    return section, name, value


def json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; a ConfigError naming ``what`` for anything else."""
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what}: not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: must be a JSON object, got {type(d).__name__}")
    return d


def _read_toml(path: Path) -> dict[str, Any]:
    text = read_input_file(path, "config file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # the message names the line and column
        raise ConfigError(f"{path}: invalid TOML: {str(exc).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- TOML file at ``path`` (if given) <- dotted ``overrides`` such as ``"train.lr=2e-4"``;
    type-checked, then range-checked by ``Config.validate`` once everything is merged."""
    merged = config_to_dict(Config())
    if path is not None:
        path = Path(path)
        _merge_into(merged, _read_toml(path), where=f"{path}: ")
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        section, name, value = parse_override(text)
        _merge_into(merged, {section: {name: value}}, where=f"override {text!r}: ")
    return _build(merged)


# -- writing --------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _data_notes(d: DataConfig) -> dict[str, str]:
    """Comments for the [data] keys: those the dataset does not read, and what a 0 of a folder means."""
    used = data_keys_used(d.name)
    notes = {f.name: f"not used by data.name = {json.dumps(d.name)}" for f in fields(DataConfig) if f.name not in used}
    if d.name == "folder":
        notes.update({"image_size": "0: 32"} if d.image_size == 0 else {})
        notes.update({"channels": "0: inferred from the images (3 if any has colour, else 1)"} if d.channels == 0
                     else {})
    return notes


def format_config(cfg: Config) -> str:
    """The config as TOML text (what ``--dry-run`` prints and ``save_config`` writes); [data] keys the
    dataset does not read carry a "not used" comment."""
    lines: list[str] = []
    for section, table in config_to_dict(cfg).items():
        notes = _data_notes(cfg.data) if section == "data" else {}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" + (f"  # {notes[k]}" if k in notes else "")
                  for k, v in table.items() if v is not None]  # TOML has no null: absent
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as TOML; ``load_config(path) == cfg``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_config(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


# -- range checks ---------------------------------------------------------------------------------
def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}; got {value!r}")


def progressive_rounds(ds: DistillConfig) -> int:
    """Rounds of progressive distillation (``families.progressive``): a first round at
    ``distill.teacher_steps`` (the v-prediction student matches one teacher DDIM step), then one round per
    halving down to ``distill.student_steps``."""
    return 1 + (ds.teacher_steps // ds.student_steps).bit_length() - 1


def _validate_progressive(cfg: "Config") -> None:
    """The keys progressive distillation (``families.progressive``) needs beyond their ranges."""
    ds, t = cfg.distill, cfg.train
    ratio = ds.teacher_steps // ds.student_steps
    _check(ds.teacher_steps % ds.student_steps == 0 and ratio & (ratio - 1) == 0, "distill.teacher_steps",
           f"distill.student_steps = {ds.student_steps} times a power of 2 (each round halves the steps)",
           ds.teacher_steps)
    _check(ds.teacher_steps <= cfg.diffusion.T, "distill.teacher_steps", f"<= diffusion.T = {cfg.diffusion.T}",
           ds.teacher_steps)
    _check(cfg.model.prediction == "v", "model.prediction",
           "'v' for loss.objective = 'progressive' (an eps student cannot take 1-4 steps: Salimans & Ho 2022, sec. 4)",
           cfg.model.prediction)
    rounds = progressive_rounds(ds)
    _check(t.steps >= rounds * ds.steps_per_round, "train.steps",
           f">= {rounds} rounds x distill.steps_per_round = {rounds * ds.steps_per_round} (the last round takes the "
           "steps past the others)", t.steps)
    _check((1.0 - t.ema_decay) * ds.steps_per_round >= 2.0 - 1e-9, "train.ema_decay",
           f"at most 1 - 2 / distill.steps_per_round = {1 - 2 / ds.steps_per_round:.4g} (the average's window "
           "1 / (1 - decay) must fit twice in a round, or the student's EMA mixes in the previous round's weights)",
           t.ema_decay)


LOGSNR_LIMIT = 30.0  # |log-SNR| beyond 30: alpha_bar or 1 - alpha_bar below 1e-13, no noise level an image needs


def _validate_objective(df: DiffusionConfig, lo: LossConfig) -> None:
    """The keys of the continuous-time objective (``diffusekit.continuous``) and what they exclude."""
    _check(-LOGSNR_LIMIT <= df.logsnr_min <= LOGSNR_LIMIT, "diffusion.logsnr_min", f"in [-{LOGSNR_LIMIT}, {LOGSNR_LIMIT}]",
           df.logsnr_min)
    _check(df.logsnr_min < df.logsnr_max <= LOGSNR_LIMIT, "diffusion.logsnr_max",
           f"in (diffusion.logsnr_min = {df.logsnr_min}, {LOGSNR_LIMIT}]", df.logsnr_max)
    if lo.objective != "continuous":  # discrete, and the distillations of a discrete-time teacher
        if df.learned_schedule:
            raise ConfigError("diffusion.learned_schedule = true needs loss.objective = 'continuous'")
        if lo.weighting in ("sigmoid", "edm"):
            raise ConfigError(f"loss.weighting = {lo.weighting!r} is a weighting w(lambda) of the continuous "
                              "objective; set loss.objective = 'continuous'")
        return
    if lo.weighting in ("simple", "snr"):
        raise ConfigError(f"loss.weighting = {lo.weighting!r} depends on the schedule under loss.objective = "
                          "'continuous'; use 'elbo' (the bound) or a w(lambda): sigmoid, edm, x0, v, min_snr, "
                          "truncated_snr")
    if lo.t_sampling == "importance" and df.learned_schedule:
        raise ConfigError("loss.t_sampling = 'importance' needs a fixed schedule with loss.objective = 'continuous'; "
                          "diffusion.learned_schedule = true already minimises that variance (VDM): use uniform or "
                          "stratified, or learned_schedule = false")
    if df.schedule == "sigmoid" and not df.learned_schedule:
        raise ConfigError("diffusion.schedule = 'sigmoid' has no log-SNR form for loss.objective = 'continuous'; "
                          "use cosine, linear (in log-SNR) or diffusion.learned_schedule = true")
    _check(df.T >= 2, "diffusion.T", ">= 2 with loss.objective = 'continuous'", df.T)


FOURIER_MAX_EXPONENT = 16  # 2^16 pi x: finer than any float32 image needs


def _validate_likelihood_model(m: ModelConfig, lo: LossConfig) -> None:
    """model.fourier_features, model.learned_variance, model.bound_clip and loss.vlb_weight."""
    ff = m.fourier_features
    _check(len(ff) <= 8 and len(set(ff)) == len(ff) and all(0 <= k <= FOURIER_MAX_EXPONENT for k in ff),
           "model.fourier_features", f"a list of at most 8 distinct exponents k in 0..{FOURIER_MAX_EXPONENT} "
           "(channels sin/cos(2^k pi x)); [] = none", ff)
    _check(not ff or m.kind in ("unet", "mlp"), "model.fourier_features",
           f"[] for model.kind = {m.kind!r} (Fourier input features are built for unet and mlp)", ff)
    _check(not m.learned_variance or m.kind in ("unet", "mlp"), "model.learned_variance",
           f"false for model.kind = {m.kind!r} (learned variances are built for unet and mlp)", m.learned_variance)
    _check(not m.learned_variance or lo.objective == "discrete", "model.learned_variance",
           f"false with loss.objective = {lo.objective!r} (the hybrid loss is a discrete-time objective)",
           m.learned_variance)
    _check(0.0 <= lo.vlb_weight <= 1e3, "loss.vlb_weight", "in [0, 1000]", lo.vlb_weight)
    _check(not m.bound_clip or (m.kind in ("unet", "mlp") and lo.objective in ("discrete", "continuous")),
           "model.bound_clip", f"false for model.kind = {m.kind!r} with loss.objective = {lo.objective!r} (the clipped "
           "x0 is built for unet and mlp runs of the discrete and continuous objectives)", m.bound_clip)
    _check(not m.pooled_text or m.kind in ("latent_unet", "text_unet"), "model.pooled_text",
           f"false for model.kind = {m.kind!r} (the pooled caption embedding is built for latent_unet and text_unet)",
           m.pooled_text)


def _validate_time_sampling(m: ModelConfig, lo: LossConfig) -> None:
    """loss.t_sampling = "importance" and its keys (``diffusekit.timestep_proposal``)."""
    _check(1 <= lo.importance_history <= 1000, "loss.importance_history", "in 1..1000", lo.importance_history)
    _check(0.0 < lo.importance_uniform <= 1.0, "loss.importance_uniform",
           "in (0, 1] (the floor u / T on every p_t keeps the weights 1 / (T p_t) finite)", lo.importance_uniform)
    if lo.t_sampling == "importance" and not (lo.objective in ("discrete", "continuous")
                                              and m.kind in ("unet", "mlp")):
        raise ConfigError(f"loss.t_sampling = 'importance' is built for loss.objective = 'discrete' or 'continuous' "
                          f"with model.kind = 'unet' or 'mlp' (got {lo.objective!r}, {m.kind!r}); use uniform or "
                          "stratified")


def _validate_img2img(cfg: Config) -> None:
    """The keys of the image-to-image family (``families.img2img``)."""
    ii = cfg.img2img
    _check(0 < len(ii.tasks) <= len(IMG2IMG_TASKS) and all(t in IMG2IMG_TASKS for t in ii.tasks)
           and len(set(ii.tasks)) == len(ii.tasks), "img2img.tasks",
           f"a non-empty list of distinct tasks among {', '.join(IMG2IMG_TASKS)}", ii.tasks)
    _check(0 < len(ii.superres_factors) <= 4 and all(2 <= f <= 16 for f in ii.superres_factors)
           and len(set(ii.superres_factors)) == len(ii.superres_factors), "img2img.superres_factors",
           "a list of 1 to 4 distinct integers in 2..16", ii.superres_factors)
    _check(_number(ii.residual_scale) and (ii.residual_scale == 0 or 1e-3 <= ii.residual_scale <= 100),
           "img2img.residual_scale", "0 (diffuse the image itself) or a number in [0.001, 100]", ii.residual_scale)
    _check(cfg.model.kind != "img2img" or cfg.model.num_classes == 0, "model.num_classes",
           "0 for model.kind = 'img2img' (the U-Net's label input carries the task)", cfg.model.num_classes)


def _validate(cfg: Config) -> None:
    for section in SECTIONS:
        for f in fields(SECTIONS[section]):
            v = getattr(getattr(cfg, section), f.name)
            if isinstance(v, float):
                _check(math.isfinite(v), f"{section}.{f.name}", "finite", v)
    d, m, df, lo, t, s = cfg.data, cfg.model, cfg.diffusion, cfg.loss, cfg.train, cfg.sample
    if d.name not in DATASET_NAMES:
        close = difflib.get_close_matches(d.name, DATASET_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"data.name = {d.name!r} is not a dataset; {hint}choose one of {', '.join(DATASET_NAMES)}")
    _check(d.seed >= 0, "data.seed", ">= 0", d.seed)
    _check(d.photo_split in PHOTO_PATCH_MAX, "data.photo_split", "'columns' (the right 20% of each photo is "
           "test) or 'tiles' (one 32-px tile in five is test)", d.photo_split)
    if d.name == "mnist":
        _check(d.image_size in MNIST_SIZES, "data.image_size", "0 or 28 (MNIST's own 28x28), 14 or 7 (average-pooled "
               "by 2 or 4, the low-resolution stage of a cascade)", d.image_size)
    elif d.name == "scenes":
        _check(d.image_size in (0, 32, 48), "data.image_size", "0 or 32 (a 32x32 canvas) or 48", d.image_size)
        if d.hflip:
            raise ConfigError("data.hflip = true would mirror scenes whose captions say left and right; "
                              "set data.hflip = false for data.name = 'scenes'")
        _check(d.n_train <= 50000 and d.n_test <= 50000, "data.n_train / data.n_test", "at most 50000 scenes "
               "for data.name = 'scenes' (each is drawn and measured when the data loads)", max(d.n_train, d.n_test))
        _check(0.0 <= d.partial_captions <= 1.0, "data.partial_captions", "in [0, 1] (a share of the two-digit "
               "scenes' captions)", d.partial_captions)
    elif d.name == "photos":  # a patch must fit the test pixels: 26 columns, or one 32-px tile (data/photos.py)
        largest = PHOTO_PATCH_MAX[d.photo_split]
        _check(d.image_size == 0 or 8 <= d.image_size <= largest, "data.image_size",
               f"0 (16) or in 8..{largest} for data.photo_split = {d.photo_split!r} (a test patch must fit in "
               f"{'the right 26 columns of a photo' if d.photo_split == 'columns' else 'one 32-px tile'})",
               d.image_size)
    else:
        _check(d.image_size == 0 or 8 <= d.image_size <= MAX_IMAGE_SIZE, "data.image_size",
               f"0 (the dataset's own) or in 8..{MAX_IMAGE_SIZE}", d.image_size)
    _check(d.channels in (0, 1, 3), "data.channels", "0 (inferred from the images), 1 or 3", d.channels)
    if d.hflip and d.name not in IMAGE_DATASETS:
        raise ConfigError(f"data.hflip = true mirrors images, but data.name = {d.name!r} is points, not images; "
                          f"flips apply to {', '.join(IMAGE_DATASETS)}")
    _check(0 < d.n_train <= MAX_EXAMPLES, "data.n_train", f"in 1..{MAX_EXAMPLES}", d.n_train)
    _check(0 < d.n_test <= MAX_EXAMPLES, "data.n_test", f"in 1..{MAX_EXAMPLES}", d.n_test)
    _check(0 < m.base_channels <= MAX_WIDTH, "model.base_channels", f"in 1..{MAX_WIDTH}", m.base_channels)
    _check(0 < len(m.channel_mult) <= 8 and all(0 < c <= 64 for c in m.channel_mult), "model.channel_mult",
           "a list of 1 to 8 integers in 1..64", m.channel_mult)
    _check(all(r > 0 for r in m.attn_resolutions), "model.attn_resolutions", "a list of positive integers",
           m.attn_resolutions)
    _check(1 <= m.num_res_blocks <= 16, "model.num_res_blocks", "in 1..16", m.num_res_blocks)
    _check(1 <= m.num_heads <= 64, "model.num_heads", "in 1..64", m.num_heads)
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "in [0, 1)", m.dropout)
    _check(0 <= m.num_classes <= 100_000, "model.num_classes", "in 0..100000", m.num_classes)
    _check(0 < m.hidden <= MAX_WIDTH * 16, "model.hidden", f"in 1..{MAX_WIDTH * 16}", m.hidden)
    _check(1 <= m.depth <= 64, "model.depth", "in 1..64", m.depth)
    _check(1 <= m.norm_groups <= MAX_WIDTH, "model.norm_groups", f"in 1..{MAX_WIDTH}", m.norm_groups)
    _validate_likelihood_model(m, lo)
    _check(1 <= df.T <= MAX_SAMPLE_STEPS, "diffusion.T", f"in 1..{MAX_SAMPLE_STEPS}", df.T)
    _check(0.0 < df.beta_start < 1.0, "diffusion.beta_start", "in (0, 1)", df.beta_start)
    _check(df.beta_start < df.beta_end < 1.0, "diffusion.beta_end", f"in (beta_start = {df.beta_start}, 1)",
           df.beta_end)
    _check(df.cosine_s >= 0.0, "diffusion.cosine_s", ">= 0", df.cosine_s)
    _check(lo.min_snr_gamma > 0.0, "loss.min_snr_gamma", "> 0", lo.min_snr_gamma)
    _validate_objective(df, lo)
    _validate_time_sampling(m, lo)
    _check(0 < t.steps < 10**8, "train.steps", "in 1..99999999", t.steps)
    _check(0 < t.batch_size <= MAX_BATCH_SIZE, "train.batch_size", f"in 1..{MAX_BATCH_SIZE}", t.batch_size)
    _check(t.lr > 0.0, "train.lr", "> 0", t.lr)
    _check(t.weight_decay >= 0.0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(t.warmup_steps >= 0, "train.warmup_steps", ">= 0", t.warmup_steps)
    _check(t.grad_clip >= 0.0, "train.grad_clip", ">= 0 (0 = no clipping)", t.grad_clip)
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "in [0, 1)", t.ema_decay)
    _check(1 <= t.grad_accum <= 1024, "train.grad_accum", "in 1..1024", t.grad_accum)
    _check(t.log_every >= 1, "train.log_every", ">= 1", t.log_every)
    _check(t.sample_every >= 0, "train.sample_every", ">= 0 (0 = never)", t.sample_every)
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", ">= 0 (0 = only at the end)", t.checkpoint_every)
    _check(1 <= t.n_sample <= 1024, "train.n_sample", "in 1..1024", t.n_sample)
    _check(0.0 <= t.class_dropout <= 1.0, "train.class_dropout", "in [0, 1]", t.class_dropout)
    _check(t.time_limit_s >= 0.0, "train.time_limit_s", ">= 0 (0 = none)", t.time_limit_s)
    _check(t.cpu_limit_s >= 0.0, "train.cpu_limit_s", ">= 0 (0 = none)", t.cpu_limit_s)
    _check(0 <= t.bound_every <= MAX_SAMPLE_STEPS * 100, "train.bound_every", ">= 0 (0 = never)", t.bound_every)
    _check(2 <= t.bound_examples <= 100_000, "train.bound_examples", "in 2..100000", t.bound_examples)
    _check(t.precision == "fp32" or m.kind not in FP32_ONLY_KINDS, "train.precision",
           f"'fp32' for model.kind = {m.kind!r} (its likelihood terms are computed inside the network's forward)",
           t.precision)
    s.check(T=df.T)
    # conditioned on captions (the text family checks its data; a ControlNet on scenes: over a text base,
    # families.controlnet checks the base)
    text_scenes = m.kind in ("latent_unet", "text_unet") or (m.kind == "controlnet" and d.name == "scenes")
    _check(s.guidance == 1.0 or m.num_classes > 0 or text_scenes, "sample.guidance",
           "1.0 for an unconditional model (guidance needs model.num_classes > 0)", s.guidance)
    v = cfg.vae
    _check(1 <= v.latent_dim <= MAX_WIDTH * 16, "vae.latent_dim", f"in 1..{MAX_WIDTH * 16}", v.latent_dim)
    _check(1 <= v.hierarchy <= 64, "vae.hierarchy", "in 1..64", v.hierarchy)
    _check(1 <= v.latent_channels <= MAX_WIDTH, "vae.latent_channels", f"in 1..{MAX_WIDTH}", v.latent_channels)
    _check(v.kl_weight >= 0.0, "vae.kl_weight", ">= 0", v.kl_weight)
    _check(1 <= v.iwae_k <= 10_000, "vae.iwae_k", "in 1..10000", v.iwae_k)
    _check(m.kind != "latent_unet" or bool(cfg.latent.autoencoder_run.strip()), "latent.autoencoder_run",
           "the run folder of a trained autoencoder", cfg.latent.autoencoder_run)
    _check(m.kind != "controlnet" or bool(cfg.controlnet.base_run.strip()), "controlnet.base_run",
           "the run folder of a trained unet, text_unet or latent_unet", cfg.controlnet.base_run)
    _check(cfg.controlnet.lowres_factor in (2, 4), "controlnet.lowres_factor", "2 or 4", cfg.controlnet.lowres_factor)
    ds = cfg.distill
    if lo.objective in ("progressive", "consistency"):
        _check(bool(ds.teacher_run.strip()), "distill.teacher_run", "the run folder of a trained diffusion run",
               ds.teacher_run)
    _check(1 <= ds.teacher_steps <= MAX_SAMPLE_STEPS, "distill.teacher_steps", f"in 1..{MAX_SAMPLE_STEPS}",
           ds.teacher_steps)
    _check(1 <= ds.student_steps <= (ds.teacher_steps if lo.objective == "progressive" else MAX_SAMPLE_STEPS),
           "distill.student_steps", f"in 1..distill.teacher_steps = {ds.teacher_steps}" if lo.objective == "progressive"
           else f"in 1..{MAX_SAMPLE_STEPS}", ds.student_steps)
    _check(1 <= ds.steps_per_round < 10**8, "distill.steps_per_round", "in 1..99999999", ds.steps_per_round)
    if lo.objective == "progressive":
        _validate_progressive(cfg)
    _validate_img2img(cfg)
    if lo.objective == "consistency":
        _check(ds.teacher_steps >= 2, "distill.teacher_steps", ">= 2 with loss.objective = 'consistency' (the N grid "
               "times of the teacher's ODE)", ds.teacher_steps)
