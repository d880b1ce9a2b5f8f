"""2-D toy distributions, standardised with fixed constants so train and test splits agree.

Each toy is shifted and scaled by constants of the distribution itself (exact where the law is
simple, measured once on 10^6 draws otherwise), never by the statistics of one sample, so every
split and every seed lives in the same coordinates: roughly zero mean and unit variance per axis.
All randomness comes from ``seed`` (a numpy Generator or sklearn's ``random_state``), never from a
global RNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from diffusekit.errors import ConfigError

__all__ = ["TOYS", "make_toy"]

TOYS = ("moons", "swiss_roll", "8gaussians", "checkerboard")

# (mean, std) per axis of the raw distribution.
_MOONS_NOISE = 0.05
_MOONS_STATS = ((0.5, 0.25), (0.867, 0.497))  # measured: sklearn make_moons(noise=0.05)
_SWISS_NOISE = 0.5
_SWISS_STATS = ((2.0, 0.2), (6.64, 6.97))  # measured: make_swiss_roll(noise=0.5), axes x and z
_GAUSS_RADIUS, _GAUSS_STD = 2.0, 0.2
_GAUSS_STATS = ((0.0, 0.0), (math.sqrt(_GAUSS_RADIUS**2 / 2 + _GAUSS_STD**2),) * 2)  # exact: r^2/2 + s^2
_CHECKER_STATS = ((0.0, 0.0), (4 / math.sqrt(12),) * 2)  # exact: uniform marginals on [-2, 2)


def _moons(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons  # scikit-learn is slow to import: on use

    return make_moons(n, noise=_MOONS_NOISE, random_state=seed)[0]


def _swiss_roll(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll  # scikit-learn is slow to import: on use

    return make_swiss_roll(n, noise=_SWISS_NOISE, random_state=seed)[0][:, [0, 2]]


def _eight_gaussians(n: int, seed: int) -> np.ndarray:
    """Equal mixture of N((r cos(k pi/4), r sin(k pi/4)), s^2 I), k = 0..7."""
    rng = np.random.default_rng(seed)
    angle = rng.integers(0, 8, size=n) * (math.pi / 4)
    centers = _GAUSS_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return centers + _GAUSS_STD * rng.standard_normal((n, 2))


def _checkerboard(n: int, seed: int) -> np.ndarray:
    """Uniform on the black squares of a 4x4 board over [-2, 2)^2 (the FFJORD toy, unscaled)."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1)


_MAKERS = {"moons": (_moons, _MOONS_STATS), "swiss_roll": (_swiss_roll, _SWISS_STATS),
           "8gaussians": (_eight_gaussians, _GAUSS_STATS), "checkerboard": (_checkerboard, _CHECKER_STATS)}


def make_toy(name: str, n: int, seed: int) -> Tensor:
    """``n`` draws of toy ``name`` as float32 (n, 2), standardised with the toy's fixed constants."""
    if name not in _MAKERS:
        raise ConfigError(f"data.name = {name!r} is not a toy; choose one of {', '.join(TOYS)}")
    if n < 1:
        raise ConfigError(f"number of toy examples must be positive, got {n}")
    if seed < 0:
        raise ConfigError(f"data.seed must be >= 0, got {seed}")
    maker, (mean, std) = _MAKERS[name]
    x = (maker(n, seed) - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
