"""Sampling runs: typed settings, batched generation over seeds, and the files a run leaves.

``generate`` draws every sample from its own seed (``PerSampleNoise``), so a sample is the same
whatever the batch size and order, and ``settings.json`` written by ``write_samples`` is enough to
reproduce the samples exactly (``SampleSettings.from_json``).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.ddim import sample_ddim
from diffusekit.sampling.ddpm import sample_ddpm
from diffusekit.sampling.grids import SPACINGS
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.schedules import DiscreteSchedule

__all__ = ["SampleSettings", "generate", "write_samples", "TrajectoryRecorder", "SAMPLERS", "CONTINUOUS_SAMPLERS"]

DISCRETE_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
CONTINUOUS_SAMPLERS: tuple[str, ...] = ("euler", "heun", "rk45", "dpmpp_2m", "unipc", "sde", "pc", "langevin")
SAMPLERS: tuple[str, ...] = DISCRETE_SAMPLERS + CONTINUOUS_SAMPLERS
CONTINUOUS_GRIDS: tuple[str, ...] = ("auto", "time", "logsnr", "karras", "time_trailing", "logsnr_trailing",
                                     "karras_trailing")
# the grid each continuous sampler uses with grid = "auto" (see sampling/ode.py)
DEFAULT_GRID = {"euler": "karras", "heun": "karras", "dpmpp_2m": "logsnr", "unipc": "logsnr_trailing", "sde": "time",
                "pc": "time"}


def settings_to_json(settings: Any, extra: dict[str, Any] | None = None) -> str:
    """A settings dataclass as indented JSON, with ``extra`` (not a setting) under key "extra"."""
    d = asdict(settings)
    if extra is not None:
        d["extra"] = extra
    return json.dumps(d, indent=1)


def settings_from_json(cls: type, text: str, what: str) -> Any:
    """``cls(**settings)`` from JSON written by ``settings_to_json`` ("extra" ignored); a non-object
    or an unknown key is a ValueError naming ``what`` settings."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"{what} settings must be a JSON object")
    d.pop("extra", None)
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} settings keys {unknown}")
    return cls(**d)


@dataclass
class SampleSettings:
    """Everything that determines a set of samples besides the model and its schedule.

    ``steps = 0`` means the full chain (T steps); ``eta`` is DDIM's, ``variance`` DDPM's;
    ``clip_x0 = c`` clamps the predicted x0 to [-c, c] (None = off, the default). ``use_ema`` is
    recorded for the caller that loads the weights; ``batch_size`` does not change the samples.

    The continuous-time samplers (``CONTINUOUS_SAMPLERS``) run on the VP SDE of the schedule
    (``sde.vp_from_schedule``: t in [1/T, 1]); for them ``steps`` (0 = T) is the number of grid
    times (network calls: euler, dpmpp_2m, unipc, sde: steps; heun: 2 steps - 1; pc: steps (1 +
    corrector_steps); langevin: steps noise levels times ``langevin_steps`` + 1; rk45 ignores it and
    uses ``rtol``/``atol``), ``grid`` picks the time grid ("auto": karras for euler/heun, logsnr for
    dpmpp_2m, logsnr_trailing for unipc, time for sde/pc; langevin's levels are always geometric),
    ``snr`` and ``corrector_steps`` are the predictor-corrector's, ``step_size`` the annealed
    Langevin step relative to the noise variance, ``order`` UniPC's (1-3; the corrector adds one).

    Class-conditional models (``generate(..., num_classes=K)``): sample i gets the label
    ``classes[i % len(classes)]`` (``classes = None``: 0..K-1, so the samples cycle through the
    classes) and ``guidance`` is the classifier-free guidance scale s of ``sampling.guidance``
    (eps_uncond + s (eps_cond - eps_uncond); 1 = the conditional model, 0 = unconditional).
    """

    sampler: Literal["ddpm", "ddim", "euler", "heun", "rk45", "dpmpp_2m", "unipc", "sde", "pc", "langevin"] = "ddpm"
    steps: int = 0
    eta: float = 0.0
    variance: Literal["beta", "beta_tilde"] = "beta_tilde"
    spacing: Literal["leading", "linspace", "trailing"] = "trailing"
    clip_x0: float | None = None
    seeds: list[int] = field(default_factory=lambda: list(range(64)))
    use_ema: bool = True
    batch_size: int = 64
    grid: Literal["auto", "time", "logsnr", "karras", "time_trailing", "logsnr_trailing", "karras_trailing"] = "auto"
    snr: float = 0.16
    corrector_steps: int = 1
    langevin_steps: int = 5
    step_size: float = 1.0
    rtol: float = 1e-4
    atol: float = 1e-4
    order: int = 2
    guidance: float = 1.0
    classes: list[int] | None = None

    def __post_init__(self) -> None:
        self.seeds = [int(s) for s in self.seeds]
        if isinstance(self.guidance, int) and not isinstance(self.guidance, bool):
            self.guidance = float(self.guidance)
        if self.classes is not None and isinstance(self.classes, (list, tuple)):
            self.classes = list(self.classes)
        checks = [
            (self.sampler in SAMPLERS, "sampler", f"one of {SAMPLERS}", self.sampler),
            (isinstance(self.steps, int) and self.steps >= 0, "steps", "an integer >= 0 (0 = T)", self.steps),
            (0.0 <= self.eta <= 1.0, "eta", "in [0, 1]", self.eta),
            (self.variance in ("beta", "beta_tilde"), "variance", "'beta' or 'beta_tilde'", self.variance),
            (self.spacing in SPACINGS, "spacing", f"one of {SPACINGS}", self.spacing),
            (self.clip_x0 is None or self.clip_x0 > 0, "clip_x0", "positive or None", self.clip_x0),
            (len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds", "non-empty and distinct",
             f"{len(self.seeds)} seeds"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", ">= 1", self.batch_size),
            (self.grid in CONTINUOUS_GRIDS, "grid", f"one of {CONTINUOUS_GRIDS}", self.grid),
            (self.snr > 0, "snr", "positive", self.snr),
            (isinstance(self.corrector_steps, int) and self.corrector_steps >= 0, "corrector_steps", ">= 0",
             self.corrector_steps),
            (isinstance(self.langevin_steps, int) and self.langevin_steps >= 1, "langevin_steps", ">= 1",
             self.langevin_steps),
            (self.step_size > 0, "step_size", "positive", self.step_size),
            (self.rtol > 0, "rtol", "positive", self.rtol),
            (self.atol > 0, "atol", "positive", self.atol),
            (isinstance(self.order, int) and not isinstance(self.order, bool) and 1 <= self.order <= 3, "order",
             "1, 2 or 3", self.order),
            (isinstance(self.guidance, float) and math.isfinite(self.guidance) and self.guidance >= 0, "guidance",
             "a finite number >= 0", self.guidance),
            (self.classes is None or (isinstance(self.classes, list) and len(self.classes) > 0 and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.classes)), "classes",
             "None or a non-empty list of class labels >= 0", self.classes),
            (self.clip_x0 is None or self.sampler in DISCRETE_SAMPLERS, "clip_x0",
             "None for the continuous-time samplers (clipping applies to ddpm and ddim)", self.clip_x0),
        ]
        for ok, name, want, got in checks:
            if not ok:
                raise ValueError(f"sample settings: {name} must be {want}, got {got!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, extra: dict[str, Any] | None = None) -> str:
        """JSON of the settings; ``extra`` (run folder, checkpoint step...) goes under key "extra"."""
        return settings_to_json(self, extra)

    @classmethod
    def from_json(cls, text: str) -> "SampleSettings":
        """Read settings written by ``to_json`` (or a ``settings.json``); unknown keys are errors."""
        return settings_from_json(cls, text, "sample")


class TrajectoryRecorder:
    """A sampler callback that keeps x_t and the predicted x0 every ``every`` steps (on the CPU).

    After sampling (and ``final(x)`` with the output, to end on t = 0), ``frames("x")`` /
    ``frames("x0")`` are lists of tensors shaped like x and ``times`` the original t of each frame;
    ``viz.save_trajectory_strip`` draws them. Use it with one batch (``generate`` calls the
    callback for every batch in turn).
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
        self.times.append(int(info["t"]))
        for key in self._frames:
            self._frames[key].append(info[key][: self.max_samples].detach().to("cpu", copy=True))

    def final(self, x: Tensor) -> None:
        """Append the sampler's output as the last frame (t = 0, where x0 = x)."""
        self.times.append(0)
        for key in self._frames:
            self._frames[key].append(x[: self.max_samples].detach().to("cpu", copy=True))

    def frames(self, key: Literal["x", "x0"] = "x") -> list[Tensor]:
        return list(self._frames[key])


def _run_continuous(denoiser: DenoiserFn, schedule: DiscreteSchedule, noise: PerSampleNoise,
                    settings: SampleSettings, cond: Any, callback: Callback | None) -> Tensor:
    """The continuous-time samplers on the VP SDE of ``schedule`` (x_T ~ N(0, I), the VP prior)."""
    from diffusekit.sampling import dpm_solver, ode, stochastic, unipc
    from diffusekit.sde import vp_from_schedule

    sde = vp_from_schedule(schedule)
    steps = settings.steps or schedule.T
    name = settings.sampler
    grid = DEFAULT_GRID.get(name, "logsnr") if settings.grid == "auto" else settings.grid
    x_T = sde.prior_sample(noise())
    common = {"cond": cond, "callback": callback}
    if name == "rk45":
        return ode.sample_rk45(denoiser, sde, x_T, rtol=settings.rtol, atol=settings.atol, cond=cond)[0]
    if name in ("euler", "heun", "dpmpp_2m"):
        fn = {"euler": ode.sample_euler, "heun": ode.sample_heun, "dpmpp_2m": dpm_solver.sample_dpmpp_2m}[name]
        return fn(denoiser, sde, x_T, steps=steps, grid=grid, **common)
    if name == "unipc":
        return unipc.sample_unipc(denoiser, sde, x_T, steps=steps, order=settings.order, grid=grid, **common)
    if name == "sde":
        return stochastic.sample_euler_maruyama(denoiser, sde, x_T, noise, steps=steps, grid=grid, **common)
    if name == "pc":
        return stochastic.sample_pc(denoiser, sde, x_T, noise, steps=steps, snr=settings.snr,
                                      corrector_steps=settings.corrector_steps, grid=grid, **common)
    return stochastic.sample_annealed_langevin(denoiser, sde, x_T, noise, levels=steps,
                                                 steps_each=settings.langevin_steps, step_size=settings.step_size,
                                                 **common)


class _CountCalls:
    """A denoiser wrapper that counts network calls (one call = one batched evaluation; a guided
    denoiser makes one call of 2B rows, see ``sampling.guidance``)."""

    def __init__(self, denoiser: DenoiserFn):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x_t: Tensor, logsnr: Tensor, cond: Any = None):
        self.calls += 1
        return self.denoiser(x_t, logsnr, cond)


def _run_sampler(denoiser: DenoiserFn, schedule: DiscreteSchedule, noise: PerSampleNoise, settings: SampleSettings,
                 cond: Any, callback: Callback | None, progress: bool) -> Tensor:
    if settings.sampler in CONTINUOUS_SAMPLERS:
        return _run_continuous(denoiser, schedule, noise, settings, cond, callback)
    steps = settings.steps or None
    x_T = noise()
    if settings.sampler == "ddpm":
        return sample_ddpm(denoiser, schedule, x_T, noise, steps=steps, spacing=settings.spacing,
                           variance=settings.variance, clip_x0=settings.clip_x0, cond=cond, callback=callback,
                           progress=progress)
    return sample_ddim(denoiser, schedule, x_T, noise, steps=steps, spacing=settings.spacing, eta=settings.eta,
                       clip_x0=settings.clip_x0, cond=cond, callback=callback, progress=progress)


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
    from diffusekit.sampling.guidance import ClassifierFreeGuidance, class_labels_for, null_class_labels

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
    "labels", the class labels when ``num_classes`` > 0.
    """
    if settings.steps > schedule.T and settings.sampler in DISCRETE_SAMPLERS:
        raise ValueError(f"settings.steps must lie in 0..T = {schedule.T}, got {settings.steps}")
    denoiser, cond = _class_conditioning(denoiser, settings, num_classes, cond, device)
    seeds, bs = settings.seeds, settings.batch_size
    out = []
    batches = range(0, len(seeds), bs)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{settings.sampler} batches", total=math.ceil(len(seeds) / bs))
    counted = _CountCalls(denoiser)
    for lo in batches:
        hi = min(lo + bs, len(seeds))
        noise = PerSampleNoise(seeds[lo:hi], shape, dtype=dtype, device=device)
        x = _run_sampler(counted, schedule, noise, settings, _slice_cond(cond, lo, hi), callback, False)
        out.append(x.cpu())
    if stats is not None:
        stats["nfe"] = counted.calls
        stats["rows_per_example"] = getattr(denoiser, "rows_per_example", 1)
        if num_classes > 0:
            stats["labels"] = cond["class_labels"].cpu()
    return torch.cat(out)


def write_samples(x: Tensor, seeds: Sequence[int], out_dir: Path | str, settings: SampleSettings,
                  levels: int | None = None, extra: dict[str, Any] | None = None, nrow: int | None = None) -> Path:
    """Write the results of ``generate`` to ``out_dir`` (each file atomically):

    - ``grid.png``: all samples (image grid with ``nrow`` per row, scatter for 2-D points, histograms
      otherwise);
    - ``sample_<seed>.png`` per sample for images (quantized to ``levels`` if given);
    - ``samples.npz``: ``x`` (float32, data range) and ``seeds`` (int64);
    - ``settings.json``: the exact ``SampleSettings`` plus ``extra`` under key "extra".
    """
    from diffusekit.train.checkpoint import atomic_write_bytes, atomic_write_text
    from diffusekit.viz import image_grid, png_bytes, save_samples_figure

    x = x.detach().cpu()
    seeds = [int(s) for s in seeds]
    if x.shape[0] != len(seeds):
        raise ValueError(f"{x.shape[0]} samples but {len(seeds)} seeds")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_samples_figure(x, out / "grid.png", levels=levels, nrow=nrow)
    if x.ndim == 4:
        for seed, img in zip(seeds, x):
            atomic_write_bytes(out / f"sample_{seed}.png", png_bytes(image_grid(img[None], pad=0, upscale=1,
                                                                               levels=levels)))
    buf = io.BytesIO()
    np.savez(buf, x=x.to(torch.float32).numpy(), seeds=np.asarray(seeds, dtype=np.int64))
    atomic_write_bytes(out / "samples.npz", buf.getvalue())
    atomic_write_text(out / "settings.json", settings.to_json(extra=extra or {}) + "\n")
    return out
