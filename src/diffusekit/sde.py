"""Forward SDEs of score-based diffusion (Song et al. 2021, "Score-based generative modeling through
stochastic differential equations"), in continuous time t in [0, 1] (t = 0 is clean data).

Every SDE here is linear, dx = f(t) x dt + g(t) dw, so its marginal given the data is Gaussian,

    x_t = a(t) x_0 + s(t) eps,   a(t) = exp(int_0^t f),   s(t)^2 = int_0^t a(t)^2 / a(u)^2 g(u)^2 du,

and everything a sampler needs follows from (a, s): the log-SNR lambda(t) = log(a^2 / s^2), the
score, the reverse SDE and the probability-flow ODE.

- ``VPSDE``: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (Gao, "VAEs and Diffusion Models" (Stanford
  CS231n), slide "Forward Diffusion Process as Stochastic Differential Equation"; Bereyhi, "Deep
  Generative Models", Chapter 6 (Toronto), slides "Diffusion by SDE"), built from any continuous
  schedule of ``schedules.py`` (its time convention: t = 0 is clean data) with
  beta(t) = -d/dt log alpha_bar(t) (exact, by autograd through the schedule, float64). Then
  a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar): the project's own alpha_t, sigma_t, and for
  ``InterpolatedSchedule`` of a discrete table the marginals equal the table at every t = k / T.
- ``SubVPSDE``: same drift, g(t)^2 = beta(t) (1 - alpha_bar(t)^2); s = 1 - alpha_bar (Song et al.
  2021, eq. 11).
- ``VESDE``: dx = sqrt(d sigma^2 / dt) dw with sigma(t) = sigma_min (sigma_max / sigma_min)^t (NCSN);
  a = 1 and, started at the data, s(t)^2 = sigma(t)^2 - sigma_min^2 (Song et al. treat the data as
  already perturbed at sigma_min and write s = sigma(t); here the marginal is exact).

Reverse SDE (Anderson 1982; Gao, slide "The Generative Reverse Stochastic Differential Equation"):
dx = [f - g^2 grad log q_t] dt + g dw_bar, run from
t = 1 to 0. Probability-flow ODE (Song et al. 2021, eq. 13): dx/dt = f - 1/2 g^2 grad log q_t.

One denoiser for every SDE: the project's networks are VP denoisers fed log-SNR. Dividing x_t by
c = sqrt(a^2 + s^2) gives x_t / c = (a/c) x_0 + (s/c) eps, a VP point with the same log-SNR and the
same eps, so ``predict`` queries the denoiser there and returns eps, x0 and the score -eps / s of
this SDE's own x_t (Tweedie; Gao, slides "Three Equivalent Interpretations").

Truncation: time runs over [t_min, 1], and t_min changes what is computed (the reference code of Song
et al. 2021 stops at 1e-3 to sample but at 1e-5 to compute likelihoods, and the NLL differs between the
two), so ``t_min`` is explicit on every SDE: 1e-3 for analytic schedules, 1 / T for the continuous view
of a T-step table (the least noisy level a model trained on that table has seen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusekit.parameterization import DenoiserFn, append_dims
from diffusekit.schedules import ContinuousSchedule, DiscreteSchedule, InterpolatedSchedule

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "SDEPrediction", "predict", "vp_from_schedule"]

F64 = torch.float64


def _t64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=F64).cpu()


def _like(v: Tensor, x: Tensor) -> Tensor:
    """A float64 scalar or per-example (B,) coefficient cast to x's dtype/device, broadcastable."""
    v = v.to(dtype=x.dtype, device=x.device)
    return v if v.ndim == 0 else append_dims(v, x.ndim)


class SDE:
    """A linear forward SDE dx = f(t) x dt + g(t) dw on t in [t_min, 1].

    Subclasses give ``log_mean_coef(t)`` (log a), ``marginal_var(t)`` (s^2), ``drift_coef(t)``
    (f) and ``diffusion_sq(t)`` (g^2), all float64 functions of a float64 t (scalar or (B,)).
    """

    t_min: float = 1e-3
    t_max: float = 1.0

    # -- coefficients (float64) ---------------------------------------------------------------
    def log_mean_coef(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def marginal_var(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def drift_coef(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def diffusion_sq(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def mean_coef(self, t: Tensor | float) -> Tensor:
        """a(t): E[x_t | x_0] = a(t) x_0."""
        return torch.exp(self.log_mean_coef(_t64(t)))

    def std(self, t: Tensor | float) -> Tensor:
        """s(t): the standard deviation of x_t given x_0."""
        return self.marginal_var(_t64(t)).sqrt()

    def logsnr(self, t: Tensor | float) -> Tensor:
        """lambda(t) = log(a^2 / s^2), the noise level the denoiser is fed."""
        t = _t64(t)
        return 2.0 * self.log_mean_coef(t) - torch.log(self.marginal_var(t))

    def diffusion(self, t: Tensor | float) -> Tensor:
        """g(t)."""
        return self.diffusion_sq(_t64(t)).sqrt()

    # -- the SDE and its reverses ---------------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        """f(x, t) = f(t) x."""
        return _like(self.drift_coef(_t64(t)), x) * x

    def reverse_drift(self, x: Tensor, t: Tensor | float, score: Tensor) -> Tensor:
        """f - g^2 score: the drift of the reverse-time SDE (Gao, "VAEs and Diffusion Models", slide "The
        Generative Reverse Stochastic Differential Equation"), in forward time."""
        return self.drift(x, t) - _like(self.diffusion_sq(_t64(t)), x) * score

    def probability_flow_drift(self, x: Tensor, t: Tensor | float, score: Tensor) -> Tensor:
        """f - 1/2 g^2 score: the probability-flow ODE's velocity (Song et al. 2021, eq. 13)."""
        return self.drift(x, t) - 0.5 * _like(self.diffusion_sq(_t64(t)), x) * score

    def marginal_sample(self, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
        """x_t = a(t) x_0 + s(t) noise."""
        t = _t64(t)
        return _like(self.mean_coef(t), x0) * x0 + _like(self.std(t), x0) * noise

    # -- prior ---------------------------------------------------------------------------------
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) that stands in for q_1."""
        return math.sqrt(float(self.mean_coef(self.t_max)) ** 2 + float(self.marginal_var(_t64(self.t_max))))

    def prior_sample(self, noise: Tensor) -> Tensor:
        """A prior draw from standard normal ``noise``."""
        return noise * self.prior_std()

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, prior_std^2 I) per example (float64, summed over dimensions)."""
        x = x.to(F64).reshape(x.shape[0], -1)
        s = self.prior_std()
        return -0.5 * (x**2).sum(1) / s**2 - x.shape[1] * (math.log(s) + 0.5 * math.log(2 * math.pi))


class _BetaMixin:
    """beta(t) = -d/dt log alpha_bar(t) of a continuous schedule, by autograd in float64."""

    schedule: ContinuousSchedule

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        return self.schedule.log_alpha_bar(t)

    def beta(self, t: Tensor | float) -> Tensor:
        t = _t64(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            lab = self.schedule.log_alpha_bar(t)
            (grad,) = torch.autograd.grad(lab.sum(), t)
        return -grad.detach()

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def log_mean_coef(self, t: Tensor) -> Tensor:
        return 0.5 * self.log_alpha_bar(t)


class VPSDE(_BetaMixin, SDE):
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta = -d log alpha_bar / dt.

    a(t) = sqrt(alpha_bar(t)), s(t)^2 = 1 - alpha_bar(t): the schedule's own alpha and sigma.
    """

    def __init__(self, schedule: ContinuousSchedule, t_min: float = 1e-3):
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.schedule, self.t_min = schedule, float(t_min)

    def marginal_var(self, t: Tensor) -> Tensor:
        return -torch.expm1(self.log_alpha_bar(t))

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def logsnr(self, t: Tensor | float) -> Tensor:
        return self.schedule.logsnr(_t64(t))

    def prior_std(self) -> float:
        return 1.0  # N(0, I), the VP prior (alpha_bar(1) is ~4e-5 for DDPM's linear table)


class SubVPSDE(_BetaMixin, SDE):
    """Sub-VP (Song et al. 2021, eq. 11): dx = -1/2 beta x dt + sqrt(beta (1 - alpha_bar^2)) dw.

    a(t) = sqrt(alpha_bar(t)), s(t) = 1 - alpha_bar(t) (below the VP std at every t).
    """

    def __init__(self, schedule: ContinuousSchedule, t_min: float = 1e-3):
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.schedule, self.t_min = schedule, float(t_min)

    def marginal_var(self, t: Tensor) -> Tensor:
        return torch.expm1(self.log_alpha_bar(t)) ** 2

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(2.0 * self.log_alpha_bar(t))

    def prior_std(self) -> float:
        return 1.0


@dataclass
class VESDE(SDE):
    """Variance exploding (NCSN as an SDE): dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw,
    sigma(t) = sigma_min (sigma_max / sigma_min)^t; a = 1, s(t)^2 = sigma(t)^2 - sigma_min^2."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _t64(t)

    def log_mean_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def marginal_var(self, t: Tensor) -> Tensor:
        # sigma_min^2 (r^(2t) - 1) with r = sigma_max / sigma_min, without cancellation
        return self.sigma_min**2 * torch.expm1(2.0 * t * math.log(self.sigma_max / self.sigma_min))

    def drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def diffusion_sq(self, t: Tensor) -> Tensor:
        return self.sigma(t) ** 2 * 2.0 * math.log(self.sigma_max / self.sigma_min)


def vp_from_schedule(schedule: DiscreteSchedule | ContinuousSchedule, t_min: float | None = None) -> VPSDE:
    """The VP SDE of a schedule. A ``DiscreteSchedule`` is viewed through ``InterpolatedSchedule``
    (piecewise-constant beta(t), marginals exact at t = k / T) with t_min = 1 / T by default."""
    if isinstance(schedule, DiscreteSchedule):
        return VPSDE(InterpolatedSchedule(schedule), 1.0 / schedule.T if t_min is None else t_min)
    return VPSDE(schedule, 1e-3 if t_min is None else t_min)


@dataclass
class SDEPrediction:
    """The denoiser's answer at (x_t, t) of an SDE: eps, x0 (data space) and grad log q_t(x_t)."""

    eps: Tensor
    x0: Tensor
    score: Tensor


def predict(denoiser: DenoiserFn, sde: SDE, x: Tensor, t: Tensor | float, cond: Any = None) -> SDEPrediction:
    """Query a VP denoiser (fed log-SNR) at the point x_t of ``sde`` (see the module docstring):
    x_t / sqrt(a^2 + s^2) is the VP point of the same log-SNR and eps; score = -eps / s."""
    t = _t64(t)
    a, s = sde.mean_coef(t), sde.std(t)
    c = torch.sqrt(a**2 + s**2)
    pred = denoiser(x / _like(c, x), sde.logsnr(t).to(x.device), cond)
    eps = pred.eps.to(x.dtype)
    return SDEPrediction(eps=eps, x0=pred.x0.to(x.dtype), score=-eps / _like(s, x))
