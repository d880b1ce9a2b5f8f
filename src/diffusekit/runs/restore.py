"""Restoring images with a run (``diffusekit restore``): a trained image model (unconditional, or trained on
pairs), a degradation, inputs, and the files it leaves.

``restore_run`` degrades each input x with the task's operator (``sampling/restore.py``,
``sampling/dps.py``), restores it once per seed and writes (each file atomically) what follows. The run
decides how: an unconditional run with RePaint, the DDNM projection or DPS (``method``, default repaint); an
image-to-image run (``families.img2img``, its family row says ``trained_restore``) with its own trained
conditional sampler (method ``img2img``, the only one it takes) for the tasks it was trained for.

- ``restore.png``: one row per input, degraded | restored (one tile per seed) | original; unknown
  pixels of a mask are drawn red in the degraded tile (the degraded image is A+ y; for blur, y itself; for
  saturation, the pixel-wise inverse of y);
- ``restored.npz``: ``restored`` (K, S, C, H, W), ``original`` (K, C, H, W), ``measurement`` (y, with
  its noise), ``degraded`` (as in the picture), ``known`` (masks), ``seeds``, ``noise_seeds`` (K, S),
  ``labels`` (-1 unknown), ``inputs`` (names); float arrays are float32 in the data range [-1, 1];
- ``settings.json``: the exact ``RestoreSettings`` (reproduce with ``RestoreSettings.from_json``)
  plus the run, checkpoint and metrics under "extra"; ``metrics.json``: the numbers alone.

Restored sample (k, s) draws all its noise from ``PerSampleNoise`` seeded by SeedSequence([s, k]),
so it depends only on the seed and the input's position, never on the batch. With DPS the measurement
is y = A(x) + noise_std n, n drawn per input from SeedSequence([measurement_seed, k], spawn_key=(1,))
(``measurement_noise``), a stream no restoration seed shares. Metrics: PSNR of the
restored images (clamped to [-1, 1], peak-to-peak 2) against the originals over the unknown pixels
(masks) or all pixels (super-resolution, colorization), averaged over samples (with several seeds also
that of their mean per input, ``psnr_of_mean``, an estimate of the posterior mean's), beside the same for
A+ y (zero fill, nearest upsampling, gray; the blurred y; the pixel-wise inverse of a saturated y) and,
for DPS, the RMS of y - A(restored) over the measured values beside noise_std; and for digits / MNIST
inputs from the dataset, the
accuracy of diffusekit's own classifier (``evaluate/features.py``) on restored, original and
degraded images against the originals' labels.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.data.images import read_image
from diffusekit.data.registry import load_dataset
from diffusekit.errors import ConfigError, DataError
from diffusekit.evaluate.features import correct, evaluate_accuracy, load_feature_net
from diffusekit.evaluate.samples import has_feature_net
from diffusekit.families import read_run
from diffusekit.families.img2img import box_masks, freeform_masks, sample_img2img, uncrop_masks
from diffusekit.io.atomic import OutputFolder, atomic_write_bytes, atomic_write_text
from diffusekit.sampling.catalog import (
    DEFAULT_MASK,
    DPS_ONLY_TASKS,
    DPS_ZETA_SQRT_STEPS,
    IMG2IMG_METHOD,
    MASKS,
    RESTORE_METHODS,
    RESTORE_TASKS,
    SPACINGS,
    VARIANCES,
)
from diffusekit.sampling.dps import GaussianBlur, Measurement, Saturation, noisy_measurement, sample_dps
from diffusekit.sampling.generate import check_finite
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.restore import (
    Colorization,
    Inpaint,
    LinearDegradation,
    SuperResolution,
    sample_ddnm,
    sample_repaint,
)
from diffusekit.sampling.settings import MAX_BATCH, MAX_SEEDS, settings_from_json, settings_to_json
from diffusekit.viz import image_grid, png_bytes

__all__ = ["RestoreSettings", "make_masks", "read_mask", "load_inputs", "psnr", "restore_run", "noise_seed",
           "measurement_noise", "dps_zeta", "resolve_method"]

PALETTE_MASKS = {"freeform": freeform_masks, "box": box_masks, "uncrop": uncrop_masks}
MAX_RESAMPLE = 1_000
MAX_NOISE_STD = 2.0  # the data range is [-1, 1]: more noise than this leaves nothing to restore
MAX_ZETA = 100.0  # a DPS step of 2 zeta in the norm of x: beyond this it is no longer a step
MAX_RESTORED_BYTES = 4 * 2**30  # the restorations of one call are held in memory (float32)


@dataclass
class RestoreSettings:
    """Everything that determines a restoration besides the model.

    ``mask`` names the region to generate: "center" (a centred square of half the side), "border"
    (all but that square: outpainting), "left" / "right" / "top" / "bottom" (that half), "random"
    (a ``fraction`` of the pixels, drawn per input from (``mask_seed``, input index)), "freeform" / "box" /
    "uncrop" (one mask per input, drawn from (``mask_seed``, input index), from the distribution an
    image-to-image run is trained on: Palette's brush strokes, a box, or uncropping), or a PNG file
    of the image size whose white pixels (>= 128) are generated; "" takes the task's default (inpaint:
    center, outpaint: border). ``factor`` is the super-resolution factor, ``blur_size`` and ``blur_width``
    the Gaussian blur's kernel side and standard deviation (pixels), ``gain`` the saturation's
    (``sampling/dps.py``). ``steps = 0`` runs the full chain (T); ``resample`` (U) and ``jump`` (j) are
    RePaint's resampling (U = 1: none; repaint and ddnm only: with dps a U other than 1 or a j other than 10
    is an error). ``method`` "" takes the run's own: repaint for an unconditional run, img2img (its trained
    conditional sampler, ancestral DDPM on ``steps``) for an image-to-image run. DPS only: ``noise_std`` is the standard deviation of the Gaussian noise added to the
    measurement (drawn from ``measurement_seed``), ``zeta`` the step size (None: ``dps_zeta``,
    DPS_ZETA_SQRT_STEPS / sqrt(steps)). Blur and saturation need DPS. Inputs are the
    first ``n`` images of the run's ``split``, or the files ``images`` (any size: centre-cropped and
    resized to the model's). ``batch_size`` does not change any sample.
    """

    task: Literal[RESTORE_TASKS] = "inpaint"  # type: ignore[valid-type]  (names: sampling/catalog.py)
    method: Literal[RESTORE_METHODS + (IMG2IMG_METHOD, "")] = ""  # type: ignore[valid-type]  ("": the run's own)
    mask: str = ""
    fraction: float = 0.5
    mask_seed: int = 0
    factor: int = 2
    blur_size: int = 5
    blur_width: float = 1.0
    gain: float = 3.0
    steps: int = 0
    spacing: Literal[SPACINGS] = "trailing"  # type: ignore[valid-type]
    resample: int = 1
    jump: int = 10
    variance: Literal[VARIANCES] = "beta_tilde"  # type: ignore[valid-type]
    clip_x0: float | None = None
    noise_std: float = 0.0
    zeta: float | None = None
    measurement_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n: int = 8
    images: list[str] = field(default_factory=list)
    split: Literal["train", "test"] = "test"
    use_ema: bool = True
    batch_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.seeds, (range, tuple)):
            self.seeds = list(self.seeds)
        if isinstance(self.images, (tuple, list)):
            self.images = [str(p) if isinstance(p, Path) else p for p in self.images]
        if not isinstance(self.mask, str):
            raise ConfigError(f"--mask must be a mask name or a file name, got {self.mask!r}")
        if not self.mask and self.task in DEFAULT_MASK:
            self.mask = DEFAULT_MASK[self.task]

        def integer(v: Any, lo: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        def real(v: Any, lo: float, hi: float, lo_open: bool = True) -> bool:  # NaN and inf fail both bounds
            return (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and (lo < v if lo_open else lo <= v) and v <= hi)

        checks = [
            (self.task in RESTORE_TASKS, "task", f"one of {RESTORE_TASKS}", self.task),
            (self.method in (*RESTORE_METHODS, IMG2IMG_METHOD, ""), "method",
             f"one of {(*RESTORE_METHODS, IMG2IMG_METHOD)}", self.method),
            (0.0 < self.fraction < 1.0, "fraction", "in (0, 1)", self.fraction),
            (integer(self.mask_seed, 0), "mask_seed", "an integer >= 0", self.mask_seed),
            (integer(self.factor, 2), "factor", "an integer >= 2", self.factor),
            (integer(self.blur_size, 3) and self.blur_size % 2 == 1, "blur_size", "an odd integer >= 3",
             self.blur_size),
            (real(self.blur_width, 0.0, 100.0), "blur_width", "in (0, 100] pixels", self.blur_width),
            (real(self.gain, 0.0, 20.0), "gain", "in (0, 20]", self.gain),
            (integer(self.steps, 0), "steps", "an integer >= 0 (0 = T)", self.steps),
            (self.spacing in SPACINGS, "spacing", f"one of {SPACINGS}", self.spacing),
            (integer(self.resample, 1) and self.resample <= MAX_RESAMPLE, "resample", f"an integer in 1..{MAX_RESAMPLE}",
             self.resample),
            (integer(self.jump, 1), "jump", "an integer >= 1", self.jump),
            (self.variance in VARIANCES, "variance", f"one of {VARIANCES}", self.variance),
            (self.clip_x0 is None or (isinstance(self.clip_x0, (int, float)) and not isinstance(self.clip_x0, bool)
                                      and 0 < self.clip_x0 <= 1000), "clip_x0", "in (0, 1000] or absent", self.clip_x0),
            (real(self.noise_std, 0.0, MAX_NOISE_STD, lo_open=False), "noise_std", f"in [0, {MAX_NOISE_STD:g}]",
             self.noise_std),
            (self.zeta is None or real(self.zeta, 0.0, MAX_ZETA), "zeta", f"in (0, {MAX_ZETA:g}] or absent",
             self.zeta),
            (integer(self.measurement_seed, 0) and self.measurement_seed < 2**62, "measurement_seed",
             "an integer >= 0", self.measurement_seed),
            (isinstance(self.seeds, list) and 0 < len(self.seeds) <= MAX_SEEDS
             and all(integer(v, 0) and v < 2**62 for v in self.seeds) and len(set(self.seeds)) == len(self.seeds),
             "seeds", "non-empty, distinct integers >= 0", self.seeds if len(self.seeds) < 9 else f"{len(self.seeds)} seeds"),
            (integer(self.n, 1) and self.n <= MAX_SEEDS, "n", "an integer >= 1", self.n),
            (isinstance(self.images, list) and all(isinstance(p, str) for p in self.images), "images",
             "a list of file names", self.images),
            (self.split in ("train", "test"), "split", "'train' or 'test'", self.split),
            (isinstance(self.use_ema, bool), "use_ema", "true or false", self.use_ema),
            (integer(self.batch_size, 1) and self.batch_size <= MAX_BATCH, "batch_size", f"an integer in 1..{MAX_BATCH}",
             self.batch_size),
        ]
        for ok, name, want, got in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be {want}, got {got!r}")
        self._check_method()

    def _check_method(self) -> None:
        """Settings that belong to one method: one-line ConfigErrors naming the flag."""
        if self.method in ("dps", IMG2IMG_METHOD):
            if self.resample != 1:
                raise ConfigError(f"--resample applies to repaint and ddnm, not --method {self.method} "
                                  f"(got {self.resample})")
            if self.jump != RestoreSettings.jump:  # the default: RePaint's j, which dps and img2img never read
                raise ConfigError(f"--jump applies to repaint and ddnm, not --method {self.method} (got {self.jump})")
            if self.method == "dps":
                return
        if self.task in DPS_ONLY_TASKS:
            raise ConfigError(f"--task {self.task} needs --method dps: {self.method or 'repaint'} needs a linear "
                              "degradation with a pseudo-inverse (inpaint, outpaint, superres, colorize)")
        for name, value, unset in (("noise_std", self.noise_std, 0.0), ("zeta", self.zeta, None),
                                   ("measurement_seed", self.measurement_seed, 0)):
            if value != unset:
                raise ConfigError(f"--{name.replace('_', '-')} applies to --method dps, not {self.method} "
                                  f"(got {value!r})")

    def to_json(self, extra: dict[str, Any] | None = None) -> str:
        return settings_to_json(self, extra)

    @classmethod
    def from_json(cls, text: str) -> "RestoreSettings":
        """Read settings written by ``to_json`` (a ``settings.json``); unknown keys and bad values are errors."""
        return settings_from_json(cls, text, "restore")


# -- masks, inputs, seeds ----------------------------------------------------------------------
def noise_seed(seed: int, index: int) -> int:
    """The noise stream of restored sample (input ``index``, ``seed``): SeedSequence([seed, index])."""
    a, b = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)  # < 2**63


def measurement_noise(seed: int, index: int, shape: Sequence[int]) -> Tensor:
    """Standard normal noise (float32, ``shape``) of input ``index``'s measurement: a generator seeded from
    SeedSequence([seed, index], spawn_key=(1,)), a child stream that no restoration seed (``noise_seed``) shares."""
    a, b = np.random.SeedSequence([int(seed), int(index)], spawn_key=(1,)).generate_state(2, dtype=np.uint32)
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed((int(a) << 31) ^ int(b)))


def dps_zeta(settings: RestoreSettings, T: int) -> float:
    """DPS's step size: ``settings.zeta``, or DPS_ZETA_SQRT_STEPS / sqrt(steps) (docs/restoration.md, "Choosing
    zeta": on digits the best zeta falls about as 1 / sqrt(steps), 0.5-0.7 at 100 steps, 0.2-0.7 at 250, 0.1-0.2
    at 1000)."""
    return settings.zeta if settings.zeta is not None else DPS_ZETA_SQRT_STEPS / math.sqrt(settings.steps or T)


def read_mask(path: str | Path, size: tuple[int, int]) -> Tensor:
    """A mask image -> bool (H, W), True where the pixel is known (the file's dark pixels, < 128)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or device would block; a folder is no mask
        raise DataError(f"--mask {path}: is not a regular file")
    try:
        with Image.open(path) as img:
            if img.size != (size[1], size[0]):  # checked before any pixel is decoded
                raise DataError(f"--mask {path}: mask is {img.size[0]}x{img.size[1]} pixels but the model's images "
                                f"are {size[1]}x{size[0]}")
            img.load()
            gray = np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise DataError(f"--mask {path}: file does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"--mask {path}: not a readable image ({first_line})") from None
    if gray.shape != tuple(size):
        raise DataError(f"--mask {path}: mask is {gray.shape[1]}x{gray.shape[0]} pixels but the model's images are "
                        f"{size[1]}x{size[0]}")
    return torch.from_numpy(gray < 128)


def make_masks(spec: str, n: int, size: tuple[int, int], fraction: float = 0.5, mask_seed: int = 0) -> Tensor:
    """Known-pixel masks (n, 1, H, W) for ``spec`` (see ``RestoreSettings``); True = known."""
    H, W = size
    if spec == "random":
        out = torch.ones(n, H * W, dtype=torch.bool)
        n_unknown = min(max(1, round(fraction * H * W)), H * W - 1)
        for k in range(n):
            g = torch.Generator().manual_seed(noise_seed(mask_seed, k))
            out[k, torch.randperm(H * W, generator=g)[:n_unknown]] = False
        return out.reshape(n, 1, H, W)
    if spec in PALETTE_MASKS:
        draw = PALETTE_MASKS[spec]
        return torch.cat([draw(1, size, torch.Generator().manual_seed(noise_seed(mask_seed, k))) for k in range(n)])
    if spec in MASKS:
        unknown = torch.zeros(H, W, dtype=torch.bool)
        h, w = H // 2, W // 2
        if spec in ("center", "border"):
            unknown[(H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w] = True
            if spec == "border":
                unknown = ~unknown
        else:
            rows = {"top": slice(0, h), "bottom": slice(H - h, H)}.get(spec, slice(None))
            cols = {"left": slice(0, w), "right": slice(W - w, W)}.get(spec, slice(None))
            unknown[rows, cols] = True
        known = ~unknown
    else:
        known = read_mask(spec, size)
    if known.all() or not known.any():
        raise DataError(f"--mask {spec}: the mask marks {'no' if known.all() else 'every'} pixel as unknown")
    return known.reshape(1, 1, H, W).expand(n, 1, H, W).clone()


def load_inputs(run, settings: RestoreSettings) -> tuple[Tensor, Tensor, list[str]]:
    """(originals (K, C, H, W) float32 in [-1, 1], labels (K,) with -1 where unknown, names)."""
    C, H, W = run.data_shape
    if settings.images:
        try:
            arrays = [read_image(p, H, C) for p in settings.images]
        except DataError as exc:
            raise DataError(f"--images {exc}") from None
        x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0 * 2.0 - 1.0)
        return x, torch.full((len(arrays),), -1, dtype=torch.int64), list(settings.images)
    data = load_dataset(run.cfg.data, settings.split)
    if settings.n > len(data):
        raise ConfigError(f"--n {settings.n} exceeds the {len(data)} images of the {settings.split} split")
    labels = data.labels[:settings.n] if data.labels is not None else torch.full((settings.n,), -1, dtype=torch.int64)
    return data.x[:settings.n].clone(), labels.clone(), [f"{settings.split}:{i}" for i in range(settings.n)]


def check_task(run, settings: RestoreSettings, run_dir: Path | str) -> None:
    """One-line ConfigErrors naming the flag, for a task the run's model cannot do (an image-to-image run: one
    it was not trained for)."""
    if settings.method == IMG2IMG_METHOD:
        run.task_index(settings.task, settings.factor)
    if len(run.data_shape) != 3:
        raise ConfigError(f"--run {run_dir}: restoration needs an image model; this run's data has shape "
                          f"{tuple(run.data_shape)}")
    C, H, W = run.data_shape
    if settings.task == "colorize" and C != 3:
        raise ConfigError(f"--task colorize needs a colour (3-channel) model; {run_dir} has {C} channel"
                          f"{'s' if C != 1 else ''}")
    if settings.task == "superres" and (H % settings.factor or W % settings.factor):
        raise ConfigError(f"--factor {settings.factor} does not divide the model's image size {H}x{W}")
    if settings.task == "blur" and settings.blur_size // 2 >= min(H, W):
        raise ConfigError(f"--blur-size {settings.blur_size} is too large for the model's {H}x{W} images (reflected "
                          f"borders: at most {2 * min(H, W) - 1})")
    T = run.schedule.T
    if settings.steps > T:
        raise ConfigError(f"--steps must lie in 0..{T} (0 = all steps), got {settings.steps}")
    if settings.resample > 1 and settings.jump > (settings.steps or T):
        raise ConfigError(f"--jump {settings.jump} exceeds the {settings.steps or T} sampling steps")


def build_operator(settings: RestoreSettings, data_shape: Sequence[int], n_inputs: int
                   ) -> tuple[LinearDegradation | Measurement | None, Tensor | None]:
    """(shared operator or None, per-input known masks or None) for the task."""
    if settings.task == "superres":
        return SuperResolution(settings.factor), None
    if settings.task == "colorize":
        return Colorization(data_shape[0]), None
    if settings.task == "blur":
        return GaussianBlur(settings.blur_size, float(settings.blur_width)), None
    if settings.task == "saturation":
        return Saturation(float(settings.gain)), None
    return None, make_masks(settings.mask, n_inputs, tuple(data_shape[1:]), settings.fraction, settings.mask_seed)


def measure(op: LinearDegradation | Measurement, x: Tensor, settings: RestoreSettings) -> tuple[Tensor, Tensor]:
    """(y, the degraded image): y = A(x) (+ noise_std n, n from ``measurement_noise`` per input), and A+ y for
    the linear degradations, y itself for blur, the pixel-wise inverse for saturation."""
    y = op.A(x)
    if settings.noise_std > 0:
        noise = torch.cat([measurement_noise(settings.measurement_seed, k, y.shape[1:])[None] for k in range(len(x))])
        y = noisy_measurement(op, x, float(settings.noise_std), noise)
    return y, (op.A_pinv(y) if isinstance(op, LinearDegradation) else op.naive_inverse(y))


def psnr(x: Tensor, ref: Tensor, region: Tensor | None = None) -> Tensor:
    """Per-image PSNR in dB of x against ref (data range [-1, 1], peak-to-peak 2) over ``region``
    (bool, broadcast to x; None = all pixels); x is clamped to [-1, 1] first."""
    err = (x.clamp(-1, 1) - ref).double().pow(2)
    if region is None:
        mse = err.flatten(1).mean(1)
    else:
        region = region.expand_as(err).flatten(1).double()
        mse = (err.flatten(1) * region).sum(1) / region.sum(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-20))


# -- the run -----------------------------------------------------------------------------------
def _restore_all(run, settings: RestoreSettings, x: Tensor, y_all: Tensor, op, known, device, progress: bool,
                 stats: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Restored images (K, S, C, H, W) on the CPU and their noise seeds (K, S); ``y_all`` holds the K
    measurements."""
    K, S = x.shape[0], len(settings.seeds)
    pairs = [(k, s) for k in range(K) for s in settings.seeds]
    seeds = torch.tensor([[noise_seed(s, k) for s in settings.seeds] for k in range(K)], dtype=torch.int64)
    options: dict[str, Any] = {"steps": settings.steps or None, "spacing": settings.spacing,
                               "variance": settings.variance, "clip_x0": settings.clip_x0}
    if settings.method == "dps":
        sampler, options["zeta"] = sample_dps, dps_zeta(settings, run.schedule.T)
    elif settings.method == IMG2IMG_METHOD:
        sampler, options["task"] = sample_img2img, run.task_index(settings.task, settings.factor)
        options["residual_scale"] = scale = run.cfg.img2img.residual_scale
        if scale and settings.clip_x0 is not None:
            raise ConfigError(f"--clip-x0: {run.source} diffuses the residual (x - A+ y) / "
                              f"{scale:g} (img2img.residual_scale), not the image, so clipping the "
                              "image's x0 does not apply; leave --clip-x0 out")
    else:
        sampler = sample_repaint if settings.method == "repaint" else sample_ddnm
        options.update(resample=settings.resample, jump=settings.jump)
    out: list[Tensor] = []
    calls = 0
    batches = range(0, len(pairs), settings.batch_size)
    if progress:
        batches = tqdm(batches, desc=f"{settings.method} batches", total=math.ceil(len(pairs) / settings.batch_size))
    for lo in batches:
        chunk = pairs[lo:lo + settings.batch_size]
        index = torch.tensor([k for k, _ in chunk])
        batch_op = Inpaint(known[index].to(device)) if known is not None else op
        y = y_all[index].to(device)
        noise = PerSampleNoise([noise_seed(s, k) for k, s in chunk], x.shape[1:], device=device)

        def count(_info: dict[str, Any]) -> None:
            nonlocal calls
            calls += 1

        calls = 0
        restored = sampler(run.denoiser, run.schedule, noise(), noise, batch_op, y, callback=count, **options)
        out.append(restored.cpu())
    stats["nfe"] = calls  # network calls per sample (every batch walks the same path)
    stats["zeta"] = options.get("zeta")
    return torch.cat(out).reshape(K, S, *x.shape[1:]), seeds


def _classifier_accuracy(run, restored: Tensor, x: Tensor, degraded: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy of the dataset's own classifier on restored / original / degraded images, if it has one, and
    the gap between the originals and their restorations with its standard error over the inputs (each input's
    gap is its original's correctness less the mean correctness of its seeds: the seeds of one input are not
    independent draws, the inputs are)."""
    name = run.cfg.data.name
    if not has_feature_net(run.cfg.data) or (labels < 0).any():
        return {}
    net = load_feature_net(name)
    K, S = restored.shape[:2]
    per_seed = correct(net, restored.flatten(0, 1).clamp(-1, 1), labels.repeat_interleave(S)).view(K, S)
    original = correct(net, x, labels)
    gap = original - per_seed.mean(1)
    return {"accuracy": per_seed.mean().item(), "accuracy_original": original.mean().item(),
            "accuracy_degraded": evaluate_accuracy(net, degraded.clamp(-1, 1), labels),
            "accuracy_gap": gap.mean().item(),
            "accuracy_gap_stderr": gap.std().item() / math.sqrt(K) if K > 1 else None}  # None: one input


def _picture(degraded: Tensor, restored: Tensor, x: Tensor, known: Tensor | None, levels: int | None) -> bytes:
    """Rows of degraded | restored (one per seed) | original; unknown mask pixels drawn red."""
    S = restored.shape[1]
    rows = torch.cat([degraded[:, None], restored.clamp(-1, 1), x[:, None]], dim=1)  # (K, S + 2, C, H, W)
    if known is not None:
        rows = rows.expand(-1, -1, 3, -1, -1).clone() if rows.shape[2] == 1 else rows
        red = torch.tensor([1.0, -0.8, -0.8]).reshape(3, 1, 1).expand_as(rows[:, 0])
        rows[:, 0] = torch.where(known.expand_as(rows[:, 0]), rows[:, 0], red)
    upscale = max(1, math.ceil(64 / rows.shape[-1]))  # tiles of at least 64 px
    return png_bytes(image_grid(rows.flatten(0, 1), nrow=S + 2, upscale=upscale, levels=levels))


def resolve_method(method: str, trained: bool, run_dir: Path | str) -> str:
    """The method a run restores with: an image-to-image run (``trained``) only with its own (img2img), an
    unconditional one only with the training-free ones; "" takes the run's own (img2img or repaint). One-line
    ConfigErrors naming the run otherwise."""
    if trained:
        if method not in ("", IMG2IMG_METHOD):
            raise ConfigError(f"--method {method}: {run_dir} is an image-to-image run (model.kind = 'img2img'), which "
                              f"restores with its own trained sampler; leave out --method (or give {IMG2IMG_METHOD})")
        return IMG2IMG_METHOD
    if method == IMG2IMG_METHOD:
        raise ConfigError(f"--method {IMG2IMG_METHOD} needs an image-to-image run trained on pairs (model.kind = "
                          f"'img2img'); {run_dir} is unconditional: use {', '.join(RESTORE_METHODS)}")
    return method or "repaint"


def restore_run(run_dir: Path | str, settings: RestoreSettings, out_dir: Path | str | None = None,
                device: str | torch.device = "cpu", progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Restore the inputs of ``settings`` with the run's model; write the files into ``out_dir`` (default:
    ``<run>/restore-<task>-<method>``), complete or absent; return (metrics, folder)."""
    family, source = read_run(run_dir)
    if not (family.restore or family.trained_restore):
        raise ConfigError(f"--run {run_dir}: restoration needs a diffusion model (model.kind unet, mlp or img2img); "
                          f"this is a {family.name} run")
    settings = replace(settings, method=resolve_method(settings.method, family.trained_restore, run_dir))
    run = family.load(source, settings.use_ema, device)
    check_task(run, settings, run_dir)
    x, labels, names = load_inputs(run, settings)
    size = x.shape[0] * len(settings.seeds) * x[0].numel() * 4
    if size > MAX_RESTORED_BYTES:
        raise ConfigError(f"--n/--seeds: {x.shape[0]} inputs x {len(settings.seeds)} seeds need {size / 2**30:.1f} GiB "
                          f"in memory (at most {MAX_RESTORED_BYTES / 2**30:.0f} GiB); restore fewer at a time")
    out = Path(out_dir) if out_dir is not None else run.source / f"restore-{settings.task}-{settings.method}"
    with OutputFolder(out, "settings.json", "restore folder") as folder:
        metrics = _restore_and_write(run, settings, x, labels, names, folder.path, device, progress)
    return metrics, out


def _restore_and_write(run, settings: RestoreSettings, x: Tensor, labels: Tensor, names: list[str], out: Path,
                       device, progress: bool) -> dict[str, Any]:
    t0 = time.time()
    op, known = build_operator(settings, run.data_shape, x.shape[0])
    full_op = Inpaint(known) if known is not None else op
    y, degraded = measure(full_op, x, settings)
    stats: dict[str, Any] = {}
    restored, seeds = _restore_all(run, settings, x, y, op, known, device, progress, stats)
    check_finite(restored.flatten(0, 1), "restorations")

    S = restored.shape[1]
    region = None if known is None else ~known
    rep = lambda t: t.repeat_interleave(S, 0)  # noqa: E731 - per input -> per restored sample
    per_sample_op = Inpaint(rep(known)) if known is not None else op
    residual = (per_sample_op.A(restored.flatten(0, 1)) - rep(y)).flatten(1)
    metrics: dict[str, Any] = {
        "task": settings.task, "method": settings.method, "resample": settings.resample,
        "n_inputs": x.shape[0], "n_samples": x.shape[0] * S, "nfe": stats["nfe"],
        "psnr": psnr(restored.flatten(0, 1), rep(x), None if region is None else rep(region)).mean().item(),
        "psnr_pinv": psnr(degraded, x, region).mean().item(),
        # several seeds: the PSNR of their mean per input, an estimate of the posterior mean's (what PSNR favours)
        **({"psnr_of_mean": psnr(restored.mean(1), x, region).mean().item()} if S > 1 else {}),
        "measurement_error": residual.abs().max().item(),
        **_classifier_accuracy(run, restored, x, degraded, labels),
    }
    if settings.method == "dps":  # the RMS of y - A(x) over the measured values (a mask's known pixels)
        measured = (rep(known).expand(-1, x.shape[1], -1, -1).flatten(1).sum(1) if known is not None
                    else residual.shape[1])
        metrics.update(zeta=stats["zeta"], noise_std=settings.noise_std,
                       residual_rms=(residual.double().pow(2).sum(1) / measured).sqrt().mean().item())
        settings = replace(settings, zeta=stats["zeta"])  # settings.json records the step size used
    metrics["seconds"] = round(time.time() - t0, 2)

    atomic_write_bytes(out / "restore.png", _picture(degraded, restored, x, known, run.levels))
    buf = io.BytesIO()
    arrays = {"restored": restored, "original": x, "measurement": y, "degraded": degraded}
    np.savez(buf, **{k: v.to(torch.float32).numpy() for k, v in arrays.items()},
             known=(known if known is not None else torch.ones(0, dtype=torch.bool)).numpy(),
             seeds=np.asarray(settings.seeds, dtype=np.int64), noise_seeds=seeds.numpy(), labels=labels.numpy(),
             inputs=np.asarray(names))
    atomic_write_bytes(out / "restored.npz", buf.getvalue())
    extra = {**run.provenance(), "metrics": metrics}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    atomic_write_text(out / "settings.json", settings.to_json(extra=extra) + "\n")
    return metrics
