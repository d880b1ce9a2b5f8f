"""Stochastic score-based samplers over the one denoiser convention, with per-sample noise.

- ``sample_euler_maruyama``: the reverse-time SDE dx = [f - g^2 grad log q_t] dt + g dw_bar (Gao, "VAEs
  and Diffusion Models" (Stanford CS231n), slide "The Generative Reverse Stochastic Differential
  Equation"; Song et al. 2021, eq. 6) by Euler-Maruyama.
- ``sample_pc``: predictor-corrector (Song et al. 2021, Algorithms 1-3): Langevin corrector steps at
  each noise level, then an Euler-Maruyama predictor step.
- ``sample_annealed_langevin``: annealed Langevin dynamics over geometric noise levels (Song & Ermon
  2019, Algorithm 1; Gao's slides "Score-based Generative Models", eq. 94, whose sqrt(2 c eps) eps
  means sqrt(2c) eps: docs/math.md) in the VE view of any SDE.

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
from diffusekit.sampling.ode import Grid, _check, grid_sigmas, resolve_times, time_grid, ve_denoise
from diffusekit.sde import SDE, predict

__all__ = ["sample_euler_maruyama", "sample_pc", "sample_annealed_langevin", "langevin_step"]

NoiseFn = Callable[[], Tensor]


def _norm(v: Tensor) -> Tensor:
    """Per-example Euclidean norm, shaped to broadcast against v."""
    n = v.reshape(v.shape[0], -1).norm(dim=1)
    return n.reshape((-1,) + (1,) * (v.ndim - 1))


def langevin_step(x: Tensor, score: Tensor, z: Tensor, snr: float, std: float | None = None) -> Tensor:
    """One Langevin corrector step x + eps score + sqrt(2 eps) z, the step eps = 2 (snr ||z|| /
    ||score||)^2 chosen per example so that the signal-to-noise ratio ||eps score|| / ||sqrt(2 eps) z||
    equals ``snr`` (Song et al. 2021, Algorithm 4, with per-example norms where their code takes
    batch means, and their alpha_i = 1 - beta_i ~ 1 dropped).

    That rule makes the step depend on z and on ||score(x)||, which is harmless in high dimension
    (both norms concentrate) but biases the chain in a few dimensions. With ``std`` = s(t) given,
    the step is the fixed eps = 2 (snr s(t))^2 instead, the value of Song's rule when ||score|| =
    ||z|| / s(t) (noise-dominated x_t): a plain unadjusted Langevin step, correct in any dimension."""
    if std is None:
        eps = 2.0 * (snr * _norm(z) / _norm(score).clamp_min(1e-20)) ** 2
    else:
        eps = torch.tensor(2.0 * (snr * std) ** 2, dtype=x.dtype, device=x.device)
    return x + eps * score + torch.sqrt(2.0 * eps) * z


def _em_step(sde: SDE, x: Tensor, t: float, dt: float, score: Tensor, z: Tensor) -> Tensor:
    """x_{t - dt} = x - (f - g^2 score) dt + g sqrt(dt) z (reverse time, dt > 0)."""
    g = float(sde.diffusion(t))
    return x - sde.reverse_drift(x, t, score) * dt + (g * math.sqrt(dt)) * z


@torch.no_grad()
def sample_euler_maruyama(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, noise: NoiseFn, times: Tensor | None = None,
                          *, steps: int | None = None, grid: Grid = "time", cond: Any = None, callback: Callback | None = None) -> Tensor:
    """Euler-Maruyama on the reverse SDE from the prior draw ``x_T`` at t_max: ``steps`` network
    calls, steps - 1 noisy steps on ``times`` (or ``time_grid(sde, steps, grid)``) and the denoising step: the
    predictor-corrector sampler without its corrector."""
    return sample_pc(denoiser, sde, x_T, noise, times, steps=steps, corrector_steps=0, grid=grid, cond=cond,
                     callback=callback)


@torch.no_grad()
def sample_pc(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, noise: NoiseFn, times: Tensor | None = None, *,
              steps: int | None = None, snr: float = 0.16,
              corrector_steps: int = 1, step_rule: Literal["norm", "fixed"] = "fixed", grid: Grid = "time",
              cond: Any = None, callback: Callback | None = None) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1 with a Langevin corrector):
    at each grid time, ``corrector_steps`` Langevin steps (``langevin_step`` with signal-to-noise
    ratio ``snr``), then an Euler-Maruyama predictor step (or, at t_min, the denoising step).
    ``step_rule`` "norm" is Song et al.'s per-example norm ratio, "fixed" the step 2 (snr s(t))^2
    (see ``langevin_step``; the default, because it stays unbiased in low dimension).
    steps (1 + corrector_steps) network calls."""
    _check(x_T)
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    if step_rule not in ("norm", "fixed"):
        raise ValueError(f"step_rule must be 'norm' or 'fixed', got {step_rule!r}")
    times = resolve_times(sde, times, steps, grid).tolist()
    steps = len(times)
    x = x_T
    for i, t in enumerate(times):
        std = float(sde.std(t)) if step_rule == "fixed" else None
        for _ in range(corrector_steps):
            x = langevin_step(x, predict(denoiser, sde, x, t, cond).score, noise(), snr, std)
        pred = predict(denoiser, sde, x, t, cond)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": pred.x0})
        x = pred.x0 if i == steps - 1 else _em_step(sde, x, t, t - times[i + 1], pred.score, noise())
    return x


@torch.no_grad()
def sample_annealed_langevin(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, noise: NoiseFn, *, levels: int,
                             steps_each: int = 5, step_size: float = 0.1, cond: Any = None,
                             denoise_final: bool = True, callback: Callback | None = None) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) in the VE view y = x / a of
    ``sde``: ``levels`` noise levels sigma_1 > ... > sigma_L geometric between sigma(t_max) and
    sigma(t_min) (uniform in log-SNR), ``steps_each`` steps per level,

        y <- y + (alpha_i / 2) grad log q_{sigma_i}(y) + sqrt(alpha_i) z,   alpha_i = step_size sigma_i^2,

    i.e. NCSN's alpha_i = eps sigma_i^2 / sigma_L^2 with eps = step_size sigma_L^2; the score is
    -(y - x0_hat) / sigma_i^2. Then the denoising step y + sigma_L^2 score = x0_hat (Song & Ermon
    2020, "Improved techniques", sec. 3.3) when ``denoise_final``. levels * steps_each (+ 1) calls."""
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
        alpha = step_size * s * s
        for _ in range(steps_each):
            x0 = ve_denoise(denoiser, y, s, cond)
            if callback is not None:
                callback({"i": n, "t": float(times[i]), "x": y, "x0": x0, "sigma": s})
            y = y - (0.5 * alpha / (s * s)) * (y - x0) + math.sqrt(alpha) * noise()
            n += 1
    if denoise_final:
        return ve_denoise(denoiser, y, sig[-1], cond)
    return y * float(sde.mean_coef(times[-1]))
