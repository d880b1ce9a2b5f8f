"""Inference timestep grids: which of the T training steps a sampler visits.

Time follows the notes ("Algorithm 2 Sampling" of Vidal, "Deep Generative Models" (Fall 2025)):
t = 1..T, t = 0 is clean data. diffusers numbers the same steps k = t - 1 = 0..T-1, so every spacing
below is diffusers' ``set_timesteps`` rule written in k and shifted by one (an off-by-one between the
two numberings, reading alpha_bar at t - T/S instead of at the previous grid point, is a known bug:
diffusers issues #2585, #10003 and PR #14357):

- ``leading``  (DDIM paper, diffusers' default with ``steps_offset = 0``):
  k = arange(S) * (T // S), so t = 1, 1 + T//S, ... . Ends at t = 1 exactly, but starts at
  (S - 1)(T // S) + 1, which can be far below T when S does not divide T.
- ``linspace`` (Lin et al. 2024, Table 2): k = round(linspace(0, T - 1, S)); spans t = 1 .. T.
- ``trailing`` (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"):
  k = round(arange(T, 0, -T / S)) - 1, so t = round(T - i T / S), i = 0..S-1. Starts at t = T
  exactly, the noisiest point; ends at t = round(T / S) >= 1.

Rounding is numpy's (half to even), as in diffusers, so the grids are identical to theirs plus one.
With S = T every spacing gives T, T-1, ..., 1, the full chain. The sampler then respaces the schedule
to the chosen steps and always ends at t = 0 (``schedules.respace``), so the last step lands on clean
data whatever the spacing.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffusekit.sampling.catalog import SPACINGS
from diffusekit.schedules import DiscreteSchedule, respace

__all__ = ["Spacing", "SPACINGS", "timestep_grid", "sampling_schedule"]

Spacing = Literal[SPACINGS]  # type: ignore[valid-type]  (the names of sampling/catalog.py)


def timestep_grid(T: int, steps: int, spacing: Spacing = "trailing") -> Tensor:
    """The ``steps`` distinct times in 1..T a sampler visits, noisiest first (int64, descending).

    ``leading``: t = i * (T // steps) + 1; ``linspace``: t = round(i (T - 1) / (steps - 1)) + 1;
    ``trailing``: t = round(T - i T / steps); i = 0..steps-1 (see the module docstring for the
    correspondence t = k + 1 with diffusers' k). Raises ValueError unless 1 <= steps <= T.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..T = {T}, got {steps!r}")
    steps = int(steps)
    if spacing == "leading":
        k = np.arange(steps, dtype=np.int64) * (T // steps)
    elif spacing == "linspace":
        k = np.linspace(0, T - 1, steps).round().astype(np.int64)
    elif spacing == "trailing":
        # diffusers: np.round(np.arange(T, 0, -T / S)) - 1; a float arange can return S + 1 values
        # (the last one ~1e-13), so keep the first S, which are exactly theirs.
        k = np.round(np.arange(T, 0, -T / steps))[:steps].astype(np.int64) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    t = np.sort(k + 1)[::-1].copy()
    return torch.from_numpy(t)


def sampling_schedule(schedule: DiscreteSchedule, steps: int | None, spacing: Spacing = "trailing") -> DiscreteSchedule:
    """The table a sampler runs on: ``schedule`` itself for the full chain (steps None or T), else
    ``respace(schedule, timestep_grid(T, steps, spacing))`` with beta recomputed from alpha_bar
    (improved-diffusion's ``respace.py``; diffusers PR #3006). Either way its step i = S..1 sits at
    original time ``timesteps[i]`` and step 1
    leads to clean data (index 0)."""
    if not isinstance(schedule, DiscreteSchedule):
        raise TypeError(f"samplers need a DiscreteSchedule, got {type(schedule).__name__}")
    if steps is None or steps == schedule.T:
        return schedule
    return respace(schedule, timestep_grid(schedule.T, steps, spacing))
