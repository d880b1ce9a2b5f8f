"""The continuous-time objective as one module holding the network and its log-SNR schedule.

``ContinuousDiffusion`` is what a continuous run trains (``families.continuous``): its ``forward`` returns the per-example
loss, so the whole loss is computed inside ``module(...)`` and DistributedDataParallel can wrap it,
and a learned schedule's parameters are checkpointed, EMA-averaged and resumed with the network's.

A learned schedule gets a different gradient from the network (Kingma et al. 2021, learning the
noise schedule by minimising the variance): the ELBO does not depend on the schedule between its fixed end points, so its gradient
there is pure noise; instead the schedule minimises the variance of the loss estimator,
d/d eta E[L^2] = E[2 L dL/d eta] (E[L] does not depend on eta). One backward pass gives both: hooks on
lambda(t) and lambda'(t), the only paths from eta to the loss, multiply their gradient by 2 L (per
example, detached), so eta receives the gradient of mean(L^2) while the network receives that of mean(L).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.continuous.elbo import diffusion_term, prior_kl_at, reconstruction_nll
from diffusekit.continuous.logsnr import CosineLogSNR, LinearLogSNR, LogSNRSchedule, MonotoneLogSNR
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.nn.build import build_network
from diffusekit.parameterization import Denoiser

__all__ = ["ContinuousDiffusion", "build_logsnr_schedule", "build_continuous_module", "load_continuous"]


class ContinuousDiffusion(nn.Module):
    """The network (behind the denoiser convention) and its log-SNR schedule, with the loss as forward.

    ``forward(x0, t, noise, cond)`` returns per-example losses in bits/dim: the whole negative ELBO
    (prior + reconstruction + diffusion) for ``weighting = "elbo"``, else the weighted diffusion loss L_w
    alone (not a bound) in the same units. ``levels`` is the data's number of values (None: continuous).
    """

    def __init__(self, net: nn.Module, schedule: LogSNRSchedule, kind: str = "eps", levels: int | None = None,
                 weighting: str = "elbo", sigmoid_bias: float = 2.0, gamma: float = 5.0, clip_x0: bool = False):
        super().__init__()
        self.net, self.schedule = net, schedule
        self.kind, self.levels, self.weighting, self.clip_x0 = kind, levels, weighting, clip_x0
        self.weight_kw = {"sigmoid_bias": sigmoid_bias, "gamma": gamma}

    @property
    def denoiser(self) -> Denoiser:
        """The network under the denoiser convention (shares the weights); with ``clip_x0`` (``model.bound_clip``)
        its x0 is clamped to [-1, 1], in the loss and the bound as in sampling."""
        return Denoiser(self.net, self.kind, clip_x0=self.clip_x0)

    def forward(self, x0: Tensor, t: Tensor, noise: Tensor, cond: dict | None = None) -> Tensor:
        lam, dlam = self.schedule(t)
        dims = x0[0].numel()
        to_bits = 1.0 / (dims * math.log(2.0))
        diff = diffusion_term(self.denoiser, x0, lam, dlam, noise, self.weighting, cond, **self.weight_kw) * to_bits
        if lam.requires_grad:  # a learned schedule: its parameters get d mean(L^2), not d mean(L)
            scale = 2.0 * diff.detach().to(torch.float64)
            lam.register_hook(lambda g: g * scale.to(g))
            dlam.register_hook(lambda g: g * scale.to(g))
        if self.weighting != "elbo":
            return diff
        with torch.no_grad():  # no parameter enters these two terms (fixed end points, fixed decoder)
            const = prior_kl_at(x0, self.schedule.logsnr_min) + reconstruction_nll(x0, self.schedule.logsnr_max,
                                                                                noise, self.levels)
        return diff + (const * to_bits).to(diff)


def build_logsnr_schedule(diffusion_cfg) -> LogSNRSchedule:
    """``[diffusion]`` -> the log-SNR schedule of a continuous run (learned, or cosine / linear in log-SNR)."""
    lo, hi = diffusion_cfg.logsnr_min, diffusion_cfg.logsnr_max
    if diffusion_cfg.learned_schedule:
        return MonotoneLogSNR(lo, hi)
    if diffusion_cfg.schedule == "cosine":
        return CosineLogSNR(lo, hi)
    if diffusion_cfg.schedule in ("linear", "logsnr_linear"):  # under the continuous objective both are linear in lambda
        return LinearLogSNR(lo, hi)
    raise ConfigError(f"diffusion.schedule = {diffusion_cfg.schedule!r} has no log-SNR form for loss.objective = "
                      "'continuous'; use cosine, linear (in log-SNR) or diffusion.learned_schedule = true")


def build_continuous_module(cfg, data_shape: tuple[int, ...], levels: int | None) -> ContinuousDiffusion:
    """The network of ``[model]`` and the log-SNR schedule of ``[diffusion]`` with the loss of ``[loss]``."""
    lc = cfg.loss
    return ContinuousDiffusion(build_network(cfg.model, tuple(data_shape)), build_logsnr_schedule(cfg.diffusion),
                               cfg.model.prediction, levels, lc.weighting, lc.sigmoid_bias, lc.min_snr_gamma,
                               cfg.model.bound_clip)


def load_continuous(cfg, data_shape: tuple[int, ...], levels: int | None, state: dict[str, Tensor],
                    source: Any) -> ContinuousDiffusion:
    """Rebuild a continuous run's module from a checkpoint state dict (``source`` names the file)."""
    module = build_continuous_module(cfg, data_shape, levels)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{source}.safetensors: weights do not fit the configured network ({first})") from None
    return module.eval()
