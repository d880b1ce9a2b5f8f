"""Per-example diffusion losses and their weightings; the trainer reduces.

Every weighting is a weight w(lambda) on the eps mean-squared error (Kingma & Gao 2023 write all
diffusion objectives this way). The network is compared with its target in its own space (eps, x0,
v or score) and the error converted with the exact factor c_kind(lambda), so

    loss = w(lambda) * c_kind(lambda) * mean_dims (raw - target)^2,

where c_kind is the ratio ||eps - eps_hat||^2 / ||raw - target||^2:
  eps: 1,   x0: SNR,   v: alpha^2 = SNR / (1 + SNR),   score: sigma^2 = 1 / (1 + SNR).
Both factors are computed in log space from lambda = log SNR, so they stay finite at both ends of
every schedule: a schedule forced to zero terminal SNR makes eps-prediction undefined at T and SNR
weights divide by zero there (Lin et al. 2024, sec. 3.2), and the log form keeps every weight finite.

Weightings (in eps-MSE units; "x0-MSE" = eps-MSE / SNR):
  simple         L_simple of Ho et al. (Vidal, "Deep Generative Models" (Fall 2025), "Algorithm 1
                 Training"): w = 1
  snr            x0-MSE weighted by SNR (Hang et al. 2023, eq. 8) -- identical to simple, kept
                 under its own name because papers state it so
  x0             plain x0-MSE: w = 1 / SNR
  v              plain v-MSE: w = 1 + 1 / SNR
  min_snr        x0-MSE weighted by min(SNR, gamma): w = min(SNR, gamma) / SNR
  truncated_snr  x0-MSE weighted by max(SNR, 1) (Salimans & Ho 2022): w = max(SNR, 1) / SNR
  elbo           the true-ELBO weight of Vidal, slide "Progressive Denoising or Direct Reconstruction?",
                 and of Zhu, "Generative Model Zoo (part III)" (CMU 16-726), slides "Parameterizing the
                 Denoising Model" / "Training Objective Weighting" (the lambda_t of Ho et al., eq. 12):
                     w_t = T beta_t^2 / (2 sigma_p^2 alpha_t (1 - alpha_bar_t)),
                 sigma_p^2 the clipped beta_tilde (beta_tilde_t for t >= 2, beta_tilde_2 at t = 1).
                 What it estimates, exactly: E_{t ~ U{1..T}, eps} of the loss is, in nats per dimension,
                     (1/D) [ sum_{t=2}^T L_{t-1}  +  ||x_0 - x0_hat(x_1, 1)||^2 / (2 beta_tilde_2) ],
                 where L_{t-1} = E KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) with variance beta_tilde_t is
                 exactly the term of ``likelihood.vlb_term`` (the KL of equal-variance Gaussians is the
                 weighted mean error alone). The t = 1 term is not L_0: it is a Gaussian stand-in, the
                 negative log-density of x_0 under N(x0_hat, beta_tilde_2 I) without its constant
                 (D/2) log(2 pi beta_tilde_2), in place of the discretized decoder's -log p(x_0|x_1) (the
                 mean of q(x_0|x_1, x_0) is x_0 itself, so the same weight formula gives this). The prior
                 term L_T has no parameters and is left out. So the loss is the negative bound minus L_T,
                 with L_0 replaced by that stand-in; it is not a number to compare with the reported bound
                 (``likelihood.vlb_exact`` / ``vlb_estimate``), only a training objective whose
                 parameter-dependent part matches it for t >= 2.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.gaussian import posterior_mean_variance, q_sample
from diffusekit.likelihood import bound_term, learned_log_variance, mean_flat, reverse_x0
from diffusekit.parameterization import Denoiser, from_eps_x0, scales_from_logsnr
from diffusekit.schedules import DiscreteSchedule

__all__ = ["WEIGHTINGS", "log_kind_factor", "log_weight", "sample_timesteps", "diffusion_loss", "vlb_loss_term",
           "hybrid_loss"]

Weighting = Literal["simple", "snr", "x0", "v", "min_snr", "truncated_snr", "elbo"]
WEIGHTINGS: tuple[str, ...] = ("simple", "snr", "x0", "v", "min_snr", "truncated_snr", "elbo")


def log_kind_factor(kind: str, logsnr: Tensor) -> Tensor:
    """log c_kind(lambda): converts a squared error in the network's space to eps-MSE."""
    if kind == "eps":
        return torch.zeros_like(logsnr)
    if kind == "x0":
        return logsnr.clone()
    if kind == "v":
        return -F.softplus(-logsnr)
    if kind == "score":
        return -F.softplus(logsnr)
    raise ValueError(f"unknown prediction kind {kind!r}")


def log_weight(weighting: str, logsnr: Tensor, *, gamma: float = 5.0,
               schedule: DiscreteSchedule | None = None, t: Tensor | None = None) -> Tensor:
    """log w(lambda) of the eps-MSE for a named weighting (float64 in, float64 out)."""
    if weighting in ("simple", "snr"):
        return torch.zeros_like(logsnr)
    if weighting == "x0":
        return -logsnr
    if weighting == "v":
        return F.softplus(-logsnr)
    if weighting == "min_snr":
        return torch.clamp(logsnr, max=math.log(gamma)) - logsnr
    if weighting == "truncated_snr":
        return torch.clamp(logsnr, min=0.0) - logsnr
    if weighting == "elbo":
        if schedule is None or t is None:
            raise ValueError("the elbo weighting needs the discrete schedule and t")
        return _log_elbo_weight(schedule)[t.cpu()].to(logsnr.device)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")


def _log_elbo_weight(schedule: DiscreteSchedule) -> Tensor:
    """log [T beta_t^2 / (2 sigma_p^2 alpha_t (1 - alpha_bar_t))] for t = 0..T (entry 0 unused)."""
    b = schedule.betas.clone()
    b[0] = b[1]
    return (math.log(schedule.T) + 2 * torch.log(b) - math.log(2.0) - schedule.posterior_log_variance_clipped
            - torch.log1p(-b) - torch.log(schedule.one_minus_alpha_bar.clamp_min(1e-300)))


def sample_timesteps(batch: int, T: int, generator: torch.Generator,
                     method: Literal["uniform", "stratified"] = "uniform") -> Tensor:
    """t in 1..T per example: i.i.d. uniform, or stratified (one draw in each of ``batch`` equal
    strata of [0, 1), randomly permuted), which lowers the variance of the loss estimate."""
    if method == "uniform":
        return torch.randint(1, T + 1, (batch,), generator=generator)
    if method == "stratified":
        u = (torch.arange(batch, dtype=torch.float64) + torch.rand(batch, generator=generator, dtype=torch.float64)) / batch
        u = u[torch.randperm(batch, generator=generator)]
        return (u * T).floor().long().clamp(0, T - 1) + 1
    raise ValueError(f"unknown timestep sampling {method!r}; choose uniform or stratified")


def diffusion_loss(denoiser: Denoiser, x0: Tensor, t: Tensor, schedule: DiscreteSchedule, noise: Tensor,
                   weighting: str = "simple", *, cond: dict | None = None, gamma: float = 5.0) -> Tensor:
    """The weighted denoising loss per example, shape (B,) (Vidal, "Deep Generative Models", "Algorithm 1
    Training" for "simple")."""
    logsnr = schedule.logsnr[t.cpu()].to(x0.device)
    x_t = q_sample(x0, t.cpu(), schedule, noise)
    raw = denoiser.raw(x_t, logsnr, cond)
    return _weighted_error(denoiser.kind, raw, x0, t, schedule, noise, logsnr, weighting, gamma)


def _weighted_error(kind: str, raw: Tensor, x0: Tensor, t: Tensor, schedule: DiscreteSchedule, noise: Tensor,
                    logsnr: Tensor, weighting: str, gamma: float) -> Tensor:
    """w(lambda) c_kind(lambda) mean_dims (raw - target)^2 per example (the module docstring)."""
    alpha, sigma = scales_from_logsnr(logsnr, x0)
    target = from_eps_x0(kind, noise, x0, alpha, sigma)
    log_factor = log_weight(weighting, logsnr.double(), gamma=gamma, schedule=schedule, t=t) + \
        log_kind_factor(kind, logsnr.double())
    # the weight and the mean-squared error are reduced in fp32 at least: under fp16/bf16 autocast the
    # network may run in half precision, but the loss reduction stays in float32
    acc = torch.promote_types(x0.dtype, torch.float32)
    return torch.exp(log_factor).to(acc) * mean_flat((raw.to(acc) - target.to(acc)) ** 2)


def vlb_loss_term(pred, x0: Tensor, x_t: Tensor, t: Tensor, schedule: DiscreteSchedule, levels: int,
                  clip: bool = False) -> Tensor:
    """The bound's term at t per example, in nats summed over dimensions, with the network's learned
    variance and its mean held fixed (Nichol & Dhariwal 2021, sec. 3.1: "we apply a stop-gradient to the
    mu_theta(x_t, t) output for the L_vlb term"): the exact Gaussian KL L_{t-1} for t >= 2 and the
    discretized decoder's L_0 at t = 1, by the same ``likelihood.bound_term`` that the evaluated bound
    (``likelihood.vlb_exact`` with variance "learned") uses, so only v receives its gradient; ``clip``: the
    reverse mean of ``model.bound_clip`` (``likelihood.reverse_x0``)."""
    mean_p, _, _ = posterior_mean_variance(reverse_x0(pred.x0.detach(), t, clip), x_t, t, schedule)
    mean_q, var_q, _ = posterior_mean_variance(x0, x_t, t, schedule)
    logvar_p = learned_log_variance(pred.variance_v, t, schedule)
    return bound_term(x0, mean_q, torch.log(var_q.clamp_min(1e-300)), mean_p, logvar_p, t, levels)


def hybrid_loss(denoiser: Denoiser, x0: Tensor, t: Tensor, schedule: DiscreteSchedule, noise: Tensor, levels: int,
                weighting: str = "simple", *, vlb_weight: float = 0.001, cond: dict | None = None,
                gamma: float = 5.0, clip: bool = False) -> Tensor:
    """L_hybrid = L_simple + lambda L_vlb per example, shape (B,) (Nichol & Dhariwal 2021, sec. 3.1, eq. 16,
    lambda = 0.001), for a learned-variance denoiser (``Denoiser(..., learned_variance=True)``).

    The first part is ``diffusion_loss``'s weighted error of the prediction ("simple": L_simple). L_vlb =
    L_0 + ... + L_{T-1} is estimated at the example's t as T L_{t-1} (``vlb_loss_term``, stop-gradient on
    the mean) in bits per dimension, the unit of Nichol & Dhariwal's code, where with T = 1000 this is
    lambda T = 1 times the term; the parameter-free prior term L_T is left out."""
    logsnr = schedule.logsnr[t.cpu()].to(x0.device)
    x_t = q_sample(x0, t.cpu(), schedule, noise)
    pred = denoiser(x_t, logsnr, cond)
    if pred.variance_v is None:
        raise ValueError("hybrid_loss needs a learned-variance denoiser (model.learned_variance = true)")
    simple = _weighted_error(denoiser.kind, pred.raw, x0, t, schedule, noise, logsnr, weighting, gamma)
    vlb = vlb_loss_term(pred, x0, x_t, t.cpu(), schedule, levels, clip)
    dims = x0[0].numel()
    return simple + (vlb_weight * schedule.T / (dims * math.log(2.0))) * vlb.to(simple.dtype)
