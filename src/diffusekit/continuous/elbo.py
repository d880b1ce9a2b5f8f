"""The continuous-time ELBO of Variational Diffusion Models and the weighted objectives of Kingma & Gao.

For data x, latents z_t = alpha_t x + sigma_t eps with log-SNR lambda(t) falling from lambda_max
(t = 0) to lambda_min (t = 1) (VDM time, ``continuous.logsnr``: t = 0 is the least noisy latent z_0, not
the data), the negative ELBO is (Kingma et al. 2021, "Variational Diffusion Models", sec. 4-5: the VLB
and its T -> infinity limit; Gao, "VAEs and Diffusion Models" (Stanford CS231n), slide "What is the
ELBO for continuous-time diffusion models?"):

    -log p(x) <= KL(q(z_1|x) || N(0, I))                               prior        (``prior_kl_at``)
               + E_{q(z_0|x)} [-log p(x|z_0)]                          reconstruction (``reconstruction_nll``)
               + 1/2 E_{t~U(0,1), eps} [-lambda'(t) ||eps - eps_hat(z_t; lambda(t))||^2]   diffusion L_inf

all in nats per example (summed over dimensions). The diffusion term is the T -> infinity limit of
the discrete terms sum_t L_{t-1} (derived in docs/continuous.md). Substituting lambda for t, it equals
1/2 int_{lambda_min}^{lambda_max} E ||eps - eps_hat(z_lambda; lambda)||^2 d lambda: with a network fed
lambda (the project's convention), it depends on the schedule only through its end points
(VDM's invariance result), which is what lets the schedule's interior be trained for low variance instead.

The decoder p(x|z_0) is Gaussian around z_0 / alpha_0 = x + e^{-lambda_max/2} eps with standard deviation
e^{-lambda_max/2}, integrated over each data value's bin for data on ``levels`` values (the project's
``discretized_gaussian_log_likelihood``, the same bin bookkeeping as the discrete bound's L_0), and a
plain density for continuous data (``levels = None``; the bound is then on -log density). We use
it rather than VDM's categorical decoder because it needs no extra machinery and, for the end
points used here (e^{-lambda_max/2} well below the bin half-width 1 / (levels - 1)), the reconstruction
term is a vanishing fraction of the bound either way.

Weighted objectives (Kingma & Gao 2023; Gao, slide "Weighted diffusion objectives"):

    L_w = 1/2 E_{t~U(0,1)} [w(lambda_t) (-lambda'(t)) ||eps - eps_hat||^2]
        = 1/2 E_{lambda~p} [w(lambda) / p(lambda) ||eps - eps_hat||^2]          (importance form)

where sampling t uniformly through a schedule is the importance density p(lambda) = 1 / |lambda'(t)|.
The weightings named after discrete losses (x0, v, min_snr, truncated_snr) are those losses trained
with t ~ U(0, 1) under the cosine schedule, written as w(lambda) (``log_kg_weight``; docs/continuous.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.gaussian import discretized_gaussian_log_likelihood, gaussian_kl, normal_log_prob
from diffusekit.likelihood import nats_to_bits_per_dim, sum_flat
from diffusekit.losses import log_kind_factor, log_weight
from diffusekit.parameterization import append_dims, from_eps_x0, to_eps_x0
from diffusekit.schedules import alpha_sigma_from_logsnr

__all__ = ["KG_WEIGHTINGS", "MONOTONE_WEIGHTINGS", "sample_times", "diffuse", "prior_kl_at", "reconstruction_nll",
           "eps_sq_error", "log_kg_weight", "importance_weighted_loss", "diffusion_term", "ContinuousBound",
           "continuous_bound"]

F64 = torch.float64
TimeSampling = Literal["uniform", "antithetic"]
# w(lambda) of L_w (``log_kg_weight``); "elbo" is w = 1. x0, v, min_snr and truncated_snr are the losses
# of those names trained with t ~ U(0, 1) under the cosine schedule, written as w(lambda). "edm" and
# "min_snr" are not monotone in lambda (see ``log_kg_weight``), so they are not ELBOs (Kingma & Gao 2023).
KG_WEIGHTINGS = ("elbo", "sigmoid", "edm", "x0", "v", "min_snr", "truncated_snr")
MONOTONE_WEIGHTINGS = ("elbo", "sigmoid", "x0", "v", "truncated_snr")
EDM_SIGMA_DATA = 0.5


def sample_times(batch: int, generator: torch.Generator, method: TimeSampling = "antithetic") -> Tensor:
    """t in [0, 1) per example, float64: i.i.d. uniform, or VDM's low-discrepancy sampler
    t_i = (u_0 + i / B) mod 1 with one uniform u_0 per batch (every t_i is still uniform, so the loss
    stays unbiased, while the batch covers [0, 1) evenly; Kingma et al. 2021, low-discrepancy sampler)."""
    if method == "uniform":
        return torch.rand(batch, generator=generator, dtype=F64)
    if method == "antithetic":
        u0 = torch.rand(1, generator=generator, dtype=F64)
        return torch.remainder(u0 + torch.arange(batch, dtype=F64) / batch, 1.0)
    raise ValueError(f"unknown time sampling {method!r}; choose uniform or antithetic")


def _scales(logsnr: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) from per-example logsnr (float64 math), cast to ``like`` and broadcastable."""
    alpha, sigma = alpha_sigma_from_logsnr(logsnr.to(F64))
    return append_dims(alpha.to(like), like.ndim), append_dims(sigma.to(like), like.ndim)


def diffuse(x0: Tensor, logsnr: Tensor, noise: Tensor) -> Tensor:
    """z_lambda = alpha x + sigma eps, alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    alpha, sigma = _scales(logsnr, x0)
    return alpha * x0 + sigma * noise


# -- the three terms of the bound (nats per example) ------------------------------------------------
def prior_kl_at(x0: Tensor, logsnr_min: float) -> Tensor:
    """KL(q(z_1|x) || N(0, I)) = sum 1/2 (alpha_1^2 x^2 + sigma_1^2 - 1 - log sigma_1^2), float64 (N,)."""
    x = x0.to(F64)
    lam = torch.tensor(float(logsnr_min), dtype=F64)
    alpha = torch.sigmoid(lam).sqrt()
    log_var = -F.softplus(lam)  # log sigmoid(-lambda)
    return sum_flat(gaussian_kl(alpha * x, log_var.expand_as(x), torch.zeros_like(x), torch.zeros_like(x)))


def reconstruction_nll(x0: Tensor, logsnr_max: float, noise: Tensor, levels: int | None) -> Tensor:
    """-log p(x | z_0) at z_0 = alpha_0 x + sigma_0 eps, float64 (N,): the decoder is Gaussian with mean
    z_0 / alpha_0 and log-scale -lambda_max / 2, binned over ``levels`` values (a density if None)."""
    x = x0.to(F64)
    log_scale = torch.full_like(x, -0.5 * float(logsnr_max))
    mean = x + torch.exp(log_scale) * noise.to(F64)
    if levels is None:
        return -sum_flat(normal_log_prob(x, mean, 2 * log_scale))
    return -sum_flat(discretized_gaussian_log_likelihood(x, mean, log_scale, levels))


def eps_sq_error(denoiser, x0: Tensor, logsnr: Tensor, noise: Tensor, cond: dict | None = None) -> Tensor:
    """||eps - eps_hat(z_lambda; lambda)||^2 summed over dimensions, per example (N,).

    A ``Denoiser`` is compared in its own space (eps, x0, v or score) and the error converted with the
    exact factor c_kind(lambda) of ``losses.log_kind_factor``, as the discrete losses do; any other
    callable under the denoiser convention (the oracle) is compared through its eps."""
    logsnr = logsnr.to(F64).expand(x0.shape[0])
    z = diffuse(x0, logsnr, noise)
    acc = torch.promote_types(x0.dtype, torch.float32)
    if hasattr(denoiser, "raw") and hasattr(denoiser, "kind"):
        raw = denoiser.raw(z, logsnr.to(x0.device), cond)
        alpha, sigma = _scales(logsnr, x0)
        target = from_eps_x0(denoiser.kind, noise, x0, alpha, sigma)
        factor = torch.exp(log_kind_factor(denoiser.kind, logsnr)).to(device=x0.device, dtype=acc)
        err = append_dims(factor, x0.ndim) * (raw.to(acc) - target.to(acc)) ** 2
        if getattr(denoiser, "clip_x0", False):
            # ||eps - eps_hat||^2 = e^lambda ||x0 - x0_hat||^2: where the clamp moves x0_hat, the clamped one's error
            x0_hat = to_eps_x0(denoiser.kind, raw, z, alpha, sigma)[1].to(acc)
            snr = append_dims(torch.exp(logsnr.to(F64)).to(device=x0.device, dtype=acc), x0.ndim)
            err = torch.where(x0_hat.abs() > 1, snr * (x0.to(acc) - x0_hat.clamp(-1.0, 1.0)) ** 2, err)
        return sum_flat(err)
    eps_hat = denoiser(z, logsnr.to(x0.device), cond).eps
    return sum_flat((noise.to(acc) - eps_hat.to(acc)) ** 2)


# -- weightings w(lambda) and the weighted losses ----------------------------------------------------
def log_kg_weight(weighting: str, logsnr: Tensor, *, sigmoid_bias: float = 2.0, gamma: float = 5.0) -> Tensor:
    """log w(lambda) of L_w in the convention of Kingma & Gao (2023, Table 1) (float64):

    elbo:    w = 1 (L_w is the diffusion term of the bound);
    sigmoid: w = sigmoid(b - lambda);
    edm:     w = N(lambda; 2.4, 2.4^2) (e^-lambda + s^2) / s^2, s = 0.5 (EDM's log-normal noise density
             times its loss weight, K&G Table 1; not monotone, so not an ELBO);
    x0, v, min_snr, truncated_snr: the weighting that makes L_w the named loss trained with t ~ U(0, 1)
             under the cosine schedule. A loss whose eps-MSE weight is a(lambda) (``losses.log_weight``:
             x0 e^-lambda, v 1 + e^-lambda, min_snr min(1, gamma e^-lambda), truncated_snr max(1, e^-lambda))
             is E_t[a(lambda_t) ||eps - eps_hat||^2]; L_w = 1/2 E_t[w (-lambda') ||eps - eps_hat||^2] equals it
             up to a constant iff w(lambda) is proportional to a(lambda) / (-dlambda/dt of the cosine schedule).
             The cosine schedule alpha = cos(pi t / 2), sigma = sin(pi t / 2) has lambda = -2 log tan(pi t / 2)
             and -dlambda/dt = 2 pi cosh(lambda / 2); we drop the 1 / pi and take

                 w(lambda) = a(lambda) / (2 cosh(lambda / 2)) = a(lambda) e^{-lambda/2} / (1 + e^{-lambda}),

             so v gives K&G's w = e^{-lambda/2} exactly and x0 gives e^{-lambda/2} sigmoid(-lambda). Then
             L_w = (pi / 2) x (the named loss) under the cosine schedule, and (u1 - u0) x (the named loss)
             under ``CosineLogSNR`` truncated to [lambda_min, lambda_max] (its -lambda' is
             4 (u1 - u0) cosh(lambda / 2), u1 - u0 = atan(e^{-lambda_min/2}) - atan(e^{-lambda_max/2})),
             pointwise in t; under any other schedule L_w is the same integral over lambda, which a
             t-uniform named loss under that schedule is not.

    All but edm and min_snr are non-increasing in lambda (monotone in the K&G sense); min_snr is
    a(lambda) = 1 for lambda < log gamma, so there w = 1 / (2 cosh(lambda / 2)), which rises with lambda
    for lambda < 0 (as K&G's eps-MSE cosine weighting sech(lambda / 2) does). Derivation: docs/continuous.md."""
    lam = logsnr.to(F64)
    if weighting == "elbo":
        return torch.zeros_like(lam)
    if weighting == "sigmoid":
        return -F.softplus(lam - sigmoid_bias)
    if weighting == "edm":
        mean, std, s2 = 2.4, 2.4, EDM_SIGMA_DATA**2
        log_density = -0.5 * ((lam - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))
        return log_density + torch.logaddexp(-lam, torch.tensor(math.log(s2), dtype=F64)) - math.log(s2)
    if weighting in ("x0", "v", "min_snr", "truncated_snr"):
        return log_weight(weighting, lam, gamma=gamma) + _log_inverse_cosine_rate(lam)
    raise ValueError(f"unknown continuous weighting {weighting!r}; choose one of {KG_WEIGHTINGS}")


def _log_inverse_cosine_rate(logsnr: Tensor) -> Tensor:
    """log [1 / (2 cosh(lambda / 2))] = -lambda/2 - softplus(-lambda) (float64): pi / (-dlambda/dt) of the
    cosine schedule, i.e. pi times the density of lambda when t ~ U(0, 1) (see ``log_kg_weight``)."""
    lam = logsnr.to(F64)
    return -0.5 * lam - F.softplus(-lam)


def importance_weighted_loss(denoiser, x0: Tensor, logsnr: Tensor, log_density: Tensor, noise: Tensor,
                             weighting: str = "elbo", cond: dict | None = None, **weight_kw: float) -> Tensor:
    """1/2 w(lambda) / p(lambda) ||eps - eps_hat||^2 per example (nats), for lambda drawn from a density p
    with log p(lambda) = ``log_density``: an unbiased estimate of L_w = 1/2 int w(lambda) E||.||^2 dlambda."""
    log_factor = log_kg_weight(weighting, logsnr, **weight_kw) - log_density.to(F64)
    err = eps_sq_error(denoiser, x0, logsnr, noise, cond)
    return 0.5 * torch.exp(log_factor).to(err) * err


def diffusion_term(denoiser, x0: Tensor, logsnr: Tensor, dlogsnr_dt: Tensor, noise: Tensor,
                   weighting: str = "elbo", cond: dict | None = None, **weight_kw: float) -> Tensor:
    """The diffusion term 1/2 w(lambda) (-lambda'(t)) ||eps - eps_hat(z_t; lambda(t))||^2 per example (nats),
    an unbiased estimate of L_inf (w = 1, VDM's continuous-time loss) or of L_w for t ~ U(0, 1).
    It is the importance form with p(lambda) = 1 / |lambda'(t)|."""
    return importance_weighted_loss(denoiser, x0, logsnr, -torch.log(-dlogsnr_dt.to(F64)), noise, weighting, cond,
                                    **weight_kw)


# -- the bound on held-out data ---------------------------------------------------------------------
@dataclass
class ContinuousBound:
    """Per-example terms of the continuous bound in nats, float64 (N,)."""

    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor
    dims: int
    levels: int | None
    stderr_nats: float = 0.0  # standard error of the mean total, from the draws of t and eps

    @property
    def total(self) -> Tensor:
        return self.prior + self.reconstruction + self.diffusion

    def bits(self, term: Tensor) -> float:
        return float(nats_to_bits_per_dim(term.mean().item(), self.dims))

    @property
    def bits_per_dim(self) -> float:
        return self.bits(self.total)

    @property
    def stderr_bits_per_dim(self) -> float:
        return float(nats_to_bits_per_dim(self.stderr_nats, self.dims))

    def summary(self) -> dict[str, Any]:
        return {"bits_per_dim": self.bits_per_dim, "stderr_bits_per_dim": self.stderr_bits_per_dim,
                "prior_bits_per_dim": self.bits(self.prior),
                "reconstruction_bits_per_dim": self.bits(self.reconstruction),
                "diffusion_bits_per_dim": self.bits(self.diffusion), "levels": self.levels,
                "n_examples": int(self.total.numel())}


@torch.no_grad()
def continuous_bound(denoiser, schedule, x0: Tensor, levels: int | None, *, n_draws: int = 16, seed: int = 0,
                     batch_size: int = 256, cond: dict | None = None, progress: bool = False) -> ContinuousBound:
    """Estimate the continuous negative ELBO of every example of ``x0`` (VDM's VLB with the continuous-time diffusion loss).

    Example i takes ``n_draws`` times t_ij = (u_i + j / n_draws) mod 1 (stratified over [0, 1)) with fresh
    noise for each; the prior is exact, and the reconstruction term is averaged over the same noise. The
    noise of draw j comes from a generator seeded by (seed, j), so the result does not depend on batching.
    The standard error is that of the mean total from the draws alone (per-example sample variance over
    draws, which overstates the stratified estimator's)."""
    if n_draws < 2:
        raise ValueError(f"n_draws must be >= 2 (the standard error needs two), got {n_draws}")
    n, dims = x0.shape[0], x0[0].numel()
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    diff = torch.zeros(n, n_draws, dtype=F64)
    recon = torch.zeros(n, dtype=F64)
    for j in tqdm(range(n_draws), desc="continuous bound", disable=not progress, unit="draw"):
        g = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
        noise = torch.randn(tuple(x0.shape), generator=g, dtype=x0.dtype)
        t = torch.remainder(u + j / n_draws, 1.0)
        lam, dlam = schedule(t.to(_schedule_device(schedule)))
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            c = {k: v[sl] for k, v in cond.items()} if cond else None
            x, e = x0[sl], noise[sl].to(x0.device)
            diff[sl, j] = diffusion_term(denoiser, x, lam[sl].to(x.device), dlam[sl].to(x.device), e,
                                         cond=c).double().cpu()
        recon += reconstruction_nll(x0.cpu(), schedule.logsnr_max, noise, levels) / n_draws
    stderr = math.sqrt((diff.var(1) / n_draws).sum().item()) / n
    return ContinuousBound(prior_kl_at(x0.cpu(), schedule.logsnr_min), recon, diff.mean(1), dims, levels, stderr)


def _schedule_device(schedule) -> torch.device:
    p = next(schedule.parameters(), None) if hasattr(schedule, "parameters") else None
    return p.device if p is not None else torch.device("cpu")
