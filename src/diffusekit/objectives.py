"""What the trainer optimises: a module and a per-example loss, chosen by the config.

The trainer (``diffusekit.train.trainer``) knows nothing about diffusion. It asks
``build_objective(cfg, data_shape)`` for an ``Objective``:

- ``module``: the ``nn.Module`` whose parameters are trained, averaged by the EMA and written to
  checkpoints (``model.*`` and ``ema.*`` keys hold its state dict);
- ``loss(module, x0, cond, generator)``: per-example losses (N,) for a batch. ``module`` is what
  the trainer passes, possibly wrapped in DistributedDataParallel, so the loss must call it rather
  than ``self.module``; every random draw comes from ``generator`` (the run's checkpointed noise
  stream), which keeps resume exact;
- ``preview(module, n, device)``: n samples (for the picture drawn during training), drawn
  without touching the global RNG's meaning (the trainer saves and restores it around the call).

Families register a builder for their ``model.kind`` with ``register_family``; the diffusion
family (``unet``, ``mlp``) is built in; ``diffusekit.vae`` and ``diffusekit.latent`` (``latent_unet``:
text-to-image latent diffusion) and ``diffusekit.control`` (``controlnet``) register theirs on import.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError

__all__ = ["Objective", "DiffusionObjective", "register_family", "build_objective", "FAMILIES"]


class Objective(Protocol):
    module: nn.Module

    def loss(self, module: nn.Module, x0: Tensor, cond: dict | None, generator: torch.Generator) -> Tensor: ...

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor: ...


class DiffusionObjective:
    """The discrete-time denoising loss of ``[loss]`` for a network predicting ``model.prediction``."""

    def __init__(self, cfg, data_shape: tuple[int, ...]):
        from diffusekit.models import build_network, build_schedule

        self.cfg, self.data_shape = cfg, tuple(data_shape)
        self.schedule = build_schedule(cfg.diffusion)
        self.module = build_network(cfg.model, self.data_shape)
        self.kind = cfg.model.prediction

    def denoiser(self, module: nn.Module):
        from diffusekit.parameterization import Denoiser

        return Denoiser(module, self.kind)

    def loss(self, module: nn.Module, x0: Tensor, cond: dict | None, generator: torch.Generator) -> Tensor:
        from diffusekit.losses import diffusion_loss, sample_timesteps

        lc = self.cfg.loss
        t = sample_timesteps(x0.shape[0], self.schedule.T, generator, lc.t_sampling)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return diffusion_loss(self.denoiser(module), x0, t, self.schedule, noise, lc.weighting, cond=cond,
                              gamma=lc.min_snr_gamma)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        from diffusekit.sampling.run import SampleSettings, generate

        settings = SampleSettings(sampler="ddpm", steps=min(100, self.schedule.T), seeds=list(range(n)),
                                  batch_size=max(n, 1))
        return generate(self.denoiser(module).eval(), self.schedule, self.data_shape, settings, device=device,
                        progress=False, num_classes=self.cfg.model.num_classes)  # conditional: classes in turn


FAMILIES: dict[str, Callable[[Any, tuple[int, ...]], Objective]] = {
    "unet": DiffusionObjective,
    "mlp": DiffusionObjective,
}


def register_family(kind: str, builder: Callable[[Any, tuple[int, ...]], Objective]) -> None:
    """Make ``model.kind = kind`` trainable: ``builder(cfg, data_shape)`` returns an ``Objective``."""
    FAMILIES[kind] = builder


def build_objective(cfg, data_shape: tuple[int, ...]) -> Objective:
    """The objective for ``cfg.model.kind`` on data of per-example shape ``data_shape``."""
    kind = cfg.model.kind
    if kind in ("vae", "mhvae", "autoencoder"):
        import diffusekit.vae  # noqa: F401  (registers the latent-variable families)
    if kind == "latent_unet":
        import diffusekit.latent  # noqa: F401  (registers text-to-image latent diffusion)
    if kind == "controlnet":
        import diffusekit.control  # noqa: F401  (registers ControlNet on a frozen unet run)
    if kind in ("unet", "mlp") and cfg.loss.objective == "continuous":
        from diffusekit.continuous import ContinuousObjective  # VDM's ELBO / weighted L_w, maybe a learned schedule

        return ContinuousObjective(cfg, tuple(data_shape))
    if kind not in FAMILIES:
        raise ConfigError(f"model.kind = {kind!r} cannot be trained; known kinds: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[kind](cfg, tuple(data_shape))
