"""Noise-level embeddings: sinusoidal positional features and random Fourier features.

The networks are told the noise level through ``c_noise``, a float tensor of shape (B,) that the
caller sets to logsnr = log(alpha^2 / sigma^2) (typically -25..25, never inf). The networks know
nothing else about noise: the noise semantics live in the wrappers of ``diffusekit.parameterization``
(docs/math.md). As the notes put it, "the time representation is conditioned in the U-Net as
sinusoidal positional embeddings or Fourier features" (Vidal, "Deep Generative Models" (Fall 2025),
slides "Implementation (DDPM)"; Zhu, "Generative Model Zoo (part III)" (CMU 16-726), slide
"Implementation Considerations: Network Architectures": "Time representation: sinusoidal positional
embeddings or random Fourier features"). The features then go through a small MLP (Linear-SiLU-Linear,
``embedding_mlp``) inside each network.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["noise_and_class_embedding", "add_pooled_context", "token_mean", "input_fourier_features",
    "SinusoidalEmbedding",
    "FourierEmbedding",
    "make_time_embedding",
    "embedding_mlp",
    "noise_level_vector",
]

EmbeddingKind = Literal["sinusoidal", "fourier"]


def input_fourier_features(x: Tensor, exponents: tuple[int, ...]) -> Tensor:
    """x with sin(2^k pi x) and cos(2^k pi x) appended along dim 1 for every k of ``exponents`` (Kingma et
    al. 2021, appendix C, "Fourier features": they let the network see the finest scales of the data).
    Order: x, then sin and cos for the first k, then for the next; no exponents returns x itself. The
    sines and cosines are computed in float32 at least (2^k pi x loses its fine digits in half precision)."""
    if not exponents:
        return x
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    feats = [x]
    for k in exponents:
        arg = (2.0**k * math.pi) * xf
        feats += [torch.sin(arg).to(x.dtype), torch.cos(arg).to(x.dtype)]
    return torch.cat(feats, dim=1)


def noise_level_vector(c_noise: Tensor, batch_size: int, owner: str) -> Tensor:
    """Return ``c_noise`` as a (B,) vector; a 0-d tensor is broadcast to the batch.

    Raises ValueError naming ``owner`` and the expected shape for anything else.
    """
    if not isinstance(c_noise, Tensor) or not c_noise.is_floating_point():
        raise ValueError(f"{owner}: c_noise must be a float tensor of shape ({batch_size},)")
    if c_noise.ndim == 0:
        return c_noise.expand(batch_size)
    if c_noise.shape != (batch_size,):
        raise ValueError(
            f"{owner}: c_noise must have shape ({batch_size},) (one logsnr per example), "
            f"got {tuple(c_noise.shape)}"
        )
    return c_noise


class SinusoidalEmbedding(nn.Module):
    """Transformer positional features of ``input_scale * c_noise`` (DDPM's timestep embedding).

    e_i = cos(s c f_i) and e_{half+i} = sin(s c f_i) with f_i = max_period^(-i / half), i < half.
    DDPM fed the integer step t in 0..1000; with s = 25 a logsnr range of +-20 covers a
    comparable span of phases (-500..500). An odd ``dim`` is padded with one zero feature.
    """

    freqs: Tensor

    def __init__(self, dim: int, max_period: float = 10000.0, input_scale: float = 25.0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"SinusoidalEmbedding: dim must be >= 2, got {dim}")
        self.dim, self.max_period, self.input_scale = dim, max_period, input_scale
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        # a pure function of the constructor arguments: rebuilt, never saved in checkpoints
        self.register_buffer("freqs", (input_scale * freqs).float(), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        """(B,) -> (B, dim) features."""
        args = c_noise.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        if self.dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period}, input_scale={self.input_scale}"


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi w c), sin(2 pi w c)] with fixed w ~ N(0, std^2).

    Tancik et al. (2020), as used by score-SDE and EDM for the noise level. ``w`` is drawn from a
    ``torch.Generator`` seeded with ``seed`` (so it does not consume the global RNG) and stored
    as a persistent buffer: checkpoints carry it, and loading one restores the same features.
    """

    weight: Tensor

    def __init__(self, dim: int, std: float = 1.0, seed: int = 0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"FourierEmbedding: dim must be even and >= 2, got {dim}")
        self.dim, self.std, self.seed = dim, std, seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(dim // 2, generator=gen) * std)

    def forward(self, c_noise: Tensor) -> Tensor:
        """(B,) -> (B, dim) features."""
        args = (2 * math.pi) * c_noise.to(self.weight.dtype)[:, None] * self.weight[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, std={self.std}, seed={self.seed}"


def make_time_embedding(kind: EmbeddingKind, dim: int) -> nn.Module:
    """Build the noise-level feature map named by ``kind`` ("sinusoidal" or "fourier")."""
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim)
    raise ValueError(f"time_embedding must be 'sinusoidal' or 'fourier', got {kind!r}")


def embedding_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-SiLU-Linear from the features to the embedding width (DDPM's ``temb`` layers)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


def noise_and_class_embedding(net: nn.Module, c_noise: Tensor, class_labels: Tensor | None, batch: int,
                              owner: str) -> Tensor:
    """The conditioning vector of a denoiser network ``net`` (with ``time_embed``, ``time_mlp``,
    ``class_embed`` and ``num_classes``): the embedded noise level, plus the class embedding when the
    network is class-conditional. Missing labels mean the null label ``num_classes`` (the unconditional
    model of classifier-free guidance); labels given to an unconditional network, or not an integer
    vector of the batch, are a ValueError naming ``owner``."""
    emb = net.time_mlp(net.time_embed(noise_level_vector(c_noise, batch, owner)))
    if net.class_embed is None:
        if class_labels is not None:
            raise ValueError(f"class_labels given, but the {owner} was built with num_classes=0")
        return emb
    if class_labels is None:
        class_labels = torch.full((batch,), net.num_classes, device=emb.device)
    elif class_labels.shape != (batch,) or class_labels.is_floating_point():
        raise ValueError(f"class_labels must be an integer tensor of shape ({batch},) with values in "
                         f"0..{net.num_classes} ({net.num_classes} = null), got {class_labels.dtype} "
                         f"{tuple(class_labels.shape)}")
    return emb + net.class_embed(class_labels)


def add_pooled_context(net: nn.Module, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
    """``emb`` plus ``net.pooled_embed`` of the mean context token over the real tokens (``context_mask`` True;
    None: every token), the pooled text embedding that Imagen (Saharia et al. 2022, sec. 2) and SDXL (Podell
    et al. 2023, sec. 2.1) add to the noise-level embedding beside cross-attention. ``emb`` unchanged when the
    network has no ``pooled_embed`` (None) or no context is given."""
    proj = getattr(net, "pooled_embed", None)
    if proj is None or context is None:
        return emb
    return emb + proj(token_mean(context, context_mask))


def token_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``tokens`` (B, L, D) over the real tokens of each row (``mask`` (B, L) True; None: every
    token) -> (B, D): a caption's sentence embedding, padding left out."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
