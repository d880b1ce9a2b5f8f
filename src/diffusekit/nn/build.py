"""Networks from the ``[model]`` section of a config: the U-Net or MLP denoiser (with the one-line checks
that a U-Net fits the images) and the denoiser convention around it."""

from __future__ import annotations

from torch import nn

from diffusekit.errors import ConfigError
from diffusekit.nn.mlp import MLPDenoiser
from diffusekit.nn.unet import UNet, unet_fit_problems
from diffusekit.parameterization import Denoiser

__all__ = ["build_network", "build_unet", "check_unet_fits", "build_denoiser"]


def build_network(model_cfg, data_shape: tuple[int, ...]) -> nn.Module:
    """The raw network for data of per-example shape ``data_shape``: it reads the Fourier features of
    ``model.fourier_features`` beside x and, with ``model.learned_variance``, outputs twice the data's
    channels (the prediction, then v; ``parameterization.Denoiser`` splits them)."""
    if model_cfg.kind == "unet":
        if len(data_shape) != 3:
            raise ConfigError(f"model.kind = 'unet' needs image data (C, H, W), got per-example shape {data_shape}")
        c, h, w = data_shape
        if h != w:
            raise ConfigError(f"model.kind = 'unet' needs square images, got {h}x{w}")
        return build_unet(model_cfg, c, h, num_classes=model_cfg.num_classes,
                          out_channels=2 * c if model_cfg.learned_variance else None,
                          fourier_exponents=tuple(model_cfg.fourier_features))
    if model_cfg.kind == "mlp":
        if len(data_shape) != 1:
            raise ConfigError(f"model.kind = 'mlp' needs vector data (D,), got per-example shape {data_shape}")
        return MLPDenoiser(dim=data_shape[0], hidden=model_cfg.hidden, depth=model_cfg.depth,
                           time_embedding=model_cfg.time_embedding, num_classes=model_cfg.num_classes,
                           dropout=model_cfg.dropout, fourier_exponents=tuple(model_cfg.fourier_features),
                           out_dim=2 * data_shape[0] if model_cfg.learned_variance else None)
    raise ConfigError(f"model.kind = {model_cfg.kind!r} cannot be trained as a diffusion model yet")


def build_unet(m, in_channels: int, size: int, num_classes: int = 0, context_dim: int | None = None,
               out_channels: int | None = None, fourier_exponents: tuple[int, ...] = ()) -> UNet:
    """The U-Net of ``[model]`` on ``size`` x ``size`` inputs of ``in_channels`` channels (class labels,
    or cross-attention over context features of width ``context_dim``), after ``check_unet_fits``; its
    output has ``out_channels`` channels (None: ``in_channels``; an image-to-image U-Net reads more channels
    than it predicts)."""
    check_unet_fits(m, size)
    return UNet(in_channels=in_channels, out_channels=out_channels, image_size=size, base_channels=m.base_channels,
                channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads, dropout=m.dropout,
                time_embedding=m.time_embedding, num_classes=num_classes, norm_groups=m.norm_groups,
                context_dim=context_dim, fourier_exponents=fourier_exponents,
                pooled_context=m.pooled_text)


def check_unet_fits(m, size: int) -> None:
    """One-line ConfigErrors naming the key, for U-Net settings that cannot fit ``size``-pixel images."""
    problems = unet_fit_problems(size, m.channel_mult, m.base_channels, m.norm_groups, m.attn_resolutions, m.num_heads)
    if problems:
        name, why = problems[0]
        hints = {"channel_mult": " (change data.image_size or model.channel_mult)",
                 "attn_resolutions": " (name level sizes, or [] for attention in the middle block only; "
                                     "configs/folder32.toml and configs/folder64.toml size U-Nets for 32x32 and 64x64)"}
        hint = hints.get(name, "")
        raise ConfigError(f"model.{name} = {why}{hint}")


def build_denoiser(cfg, data_shape: tuple[int, ...]) -> Denoiser:
    """Network wrapped in the denoiser convention for ``model.prediction``."""
    return Denoiser(build_network(cfg.model, data_shape), cfg.model.prediction,
                    learned_variance=cfg.model.learned_variance)
