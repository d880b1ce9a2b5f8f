"""``generate``: samples for a list of seeds, each from its own seed, by any sampler of the catalog.

``generate`` draws every sample from its own seed (``PerSampleNoise``), so a sample is the same
whatever the batch size and order; ``SampleSettings`` (``sampling.settings``) name the sampler and its
options, and the catalog row of the sampler (``sampling.catalog``) says how to call its function, so a new
sampler needs no change here. ``TrajectoryRecorder`` keeps the reverse process for pictures, and
``sample_trajectory`` returns it for one sample of a call.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.errors import ConfigError, SamplingError
from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import TUNED_GRID, SamplerSpec, default_grid, sampler_spec
from diffusekit.sampling.guidance import ClassifierFreeGuidance, class_labels_for, null_class_labels
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.ode import time_grid
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule
from diffusekit.sde import vp_from_schedule
from diffusekit.speed import fast_denoiser

__all__ = ["Trajectory", "TrajectoryRecorder", "check_finite", "generate", "run_sampler", "sample_trajectory",
           "sampler_function"]


class TrajectoryRecorder:
    """A sampler callback that keeps x_t and the predicted x0 every ``every`` steps (on the CPU).

    After sampling (and ``final(x)`` with the output, to end on t = 0), ``frames("x")`` /
    ``frames("x0")`` are lists of tensors shaped like x and ``times`` the t of each frame (the discrete
    t of ddpm and ddim, the continuous t in (0, 1] of the others); ``viz.save_trajectory_strip`` draws
    them. The continuous-time samplers that report the VE variable y = x_t / alpha_t with its sigma
    (``sampling.ode``) are recorded as x_t = y / sqrt(1 + sigma^2), the VP state, like the others. Use it
    with one batch (``generate`` calls the callback for every batch in turn).
    """

    def __init__(self, every: int = 1, max_samples: int | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.max_samples = every, max_samples
        self.times: list[int] = []
        self._frames: dict[str, list[Tensor]] = {"x": [], "x0": []}

    def __call__(self, info: dict[str, Any]) -> None:
        if info["i"] % self.every:
            return
        t = info["t"]
        self.times.append(float(t) if isinstance(t, float) else int(t))
        frames = {"x": info["x"], "x0": info["x0"]}
        if "sigma" in info:  # the VE view y = x_t / alpha_t, and alpha_t = 1 / sqrt(1 + sigma^2) on a VP SDE
            frames["x"] = frames["x"] * (1.0 / math.sqrt(1.0 + float(info["sigma"]) ** 2))
        for key in self._frames:
            self._frames[key].append(frames[key][: self.max_samples].detach().to("cpu", copy=True))

    def final(self, x: Tensor) -> None:
        """Append the sampler's output as the last frame (t = 0, where x0 = x)."""
        self.times.append(0)
        for key in self._frames:
            self._frames[key].append(x[: self.max_samples].detach().to("cpu", copy=True))

    def frames(self, key: Literal["x", "x0"] = "x") -> list[Tensor]:
        return list(self._frames[key])


class _CountCalls:
    """A denoiser wrapper that counts network calls (one call = one batched evaluation; a guided
    denoiser makes one call of 2B rows, see ``sampling.guidance``)."""

    def __init__(self, denoiser: DenoiserFn):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x_t: Tensor, logsnr: Tensor, cond: Any = None):
        self.calls += 1
        return self.denoiser(x_t, logsnr, cond)


def sampler_function(spec: SamplerSpec):
    """The function a catalog row names (``"<module>.<function>"`` inside ``diffusekit.sampling``)."""
    module, name = spec.function.split(".")
    return getattr(importlib.import_module(f"diffusekit.sampling.{module}"), name)


def run_sampler(denoiser: DenoiserFn, schedule: DiscreteSchedule, noise: PerSampleNoise, settings: SampleSettings,
                cond: Any = None, callback: Callback | None = None) -> Tensor:
    """One batch: the sampler of ``settings`` from x_T = noise() to clean data, called as its catalog row
    says (``sampling.catalog``); the continuous-time samplers run on the VP SDE of ``schedule``."""
    spec = sampler_spec(settings.sampler)
    fn = sampler_function(spec)
    options = {kw: getattr(settings, name) for kw, name in spec.options.items()}
    common = {"cond": cond, "callback": callback}
    steps = settings.steps or schedule.T
    if spec.call == "discrete":
        return fn(denoiser, schedule, noise(), noise, steps=settings.steps or None, **options, **common)
    sde = vp_from_schedule(schedule)
    x_T = sde.prior_sample(noise())
    if spec.call == "adaptive":
        return fn(denoiser, sde, x_T, cond=cond, **options)[0]
    if spec.call == "levels":
        return fn(denoiser, sde, x_T, noise, levels=steps, **options, **common)
    if settings.times is not None:  # grid = "tuned": the explicit times (sampling.tune, the run's grids.json)
        times = torch.tensor(settings.times, dtype=torch.float64)
    elif settings.grid == TUNED_GRID:
        raise ConfigError(f"grid = {TUNED_GRID!r} needs its times (SampleSettings.times); `diffusekit sample` reads "
                          "them from the run's grids.json (written by `diffusekit tune-grid`)")
    else:
        times = time_grid(sde, steps, default_grid(spec.name) if settings.grid == "auto" else settings.grid)
    if spec.call == "sde":
        return fn(denoiser, sde, x_T, noise, times, **options, **common)
    return fn(denoiser, sde, x_T, times, **options, **common)


def _slice_cond(cond: Any, lo: int, hi: int) -> Any:
    """Per-example conditioning (tensors with a batch dim, in a dict or alone) cut to one batch."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[lo:hi]
    if isinstance(cond, dict):
        return {k: _slice_cond(v, lo, hi) for k, v in cond.items()}
    return cond


def _class_conditioning(denoiser: DenoiserFn, settings: SampleSettings, num_classes: int, cond: Any,
                        device: torch.device | str) -> tuple[DenoiserFn, Any]:
    """The labels of ``settings.classes`` as ``cond`` and the guided denoiser, for a model with
    ``num_classes`` classes (0: unconditional, and then ``classes``/``guidance`` must be unset)."""
    if num_classes == 0:
        if settings.classes is not None or settings.guidance != 1.0:
            raise ValueError("sample settings: classes and guidance need a class-conditional model "
                             f"(num_classes > 0), got classes={settings.classes!r}, guidance={settings.guidance}")
        return denoiser, cond
    if cond is not None:
        raise ValueError("generate: pass either cond or num_classes (which makes the class labels), not both")
    labels = class_labels_for(len(settings.seeds), settings.classes, num_classes).to(device)
    return ClassifierFreeGuidance(denoiser, settings.guidance, null_class_labels(num_classes)), {"class_labels": labels}


def generate(denoiser: DenoiserFn, schedule: DiscreteSchedule, shape: Sequence[int], settings: SampleSettings,
             device: torch.device | str = "cpu", cond: Any = None, callback: Callback | None = None,
             progress: bool = True, dtype: torch.dtype = torch.float32, stats: dict[str, Any] | None = None,
             num_classes: int = 0) -> Tensor:
    """Samples for ``settings.seeds`` in order, shape (len(seeds), *shape), on the CPU.

    Seeds are processed in batches of ``settings.batch_size``; sample i uses only seed i, so the
    batch size does not change any sample (up to the network's own batch invariance). ``cond``
    holds per-seed tensors (or a dict of them) and is cut into the same batches. For a
    class-conditional model pass ``num_classes`` = K instead: sample i gets the label
    ``settings.classes[i % len]`` (default: i % K) and the denoiser is guided with
    ``settings.guidance`` (``sampling.guidance.ClassifierFreeGuidance``). The caller chooses the
    weights (``settings.use_ema`` is only recorded). ``stats``, if given, receives "nfe": the number
    of batched network calls over all batches (function evaluations; with guidance each call
    evaluates the conditional and null halves together, so "rows_per_example" is 2), and
    "labels", the class labels when ``num_classes`` > 0. ``settings.precision`` and ``settings.compile``
    say how the network runs (``speed.fast_denoiser``); the samplers' arithmetic is the same either way.
    """
    settings.check(T=schedule.T)
    denoiser = fast_denoiser(denoiser, settings.precision, settings.compile)  # the network only; guidance in fp32
    denoiser, cond = _class_conditioning(denoiser, settings, num_classes, cond, device)
    seeds, bs = settings.seeds, settings.batch_size
    out = []
    batches = range(0, len(seeds), bs)
    if progress:
        batches = tqdm(batches, desc=f"{settings.sampler} batches", total=math.ceil(len(seeds) / bs))
    counted = _CountCalls(denoiser)
    for lo in batches:
        hi = min(lo + bs, len(seeds))
        noise = PerSampleNoise(seeds[lo:hi], shape, dtype=dtype, device=device)
        x = run_sampler(counted, schedule, noise, settings, _slice_cond(cond, lo, hi), callback)
        out.append(x.cpu())
    if stats is not None:
        stats["nfe"] = counted.calls
        stats["rows_per_example"] = getattr(denoiser, "rows_per_example", 1)
        if num_classes > 0:
            stats["labels"] = cond["class_labels"].cpu()
    return torch.cat(out)


@dataclass
class Trajectory:
    """The reverse process of one sample: ``x`` (F, *shape) the state x_t and ``x0`` (F, *shape) the
    model's estimate of x_0 at the F recorded ``times`` (the sampler's t, first the noisiest; the last
    frame, t = 0, is the sample itself in both)."""

    times: list[float]
    x: Tensor
    x0: Tensor


def sample_trajectory(denoiser: DenoiserFn, schedule: DiscreteSchedule, shape: Sequence[int],
                      settings: SampleSettings, index: int = 0, device: torch.device | str = "cpu", cond: Any = None,
                      num_classes: int = 0, max_frames: int = 25) -> Trajectory:
    """The reverse trajectory of sample ``index`` of ``settings``: that sample drawn again by the same
    sampler from its own seed (and its class label or ``cond`` row), with every state the sampler
    reports kept, then at most ``max_frames`` of them, evenly spaced, first and last included. The last
    frame equals sample ``index`` of ``generate(..., settings)`` up to the network's batch invariance.
    An adaptive sampler (rk45) reports no states: its trajectory is the sample alone."""
    if not 0 <= index < len(settings.seeds):
        raise ConfigError(f"sample index {index} is out of range for {len(settings.seeds)} seeds")
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    classes = settings.classes or (list(range(num_classes)) if num_classes > 0 else None)
    one = settings.replace(seeds=[settings.seeds[index]], batch_size=1,
                           classes=None if classes is None else [classes[index % len(classes)]])
    recorder = TrajectoryRecorder()
    x = generate(denoiser, schedule, shape, one, device=device, cond=_slice_cond(cond, index, index + 1),
                 callback=recorder, progress=False, num_classes=num_classes)
    recorder.final(x)
    n = len(recorder.times)
    keep = sorted({round(i * (n - 1) / (max_frames - 1)) for i in range(max_frames)}) if n > max_frames else range(n)
    return Trajectory(times=[recorder.times[i] for i in keep],
                      x=torch.cat([recorder.frames("x")[i] for i in keep]),
                      x0=torch.cat([recorder.frames("x0")[i] for i in keep]))


def check_finite(x: Tensor, what: str = "samples") -> None:
    """A ``SamplingError`` (one line: how many, and what to try) when any of ``x`` is NaN or infinite, so
    that no such sample is ever written or scored as if it were one."""
    bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1)
    if bool(bad.any()):
        raise SamplingError(f"{int(bad.sum())} of {x.shape[0]} {what} are not finite (NaN or infinity); nothing was "
                            "written. Lower the guidance, step size or clip value, or check the checkpoint")
