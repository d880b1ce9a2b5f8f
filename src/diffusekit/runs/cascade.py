"""Cascaded generation (Ho et al. 2021, "Cascaded diffusion models for high fidelity image generation";
Saharia et al. 2022, Imagen, section 2.3): samples of a low-resolution run upsampled by a super-resolution
image-to-image run (``model.kind = "img2img"`` trained with ``superres``), as ``diffusekit sample --run LOW
--then SR`` does.

The second stage is the SR run's own restoration sampler (``families.img2img.sample_img2img``: ancestral
DDPM conditioned on the nearest-upsampled low-resolution sample, then the exact projection onto A x = y),
with the low-resolution sample in the place of the measurement y. Sample i of the cascade depends on seed
i only: the first stage draws from seed i as ``diffusekit sample`` does, the second from a child stream of
seed i that no first-stage or restoration stream shares (``cascade_seed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.families import read_run
from diffusekit.families.img2img import Img2ImgModel, sample_img2img
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.restore import SuperResolution

__all__ = ["Upsampler", "cascade_seed", "open_upsampler"]

SR_TASK = "superres"


def cascade_seed(seed: int) -> int:
    """The second stage's noise stream of cascade sample ``seed``: SeedSequence([seed], spawn_key=(2,)), a
    child stream distinct from the first stage's (seed itself) and from every restoration stream."""
    a, b = np.random.SeedSequence([int(seed)], spawn_key=(2,)).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)  # < 2**63


@dataclass
class Upsampler:
    """An SR run ready to upsample samples of shape ``low_shape`` by ``factor``."""

    model: Img2ImgModel
    factor: int
    task: int
    steps: int

    def provenance(self) -> dict[str, Any]:
        return {**self.model.provenance(), "factor": self.factor, "steps": self.steps}

    @torch.no_grad()
    def __call__(self, low: Tensor, seeds: Sequence[int], batch_size: int = 500, device: str | torch.device = "cpu",
                 progress: bool = False) -> Tensor:
        """``low`` (N, C, h, w) in the data range, one per seed -> (N, C, factor h, factor w) on the CPU."""
        if low.shape[0] != len(seeds):
            raise ValueError(f"{low.shape[0]} low-resolution samples but {len(seeds)} seeds")
        op, sched = SuperResolution(self.factor), self.model.schedule
        out = []
        starts = range(0, len(seeds), batch_size)
        for lo in tqdm(starts, desc="upsample", disable=not progress, total=len(starts)):
            chunk = [int(s) for s in seeds[lo:lo + batch_size]]
            noise = PerSampleNoise([cascade_seed(s) for s in chunk], self.model.data_shape, device=device)
            y = low[lo:lo + batch_size].to(device=device, dtype=torch.float32)
            out.append(sample_img2img(self.model.denoiser, sched, noise(), noise, op, y, task=self.task,
                                      steps=self.steps or None, variance=self.model.cfg.sample.variance).cpu())
        return torch.cat(out)


def open_upsampler(run: Path | str, low_shape: Sequence[int], steps: int = 0, use_ema: bool = True,
                   device: str | torch.device = "cpu", flag: str = "--then") -> Upsampler:
    """The SR run ``run`` for samples of shape ``low_shape`` (C, h, w), with one-line ConfigErrors for a run
    that is not an image-to-image super-resolution run, or whose channels or size do not fit."""
    try:
        family, source = read_run(run)
    except DiffusekitError as exc:  # the message names the folder; say which of the two runs it is
        raise type(exc)(f"{flag}: {exc}") from None
    if family.name != "img2img":
        raise ConfigError(f"{flag} {run}: a {family.name} run; the second stage of a cascade is an image-to-image "
                          "run trained for super-resolution (model.kind = 'img2img', img2img.tasks = ['superres'])")
    model = family.load(source, use_ema, device)
    c, h, w = tuple(low_shape)
    C, H, W = model.data_shape
    if c != C:
        raise ConfigError(f"{flag} {run}: it makes {C}-channel images, the first stage {c}-channel ones")
    if H % h or W % w or H // h != W // w or H == h:
        raise ConfigError(f"{flag} {run}: it makes {H}x{W} images, which are no integer enlargement of the "
                          f"first stage's {h}x{w}")
    factor = H // h
    T = model.schedule.T
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= T:
        raise ConfigError(f"{flag}-steps must be an integer in 0..{T} (0 = the SR run's T), got {steps!r}")
    try:
        task = model.task_index(SR_TASK, factor)
    except ConfigError:
        trained = ", ".join(map(str, model.tasks))
        raise ConfigError(f"{flag} {run}: upsampling {h}x{w} to {H}x{W} needs superres x{factor}, but the run was "
                          f"trained for {trained} only (img2img.tasks, img2img.superres_factors)") from None
    return Upsampler(model, factor, task, steps)
