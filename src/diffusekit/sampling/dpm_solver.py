"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of diffusion
probabilistic models", Algorithm 2), the multistep second-order solver of the probability-flow ODE in
its data-prediction (x0) form.

With Lu et al.'s half log-SNR l = log(alpha / sigma) = lambda / 2 and h_i = l_{i+1} - l_i > 0, the
exact solution of the probability-flow ODE between grid points is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + sigma_{i+1} int_{l_i}^{l_{i+1}} e^l x0_hat dl,

and DPM-Solver++(2M) approximates x0_hat on the step by the linear extrapolation of the last two
predictions, D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1}, r_i = h_{i-1} / h_i, giving

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i.

In the VE variables of ``ode.py`` (y = x / alpha, s = sigma / alpha = e^{-l}) the step reads
y_{i+1} = (s_{i+1} / s_i) y_i + (1 - s_{i+1} / s_i) D_i, the same for VP, sub-VP and VE SDEs. The first
step has no previous prediction and is first order (the DDIM step); so is the last one, from t_min
to clean data (s = 0, h = infinity), where y = D = x0_hat: lower order at the end and a final sigma of
exactly 0, so no residual noise is left at 5-20 steps (the failure diffusers fixed in PRs #5541 and
#6477). ``steps`` network calls; the default grid is uniform in
log-SNR (Lu et al.'s "logSNR" spacing).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import default_grid
from diffusekit.sampling.ode import Grid, finish, model_x0, walk
from diffusekit.sde import SDE

__all__ = ["sample_dpmpp_2m"]


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, times: Tensor | None = None, *,
                    steps: int | None = None, grid: Grid = default_grid("dpmpp_2m"),
                    cond: Any = None, denoise_final: bool = True, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) from the prior draw ``x_T`` of ``sde`` at t_max to clean data, ``steps``
    network calls on ``time_grid(sde, steps, grid)``; with ``denoise_final`` False the last step is
    skipped and x at t_min returned (x = a(t_min) y)."""
    times, sig, y = walk(sde, x_T, times, steps, grid)
    x0_prev, h_prev = None, None
    for i in range(len(times) if denoise_final else len(times) - 1):
        x0 = model_x0(denoiser, y, i, times, sig, cond, callback)
        ratio = sig[i + 1] / sig[i]  # e^{-h_i}
        if x0_prev is None or sig[i + 1] == 0.0:
            d = x0
        else:
            r = h_prev / math.log(sig[i] / sig[i + 1])
            d = x0 * (1.0 + 0.5 / r) - x0_prev * (0.5 / r)
        if sig[i + 1] > 0.0:
            h_prev = math.log(sig[i] / sig[i + 1])
        y = d + ratio * (y - d)
        x0_prev = x0
    return finish(sde, y, times, denoise_final)
