"""The Gaussian pieces of the forward process and of the bound, one small function per equation.

Indices ``t`` are int64 tensors of shape (B,) in 1..T (the notes' t; t = 0 is clean data). Tables
come from a float64 ``DiscreteSchedule`` and are cast to x's dtype at use. The slides cited are those of
Vidal, "Deep Generative Models" (Fall 2025) and Gao, "VAEs and Diffusion Models" (Stanford CS231n).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusekit.parameterization import append_dims
from diffusekit.schedules import DiscreteSchedule

__all__ = [
    "extract",
    "forward_step_mean_var",
    "forward_step_sample",
    "marginal_mean_std",
    "q_sample",
    "posterior_mean_variance",
    "posterior_mean_from_eps",
    "gaussian_kl",
    "normal_log_prob",
    "discretized_gaussian_log_likelihood",
    "tweedie_x0",
]

LOG_2PI = math.log(2 * math.pi)


def extract(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] cast to like's dtype/device, shaped (B, 1, ..., 1) to broadcast against ``like``."""
    t = torch.as_tensor(t, dtype=torch.long, device=table.device)
    return append_dims(table[t].to(dtype=like.dtype, device=like.device), like.ndim)


# -- forward process (Vidal, "Deep Generative Models", slides "The Forward Process of Diffusion Model") --
def forward_step_mean_var(x_prev: Tensor, t: Tensor, schedule: DiscreteSchedule) -> tuple[Tensor, Tensor]:
    """q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I): returns (mean, variance)."""
    beta = extract(schedule.betas, t, x_prev)
    return (1 - beta).sqrt() * x_prev, beta.expand_as(x_prev)


def forward_step_sample(x_prev: Tensor, t: Tensor, schedule: DiscreteSchedule, noise: Tensor) -> Tensor:
    """One Markov step x_t = sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) eps."""
    mean, var = forward_step_mean_var(x_prev, t, schedule)
    return mean + var.sqrt() * noise


def marginal_mean_std(x0: Tensor, t: Tensor, schedule: DiscreteSchedule) -> tuple[Tensor, Tensor]:
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): returns (mean, std)."""
    return extract(schedule.alpha, t, x0) * x0, extract(schedule.sigma, t, x0)


def q_sample(x0: Tensor, t: Tensor, schedule: DiscreteSchedule, noise: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (the closed-form kernel)."""
    mean, std = marginal_mean_std(x0, t, schedule)
    return mean + std * noise


# -- posterior q(x_{t-1} | x_t, x_0) (Vidal, "Deep Generative Models", slide "ELBO for Diffusion Model:
# Score Matching Term", with the square root on alpha_bar_{t-1} that the slide drops; docs/math.md) --
def posterior_mean_variance(
    x0: Tensor, x_t: Tensor, t: Tensor, schedule: DiscreteSchedule
) -> tuple[Tensor, Tensor, Tensor]:
    """mu_q = [sqrt(alpha_bar_{t-1}) beta_t x_0 + sqrt(alpha_t)(1 - alpha_bar_{t-1}) x_t] / (1 - alpha_bar_t),
    variance beta_tilde_t; returns (mean, variance, clipped log-variance)."""
    mean = extract(schedule.posterior_mean_coef_x0, t, x_t) * x0 + extract(schedule.posterior_mean_coef_xt, t, x_t) * x_t
    var = extract(schedule.posterior_variance, t, x_t).expand_as(x_t)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    return mean, var, log_var


def posterior_mean_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, schedule: DiscreteSchedule) -> Tensor:
    """The eps form of mu_q (Vidal, "Deep Generative Models", slide "Reparameterization as an Alternative
    Form for ELBO"):
    mu_q = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)."""
    beta = extract(schedule.betas, t, x_t)
    return (x_t - beta / extract(schedule.sigma, t, x_t) * eps) / (1 - beta).sqrt()


# -- divergences and likelihoods ------------------------------------------------------------
def gaussian_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (diagonal Gaussians;
    Vidal, "Deep Generative Models", slide "ELBO for Diffusion Model: Matching the Mean")."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def normal_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, e^logvar) per element, in nats."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log_diff_ndtr(b: Tensor, a: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for b > a, accurate in both tails (mirror when a > 0)."""
    mirror = a > 0
    hi = torch.where(mirror, -a, b)
    lo = torch.where(mirror, -b, a)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """log P(x) per element for data on ``levels`` equally spaced values in [-1, 1] under
    N(mean, exp(log_scale)^2) integrated over each value's bin (Ho et al. 2020, sec. 3.3).

    The bin half-width is 1 / (levels - 1); the end bins extend to -inf and +inf. Where a bin is so
    narrow that the difference of CDFs underflows, the density times the bin width is used.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    half = 1.0 / (levels - 1)
    inv_s = torch.exp(-log_scale)
    upper = (x - mean + half) * inv_s
    lower = (x - mean - half) * inv_s
    lo_edge = x <= -1 + 1e-3 * half
    hi_edge = x >= 1 - 1e-3 * half
    inf = torch.full_like(upper, float("inf"))
    upper = torch.where(hi_edge, inf, upper)
    lower = torch.where(lo_edge, -inf, lower)
    exact = _log_diff_ndtr(upper, lower)
    approx = normal_log_prob(x, mean, 2 * log_scale) + math.log(2 * half)
    return torch.where(torch.isfinite(exact), exact, approx)


def tweedie_x0(x_t: Tensor, score: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie's formula (Gao, "VAEs and Diffusion Models" (Stanford CS231n), slides "Tweedie's formula"
    and the "Variational Diffusion Models" slides that apply it): E[x_0 | x_t] = (x_t + sigma^2 score) / alpha
    for x_t = alpha x_0 + sigma eps, where score = grad log q_t(x_t)."""
    return (x_t + sigma**2 * score) / alpha
