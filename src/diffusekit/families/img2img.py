"""The image-to-image family (``model.kind = "img2img"``): a diffusion model trained on pairs, conditioned on
the degraded image, as SR3 (Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement", sec. 2)
and Palette (Saharia et al. 2022, "Palette: Image-to-Image Diffusion Models", sec. 3) do.

The U-Net reads x_t beside a condition image of C + 1 channels, ``condition_image(op, y)``:

    [ A+ y  (C channels: zero fill, nearest upsampling or gray, as sampling/restore.py defines A+),
      m     (1 channel: 1 where the pixel is measured, 0 where a mask leaves it unknown; 1 everywhere for
             super-resolution and colorization) ]

concatenated along the channels (SR3 sec. 2.3, Palette sec. 3), and a task index through the U-Net's label
embedding, so one network learns several tasks (Palette's multi-task model, sec. 5.4). The tasks
(``img2img.tasks``; ``img2img.superres_factors`` for super-resolution, one task index per factor) are the
degradations y = A x of ``sampling/restore.py``: ``Inpaint`` with random free-form strokes or a box
(inpaint) and with a kept box or a kept side (outpaint, Palette's uncrop), ``SuperResolution(f)``
(average pooling), ``Colorization(C)`` (the channel mean). Pairs are made on the fly from any image dataset
(``make_pairs``): every draw comes from the trainer's noise generator, so resume stays exact. The loss is the
discrete-time denoising loss of ``[loss]`` of the conditional network (SR3 eq. 4 for eps, Palette eq. 2).

Restoring (``sample_img2img``, called by ``runs.restore`` for ``diffusekit restore --run R`` on such a run)
is ancestral DDPM on the conditional denoiser (``sampling.ddpm.sample_ddpm`` with the condition as
``cond``; ``steps`` respaces it), ending, like RePaint and DDNM, with ``op.consistent(x, y)``: the known pixels
of a mask are the input's, bit for bit, and A x = y for pooling and gray up to one rounding.

**Residual diffusion** (``img2img.residual_scale = s > 0``). The measurement fixes P x = A+ y exactly, so only
the unseen part (I - P) x = x - A+ y is uncertain. With s > 0 the model diffuses r = (x - A+ y) / s instead of
x, and a restoration is A+ y + s r. This is the residual idea of SRDiff (Li et al. 2022, "SRDiff: Single Image
Super-Resolution with Diffusion Probabilistic Models", sec. 3.2, where the residual is taken over the bicubic
upsampling), here over A+ y, so it lies in the null space of A for every task. Dividing by s (about the RMS of
the residual on the training data) gives the network a unit-scale target. Where the unseen part is nearly
zero (smooth patches for super-resolution, gray ones for colorization), the network's absolute error shrinks
by the factor s; with s = 0 the same error lands on the image at full scale. Measured on photo patches
(docs/restoration.md), that did not pay: it ties diffusing x on super-resolution and is worse on colorization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.registry import load_dataset
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.families import diffusion
from diffusekit.families.base import Model, SampleRequest, Samples
from diffusekit.io.checkpoint import check_state, load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.nn.build import build_unet
from diffusekit.parameterization import Callback, Denoiser, DenoiserFn
from diffusekit.sampling.ddpm import NoiseFn, Variance, sample_ddpm
from diffusekit.sampling.grids import Spacing
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.restore import Colorization, Inpaint, LinearDegradation, SuperResolution
from diffusekit.schedules import DiscreteSchedule

__all__ = ["KIND", "Img2ImgModel", "Img2ImgObjective", "Img2ImgUNet", "Pairs", "Task", "box_masks", "build_network",
           "condition_image", "degradation", "freeform_masks", "from_residual", "load", "make_pairs", "residual",
           "sample", "sample_img2img", "tasks_of", "training_masks", "uncrop_masks"]

KIND = "img2img"


class Task(NamedTuple):
    """One thing the network learns: a task of ``img2img.tasks`` and, for superres, its factor (else 0)."""

    name: str
    factor: int = 0

    def __str__(self) -> str:
        return f"{self.name} x{self.factor}" if self.name == "superres" else self.name


def tasks_of(cfg: Config) -> list[Task]:
    """The tasks of a config in task-index order: ``img2img.tasks``, superres once per factor."""
    ii = cfg.img2img
    return [Task(name, f) for name in ii.tasks for f in (ii.superres_factors if name == "superres" else (0,))]


# -- masks (True = known), all drawn from ``generator`` --------------------------------------------------
def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """An integer uniform in lo..hi (both included)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _box_side(size: int, generator: torch.Generator) -> int:
    return _randint(max(1, size // 4), max(1, (3 * size) // 4), generator)


def box_masks(n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """(n, 1, H, W) masks with one unknown box each: sides uniform in H/4..3H/4 (W/4..3W/4), placed uniformly."""
    H, W = size
    known = torch.ones(n, 1, H, W, dtype=torch.bool)
    for k in range(n):
        h, w = _box_side(H, generator), _box_side(W, generator)
        top, left = _randint(0, H - h, generator), _randint(0, W - w, generator)
        known[k, 0, top:top + h, left:left + w] = False
    return known


def freeform_masks(n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """(n, 1, H, W) free-form masks: 1-3 brush strokes, each a polyline of 2-5 segments from a uniform start, at
    uniform angles, of lengths uniform in [0.1, 0.5] H; a pixel is unknown when its centre lies within the
    stroke's radius (0.5 + U H / 16 pixels) of a segment (the irregular masks of Palette, sec. 5.2, scaled down)."""
    H, W = size
    rows = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W) + 0.5
    cols = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W) + 0.5
    known = torch.ones(n, 1, H, W, dtype=torch.bool)
    for k in range(n):
        unknown = torch.zeros(H, W, dtype=torch.bool)
        for _ in range(_randint(1, 3, generator)):
            radius = 0.5 + _uniform(generator) * H / 16
            r0, c0 = _uniform(generator) * H, _uniform(generator) * W
            for _ in range(_randint(2, 5, generator)):
                angle, length = 2 * math.pi * _uniform(generator), (0.1 + 0.4 * _uniform(generator)) * H
                r1 = min(max(r0 + length * math.sin(angle), 0.0), float(H))
                c1 = min(max(c0 + length * math.cos(angle), 0.0), float(W))
                dr, dc = r1 - r0, c1 - c0
                s = ((rows - r0) * dr + (cols - c0) * dc) / max(dr * dr + dc * dc, 1e-12)
                s = s.clamp(0, 1)
                unknown |= (rows - r0 - s * dr) ** 2 + (cols - c0 - s * dc) ** 2 <= radius ** 2
                r0, c0 = r1, c1
        if not unknown.any():  # a stroke between pixel centres: its nearest pixel
            unknown[min(int(r0), H - 1), min(int(c0), W - 1)] = True
        known[k, 0] = ~unknown
    return known


def uncrop_masks(n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """(n, 1, H, W) outpainting masks (Palette's uncrop, sec. 5.3): with probability 1/2 a known box (sides H/4..3H/4,
    placed uniformly) and everything around it unknown, else one side unknown (left, right, top or bottom, a
    strip of H/4..3H/4 rows or columns)."""
    H, W = size
    known = torch.zeros(n, 1, H, W, dtype=torch.bool)
    for k in range(n):
        if _uniform(generator) < 0.5:
            h, w = _box_side(H, generator), _box_side(W, generator)
            top, left = _randint(0, H - h, generator), _randint(0, W - w, generator)
            known[k, 0, top:top + h, left:left + w] = True
        else:
            side = _randint(0, 3, generator)
            width = _box_side(W if side < 2 else H, generator)
            known[k, 0] = True
            region = {0: (slice(None), slice(0, width)), 1: (slice(None), slice(W - width, W)),
                      2: (slice(0, width), slice(None)), 3: (slice(H - width, H), slice(None))}[side]
            known[k, 0][region] = False
    return known


def training_masks(task: str, n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Known-pixel masks for ``task``: inpaint, half free-form and half box (one draw each decides); outpaint,
    ``uncrop_masks``."""
    if task == "outpaint":
        return uncrop_masks(n, size, generator)
    known = torch.ones(n, 1, *size, dtype=torch.bool)
    for k in range(n):
        draw = freeform_masks if _uniform(generator) < 0.5 else box_masks
        known[k:k + 1] = draw(1, size, generator)
    return known


def degradation(task: Task, channels: int, known: Tensor | None = None) -> LinearDegradation:
    """The operator of ``sampling/restore.py`` for ``task`` (``known``: the masks of inpaint and outpaint)."""
    if task.name == "superres":
        return SuperResolution(task.factor)
    if task.name == "colorize":
        return Colorization(channels)
    if known is None:
        raise ValueError(f"{task} needs known-pixel masks")
    return Inpaint(known)


def condition_image(op: LinearDegradation, y: Tensor) -> Tensor:
    """What the network reads beside x_t: [A+ y, m] (N, C + 1, H, W), m = 1 on measured pixels (a mask's known
    ones; every pixel for pooling and gray), 0 elsewhere."""
    up = op.A_pinv(y)
    shape = (up.shape[0], 1, *up.shape[2:])
    if isinstance(op, Inpaint):
        measured = op.known.to(up.device).expand(shape).to(up.dtype)
    else:
        measured = torch.ones(shape, dtype=up.dtype, device=up.device)
    return torch.cat([up, measured], dim=1)


def residual(x0: Tensor, source: Tensor, scale: float) -> Tensor:
    """What the network diffuses: x0 itself for ``scale`` 0, else r0 = (x0 - A+ y) / scale, with A+ y the first C
    channels of the condition image ``source`` (= P x0, so r0 = (I - P) x0 / scale lies in A's null space)."""
    if not scale:
        return x0
    return (x0 - source[:, :x0.shape[1]].to(x0.dtype)) / scale


def from_residual(r: Tensor, source: Tensor, scale: float) -> Tensor:
    """The inverse of ``residual``: A+ y + scale r (r itself for ``scale`` 0)."""
    if not scale:
        return r
    return source[:, :r.shape[1]].to(r.dtype) + scale * r


@dataclass
class Pairs:
    """A batch of training pairs: the condition images (N, C + 1, H, W), the task indices (N,) and the
    known-pixel masks (N, 1, H, W; all True for superres and colorize)."""

    source: Tensor
    task: Tensor
    known: Tensor


def make_pairs(x0: Tensor, tasks: list[Task], generator: torch.Generator) -> Pairs:
    """Degrade each example of ``x0`` by a task drawn uniformly from ``tasks``: first the N task indices, then,
    task by task in index order, the masks of that task's examples (in batch order), all from ``generator``."""
    n, C, H, W = x0.shape
    task = torch.randint(len(tasks), (n,), generator=generator)
    source = torch.empty(n, C + 1, H, W, dtype=x0.dtype, device=x0.device)
    known = torch.ones(n, 1, H, W, dtype=torch.bool)
    for index, spec in enumerate(tasks):
        rows = (task == index).nonzero().flatten()
        if len(rows) == 0:
            continue
        masks = None
        if spec.name in ("inpaint", "outpaint"):
            masks = training_masks(spec.name, len(rows), (H, W), generator)
            known[rows] = masks
        op = degradation(spec, C, None if masks is None else masks.to(x0.device))
        source[rows.to(x0.device)] = condition_image(op, op.A(x0[rows.to(x0.device)]))
    return Pairs(source, task.to(x0.device), known)


# -- the network ----------------------------------------------------------------------------------------
class Img2ImgUNet(nn.Module):
    """A U-Net over [x_t, condition image] (2C + 1 input channels, C output channels); the task index goes
    in as the U-Net's class label (its embedding is added to the noise level's)."""

    def __init__(self, unet: nn.Module, channels: int):
        super().__init__()
        self.unet, self.channels = unet, channels

    def forward(self, x: Tensor, c_noise: Tensor, source: Tensor | None = None, task: Tensor | None = None) -> Tensor:
        if source is None or task is None:
            raise ValueError("an image-to-image network needs the condition image (source) and the task index")
        if source.shape != (x.shape[0], self.channels + 1, *x.shape[2:]):
            raise ValueError(f"source must have shape {(x.shape[0], self.channels + 1, *x.shape[2:])}, "
                             f"got {tuple(source.shape)}")
        return self.unet(torch.cat([x, source.to(x.dtype)], dim=1), c_noise, class_labels=task)


def build_network(cfg: Config, data_shape: tuple[int, ...]) -> Img2ImgUNet:
    """The conditional U-Net of ``[model]`` for images of ``data_shape``, with one task embedding per task;
    one-line ConfigErrors for data or tasks it cannot take."""
    if len(data_shape) != 3:
        raise ConfigError(f"model.kind = {KIND!r} needs image data (C, H, W), got per-example shape {data_shape}")
    C, H, W = data_shape
    if H != W:
        raise ConfigError(f"model.kind = {KIND!r} needs square images, got {H}x{W}")
    if "colorize" in cfg.img2img.tasks and C != 3:
        raise ConfigError(f"img2img.tasks has 'colorize', which needs colour (3-channel) images; data.name = "
                          f"{cfg.data.name!r} has {C} channel{'s' if C != 1 else ''}")
    bad = [f for f in cfg.img2img.superres_factors if H % f] if "superres" in cfg.img2img.tasks else []
    if bad:
        raise ConfigError(f"img2img.superres_factors: factor {bad[0]} does not divide the image size {H}x{W}")
    unet = build_unet(cfg.model, 2 * C + 1, H, num_classes=len(tasks_of(cfg)), out_channels=C)
    return Img2ImgUNet(unet, C)


class Img2ImgObjective(diffusion.DiffusionObjective):
    """The denoising loss of ``[loss]`` (``DiffusionObjective.loss``) of the conditional network on pairs made
    from each batch (``make_pairs``): the pairs' draws come first, then t and the noise."""

    heldout_bound = None  # a conditional model: no unconditional bound on the test split (train.bound_every)

    def __init__(self, cfg: Config, data: ArrayDataset):
        if cfg.loss.objective != "discrete":
            raise ConfigError(f"model.kind = {KIND!r} trains the discrete-time loss; set loss.objective = 'discrete'")
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        self.schedule = diffusion.build_schedule(cfg.diffusion)
        self.module = build_network(cfg, self.data_shape)
        self.kind = cfg.model.prediction
        self.tasks = tasks_of(cfg)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """The denoising loss on x0, or with ``img2img.residual_scale`` on r0 = (x0 - A+ y) / s (``residual``)."""
        pairs = make_pairs(x0, self.tasks, generator)
        target = residual(x0, pairs.source, self.cfg.img2img.residual_scale)
        return super().loss(module, target, None, generator, extra_cond={"source": pairs.source, "task": pairs.task})

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """Pairs (condition's A+ y, restoration) of the first n / 2 test images, tasks and masks drawn from
        seed 0; DDPM on at most 100 steps."""
        with torch.random.fork_rng(devices=[]):
            x = load_dataset(self.cfg.data, "test").x[:max(1, n // 2)].to(device)
        pairs = make_pairs(x, self.tasks, torch.Generator().manual_seed(0))
        noise = PerSampleNoise(range(x.shape[0]), x.shape[1:], device=device)
        cond = {"source": pairs.source, "task": pairs.task}
        out = sample_ddpm(self.denoiser(module).eval(), self.schedule, noise(), noise, steps=min(100, self.schedule.T),
                          cond=cond)
        out = from_residual(out, pairs.source, self.cfg.img2img.residual_scale)
        C = x.shape[1]
        return torch.stack([pairs.source[:, :C], out], dim=1).flatten(0, 1)


# -- a trained run ---------------------------------------------------------------------------------------
@dataclass
class Img2ImgModel(Model):
    """A trained image-to-image model: the conditional denoiser, its float64 schedule and its tasks."""

    denoiser: DenoiserFn | None = None
    schedule: DiscreteSchedule | None = None
    tasks: tuple[Task, ...] = ()

    def task_index(self, task: str, factor: int = 0) -> int:
        """The index of ``task`` (with ``factor`` for superres); a one-line ConfigError naming the run and the
        tasks it was trained for otherwise."""
        wanted = Task(task, factor if task == "superres" else 0)
        if wanted not in self.tasks:
            flag = f"--task {task}" + (f" --factor {factor}" if task == "superres" else "")
            raise ConfigError(f"{flag}: {self.source} is an image-to-image run trained for "
                              f"{', '.join(map(str, self.tasks))} only (img2img.tasks); train one for {wanted} or "
                              "use an unconditional run with the training-free methods")
        return self.tasks.index(wanted)


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> Img2ImgModel:
    """An image-to-image run's conditional denoiser from its newest checkpoint (shapes checked on a weightless
    copy first, as ``diffusion.load_network`` does)."""
    state, source, what = rc.weights(use_ema)
    try:
        with torch.device("meta"):
            check_state(build_network(rc.cfg, rc.data_shape).state_dict(), state, source, what)
        net = build_network(rc.cfg, rc.data_shape)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{rc.path}.json: recorded model cannot be built ({exc})") from None
    load_module_state(net, state, source, what)
    denoiser = Denoiser(net, rc.cfg.model.prediction).to(device).eval()
    return Img2ImgModel(rc.run_dir, rc.cfg, rc.data_shape, rc.levels, rc.step, rc.path, denoiser=denoiser,
                        schedule=diffusion.build_schedule(rc.cfg.diffusion), tasks=tuple(tasks_of(rc.cfg)))


def sample(model: Img2ImgModel, settings: Any, request: SampleRequest, device: str | torch.device = "cpu",
           progress: bool = True) -> Samples:
    """An image-to-image model draws nothing without an input: a one-line ConfigError pointing to restore."""
    tasks = ", ".join(map(str, model.tasks))
    raise ConfigError(f"--run {model.source}: an image-to-image run ({tasks}) restores images rather than sampling "
                      f"them; use `diffusekit restore --run {model.source} --task {model.tasks[0].name}`")


@torch.no_grad()
def sample_img2img(denoiser: DenoiserFn, schedule: DiscreteSchedule, x_T: Tensor, noise: NoiseFn,
                   op: LinearDegradation, y: Tensor, *, task: int, steps: int | None = None,
                   spacing: Spacing = "trailing", variance: Variance = "beta_tilde", clip_x0: float | None = None,
                   residual_scale: float = 0.0, callback: Callback | None = None, progress: bool = False) -> Tensor:
    """Restore y = op.A(x) with a trained image-to-image denoiser: ancestral DDPM (``sample_ddpm``, respaced to
    ``steps`` with ``spacing``) on the denoiser conditioned on ``condition_image(op, y)`` and task index ``task``
    (SR3 Algorithm 2, Palette sec. 3), then ``op.consistent(x, y)`` (the measured part is y's). With
    ``residual_scale`` s > 0 the chain draws r and the image is A+ y + s r (``from_residual``); ``clip_x0`` then
    clips r's prediction, so a caller clipping images must leave it None. The same calling convention as
    ``sample_repaint``: one x_T draw and one ``noise()`` per step but the last."""
    y = y.to(device=x_T.device, dtype=x_T.dtype)
    source = condition_image(op, y)
    cond = {"source": source, "task": torch.full((x_T.shape[0],), task, device=x_T.device)}
    x = sample_ddpm(denoiser, schedule, x_T, noise, steps=steps, spacing=spacing, variance=variance, clip_x0=clip_x0,
                    cond=cond, callback=callback, progress=progress)
    return op.consistent(from_residual(x, source, residual_scale), y)
