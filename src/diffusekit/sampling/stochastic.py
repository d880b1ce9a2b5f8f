"""Stochastic score-based samplers over the one denoiser convention, with per-sample noise, in the VE
variables of ``ode.py`` (y = x / a, sigma = s / a: the same for VP, sub-VP and VE SDEs).

- ``sample_euler_maruyama``: the reverse-time SDE dx = [f - g^2 grad log q_t] dt + g dw_bar (Gao, "VAEs
  and Diffusion Models" (Stanford CS231n), slide "The Generative Reverse Stochastic Differential
  Equation"; Song et al. 2021, eq. 6), first order, by the exponential Euler-Maruyama step below.
- ``sample_pc``: predictor-corrector (Song et al. 2021, Algorithms 1-3): Langevin corrector steps at
  each noise level, then that reverse-SDE step as predictor.
- ``sample_annealed_langevin``: annealed Langevin dynamics over geometric noise levels (Song & Ermon
  2019, Algorithm 1; Gao's slides "Score-based Generative Models", eq. 94, whose sqrt(2 c eps) eps
  means sqrt(2c) eps: docs/math.md), each level's last step carrying the state to the next level.

The reverse-SDE step (``reverse_sde_step``). In y every linear SDE is a VE one (dy = (g / a) dw,
d sigma^2 / dt = g^2 / a^2), and with the score -(y - x0_hat) / sigma^2 its reverse reads, in v = sigma^2
running down,

    dy = (y - x0_hat) dv / v + dw_bar,     Var(dw_bar) = |dv|.

For x0_hat = D held fixed over a step this is linear in e = y - D: e scales as v, and the noise
integral has variance int_{v'}^{v} (v' / u)^2 du = v' (1 - v' / v), so the exact solution is

    y' = D + (sigma' / sigma)^2 (y - D) + sigma' sqrt(1 - (sigma' / sigma)^2) z,      z ~ N(0, I).

That is the DDPM posterior q(y' | y, x_0 = D) between any two noise levels (Ho et al. 2020, eq. 6-7,
the "beta_tilde" variance), DDIM with eta = 1 (Song, Meng & Ermon 2021, eq. 12 and 16), SDE-DPM-Solver++
of first order (Lu's ``algorithm_type="sde-dpmsolver++"`` in diffusers, PR #3344; the stochastic
exponential integrators of Gonzalez et al. 2023, SEEDS, build on it): the stochastic counterpart of the
DDIM step. It is a convex combination of y and D plus noise of the scale of the level it reaches
(sigma', never sigma), so no step, however long, sends samples away; for data at one point (D
constant) it maps N(D, sigma^2 I) exactly onto N(D, sigma'^2 I) (tested). Song et al.'s Euler-Maruyama
step, which this replaces in ``sample_euler_maruyama`` and ``sample_pc``, freezes the drift and the
noise at the start of the step: over a long step it overshoots (in x, the VP drift multiplies x by
1 + beta dt / 2 - beta dt / s^2) and adds noise of the level it leaves (sqrt(sigma^2 - sigma'^2) in y),
which left samples up to 10^3 times the data's norm at 2-5 steps. The two agree to first order. What
the exact step leaves out is the spread of x_0 given y: it adds (1 - rho)^2 Cov[x_0 | y] to the
variance (rho = (sigma' / sigma)^2), which the frozen D cannot see; so over long steps near the data,
where Cov[x_0 | y] ~ sigma^2, it adds too little noise (measured on the oracle: at 20-100 steps of the
default uniform-time grid its sliced W2 was up to 3.5 times Euler-Maruyama's).

The Langevin step (``langevin_coefficients``). A Langevin step of time c sigma^2 at level sigma,
y' = y + c sigma^2 grad log q + sqrt(2 c) sigma z, is y' = D + (1 - c) (y - D) + sqrt(2c) sigma z:
Song's unadjusted step, kept while it is a convex combination of y and D (c <= 1). For c > 1 it
overshoots D (and diverges for c >= 2: the settings accept steps that large), so there the step is
the exact solution for D held fixed (an Ornstein-Uhlenbeck process with stationary law N(D, sigma^2 I)),
y' = D + e^{-c} (y - D) + sqrt(1 - e^{-2c}) sigma z. (That exact form is not used below c = 1: with
x0_hat following y one to one near the data, it under-disperses the chain, stationary variance
(1 + e^{-c}) / 2 of the target's.)

Grids and the last step. Times t_0 = t_max > ... > t_{N-1} = t_min come from ``ode.time_grid``
(default uniform in t, as Song et al.); the step from t_{N-1} to clean data is the denoising step
x_0 = x0_hat(x_{t_min}) (Tweedie's formula; Song et al.'s "noise removal", Jolicoeur-Martineau et
al. 2021), which uses the last network call and adds no noise. ``noise()`` returns standard normal
noise shaped like x (a ``PerSampleNoise``: sample i depends only on seed i), and the Langevin step
sizes use per-sample norms, so no sample ever reads another one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import default_grid
from diffusekit.sampling.ode import Grid, _check, grid_sigmas, time_grid, ve_denoise, walk
from diffusekit.sde import SDE

__all__ = ["sample_euler_maruyama", "sample_pc", "sample_annealed_langevin", "reverse_sde_step",
           "langevin_coefficients", "langevin_step"]

NoiseFn = Callable[[], Tensor]


def _norm(v: Tensor) -> Tensor:
    """Per-example Euclidean norm, shaped to broadcast against v."""
    n = v.reshape(v.shape[0], -1).norm(dim=1)
    return n.reshape((-1,) + (1,) * (v.ndim - 1))


def reverse_sde_step(y: Tensor, x0: Tensor, sigma: float, sigma_next: float, z: Tensor) -> Tensor:
    """y' = x0 + rho (y - x0) + sigma_next sqrt(1 - rho) z, rho = (sigma_next / sigma)^2: the reverse SDE from
    noise level sigma to sigma_next solved exactly for a denoiser held at ``x0`` (module docstring; the DDPM
    posterior step, SDE-DPM-Solver++ of first order)."""
    rho = (sigma_next / sigma) ** 2
    return x0 + rho * (y - x0) + (sigma_next * math.sqrt(1.0 - rho)) * z


def langevin_coefficients(c: float | Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) of the Langevin step y' = x0 + a (y - x0) + b sigma z of time c sigma^2 at level sigma (score
    -(y - x0) / sigma^2; module docstring): Song's unadjusted step (1 - c, sqrt(2c)) while c <= 1, where it is
    a convex combination of y and x0; the exact step for x0 held fixed (e^{-c}, sqrt(1 - e^{-2c})) beyond.
    ``c`` is a float or a per-example tensor; float64 results shaped like it."""
    c = torch.as_tensor(c, dtype=torch.float64)
    unadjusted = c <= 1.0
    a = torch.where(unadjusted, 1.0 - c, torch.exp(-c))
    b = torch.where(unadjusted, torch.sqrt(2.0 * c), torch.sqrt(-torch.expm1(-2.0 * c)))
    return a, b


def langevin_step(x: Tensor, score: Tensor, z: Tensor, snr: float, std: float | None = None) -> Tensor:
    """One Langevin corrector step x + eps score + sqrt(2 eps) z (its Euler-Maruyama form, Song et al.
    2021, Algorithm 4), the step eps = 2 (snr ||z|| / ||score||)^2 chosen per example so that the
    signal-to-noise ratio ||eps score|| / ||sqrt(2 eps) z|| equals ``snr`` (per-example norms where their
    code takes batch means, and their alpha_i = 1 - beta_i ~ 1 dropped).

    That rule makes the step depend on z and on ||score(x)||, which is harmless in high dimension
    (both norms concentrate) but biases the chain in a few dimensions. With ``std`` = s(t) given,
    the step is the fixed eps = 2 (snr s(t))^2 instead, the value of Song's rule when ||score|| =
    ||z|| / s(t) (noise-dominated x_t): a plain unadjusted Langevin step, correct in any dimension.
    ``sample_pc`` takes the same step sizes (``_corrector_time``) in the VE variables, where a step
    longer than this rule's value at snr = 1/sqrt(2) is solved exactly instead (``langevin_coefficients``)."""
    if std is None:
        eps = 2.0 * (snr * _norm(z) / _norm(score).clamp_min(1e-20)) ** 2
    else:
        eps = torch.tensor(2.0 * (snr * std) ** 2, dtype=x.dtype, device=x.device)
    return x + eps * score + torch.sqrt(2.0 * eps) * z


def _corrector_time(y: Tensor, x0: Tensor, sigma: float, z: Tensor, snr: float,
                    step_rule: Literal["norm", "fixed"]) -> float | Tensor:
    """The Langevin amount c = eps / sigma^2 of ``langevin_step``'s step eps in y: "fixed" 2 snr^2; "norm"
    2 (snr ||z|| / ||score||)^2 / sigma^2 with score = -(y - x0) / sigma^2, per example."""
    if step_rule == "fixed":
        return 2.0 * snr**2
    return 2.0 * (snr * sigma * _norm(z) / _norm(y - x0).clamp_min(1e-300)) ** 2


@torch.no_grad()
def sample_euler_maruyama(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, noise: NoiseFn, times: Tensor | None = None,
                          *, steps: int | None = None, grid: Grid = default_grid("sde"), cond: Any = None,
                          callback: Callback | None = None) -> Tensor:
    """The reverse SDE from the prior draw ``x_T`` by its first-order exponential Euler-Maruyama step
    (module docstring: the linear part and the noise integral exact for a frozen denoiser; the DDPM
    posterior step between grid times, SDE-DPM-Solver++ of order 1): ``steps`` network calls, steps - 1
    noisy steps on ``times`` (or ``time_grid(sde, steps, grid)``) and the denoising step; the
    predictor-corrector sampler without its corrector. Before this the step was Song et al.'s plain
    Euler-Maruyama x - (f - g^2 score) dt + g sqrt(dt) z, unstable at a few steps."""
    return sample_pc(denoiser, sde, x_T, noise, times, steps=steps, corrector_steps=0, grid=grid, cond=cond,
                     callback=callback)


def _langevin(y: Tensor, x0: Tensor, sigma: float, sigma_next: float, c: float | Tensor, z: Tensor) -> Tensor:
    """A Langevin step of time c sigma^2 at level sigma (``langevin_coefficients``), then the move of y - x0
    and of the noise to level sigma_next as the probability-flow ODE would (factor sigma_next / sigma;
    sigma_next = sigma: no move)."""
    a, b = (v.to(dtype=y.dtype, device=y.device) for v in langevin_coefficients(c))
    return x0 + (sigma_next / sigma) * (a * (y - x0) + (b * sigma) * z)


@torch.no_grad()
def sample_pc(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, noise: NoiseFn, times: Tensor | None = None, *,
              steps: int | None = None, snr: float = 0.16,
              corrector_steps: int = 1, step_rule: Literal["norm", "fixed"] = "fixed", grid: Grid = default_grid("pc"),
              cond: Any = None, callback: Callback | None = None) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1 with a Langevin corrector), in the VE
    variables: at each grid time, ``corrector_steps`` Langevin steps at that noise level, then the
    reverse-SDE step to the next time (``reverse_sde_step``; at t_min, the denoising step). The
    corrector's step is Song et al.'s Algorithm 4 step eps (``step_rule`` "fixed": eps = 2 (snr s(t))^2,
    the default, unbiased in low dimension; "norm": their per-example norm ratio; see ``langevin_step``),
    taken as their unadjusted step while it is a convex combination and exactly beyond
    (``langevin_coefficients``: c = eps / s(t)^2 = 2 snr^2 for "fixed"). Song et al.'s predictor is an
    Euler-Maruyama step, which this sampler also took before and which blew up at 2-5 steps (module
    docstring). steps (1 + corrector_steps) network calls."""
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    if step_rule not in ("norm", "fixed"):
        raise ValueError(f"step_rule must be 'norm' or 'fixed', got {step_rule!r}")
    times, sig, y = walk(sde, x_T, times, steps, grid)
    for i, t in enumerate(times.tolist()):
        for _ in range(corrector_steps):
            x0 = ve_denoise(denoiser, y, sig[i], cond)
            z = noise()
            y = _langevin(y, x0, sig[i], sig[i], _corrector_time(y, x0, sig[i], z, snr, step_rule), z)
        x0 = ve_denoise(denoiser, y, sig[i], cond)
        if callback is not None:
            callback({"i": i, "t": t, "x": y * float(sde.mean_coef(t)), "x0": x0})
        y = x0 if sig[i + 1] == 0.0 else reverse_sde_step(y, x0, sig[i], sig[i + 1], noise())
    return y


@torch.no_grad()
def sample_annealed_langevin(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, noise: NoiseFn, *, levels: int,
                             steps_each: int = 5, step_size: float = 0.1, cond: Any = None,
                             denoise_final: bool = True, callback: Callback | None = None) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) in the VE view y = x / a of ``sde``:
    ``levels`` noise levels sigma_1 > ... > sigma_L geometric between sigma(t_max) and sigma(t_min)
    (uniform in log-SNR), ``steps_each`` steps per level,

        y <- y + (alpha_i / 2) grad log q_{sigma_i}(y) + sqrt(alpha_i) z,   alpha_i = step_size sigma_i^2,

    i.e. NCSN's alpha_i = eps sigma_i^2 / sigma_L^2 with eps = step_size sigma_L^2; the score is
    -(y - x0_hat) / sigma_i^2, so the step is y <- x0_hat + (1 - c) (y - x0_hat) + sqrt(2c) sigma_i z with
    c = step_size / 2, taken exactly instead when step_size > 2 (``langevin_coefficients``: their step
    overshoots x0_hat there and diverges from step_size 4). The last step of each level also carries y
    to the next level as the probability-flow ODE would: y - x0_hat and the new noise are scaled by
    sigma_{i+1} / sigma_i. Song & Ermon start the next level from y as it is; then a sample of
    q_{sigma_i} cannot be pulled back at a level far below it (x0_hat is nearly the identity far from
    the data at a small sigma), which left samples 10^2-10^4 times the data's norm at 2-10 levels (with
    many levels the factor tends to 1). Then the denoising step x0_hat at sigma_L (Song & Ermon 2020,
    "Improved techniques", sec. 3.3) when ``denoise_final``. levels * steps_each (+ 1) network calls."""
    _check(x_T)
    if not isinstance(levels, int) or levels < 1 or not isinstance(steps_each, int) or steps_each < 1:
        raise ValueError(f"levels and steps_each must be positive integers, got {levels!r}, {steps_each!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    times = time_grid(sde, levels, "logsnr")
    sig = grid_sigmas(sde, times)[:-1]
    y = x_T / float(sde.mean_coef(times[0]))
    n = 0
    for i, s in enumerate(sig):
        for k in range(steps_each):
            x0 = ve_denoise(denoiser, y, s, cond)
            if callback is not None:
                callback({"i": n, "t": float(times[i]), "x": y, "x0": x0, "sigma": s})
            s_next = sig[i + 1] if k == steps_each - 1 and i + 1 < len(sig) else s
            y = _langevin(y, x0, s, s_next, 0.5 * step_size, noise())
            n += 1
    if denoise_final:
        return ve_denoise(denoiser, y, sig[-1], cond)
    return y * float(sde.mean_coef(times[-1]))
