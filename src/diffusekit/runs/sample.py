"""Sampling a run folder (``diffusekit sample``): settings, the destination, the samples, the files.

``sample_run`` reads the run once (``families.read_run``), builds the settings from its ``[sample]``
config with the call's overrides (or reads an earlier ``settings.json``), checks what the call asks
against what the model takes, checks the destination, then samples and writes (``write_samples``)
into a folder that is complete or absent: ``grid.png``, ``sample_<seed>.png`` per image,
``samples.npz`` (``x`` in the data range and ``seeds``) and ``settings.json`` (the settings, plus the
run, checkpoint and request under "extra"), which reproduces the samples exactly.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from diffusekit.config import Config
from diffusekit.errors import ConfigError
from diffusekit.families import Family, families_taking, read_run
from diffusekit.families.base import CONDITIONING_FLAGS, Model, SampleRequest, Samples, check_labels_and_guidance
from diffusekit.io.atomic import OutputFolder, atomic_write_bytes, atomic_write_text, read_input_file
from diffusekit.runs.cascade import open_upsampler
from diffusekit.runs.grids import tuned_settings
from diffusekit.sampling.catalog import TUNED_GRID
from diffusekit.sampling.generate import check_finite
from diffusekit.sampling.settings import SampleSettings
from diffusekit.viz import image_grid, png_bytes, save_samples_figure

__all__ = ["SampleResult", "sample_run", "write_samples", "read_settings_file", "check_conditioning",
           "check_size", "MAX_SAMPLE_BYTES"]

MAX_SAMPLE_BYTES = 8 * 2**30  # the samples of one call are held in memory (float32): refuse more than 8 GiB


@dataclass
class SampleResult:
    out: Path
    settings: Any
    samples: Samples
    seconds: float


def _key(overrides: dict[str, Any], names: dict[str, str] | None) -> Callable[[str], str]:
    names = names or {}
    return lambda f: names.get(f, f) if f in overrides else f"sample.{f}"


def read_settings_file(family: Family, path: Path, request: SampleRequest) -> tuple[Any, SampleRequest]:
    """An earlier call's ``settings.json`` for this family, checked like flags (one line naming the file),
    and ``request`` with what the call did not ask filled from what the file recorded."""
    text = read_input_file(path, "settings file", flag="--settings")
    if family.read_settings is not None:
        settings = family.read_settings(text, f"--settings {path}")
    else:
        settings = SampleSettings.from_json(text, source=f"--settings {path}")
    return settings, _request_from_extra(request, json.loads(text).get("extra", {}))


def _request_from_extra(request: SampleRequest, extra: Any) -> SampleRequest:
    """Fill what the call did not ask from what ``settings.json`` recorded (prompts, hints, scale)."""
    if not isinstance(extra, dict):
        return request
    prompts = extra.get("prompts")
    if request.prompts is None and isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        request.prompts = prompts
    source = extra.get("control_from")
    if request.control_from is None and request.control_images is None:
        if isinstance(source, str):
            request.control_from = source
        elif isinstance(source, list) and all(isinstance(p, str) for p in source):
            request.control_images = [Path(p) for p in source]
    scale = extra.get("control_scale")
    if request.control_scale is None and isinstance(scale, (int, float)) and not isinstance(scale, bool):
        request.control_scale = float(scale)
    return request


def check_conditioning(family: Family, model: Model, settings: Any, request: SampleRequest,
                       key: Callable[[str], str]) -> None:
    """One-line ConfigErrors for what the model does not take: prompts or hints, guidance, class labels."""
    for name in request.given():
        if name not in family.conditioning:
            takers = [f"{f.name} runs (model.kind = {', '.join(repr(k) for k in f.kinds)})"
                      for f in families_taking(name)]
            raise ConfigError(f"{CONDITIONING_FLAGS[name]} applies to {' and '.join(takers)}; {model.source} is a "
                              f"{family.name} run")
    check_labels_and_guidance(model, settings, key, family.guidance, "prompts" in family.conditioning)


def check_size(n: int, data_shape: Sequence[int], flag: str = "--seeds") -> None:
    """Refuse a call whose samples would not fit in memory (float32, held at once)."""
    size = n * math.prod(data_shape) * 4
    if size > MAX_SAMPLE_BYTES:
        raise ConfigError(f"{flag}: {n} samples of shape {tuple(data_shape)} need {size / 2**30:.1f} GiB in memory "
                          f"(at most {MAX_SAMPLE_BYTES / 2**30:.0f} GiB); sample in smaller calls")


def _then_from_extra(settings_file: Path) -> tuple[str | None, int]:
    """The second stage (run, steps) an earlier cascade's ``settings.json`` recorded, if any."""
    then = json.loads(read_input_file(settings_file, "settings file", flag="--settings")).get("extra", {}).get("then")
    if not isinstance(then, dict) or not isinstance(then.get("run"), str):
        return None, 0
    steps = then.get("steps", 0)
    return then["run"], steps if isinstance(steps, int) and not isinstance(steps, bool) else 0


def sample_run(run: Path | str, overrides: dict[str, Any] | None = None, request: SampleRequest | None = None,
               settings_file: Path | None = None, out: Path | None = None, names: dict[str, str] | None = None,
               device: str | torch.device = "cpu", progress: bool = True, then: Path | str | None = None,
               then_steps: int = 0) -> SampleResult:
    """Sample run folder ``run`` (see the module docstring). ``overrides`` are the settings the call gives
    (unset ones come from the run's ``[sample]``); ``names`` spell them for messages (``{"steps":
    "--steps"}``); ``settings_file`` reproduces an earlier call instead. ``then``: a super-resolution
    image-to-image run that upsamples the samples with ``then_steps`` steps (0 = its T), a cascade
    (``runs.cascade``); the folder then also holds the first stage's ``low.npz`` and ``low_grid.png``."""
    overrides, request = dict(overrides or {}), request or SampleRequest()
    family, source = read_run(run)
    cfg = getattr(source, "cfg", None)
    if settings_file is not None:
        if then is None:
            then, then_steps = _then_from_extra(Path(settings_file))
        settings, request = read_settings_file(family, Path(settings_file), request)
        key = lambda f: f"--settings {settings_file}: {f}"  # noqa: E731
    else:
        key = _key(overrides, names)
        cfg = cfg or Config()
        settings = (family.settings(cfg, overrides, key) if family.settings is not None
                    else SampleSettings.from_config(cfg.sample, key=key, **overrides))
    model = family.load(source, settings.use_ema, device)
    if isinstance(settings, SampleSettings) and settings.grid == TUNED_GRID and settings.times is None:
        settings = tuned_settings(family.name, model, settings, run, key)  # the times of <run>/grids.json
    schedule = getattr(model, "schedule", None)
    if isinstance(settings, SampleSettings):
        settings.check(key, T=schedule.T if schedule is not None else None)
    check_conditioning(family, model, settings, request, key)
    if model.num_classes > 0 and settings.classes is None:  # every class in turn, recorded so settings.json reproduces
        settings = settings.replace(classes=list(range(model.num_classes)))
    check_size(len(settings.seeds), model.data_shape)
    upsampler = None
    if then is not None:
        if len(model.data_shape) != 3:
            raise ConfigError(f"--then: {model.source} makes vectors of shape {tuple(model.data_shape)}, not images")
        upsampler = open_upsampler(then, model.data_shape, then_steps, settings.use_ema, device)
        check_size(len(settings.seeds), upsampler.model.data_shape)
    name = model.sample_dir_name(settings) + (f"-then-{Path(then).name}" if then is not None else "")
    out = Path(out) if out is not None else model.source / name
    folder = OutputFolder(out, "settings.json", "sample folder")
    try:
        t0 = time.time()
        samples = family.sample(model, settings, request, device, progress)
        check_finite(samples.x, "samples")
        x, extra, levels = samples.x, {**model.provenance(), **samples.extra}, model.levels
        if upsampler is not None:
            write_samples(x, settings.seeds, folder.path, settings, levels, nrow=samples.nrow, stem="low")
            x = upsampler(x, settings.seeds, settings.batch_size, device, progress)
            check_finite(x, "upsampled samples")
            extra["then"], levels = upsampler.provenance(), upsampler.model.levels
        seconds = time.time() - t0
        write_samples(x, settings.seeds, folder.path, settings, levels, extra=extra, nrow=samples.nrow)
    except BaseException:
        folder.discard()
        raise
    folder.commit()
    return SampleResult(out, settings, samples, seconds)


def write_samples(x: Tensor, seeds: Sequence[int], out_dir: Path | str, settings: Any, levels: int | None = None,
                  extra: dict[str, Any] | None = None, nrow: int | None = None, stem: str = "") -> Path:
    """Write samples to ``out_dir`` (each file atomically; see the module docstring for the files). With a
    ``stem`` (a cascade's first stage): only ``<stem>_grid.png`` and ``<stem>.npz``."""
    x = x.detach().cpu()
    seeds = [int(s) for s in seeds]
    if x.shape[0] != len(seeds):
        raise ValueError(f"{x.shape[0]} samples but {len(seeds)} seeds")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_samples_figure(x, out / (f"{stem}_grid.png" if stem else "grid.png"), levels=levels, nrow=nrow)
    buf = io.BytesIO()
    np.savez(buf, x=x.to(torch.float32).numpy(), seeds=np.asarray(seeds, dtype=np.int64))
    atomic_write_bytes(out / f"{stem or 'samples'}.npz", buf.getvalue())
    if stem:
        return out
    if x.ndim == 4:
        for seed, img in zip(seeds, x):
            atomic_write_bytes(out / f"sample_{seed}.png", png_bytes(image_grid(img[None], pad=0, upscale=1,
                                                                               levels=levels)))
    atomic_write_text(out / "settings.json", settings.to_json(extra=extra or {}) + "\n")
    return out
