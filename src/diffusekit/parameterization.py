"""eps <-> x0 <-> v <-> score conversions, and the one denoiser calling convention.

All conversions are for x_t = alpha x0 + sigma eps (Vidal, "Deep Generative Models" (Fall 2025), slides
"The Forward Process of Diffusion Model"; Gao, "VAEs and Diffusion Models" (Stanford CS231n), slides
"Three Equivalent Interpretations"). ``alpha`` and ``sigma`` broadcast against x.

- x0 from eps:     x0 = (x_t - sigma eps) / alpha
- eps from x0:     eps = (x_t - alpha x0) / sigma
- score from eps:  grad log q_t(x_t) = -eps / sigma           (Tweedie; Gao, "VAEs and Diffusion Models",
                   slide "Denoising Score Matching: Epsilon-prediction parametrization")
- v (Salimans & Ho 2022):  v = alpha eps - sigma x0, so for any alpha, sigma
      x0  = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
      eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)

The denoiser convention: a ``Denoiser`` wraps a raw network (which maps (x, c_noise) to a tensor
shaped like x, knowing nothing about noise) and returns a ``Prediction`` carrying eps and x0, so
samplers and losses never care which quantity the network predicts (EDM's preconditioning idea).
The network's noise input is c_noise = logsnr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
from torch import Tensor, nn

from diffusekit.schedules import alpha_sigma_from_logsnr

__all__ = [
    "PredictionKind",
    "Prediction",
    "DenoiserFn",
    "Callback",
    "Denoiser",
    "append_dims",
    "eps_to_x0",
    "x0_to_eps",
    "eps_to_score",
    "score_to_eps",
    "v_from_x0_eps",
    "v_to_x0",
    "v_to_eps",
    "to_eps_x0",
    "from_eps_x0",
    "scales_from_logsnr",
]

PredictionKind = Literal["eps", "x0", "v", "score"]
KINDS: tuple[str, ...] = ("eps", "x0", "v", "score")


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-example (B,) tensor broadcasts against x."""
    if t.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor with {t.ndim} dims against {ndim} dims")
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def eps_to_x0(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def eps_to_score(eps: Tensor, sigma: Tensor) -> Tensor:
    """score = -eps / sigma (the score of q_t at the optimum; Tweedie's formula)."""
    return -eps / sigma


def score_to_eps(score: Tensor, sigma: Tensor) -> Tensor:
    """eps = -sigma score."""
    return -sigma * score


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x0."""
    return alpha * eps - sigma * x0


def v_to_x0(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)."""
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def v_to_eps(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)."""
    return (sigma * x_t + alpha * v) / (alpha**2 + sigma**2)


def to_eps_x0(kind: str, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Turn a prediction of ``kind`` into (eps, x0)."""
    if kind == "eps":
        return out, eps_to_x0(x_t, out, alpha, sigma)
    if kind == "x0":
        return x0_to_eps(x_t, out, alpha, sigma), out
    if kind == "v":
        return v_to_eps(x_t, out, alpha, sigma), v_to_x0(x_t, out, alpha, sigma)
    if kind == "score":
        eps = score_to_eps(out, sigma)
        return eps, eps_to_x0(x_t, eps, alpha, sigma)
    raise ValueError(f"unknown prediction kind {kind!r}; choose one of {KINDS}")


def from_eps_x0(kind: str, eps: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The target of ``kind`` given the true (eps, x0): what a network of that kind should output."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if kind == "score":
        return eps_to_score(eps, sigma)
    raise ValueError(f"unknown prediction kind {kind!r}; choose one of {KINDS}")


def _sigmoid(z: float) -> float:
    """1 / (1 + e^-z) without overflow."""
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def scales_from_logsnr(logsnr: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) computed in float64 from logsnr, cast to ``like``'s dtype and broadcastable."""
    alpha, sigma = alpha_sigma_from_logsnr(logsnr.to(torch.float64))
    return (append_dims(alpha.to(like.dtype), like.ndim).to(like.device),
            append_dims(sigma.to(like.dtype), like.ndim).to(like.device))


@dataclass
class Prediction:
    """A denoiser's output at (x_t, logsnr): the noise and clean-data estimates, and the raw output."""

    eps: Tensor
    x0: Tensor
    raw: Tensor
    kind: str
    variance_v: Tensor | None = None  # a learned-variance network's v (``likelihood.learned_log_variance``)


class DenoiserFn(Protocol):
    """The one calling convention every sampler and likelihood uses."""

    def __call__(self, x_t: Tensor, logsnr: Tensor, cond: Any = None) -> Prediction: ...


# What every sampler calls once per network evaluation with a dict of its state: "i" (step index),
# "t" (time), "x" (the current state) and "x0" (the model's prediction of clean data), and more per sampler.
Callback = Callable[[dict[str, Any]], None]


class Denoiser(nn.Module):
    """Wrap a raw network that predicts ``kind`` so it answers with a ``Prediction``.

    ``cond`` is passed to the network as keyword arguments: a dict such as
    {"class_labels": y} or {"context": tokens}; None passes nothing.

    ``learned_variance``: the network outputs twice x's channels (dim 1), the prediction of ``kind``
    and then v, the interpolation weight of the reverse variance (Nichol & Dhariwal 2021, sec. 3.1);
    ``raw`` returns the prediction alone and ``forward`` carries v as ``Prediction.variance_v``.

    ``clip_x0`` (a continuous run's ``model.bound_clip``): the model predicts x0 clamped to the data range
    [-1, 1], and the eps that goes with it; ``raw`` stays the network's unclamped output.
    """

    def __init__(self, net: nn.Module, kind: PredictionKind = "eps", learned_variance: bool = False,
                 clip_x0: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown prediction kind {kind!r}; choose one of {KINDS}")
        self.net = net
        self.kind = kind
        self.learned_variance = learned_variance
        self.clip_x0 = clip_x0  # the model's x0 is the prediction clamped to [-1, 1], eps made to agree with it

    def raw_and_variance(self, x_t: Tensor, logsnr: Tensor, cond: dict | None = None) -> tuple[Tensor, Tensor | None]:
        """The network's own output in x_t's dtype (a network run under bf16/fp16 autocast,
        ``diffusekit.speed``, hands the losses and samplers fp32), split into (prediction, v) for a
        learned-variance network, (output, None) otherwise."""
        c_noise = logsnr.to(x_t.dtype).expand(x_t.shape[0]).to(x_t.device)
        out = self.net(x_t, c_noise, **(cond or {})).to(x_t.dtype)
        if not self.learned_variance:
            return out, None
        if out.ndim < 2 or out.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(f"a learned-variance network must output {2 * x_t.shape[1]} channels (dim 1: the "
                             f"prediction, then v) for x_t of shape {tuple(x_t.shape)}, got {tuple(out.shape)}")
        pred, v = out.chunk(2, dim=1)
        return pred, v

    def raw(self, x_t: Tensor, logsnr: Tensor, cond: dict | None = None) -> Tensor:
        """The network's prediction of ``kind`` (used by losses, which compare in the native space)."""
        return self.raw_and_variance(x_t, logsnr, cond)[0]

    def forward(self, x_t: Tensor, logsnr: Tensor, cond: dict | None = None) -> Prediction:
        out, v = self.raw_and_variance(x_t, logsnr, cond)
        if logsnr.numel() == 1:  # one noise level for the batch (samplers): scalar scales, no tensor ops
            lam = float(logsnr)
            alpha, sigma = math.sqrt(_sigmoid(lam)), math.sqrt(_sigmoid(-lam))
        else:
            alpha, sigma = scales_from_logsnr(logsnr.expand(x_t.shape[0]), x_t)
        eps, x0 = to_eps_x0(self.kind, out, x_t, alpha, sigma)
        if self.clip_x0:  # eps recomputed only where the clamp moved x0 (elsewhere the network's own, exactly)
            clipped = x0.clamp(-1.0, 1.0)
            eps = torch.where(clipped != x0, (x_t - alpha * clipped) / sigma, eps)
            x0 = clipped
        return Prediction(eps=eps, x0=x0, raw=out, kind=self.kind, variance_v=v)
