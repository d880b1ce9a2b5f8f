"""DDIM sampling and its deterministic inversion (Song, Meng & Ermon 2021, eq. 12 and sec. 4.3).

One DDIM step from grid time t to the previous grid time s (alpha_bar_s > alpha_bar_t) is

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma_t^2) eps_hat + sigma_t z,
    sigma_t(eta) = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s)

(eq. 12 and eq. 16). sigma_t(1)^2 is the posterior variance beta_tilde of the (respaced) table, and
with eta = 1 the step equals DDPM's ancestral step with sigma^2 = beta_tilde ("Algorithm 2 Sampling" of
Vidal, "Deep Generative Models" (Fall 2025)): expanding x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
in mu_q gives the same coefficients. With eta = 0 the map x_T -> x_0 is deterministic (an Euler step of
the probability-flow ODE in the variables x / alpha and sigma / alpha), and it can be run backwards:
``ddim_invert``.
The last step goes to alpha_bar = 1 (clean data), where x_0 = x0_hat exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.ddpm import NoiseFn, _check_common, predict_x0_eps, step_iterator
from diffusekit.sampling.grids import Spacing, sampling_schedule
from diffusekit.schedules import DiscreteSchedule

__all__ = ["sample_ddim", "ddim_invert", "ddim_sigma"]


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (DDIM eq. 16)."""
    return eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)) * math.sqrt(1.0 - alpha_bar_t / alpha_bar_prev)


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    schedule: DiscreteSchedule,
    x_T: Tensor,
    noise: NoiseFn | None = None,
    *,
    steps: int | None = None,
    spacing: Spacing = "trailing",
    eta: float = 0.0,
    clip_x0: float | None = None,
    cond: Any = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) from x_T to x_0 on the grid ``timestep_grid(T, steps, spacing)``.

    ``eta`` in [0, 1]: 0 is deterministic (``noise`` may be None), 1 is DDPM with beta_tilde.
    ``noise()`` is called only at steps with sigma_t > 0 (never at the last one). With ``clip_x0``
    the predicted x0 is clamped and eps recomputed from it (``ddpm.predict_x0_eps``). ``callback`` receives
    dict(i, t, x, x0, eps) before each step, as in ``sample_ddpm``.
    """
    _check_common(x_T, clip_x0)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if eta > 0 and noise is None:
        raise ValueError("sample_ddim with eta > 0 needs a noise source")
    sched = sampling_schedule(schedule, steps, spacing)
    abar = sched.alpha_bar.tolist()
    alpha, sigma = sched.alpha.tolist(), sched.sigma.tolist()
    logsnr = list(sched.logsnr.unbind())
    t_orig = sched.timesteps.tolist()
    # per-step scalars: x_{i-1} = coef_x0 x0 + coef_eps eps + std z
    std = [0.0] + [ddim_sigma(abar[i], abar[i - 1], eta) for i in range(1, sched.T + 1)]
    coef_x0 = [1.0] + [math.sqrt(abar[i - 1]) for i in range(1, sched.T + 1)]
    coef_eps = [0.0] + [math.sqrt(max(1.0 - abar[i - 1] - std[i] ** 2, 0.0)) for i in range(1, sched.T + 1)]

    x = x_T
    for n, i in enumerate(step_iterator(sched, progress, "ddim")):
        x0, eps = predict_x0_eps(denoiser, x, logsnr[i], cond, alpha[i], sigma[i], clip_x0)
        if callback is not None:
            callback({"i": n, "t": t_orig[i], "x": x, "x0": x0, "eps": eps})
        x_prev = x0.mul(coef_x0[i])
        if coef_eps[i] != 0.0:
            x_prev.add_(eps, alpha=coef_eps[i])
        if std[i] > 0.0:
            x_prev.add_(noise(), alpha=std[i])
        x = x_prev
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: DenoiserFn,
    schedule: DiscreteSchedule,
    x0: Tensor,
    *,
    steps: int | None = None,
    spacing: Spacing = "trailing",
    cond: Any = None,
    fixed_point_iters: int = 0,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Encode data to noise by running the eta = 0 DDIM map backwards (Song et al. 2021, sec. 4.3).

    The sampling step from grid time t_j to t_{j-1} is x_{j-1} = (alpha_{j-1} / alpha_j)(x_j - sigma_j
    eps(x_j, t_j)) + sigma_{j-1} eps(x_j, t_j). Its exact inverse needs eps at the unknown x_j; the
    standard approximation (diffusers' DDIMInverseScheduler, prompt-to-prompt's null-text inversion)
    evaluates the model at the current point x_{j-1} with the noise level of t_j (which also avoids
    t = 0, where logsnr is infinite):

        x_j = (alpha_j / alpha_{j-1}) (x_{j-1} - sigma_{j-1} eps) + sigma_j eps.

    ``fixed_point_iters = k > 0`` re-evaluates eps at the new x_j k more times, converging to the
    exact inverse of ``sample_ddim(eta=0)`` on the same grid when the step is small enough (Pan et al.
    2023, "Effective real image editing with accelerated iterative diffusion inversion").
    ``callback`` receives dict(i, t, x, x0, eps) with t the target time and x the current point.
    """
    _check_common(x0, None)
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    sched = sampling_schedule(schedule, steps, spacing)
    alpha, sigma = sched.alpha.tolist(), sched.sigma.tolist()
    logsnr = list(sched.logsnr.unbind())
    t_orig = sched.timesteps.tolist()

    x = x0
    for n, j in enumerate(step_iterator(sched, progress, "ddim-invert", reverse=False)):
        ratio = alpha[j] / alpha[j - 1]
        pred = denoiser(x, logsnr[j], cond)
        if callback is not None:
            callback({"i": n, "t": t_orig[j], "x": x, "x0": pred.x0, "eps": pred.eps})
        x_next = _inverse_update(x, pred.eps, ratio, sigma[j - 1], sigma[j])
        for _ in range(fixed_point_iters):
            x_next = _inverse_update(x, denoiser(x_next, logsnr[j], cond).eps, ratio, sigma[j - 1], sigma[j])
        x = x_next
    return x


def _inverse_update(x: Tensor, eps: Tensor, ratio: float, sigma_cur: float, sigma_next: float) -> Tensor:
    """x_next = ratio (x - sigma_cur eps) + sigma_next eps."""
    return x.mul(ratio).add_(eps, alpha=sigma_next - ratio * sigma_cur)
