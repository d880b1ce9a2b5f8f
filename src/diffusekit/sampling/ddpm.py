"""DDPM ancestral sampling (Vidal, "Deep Generative Models" (Fall 2025), "Algorithm 2 Sampling"; Ho et
al. 2020, Algorithm 2).

Algorithm 2 writes the step in eps form,

    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z,

which is the posterior mean mu_q(x_t, x0_hat) of q(x_{t-1} | x_t, x0) (Vidal, slide "ELBO for Diffusion
Model: Score Matching Term", with the square root on alpha_bar_{t-1} that the slide drops; the mu_tilde_t
of Zhu, "Generative Model Zoo (part III)" (CMU 16-726), slide "Learning Denoising Model: Variational
upper bound") evaluated at x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): substituting
x0_hat into

    mu_q = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0_hat
           + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t

gives the eps form back. The code uses the x0 form because it is the one where clipping x0_hat makes
sense and because it works for any parameterization. Clipping is off by default: the original DDPM code
clips x0_hat to [-1, 1], which Algorithm 2 does not say and which is wrong for latents. The reverse
variance is sigma_t^2 = beta_t or beta_tilde_t, the upper and lower bounds on the reverse-process
entropy that Ho et al. 2020 (sec. 3.2) found to give similar samples; no noise is added at the last
step t = 1 (z = 0).

With fewer steps than T the schedule is respaced (``grids.sampling_schedule``): beta_i =
1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} is recomputed from alpha_bar on the grid (improved-diffusion's
``respace.py``; keeping the T-step betas on a shorter grid is the bug diffusers PR #3006 fixed), and
the network still sees the logsnr of the original t_i.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import VARIANCES
from diffusekit.sampling.grids import Spacing, sampling_schedule
from diffusekit.schedules import DiscreteSchedule

__all__ = ["sample_ddpm", "predict_x0_eps", "step_iterator", "NoiseFn"]

NoiseFn = Callable[[], Tensor]
Variance = Literal[VARIANCES]  # type: ignore[valid-type]  (the names of sampling/catalog.py)


def predict_x0_eps(denoiser: DenoiserFn, x: Tensor, logsnr: Tensor, cond: Any, alpha: float, sigma: float,
                   clip_x0: float | None) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) at x_t = x; with ``clip_x0 = c`` x0_hat is clamped to [-c, c] and eps is
    recomputed from the clipped x0, eps = (x_t - alpha x0) / sigma, so the pair stays
    consistent with x_t = alpha x0 + sigma eps."""
    pred = denoiser(x, logsnr, cond)
    if clip_x0 is None:
        return pred.x0, pred.eps
    x0 = pred.x0.clamp(-clip_x0, clip_x0)
    return x0, (x - alpha * x0) / sigma


def step_iterator(sched: DiscreteSchedule, progress: bool, desc: str, reverse: bool = True):
    """Indices i = S..1 of ``sched`` (or 1..S with ``reverse=False``), wrapped in tqdm if asked."""
    idx = range(sched.T, 0, -1) if reverse else range(1, sched.T + 1)
    if not progress:
        return idx

    return tqdm(idx, desc=desc, leave=False)


def _check_common(x: Tensor, clip_x0: float | None) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"x_T must be a floating-point tensor, got {x.dtype}")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    schedule: DiscreteSchedule,
    x_T: Tensor,
    noise: NoiseFn,
    *,
    steps: int | None = None,
    spacing: Spacing = "trailing",
    variance: Variance = "beta_tilde",
    clip_x0: float | None = None,
    cond: Any = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling, "Algorithm 2 Sampling" of Vidal, "Deep Generative Models", from x_T down to x_0.

    ``x_T`` is the initial standard normal draw; ``noise()`` returns fresh standard normal noise
    shaped like x (e.g. a ``PerSampleNoise``) and is called once per step except the last.
    ``steps`` None or T runs the full chain; fewer steps respace the table on ``timestep_grid(T,
    steps, spacing)``. ``variance`` picks sigma_t^2 = beta_t or beta_tilde_t (of the respaced table).
    ``callback`` receives dict(i, t, x, x0, eps) before each step (i counts steps from 0, t is the
    original time, x is x_t). Coefficients come from the float64 tables and are applied as Python
    floats, so the arithmetic happens in x's dtype.
    """
    _check_common(x_T, clip_x0)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    sched = sampling_schedule(schedule, steps, spacing)
    # per-step scalars, indexed by the respaced step i = 0..S (entry 0 unused)
    coef_x0 = sched.posterior_mean_coef_x0.tolist()
    coef_xt = sched.posterior_mean_coef_xt.tolist()
    var = sched.betas if variance == "beta" else sched.posterior_variance
    std = var.sqrt().tolist()
    alpha, sigma = sched.alpha.tolist(), sched.sigma.tolist()
    logsnr = list(sched.logsnr.unbind())
    t_orig = sched.timesteps.tolist()

    x = x_T
    for n, i in enumerate(step_iterator(sched, progress, "ddpm")):
        x0, eps = predict_x0_eps(denoiser, x, logsnr[i], cond, alpha[i], sigma[i], clip_x0)
        if callback is not None:
            callback({"i": n, "t": t_orig[i], "x": x, "x0": x0, "eps": eps})
        x_prev = x.mul(coef_xt[i]).add_(x0, alpha=coef_x0[i])  # mu_q(x_t, x0_hat)
        if i > 1:
            x_prev.add_(noise(), alpha=std[i])
        x = x_prev
    return x
