"""Likelihood bookkeeping: nats internally, bits/dim only at the reporting boundary.

The discrete variational bound of Vidal, "Deep Generative Models" (Fall 2025), slides "Decomposition of
the ELBO for a MHVAE" (reconstruction, prior matching and score matching terms), in the notation
L_T + sum L_{t-1} + L_0 of Zhu, "Generative Model Zoo (part III)" (CMU 16-726), slide "Learning
Denoising Model: Variational upper bound":

    -log p(x_0) <= KL(q(x_T|x_0) || N(0, I))                                   L_T (prior matching)
                 + sum_{t=2}^T E_q KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))   L_{t-1}
                 - E_q log p_theta(x_0 | x_1)                                    L_0 (reconstruction)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.gaussian import (
    discretized_gaussian_log_likelihood,
    extract,
    gaussian_kl,
    posterior_mean_variance,
    q_sample,
)
from diffusekit.schedules import DiscreteSchedule

__all__ = ["prior_kl", "nats_to_bits_per_dim", "mean_flat", "sum_flat", "decoder_log_variance", "learned_log_variance",
           "bound_term", "reverse_x0", "vlb_term",
           "BoundResult", "vlb_exact", "vlb_estimate", "stratum_edges", "fit_reverse_log_variances"]


def sum_flat(x: Tensor) -> Tensor:
    """Sum over every dimension but the first (per-example totals)."""
    return x.reshape(x.shape[0], -1).sum(1)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (per-example averages)."""
    return x.reshape(x.shape[0], -1).mean(1)


def prior_kl(x0: Tensor, schedule: DiscreteSchedule) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in nats (summed over dimensions).

    No parameters enter: with DDPM's linear schedule (alpha_bar_T ~ 4e-5) it is ~1e-5 bits/dim.
    """
    x0 = x0.to(torch.float64)
    T = torch.full((x0.shape[0],), schedule.T, dtype=torch.long)
    mean = extract(schedule.alpha, T, x0) * x0
    logvar = torch.log(extract(schedule.one_minus_alpha_bar, T, x0)).expand_as(x0)
    return sum_flat(gaussian_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)))


def nats_to_bits_per_dim(nats: Tensor | float, dims: int) -> Tensor | float:
    """Convert a per-example negative log-likelihood in nats to bits per dimension."""
    return nats / (dims * math.log(2.0))


# --------------------------------------------------------------------------------------------
# The discrete variational bound, term by term
# --------------------------------------------------------------------------------------------
def decoder_log_variance(schedule: DiscreteSchedule, variance: str | Tensor = "beta_tilde") -> Tensor:
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) for t = 0..T: beta_tilde_t or beta_t (the sigma_t of
    "Algorithm 2 Sampling" in Vidal, "Deep Generative Models"; both choices are in Ho et al. 2020,
    sec. 3.2). At t = 1 (the decoder p(x_0 | x_1)) both use beta_tilde_2, because beta_tilde_1 = 0
    (improved-diffusion's choice). A tensor of T + 1 log-variances (e.g. from
    ``fit_reverse_log_variances``) is returned as it is."""
    if isinstance(variance, Tensor):
        if variance.shape != (schedule.T + 1,):
            raise ValueError(f"a reverse log-variance table must have shape ({schedule.T + 1},), got "
                             f"{tuple(variance.shape)}")
        return variance.to(torch.float64)
    table = schedule.posterior_log_variance_clipped.clone()
    if variance == "beta":
        table[2:] = torch.log(schedule.betas[2:])
    elif variance != "beta_tilde":
        raise ValueError(f"unknown reverse variance {variance!r}; choose beta or beta_tilde")
    return table


def learned_log_variance(v: Tensor, t: Tensor, schedule: DiscreteSchedule) -> Tensor:
    """log Sigma_theta = v log beta_t + (1 - v) log beta_tilde_t (Nichol & Dhariwal 2021, sec. 3.1, eq. 15),
    elementwise for a network's output v; the two ends are the tables of ``decoder_log_variance``, so
    v = 0 gives exactly the beta_tilde bound and v = 1 the beta bound (at t = 1 both ends are
    beta_tilde_2, and the decoder's variance is not learned). v is not constrained to [0, 1]."""
    low = extract(decoder_log_variance(schedule, "beta_tilde"), t, v)
    high = extract(decoder_log_variance(schedule, "beta"), t, v)
    return v * high + (1 - v) * low


def bound_term(x0: Tensor, mean_q: Tensor, logvar_q: Tensor, mean_p: Tensor, logvar_p: Tensor, t: Tensor,
               levels: int) -> Tensor:
    """One term of the bound per example in nats summed over dimensions, given q(x_{t-1} | x_t, x_0) =
    N(mean_q, e^logvar_q) and p_theta(x_{t-1} | x_t) = N(mean_p, e^logvar_p):
    t >= 2: L_{t-1} = KL(q || p_theta), the exact Gaussian KL;
    t = 1:  L_0 = -log p_theta(x_0 | x_1), a discretized Gaussian over ``levels`` values.
    Differentiable: the hybrid loss (``losses.hybrid_loss``) trains on exactly this term."""
    kl = gaussian_kl(mean_q, logvar_q, mean_p, logvar_p)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p, levels)
    return torch.where((t == 1).to(x0.device), sum_flat(decoder_nll), sum_flat(kl))


def reverse_log_variance(variance: str | Tensor, pred, t: Tensor, schedule: DiscreteSchedule, like: Tensor) -> Tensor:
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) shaped like ``like``: a fixed or fitted table
    (``decoder_log_variance``), or "learned", the network's own (``learned_log_variance`` of its v)."""
    if isinstance(variance, str) and variance == "learned":
        if pred.variance_v is None:
            raise ValueError("variance 'learned' needs a network trained with learned variances "
                             "(model.learned_variance = true)")
        return learned_log_variance(pred.variance_v, t, schedule)
    return extract(decoder_log_variance(schedule, variance), t, like).expand_as(like)


def reverse_x0(x0_hat: Tensor, t: Tensor, clip: bool) -> Tensor:
    """The prediction of x_0 that the reverse model's mean mu(x_t, x0_hat) takes: ``x0_hat`` itself, or with
    ``clip`` (``model.bound_clip``) x0_hat clamped to the data range [-1, 1] at t >= 2.

    Any function of x_t is a valid reverse mean, so the clipped model's bound is a bound. It is never
    looser term by term at equal variances: for t >= 2 the posterior mean is c_0 x_0 + c_t x_t with
    c_0 > 0 (Ho et al. 2020, eq. 7), so the KL's mean part is c_0^2 (x0_hat - x_0)^2 / (2 sigma^2) per
    dimension, and projecting onto [-1, 1] moves x0_hat towards every x_0 in [-1, 1]. At t = 1 the
    discretized decoder is left alone: there a mean beyond an edge puts more mass on the edge's
    open-ended bin, and clamping it would lower that probability."""
    if not clip:
        return x0_hat
    t = torch.as_tensor(t).to(x0_hat.device).reshape(-1, *([1] * (x0_hat.ndim - 1)))
    return torch.where(t >= 2, x0_hat.clamp(-1.0, 1.0), x0_hat)


@torch.no_grad()
def vlb_term(denoiser, x0: Tensor, t: Tensor, schedule: DiscreteSchedule, noise: Tensor, levels: int,
             variance: str | Tensor = "beta_tilde", cond: dict | None = None, clip: bool = False) -> Tensor:
    """One term of the bound per example (t may differ per example), in nats summed over dimensions:
    t >= 2: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) at x_t ~ q(x_t|x_0);
    t = 1:  L_0 = -log p_theta(x_0|x_1), a discretized Gaussian over ``levels`` values.
    ``variance``: beta_tilde, beta, a table of T + 1 log-variances, or learned (the network's v);
    ``clip``: the reverse mean takes x0_hat clipped to [-1, 1] (``reverse_x0``)."""
    return _vlb_terms(denoiser, x0, t, schedule, noise, levels, [variance], cond, clip)[0]


def _vlb_terms(denoiser, x0: Tensor, t: Tensor, schedule: DiscreteSchedule, noise: Tensor, levels: int,
               variances: list, cond: dict | None, clip: bool = False) -> list[Tensor]:
    """``vlb_term`` for several reverse-variance choices from one network call."""
    t = torch.as_tensor(t, dtype=torch.long).expand(x0.shape[0]).cpu()
    x_t = q_sample(x0, t, schedule, noise)
    pred = denoiser(x_t, schedule.logsnr[t].to(x0.device), cond)
    mean_p, _, _ = posterior_mean_variance(reverse_x0(pred.x0, t, clip), x_t, t, schedule)
    mean_q, var_q, _ = posterior_mean_variance(x0, x_t, t, schedule)
    logvar_q = torch.log(var_q.clamp_min(1e-300))
    return [bound_term(x0, mean_q, logvar_q, mean_p, reverse_log_variance(variance, pred, t, schedule, x0), t, levels)
            for variance in variances]


@torch.no_grad()
def fit_reverse_log_variances(denoiser, x0: Tensor, schedule: DiscreteSchedule, levels: int, *, seed: int = 0,
                              batch_size: int = 256, cond: dict | None = None, progress: bool = False,
                              clip: bool = False) -> Tensor:
    """Reverse variances sigma_t^2 that minimise the bound on ``x0`` (training data) for the model's
    fixed means, as log sigma_t^2 for t = 0..T (entry 0 unused); pass the result as ``variance`` to
    ``vlb_exact`` / ``vlb_estimate`` of held-out data.

    For t >= 2 the expected term E KL(N(mu_q, beta_tilde_t) || N(mu_theta, sigma^2)) per dimension is
    (1/2)[log sigma^2 - log beta_tilde_t + (beta_tilde_t + e_t) / sigma^2 - 1], with e_t the mean of
    (mu_q - mu_theta)^2 over examples and dimensions; it is minimal at sigma_t^2 = beta_tilde_t + e_t
    (the optimum that Analytic-DPM, Bao et al. 2022, estimates from the score's norm; here the mean
    error is measured directly, one draw of x_t per example and t; ``clip``: of the clipped model's mean,
    ``reverse_x0``). An imperfect model gets a wider
    reverse step than beta_tilde exactly where its mean is unsure, which is where the fixed-variance
    bound pays most (small t). For t = 1 the discretized-Gaussian decoder's scale has no closed form:
    the best of a log-spaced grid (refined once) is taken. Noise is seeded per (seed, t), as in
    ``vlb_exact``: the fit does not depend on batching.
    """
    n = x0.shape[0]
    table = schedule.posterior_log_variance_clipped.clone()
    excess = torch.zeros(schedule.T + 1, dtype=torch.float64)
    means_1: list[Tensor] = []
    for t in tqdm(range(1, schedule.T + 1), desc="fit variances", disable=not progress, unit="t"):
        noise = _term_noise(seed + 7919, t, tuple(x0.shape), x0.dtype)
        total = 0.0
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            c = {k: v[sl] for k, v in cond.items()} if cond else None
            tt = torch.full((x0[sl].shape[0],), t, dtype=torch.long)
            x_t = q_sample(x0[sl], tt, schedule, noise[sl].to(x0.device))
            pred = denoiser(x_t, schedule.logsnr[tt].to(x0.device), c)
            mean_p, _, _ = posterior_mean_variance(reverse_x0(pred.x0, tt, clip), x_t, tt, schedule)
            if t == 1:
                means_1.append(mean_p.double().cpu())
            else:
                mean_q, _, _ = posterior_mean_variance(x0[sl], x_t, tt, schedule)
                total += (mean_q - mean_p).double().pow(2).sum().item()
        excess[t] = total / x0.numel()
    table[2:] = torch.log(schedule.posterior_variance[2:] + excess[2:])
    mean_1, x = torch.cat(means_1), x0.double().cpu()

    def decoder_nll(log_var: float) -> float:
        return -discretized_gaussian_log_likelihood(x, mean_1, torch.full_like(x, 0.5 * log_var), levels).mean().item()

    grid = torch.linspace(math.log(1e-8), 0.0, 49, dtype=torch.float64)
    best = min(grid.tolist(), key=decoder_nll)
    step = float(grid[1] - grid[0])
    table[1] = min(torch.linspace(best - step, best + step, 21, dtype=torch.float64).tolist(), key=decoder_nll)
    return table


def _term_noise(seed: int, t: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Noise for term t of every example at once, from a generator seeded by (seed, t): the bound
    does not depend on how the examples are batched."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + t)
    return torch.randn(shape, generator=g, dtype=dtype)


@dataclass
class BoundResult:
    """Per-example bound in nats: ``prior`` (L_T), ``terms[:, t-1]`` (L_0 for t = 1, L_{t-1} else)."""

    prior: Tensor  # (N,)
    terms: Tensor  # (N, T) for the exact bound; (N,) diffusion+reconstruction estimate otherwise
    dims: int
    # standard error of the mean total: over examples for ``vlb_exact`` (std(total) / sqrt(N)); from the
    # draws of t and noise for ``vlb_estimate``
    stderr_nats: float = 0.0
    comparison: "BoundResult | None" = None  # the same draws under ``compare_variance`` (estimates only)

    @property
    def total(self) -> Tensor:
        return self.prior + (self.terms.sum(1) if self.terms.ndim == 2 else self.terms)

    @property
    def bits_per_dim(self) -> float:
        return float(nats_to_bits_per_dim(self.total.mean().item(), self.dims))

    @property
    def stderr_bits_per_dim(self) -> float:
        return float(nats_to_bits_per_dim(self.stderr_nats, self.dims))

    def term_bits_per_dim(self) -> Tensor:
        """Mean of each term over examples, bits/dim, index t-1 (exact bound only)."""
        return self.terms.mean(0) / (self.dims * math.log(2.0))


@torch.no_grad()
def vlb_exact(denoiser, x0: Tensor, schedule: DiscreteSchedule, levels: int, *, seed: int = 0,
              batch_size: int = 256, variance: str | Tensor = "beta_tilde", cond: dict | None = None,
              progress: bool = False, clip: bool = False) -> BoundResult:
    """Every term of the bound for every example (T network calls per example).

    No t is sampled, but each term L_{t-1} is still evaluated at one draw x_t ~ q(x_t | x_0) per
    example, so the per-example total is a one-sample Monte-Carlo estimate of that example's bound.
    ``stderr_nats`` is the standard error of the mean total over the N examples,
    std(total) / sqrt(N) (sample standard deviation; 0 for a single example, which has no spread):
    it covers both that noise and the spread of the bound across the data."""
    n, dims = x0.shape[0], x0[0].numel()
    terms = torch.zeros(n, schedule.T, dtype=torch.float64)
    for t in tqdm(range(1, schedule.T + 1), desc="bound", disable=not progress, unit="t"):
        noise = _term_noise(seed, t, tuple(x0.shape), x0.dtype)
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            c = {k: v[sl] for k, v in cond.items()} if cond else None
            terms[sl, t - 1] = vlb_term(denoiser, x0[sl], torch.tensor(t), schedule, noise[sl].to(x0.device),
                                        levels, variance, c, clip).double().cpu()
    result = BoundResult(prior_kl(x0.cpu(), schedule), terms, dims)
    if n > 1:
        result.stderr_nats = result.total.std().item() / math.sqrt(n)
    return result


def stratum_edges(T: int, n: int) -> Tensor:
    """n + 1 strictly increasing edges from 0 to T, geometrically spaced: stratum h is t in
    (edges[h], edges[h+1]]."""
    edges = [0]
    for k in range(1, n + 1):
        target = round(T ** (k / n))
        edges.append(min(max(edges[-1] + 1, target), T - (n - k)))
    return torch.tensor(edges, dtype=torch.long)


@torch.no_grad()
def vlb_estimate(denoiser, x0: Tensor, schedule: DiscreteSchedule, levels: int, *, n_strata: int = 16,
                 seed: int = 0, batch_size: int = 256, variance: str | Tensor = "beta_tilde", cond: dict | None = None,
                 progress: bool = False, compare_variance: str | Tensor | None = None, clip: bool = False) -> BoundResult:
    """Stratified estimate of sum_t L_{t-1} with two draws of t per stratum for every example.

    1..T is cut into ``n_strata`` strata h whose sizes grow geometrically (the terms of the bound change
    fastest at small t, so small t gets narrow strata, down to single steps); example i draws t_{ih1},
    t_{ih2} uniformly in each.
    The estimate sum_h |h| (L(t_{ih1}) + L(t_{ih2})) / 2 is unbiased, and its variance is estimated
    by sum_h |h|^2 (L(t_{ih1}) - L(t_{ih2}))^2 / 4, giving the standard error of the mean bound from
    the sampling of t (and of the noise) alone.

    ``compare_variance``: the same estimate (same t and noise, no extra network calls) under a
    second choice of reverse variances, returned as the result's ``comparison``."""
    n, dims, T = x0.shape[0], x0[0].numel(), schedule.T
    if not 1 <= n_strata <= T:
        raise ValueError(f"n_strata must lie in 1..{T}, got {n_strata}")
    edges = stratum_edges(T, n_strata)
    g = torch.Generator().manual_seed(seed)
    variances = [variance] if compare_variance is None else [variance, compare_variance]
    estimate = torch.zeros(len(variances), n, dtype=torch.float64)
    variance_sum = torch.zeros(len(variances), n, dtype=torch.float64)
    for h in tqdm(range(n_strata), desc="bound", disable=not progress, unit="stratum"):
        lo, hi = int(edges[h]) + 1, int(edges[h + 1])
        size = hi - lo + 1
        pair = []
        for draw in range(2):
            t = torch.randint(lo, hi + 1, (n,), generator=g)
            noise = torch.randn(tuple(x0.shape), generator=g, dtype=x0.dtype)
            vals = torch.zeros(len(variances), n, dtype=torch.float64)
            for i in range(0, n, batch_size):
                sl = slice(i, i + batch_size)
                c = {k: v[sl] for k, v in cond.items()} if cond else None
                terms = _vlb_terms(denoiser, x0[sl], t[sl], schedule, noise[sl].to(x0.device), levels, variances, c,
                                   clip)
                vals[:, sl] = torch.stack([v.double().cpu() for v in terms])
            pair.append(vals)
        estimate += size * (pair[0] + pair[1]) / 2
        variance_sum += size**2 * (pair[0] - pair[1]) ** 2 / 4
    prior = prior_kl(x0.cpu(), schedule)
    results = [BoundResult(prior, estimate[k], dims, math.sqrt(variance_sum[k].sum().item()) / n)
               for k in range(len(variances))]
    if compare_variance is not None:
        results[0].comparison = results[1]
    return results[0]
