"""Text-to-image latent diffusion (``model.kind = "latent_unet"``): the codec and the network.

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models": a frozen
autoencoder maps an image x to a latent z = E(x) (here the posterior mean of the KL autoencoder of
``configs/autoencoder_mnist.toml``: 28x28 -> 4x7x7), diffusion runs on z, and samples are decoded
by D. They rescale KL-regularized latents by one factor so they have unit variance (the
"scale factor" of Stable Diffusion); here it is measured on the train split when training starts
(``latent_scale``) and kept as a buffer of the trained module, so every checkpoint carries it.
Conditioning follows their sec. 3.3: the U-Net's cross-attention reads the token features tau(y) of the
caption y (MiniLM, ``diffusekit.text``), and the loss is the usual per-example denoising loss,

    L = E_{E(x), y, eps, t} || eps - eps_theta(z_t, t, tau(y)) ||^2      (any prediction kind)

Captions come from the labels (``data.captions``); training, loading and sampling a run are the
family's (``families.text_latent``).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError
from diffusekit.nn.build import build_unet

__all__ = ["KIND", "LatentCodec", "LatentTextNet", "latent_scale", "codec_fingerprint", "build_latent_net"]

KIND = "latent_unet"
FINGERPRINT_WORDS = 8  # 16-bit words of the codec's SHA-256 kept in the trained module


class LatentCodec:
    """The frozen autoencoder as codec: ``encode(x)`` = scale * E[z | x], ``decode(z)`` = E[x | z / scale]."""

    def __init__(self, autoencoder: nn.Module, scale: float, source: str = ""):
        self.autoencoder, self.scale, self.source = autoencoder.eval().requires_grad_(False), float(scale), source

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.autoencoder.latent_shape)

    def to(self, device: torch.device | str) -> "LatentCodec":
        self.autoencoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.autoencoder.encode(x) * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale)


@torch.no_grad()
def latent_scale(autoencoder: nn.Module, x: Tensor, batch_size: int = 500) -> float:
    """1 / std of the posterior means E[z | x] over all of ``x`` and every latent coordinate, so that
    the scaled train latents have unit variance (the rescaling of Rombach et al. 2022)."""
    total, total_sq, count = 0.0, 0.0, 0
    for lo in range(0, x.shape[0], batch_size):
        z = autoencoder.encode(x[lo:lo + batch_size]).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    mean = total / count
    var = total_sq / count - mean * mean
    if not (math.isfinite(var) and var > 0):
        raise ValueError(f"the latents have variance {var}; cannot scale them to unit variance")
    return 1.0 / math.sqrt(var)


def codec_fingerprint(autoencoder: nn.Module) -> Tensor:
    """The first 128 bits of a SHA-256 over the autoencoder's state (names, dtypes, shapes, bytes), as
    ``FINGERPRINT_WORDS`` 16-bit words in float32 (exact there, and unchanged by the trainer's float32
    EMA, which copies buffers). Any change of the codec's weights changes it."""
    digest = hashlib.sha256()
    for name, value in sorted(autoencoder.state_dict().items()):
        v = value.detach().cpu().contiguous()
        digest.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        digest.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    raw = digest.digest()[:2 * FINGERPRINT_WORDS]
    return torch.tensor([int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)], dtype=torch.float32)


class LatentTextNet(nn.Module):
    """The trained module: a cross-attention U-Net on scaled latents, plus the buffers ``latent_scale``
    and ``codec_fingerprint`` (of the autoencoder it was trained with; both saved in every checkpoint
    with the weights, so a run cannot silently decode with a retrained autoencoder)."""

    latent_scale: Tensor
    codec_fingerprint: Tensor

    def __init__(self, unet: nn.Module, scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.register_buffer("latent_scale", torch.tensor(float(scale)))
        self.register_buffer("codec_fingerprint", torch.zeros(FINGERPRINT_WORDS))

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        return self.unet(x, c_noise, context=context, context_mask=context_mask)


def build_latent_net(model_cfg, latent_shape: tuple[int, ...], context_dim: int, scale: float = 1.0) -> LatentTextNet:
    """The U-Net of ``[model]`` on latents of shape (C, H, W), with cross-attention of width ``context_dim``."""
    c, h, w = latent_shape
    if h != w:
        raise ConfigError(f"model.kind = {KIND!r} needs square latents, got {h}x{w}")
    return LatentTextNet(build_unet(model_cfg, c, h, context_dim=context_dim), scale)
