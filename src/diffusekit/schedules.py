"""Noise schedules, discrete and continuous, always built in float64.

Notation (docs/math.md): the forward kernel is q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with
alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t) (variance preserving), and the
log signal-to-noise ratio is logsnr = log(alpha_t^2 / sigma_t^2).

Discrete tables are indexed by the notes' time t = 0..T: index 0 is clean data (beta_0 = 0,
alpha_bar_0 = 1) and t = 1..T are the noising steps of Vidal, "Deep Generative Models" (Fall 2025),
slides "The Forward Process of Diffusion Model". diffusers numbers the same steps k = t - 1 = 0..T-1.

Time convention of the continuous schedules here (score-SDE time, Song et al. 2021): t in [0, 1],
t = 0 is clean data (alpha_bar(0) = 1, lambda = +inf) and t = 1 the noisiest point; ``discretize(T)``
puts step k = 0..T at t = k / T. A continuous schedule maps t to log(alpha_bar(t)); everything else
(logsnr, alpha, sigma) is derived from it. These drive the SDEs (``sde.py``), the ODE/SDE samplers and
the discrete tables. ``InterpolatedSchedule`` is the continuous view of any discrete table: log
alpha_bar is linear between grid points t = k / T (a piecewise-constant beta(t) of a VP SDE), so it
agrees with the table exactly at every grid point.

The other continuous family, ``continuous.logsnr.LogSNRSchedule``, uses VDM time instead (Kingma et
al. 2021): t = 0 is the least noisy latent z_0 at a finite logsnr_max, clean data is separate, and
its ``discretize(T)`` puts step k = 1..T at t = (k - 1) / (T - 1). Both are right for what they model,
and trained runs depend on both discretizations (docs/math.md, "Two continuous time conventions").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Protocol, Sequence

import torch
from torch import Tensor

__all__ = [
    "DiscreteSchedule",
    "ContinuousSchedule",
    "CosineSchedule",
    "LinearVPSchedule",
    "SigmoidSchedule",
    "InterpolatedSchedule",
    "linear_betas",
    "cosine_betas",
    "sigmoid_betas",
    "logsnr_linear_log_alpha_bar",
    "betas_from_alpha_bar",
    "make_schedule",
    "respace",
    "alpha_sigma_from_logsnr",
    "logsnr_from_log_alpha_bar",
]

F64 = torch.float64
ScheduleName = Literal["linear", "cosine", "sigmoid", "logsnr_linear"]


# --------------------------------------------------------------------------------------------
# Helpers shared by both views
# --------------------------------------------------------------------------------------------
def logsnr_from_log_alpha_bar(log_alpha_bar: Tensor) -> Tensor:
    """logsnr = log(alpha_bar / (1 - alpha_bar)), computed stably from log(alpha_bar).

    Uses log(1 - alpha_bar) = log(-expm1(log alpha_bar)); +inf where alpha_bar = 1 (t = 0).
    """
    return log_alpha_bar - torch.log(-torch.expm1(log_alpha_bar))


def alpha_sigma_from_logsnr(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Variance-preserving scales from log-SNR: alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


# --------------------------------------------------------------------------------------------
# Discrete beta tables (Vidal, "Deep Generative Models", slides "Implementation (DDPM)"; Zhu, CMU 16-726
# "Generative Model Zoo (part III)", slides "Implementation Considerations: Noise Schedule")
# --------------------------------------------------------------------------------------------
def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule, beta from 1e-4 to 0.02 at T = 1000 (Ho et al. 2020, sec. 4).

    The end points are defined for T = 1000, and a schedule defined for one T must be rescaled when T
    changes (DDPM's betas used as they are at T = 10 would leave alpha_bar_T at about 0.9). For other T, beta is first
    spread linearly over T points, b_t = linspace(beta_start, beta_end, T)[t - 1], and the per-step
    log-retention is rescaled, log(1 - beta'_t) = (1000 / T) log(1 - b_t), so every beta' stays in
    (0, 1) even for small T; at T = 1000 the table is exactly DDPM's.

    What is kept, measured against the T = 1000 table (log alpha_bar_1000 = -10.1177): the total
    log alpha_bar_T only approximately, because log(1 - b) is not linear in b and the mean of log(1 - b)
    over T linearly spaced points depends on T. |Relative error| of log alpha_bar_T: 3.3e-3 at T = 2,
    8.3e-4 at T = 5, 3.7e-4 at T = 10, 3.0e-5 at T = 100, 3.3e-6 at T = 500, 1.7e-6 at T = 2000
    (alpha_bar_T itself is off by the same absolute amount in the exponent, e.g. a factor 0.9963 at
    T = 10). T = 1 is degenerate: its single beta is beta_start, so log alpha_bar_1 = -0.1. In between,
    alpha_bar(k / T) is matched only loosely at small k: step 1 carries beta_start, the value DDPM gives
    its first step, rather than the mean of the first 1000 / T steps, so at T = 10 log alpha_bar at
    t = 0.1 is -0.010 against -0.109; alpha = sqrt(alpha_bar) on the grid differs from the T = 1000
    table's by at most 0.077 at T = 10, 0.0062 at T = 100 and 0.0003 at T = 2000.
    """
    _check_T(T)
    base = torch.linspace(beta_start, beta_end, T, dtype=F64)
    if T == 1000:
        return base
    return -torch.expm1((1000.0 / T) * torch.log1p(-base))


def betas_from_alpha_bar(alpha_bar: Tensor, max_beta: float = 0.999) -> Tensor:
    """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, capped at ``max_beta``.

    ``alpha_bar`` holds alpha_bar_0 .. alpha_bar_T (alpha_bar_0 = 1); returns T betas.
    """
    alpha_bar = alpha_bar.to(F64)
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0),
    f(t) = cos(((t + s) / (1 + s)) pi / 2)^2, with beta capped at 0.999 near t = 1."""
    _check_T(T)
    grid = torch.arange(T + 1, dtype=F64) / T
    return betas_from_alpha_bar(torch.exp(CosineSchedule(s).log_alpha_bar(grid)), max_beta)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> Tensor:
    """Sigmoid schedule of Chen (2023), "On the importance of noise scheduling", Algorithm 1."""
    _check_T(T)
    grid = torch.arange(T + 1, dtype=F64) / T
    sched = SigmoidSchedule(start, end, tau)
    return betas_from_alpha_bar(torch.exp(sched.log_alpha_bar(grid)), max_beta)


def logsnr_linear_log_alpha_bar(T: int, logsnr_min: float = -10.0, logsnr_max: float = 10.0) -> Tensor:
    """log alpha_bar_0..T of the schedule whose log-SNR falls linearly from ``logsnr_max`` at t = 1 to
    ``logsnr_min`` at t = T (alpha_bar = sigmoid(lambda), so log alpha_bar = -softplus(-lambda) in float64).

    Steps of equal size in log-SNR. The discrete bound's terms are the continuous-time bound's integral
    taken in steps, each with the error of the noisier end (Kingma et al. 2021, VDM, sec. 4-5: the
    discrete-time loss in terms of SNR(s) - SNR(t), and more steps never loosen it): a step that is wide in log-SNR where the denoiser's error
    changes fast pays for it. DDPM's linear betas take their widest steps at the clean end, where the
    bits of quantized data are decided (from beta_1 = 2e-3: 6.21, 5.51, 5.10, ... in log-SNR, 0.70
    for the first step against 0.017 for every step here at T = 1000 over the same range). T = 1 is
    the single step to ``logsnr_min``."""
    _check_T(T)
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max) and logsnr_min < logsnr_max):
        raise ValueError(f"need finite logsnr_min < logsnr_max, got {logsnr_min} and {logsnr_max}")
    lam = (torch.linspace(logsnr_max, logsnr_min, T, dtype=F64) if T > 1
           else torch.tensor([logsnr_min], dtype=F64))
    return DiscreteSchedule.from_logsnr(lam).log_alpha_bar


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"number of diffusion steps T must be a positive integer, got {T!r}")


@dataclass(frozen=True)
class DiscreteSchedule:
    """All tables of a discrete diffusion, float64, indexed by t = 0..T (t = 0 is clean data).

    The primary table is ``log_alpha_bar`` (log alpha_bar_0 = 0); every other table is derived
    from it once and cached (treat the returned tensors as read-only), so respacing (which only selects entries) is exact. ``timesteps[t]`` is the index of
    step t in the schedule this one was respaced from (identity for a schedule that was not
    respaced); the network only ever sees ``logsnr``, so a respaced schedule feeds it exactly the
    noise levels it was trained on.
    """

    log_alpha_bar: Tensor  # (T+1,), entry 0 is 0
    timesteps: Tensor  # (T+1,) int64

    def __post_init__(self) -> None:
        lab = self.log_alpha_bar
        if lab.dtype != F64 or lab.ndim != 1 or lab.numel() < 2:
            raise ValueError("log_alpha_bar must be a float64 vector of length T + 1 >= 2")
        if lab[0] != 0 or not torch.all(torch.diff(lab) < 0):
            raise ValueError("alpha_bar must start at 1 and decrease strictly (every beta in (0, 1))")

    @classmethod
    def from_betas(cls, betas: Tensor | Sequence[float]) -> "DiscreteSchedule":
        """Accumulate log alpha_bar_t = sum_{s<=t} log(1 - beta_s) in float64."""
        betas = torch.as_tensor(betas, dtype=F64).flatten()
        if betas.numel() < 1:
            raise ValueError("a schedule needs at least one beta")
        if not torch.all((betas > 0) & (betas < 1)):
            raise ValueError("every beta_t must lie in (0, 1)")
        lab = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(torch.log1p(-betas), 0)])
        return cls(lab, torch.arange(lab.numel(), dtype=torch.int64))

    @classmethod
    def from_logsnr(cls, logsnr: Tensor) -> "DiscreteSchedule":
        """The schedule whose steps t = 1..T have log-SNR ``logsnr`` (strictly decreasing): alpha_bar =
        sigmoid(lambda), so log alpha_bar_t = -softplus(-lambda_t) in float64, and clean data at t = 0."""
        lam = torch.as_tensor(logsnr).to(F64).flatten()
        lab = torch.cat([torch.zeros(1, dtype=F64), -torch.nn.functional.softplus(-lam)])
        return cls(lab, torch.arange(lab.numel(), dtype=torch.int64))

    # -- basic tables -------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return self.log_alpha_bar.numel() - 1

    @cached_property
    def betas(self) -> Tensor:
        """beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}; entry 0 is 0."""
        lab = self.log_alpha_bar
        return torch.cat([torch.zeros(1, dtype=F64), -torch.expm1(lab[1:] - lab[:-1])])

    @cached_property
    def alphas(self) -> Tensor:
        """alpha_t = 1 - beta_t (per-step signal retention; Vidal, "Deep Generative Models", slides
        "Implementation (DDPM)")."""
        return 1.0 - self.betas

    @cached_property
    def alpha_bar(self) -> Tensor:
        """alpha_bar_t = prod_{s=1}^t alpha_s (Manwani, "Diffusion Models" (IIIT Hyderabad), writes
        alpha_t for this and 1 - beta_t for the per-step alpha_t)."""
        return torch.exp(self.log_alpha_bar)

    @cached_property
    def one_minus_alpha_bar(self) -> Tensor:
        """1 - alpha_bar_t, computed without cancellation (expm1)."""
        return -torch.expm1(self.log_alpha_bar)

    @cached_property
    def alpha(self) -> Tensor:
        """Signal scale sqrt(alpha_bar_t) of q(x_t | x_0)."""
        return self.alpha_bar.sqrt()

    @cached_property
    def sigma(self) -> Tensor:
        """Noise scale sqrt(1 - alpha_bar_t) of q(x_t | x_0)."""
        return self.one_minus_alpha_bar.sqrt()

    @cached_property
    def logsnr(self) -> Tensor:
        """log(alpha_bar_t / (1 - alpha_bar_t)); +inf at t = 0."""
        return logsnr_from_log_alpha_bar(self.log_alpha_bar)

    @cached_property
    def snr(self) -> Tensor:
        return self.alpha_bar / self.one_minus_alpha_bar

    # -- posterior q(x_{t-1} | x_t, x_0) (Vidal, "Deep Generative Models", slide "ELBO for Diffusion
    # Model: Score Matching Term"; that slide drops the square root on alpha_bar_{t-1}, docs/math.md)
    @cached_property
    def posterior_variance(self) -> Tensor:
        """beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); 0 at t = 1 (and t = 0)."""
        omab = self.one_minus_alpha_bar
        var = torch.zeros_like(self.betas)
        var[1:] = self.betas[1:] * omab[:-1] / omab[1:]
        return var

    @cached_property
    def posterior_log_variance_clipped(self) -> Tensor:
        """log beta_tilde_t with the t = 1 entry (log 0) replaced by the t = 2 one, as
        improved-diffusion does, or by beta_1 / 2 where that is larger; entry 0 is unused and set equal to
        entry 1.

        beta_tilde_2 = beta_1 beta_2 / (beta_1 + beta_2 - beta_1 beta_2) is at least beta_1 / 2 exactly
        when beta_2 >= beta_1 (every linear, cosine and sigmoid table, whose betas grow), so there the
        entry is beta_tilde_2 as before. A schedule whose first step is wider than its second (log-SNR
        linear: beta_2 / beta_1 = 0.017 at T = 1000) would otherwise give the decoder p(x_0 | x_1) a
        variance far below the noise of x_1 it has to undo; beta_1 / 2 keeps the relation of the
        equal-step case (beta_tilde_2 -> beta_1 / 2 as beta_2 -> beta_1)."""
        var = self.posterior_variance.clone()
        if self.T >= 2:
            var[1] = torch.maximum(var[2], self.betas[1] / 2)
        else:
            var[1] = self.betas[1]
        var[0] = var[1]
        return torch.log(var)

    @cached_property
    def posterior_mean_coef_x0(self) -> Tensor:
        """Coefficient of x_0 in mu_q: sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)."""
        ab, omab = self.alpha_bar, self.one_minus_alpha_bar
        coef = torch.zeros_like(self.betas)
        coef[1:] = ab[:-1].sqrt() * self.betas[1:] / omab[1:]
        return coef

    @cached_property
    def posterior_mean_coef_xt(self) -> Tensor:
        """Coefficient of x_t in mu_q: sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)."""
        omab = self.one_minus_alpha_bar
        coef = torch.zeros_like(self.betas)
        coef[1:] = self.alphas[1:].sqrt() * omab[:-1] / omab[1:]
        return coef

    def continuous(self) -> "InterpolatedSchedule":
        """The continuous-time view of this table (exact at t = k / T)."""
        return InterpolatedSchedule(self)


# --------------------------------------------------------------------------------------------
# Continuous-time schedules: t in [0, 1] -> log alpha_bar(t)
# --------------------------------------------------------------------------------------------
class ContinuousSchedule(Protocol):
    """A VP noise schedule in continuous time. Implementations give ``log_alpha_bar(t)``."""

    def log_alpha_bar(self, t: Tensor) -> Tensor: ...


class _ContinuousMixin:
    """Derived quantities shared by every continuous schedule (inputs cast to float64)."""

    def log_alpha_bar(self, t: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def logsnr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2)."""
        return logsnr_from_log_alpha_bar(self.log_alpha_bar(torch.as_tensor(t, dtype=F64)))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(torch.as_tensor(t, dtype=F64)))

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(self.log_alpha_bar(torch.as_tensor(t, dtype=F64)))).sqrt()

    def discretize(self, T: int, max_beta: float = 0.999) -> DiscreteSchedule:
        """The discrete table with alpha_bar_k = alpha_bar(k / T), beta recomputed from ratios."""
        _check_T(T)
        grid = torch.arange(T + 1, dtype=F64) / T
        alpha_bar = torch.exp(self.log_alpha_bar(grid))
        return DiscreteSchedule.from_betas(betas_from_alpha_bar(alpha_bar, max_beta))


@dataclass(frozen=True)
class CosineSchedule(_ContinuousMixin):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos(((t + s) / (1 + s)) pi / 2)^2 (Nichol & Dhariwal)."""

    s: float = 0.008

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64)
        f = lambda u: 2.0 * torch.log(torch.cos((u + self.s) / (1 + self.s) * math.pi / 2).clamp_min(1e-300))
        return f(t) - f(torch.zeros_like(t))


@dataclass(frozen=True)
class LinearVPSchedule(_ContinuousMixin):
    """The VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021):
    log alpha_bar(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2). With the defaults this is the
    continuum limit of DDPM's linear table at T = 1000 (T * 1e-4 = 0.1, T * 0.02 = 20)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)


@dataclass(frozen=True)
class SigmoidSchedule(_ContinuousMixin):
    """Chen (2023): alpha_bar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start)."""

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64)
        v_start = torch.sigmoid(torch.tensor(self.start / self.tau, dtype=F64))
        v_end = torch.sigmoid(torch.tensor(self.end / self.tau, dtype=F64))
        out = (v_end - torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)) / (v_end - v_start)
        return torch.log(out.clamp(min=1e-300, max=1.0))


class InterpolatedSchedule(_ContinuousMixin):
    """Continuous view of a discrete table: log alpha_bar linear between t = k / T.

    This is the VP SDE whose beta(t) is constant on each interval; it reproduces the discrete
    alpha_bar, logsnr, alpha and sigma exactly at the grid points, so a continuous-time wrapper of a
    discrete model (an SDE sampler or the PF-ODE likelihood of a DDPM) sees the same noise levels the
    discrete model was trained on at t = k / T.
    """

    def __init__(self, schedule: DiscreteSchedule):
        self.schedule = schedule
        self._table = schedule.log_alpha_bar  # (T+1,)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64)
        T = self.schedule.T
        pos = (t.clamp(0.0, 1.0) * T)
        lo = pos.floor().clamp(max=T - 1).long()
        frac = pos - lo.to(F64)
        return self._table[lo] * (1 - frac) + self._table[lo + 1] * frac


# --------------------------------------------------------------------------------------------
# Construction by name and respacing
# --------------------------------------------------------------------------------------------
def make_schedule(name: ScheduleName, T: int = 1000, **kwargs: float) -> DiscreteSchedule:
    """Build a discrete schedule by name: "linear", "cosine", "sigmoid" or "logsnr_linear"."""
    if name == "logsnr_linear":
        lab = logsnr_linear_log_alpha_bar(T, **kwargs)
        return DiscreteSchedule(lab, torch.arange(T + 1, dtype=torch.int64))
    makers = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
    if name not in makers:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted([*makers, 'logsnr_linear'])}")
    return DiscreteSchedule.from_betas(makers[name](T, **kwargs))


def respace(schedule: DiscreteSchedule, timesteps: Sequence[int] | Tensor) -> DiscreteSchedule:
    """Keep only the steps ``timesteps`` (values in 1..T) and recompute beta from alpha_bar.

    beta'_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}] with t_0 = 0 (improved-diffusion's
    ``respace.py``; the same bug, keeping the original betas on a respaced grid, was fixed in diffusers
    PR #3006). The result is indexed 0..S and remembers the original steps in
    ``timesteps``. Respacing with all of 1..T returns the original tables exactly.
    """
    steps = torch.as_tensor(timesteps, dtype=torch.int64).flatten().unique(sorted=True)
    if steps.numel() == 0 or steps[0] < 1 or steps[-1] > schedule.T:
        raise ValueError(f"respaced timesteps must lie in 1..{schedule.T}")
    full = torch.cat([torch.zeros(1, dtype=torch.int64), steps])
    return DiscreteSchedule(schedule.log_alpha_bar[full].clone(), schedule.timesteps[full].clone())
