"""Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
Algorithm 1), over the one denoiser convention.

A consistency model f(x_t, t) maps any point of a probability-flow ODE trajectory to its origin, so one
call on x_T is a sample. More calls trade compute for quality: denoise, re-noise to a lower level with
fresh noise, denoise again. In the VE variables of ``ode.py`` (y = x / a, sigma = s / a, the same for
every linear SDE), with grid times t_0 = t_max > t_1 > ... > t_{N-1}:

    x <- f(y_T, t_0),     y_T = x_T / a(t_0)
    for k = 1 .. N-1:     y_k = x + sigma_k z_k,   z_k ~ N(0, I)   (Algorithm 1 with x_tk = x + sqrt(tk^2 - eps^2) z;
                          x <- f(y_k, t_k)                          here the marginal is exact, sigma_k itself)

where f is the denoiser's x0 (``ode.ve_denoise``). N steps are N network calls and the last output is
the sample (no extra denoising step). The z_k come from the per-sample noise stream (``noise()``), so
sample i depends only on seed i. Any denoiser works: on an ordinary diffusion model each call is
Tweedie's denoising step and the sampler is a valid (if blurry, at few steps) sampler; with the exact
denoiser of a Gaussian target one step returns the posterior mean E[x0 | x_T] (tested). The consistency
family (``families.consistency``) trains the denoiser for which it is the intended sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import default_grid
from diffusekit.sampling.ode import Grid, model_x0, walk
from diffusekit.sde import SDE

__all__ = ["sample_consistency"]

DEFAULT_GRID = default_grid("consistency")


@torch.no_grad()
def sample_consistency(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, noise: Callable[[], Tensor],
                       times: Tensor | None = None, *, steps: int | None = None,
                       grid: Grid = DEFAULT_GRID, cond: Any = None,
                       callback: Callback | None = None) -> Tensor:
    """Multistep consistency sampling (module docstring): ``len(times)`` network calls, the first at x_T
    (the prior draw of ``sde`` at t_max), each later one after re-noising the current sample to the next
    grid time with a fresh draw of ``noise()``. Returns clean samples."""
    times, sig, y = walk(sde, x_T, times, steps, grid)
    x = model_x0(denoiser, y, 0, times, sig, cond, callback)
    for i in range(1, len(times)):
        y = x + sig[i] * noise().to(x.dtype)
        x = model_x0(denoiser, y, i, times, sig, cond, callback)
    return x
