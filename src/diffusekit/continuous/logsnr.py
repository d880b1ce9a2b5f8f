"""Continuous-time log-SNR schedules t in [0, 1] -> lambda(t), with exact derivatives, in float64.

The continuous ELBO (Kingma et al. 2021, "Variational Diffusion Models", sec. 5 "Continuous-time
model: T -> infinity", as quoted in Gao, "VAEs and Diffusion Models" (Stanford CS231n), slides
"Connection to SDEs") weights the noise-prediction error by -dlambda/dt, so
every schedule here returns the pair (lambda(t), dlambda/dt) from one call, computed in closed form
(no finite differences). Conventions: lambda = log(alpha^2 / sigma^2) decreases from
``logsnr_max`` at t = 0 (the least noisy latent z_0) to ``logsnr_min`` at t = 1 (z_1, matched to the
prior N(0, I)); VDM's gamma is -lambda.

All schedules are ``nn.Module``s so that a learned one lives inside the trained module (checkpointed,
EMA-averaged and resumed like any weight); the fixed ones have no parameters.

Time convention (VDM time): t = 0 is the least noisy latent z_0 at the finite ``logsnr_max``, t = 1 is
z_1, and clean data is not on the t axis at all (it enters through the decoder p(x | z_0)).
``discretize(T)`` gives the discrete table whose steps k = 1..T sit at t = (k - 1) / (T - 1): step 1 is
z_0 (lambda_max), step T is z_1 (lambda_min), step 0 is clean data. The discrete and continuous views
agree exactly at those grid points, so every discrete sampler and the discrete bound run on a
continuous model.

This differs from the continuous schedules of ``diffusekit.schedules`` (score-SDE time): there t = 0
is the clean data itself (lambda = +inf) and ``discretize(T)`` puts step k = 0..T at t = k / T. Both are
right for what they model (a bound with a decoder at a finite lambda_max here; SDEs started at the data
there), and trained runs depend on both discretizations, so neither is changed (docs/math.md, "Two
continuous time conventions").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.schedules import DiscreteSchedule

__all__ = ["LogSNRSchedule", "LinearLogSNR", "CosineLogSNR", "MonotoneLogSNR", "grid_times"]

F64 = torch.float64


def grid_times(T: int) -> Tensor:
    """Continuous times t_k = (k - 1) / (T - 1) of the discrete steps k = 1..T (float64, (T,))."""
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"a continuous schedule needs T >= 2 grid steps, got {T!r}")
    return torch.arange(T, dtype=F64) / (T - 1)


class LogSNRSchedule(nn.Module):
    """Base class: a strictly decreasing lambda(t) with lambda(0) = logsnr_max, lambda(1) = logsnr_min."""

    def __init__(self, logsnr_min: float, logsnr_max: float):
        super().__init__()
        if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max) and logsnr_min < logsnr_max):
            raise ValueError(f"need finite logsnr_min < logsnr_max, got {logsnr_min} and {logsnr_max}")
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - overridden
        """(lambda(t), dlambda/dt), float64, shaped like t."""
        raise NotImplementedError

    def logsnr(self, t: Tensor) -> Tensor:
        return self(torch.as_tensor(t, dtype=F64))[0]

    @torch.no_grad()
    def discretize(self, T: int) -> DiscreteSchedule:
        """The discrete schedule with logsnr[k] = lambda((k - 1) / (T - 1)) for k = 1..T (and clean
        data at k = 0); log alpha_bar = log sigmoid(lambda) = -softplus(-lambda) in float64."""
        return DiscreteSchedule.from_logsnr(self.logsnr(grid_times(T).to(self._device())).cpu())

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def extra_repr(self) -> str:
        return f"logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max}"


class LinearLogSNR(LogSNRSchedule):
    """lambda(t) = lambda_max + t (lambda_min - lambda_max): uniform in log-SNR (VDM's fixed baseline)."""

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=F64)
        slope = self.logsnr_min - self.logsnr_max
        return self.logsnr_max + slope * t, torch.full_like(t, slope)


class CosineLogSNR(LogSNRSchedule):
    """The cosine schedule in log-SNR form, truncated to [lambda_min, lambda_max] (Kingma & Gao 2023,
    the cosine schedule written as a function of log-SNR): lambda(t) = -2 log tan(a + t (b - a)) with a = atan(exp(-lambda_max / 2)),
    b = atan(exp(-lambda_min / 2)); dlambda/dt = -4 (b - a) / sin(2 (a + t (b - a)))."""

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=F64)
        a, b = math.atan(math.exp(-self.logsnr_max / 2)), math.atan(math.exp(-self.logsnr_min / 2))
        u = a + t * (b - a)
        return -2.0 * torch.log(torch.tan(u)), -4.0 * (b - a) / torch.sin(2.0 * u)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class MonotoneLogSNR(LogSNRSchedule):
    """A learned monotone schedule with fixed end points (VDM's monotone network, Kingma et al. 2021,
    in closed form).

        g(t) = a t + sum_j w_j sigmoid(k_j (t - c_j)),    a, w_j, k_j > 0 (softplus of parameters)
        lambda(t) = lambda_max + (lambda_min - lambda_max) (g(t) - g(0)) / (g(1) - g(0))
        dlambda/dt = (lambda_min - lambda_max) g'(t) / (g(1) - g(0)),
        g'(t) = a + sum_j w_j k_j s_j (1 - s_j),   s_j = sigmoid(k_j (t - c_j)).

    This is VDM's function class (a positive linear layer plus a positive combination of sigmoids of
    positive-slope affine maps of t); we choose it because g' > a > 0 makes lambda strictly
    decreasing for every parameter value, the normalisation pins both end points exactly whatever
    the parameters, and dlambda/dt is smooth and exact, which the -dlambda/dt weight of the ELBO
    needs. It starts close to linear in log-SNR (the sigmoids are evenly spaced with equal weights).
    Parameters are float32 like any weight; the schedule is evaluated in float64.
    """

    def __init__(self, logsnr_min: float, logsnr_max: float, hidden: int = 32):
        super().__init__(logsnr_min, logsnr_max)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.raw_a = nn.Parameter(torch.tensor(_softplus_inverse(1.0)))
        self.raw_w = nn.Parameter(torch.full((hidden,), _softplus_inverse(1.0 / hidden)))
        self.raw_k = nn.Parameter(torch.full((hidden,), _softplus_inverse(10.0)))
        self.center = nn.Parameter((torch.arange(hidden, dtype=torch.float32) + 0.5) / hidden)

    def _g(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """g(t) and g'(t), float64, shaped like t."""
        a = F.softplus(self.raw_a.to(F64))
        w, k = F.softplus(self.raw_w.to(F64)), F.softplus(self.raw_k.to(F64))
        s = torch.sigmoid(k * (t[..., None] - self.center.to(F64)))
        return a * t + (w * s).sum(-1), a + (w * k * s * (1 - s)).sum(-1)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=F64, device=self.raw_a.device)
        g, dg = self._g(t)
        ends, _ = self._g(torch.tensor([0.0, 1.0], dtype=F64, device=t.device))
        span, width = self.logsnr_min - self.logsnr_max, ends[1] - ends[0]
        return self.logsnr_max + span * ((g - ends[0]) / width), span * (dg / width)
