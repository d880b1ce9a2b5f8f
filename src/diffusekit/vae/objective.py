"""The trainer's ``Objective`` for the latent-variable families (``model.kind`` = vae | mhvae | autoencoder).

The per-example loss is the negative ELBO (or, with ``vae.iwae_k`` = k > 1, the negative IWAE bound
of Burda et al. 2016, eq. 8) divided by the number of data dimensions: nats per dimension, so
loss / ln 2 is the training bound in bits/dim. ``vae.kl_weight`` = beta < 1 scales the latent terms
(the beta-VAE objective of Higgins et al. 2017), which is how the KL-regularised autoencoder trades
a little latent regularity for sharp reconstructions (Rombach et al. 2022, sec. 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError
from diffusekit.vae.models import DecoderLikelihood, HierarchicalVAE, build_hierarchical_vae, sample

__all__ = ["LATENT_KINDS", "data_levels", "build_likelihood", "build_latent_model", "LatentVariableObjective",
           "neg_bound_per_example"]

LATENT_KINDS = ("vae", "mhvae", "autoencoder")
_KNOWN_LEVELS = {"digits": 17, "mnist": 256, "folder": 256}


def data_levels(data_cfg) -> int | None:
    """Number of values per data coordinate for ``[data]`` (None: continuous data)."""
    if data_cfg.name in _KNOWN_LEVELS:
        return _KNOWN_LEVELS[data_cfg.name]
    from diffusekit.data import load_dataset

    return load_dataset(data_cfg, "test").levels


def build_likelihood(cfg) -> DecoderLikelihood:
    """The decoder p(x | z_1) named by ``vae.decoder`` ("auto": discretized on image data, else Gaussian)."""
    levels = data_levels(cfg.data)
    kind = cfg.vae.decoder
    if kind == "auto":
        kind = "discretized" if levels is not None else "gaussian"
    if kind == "discretized" and levels is None:
        raise ConfigError(f"vae.decoder = 'discretized' needs data on a finite number of levels; "
                          f"data.name = {cfg.data.name!r} is continuous (use 'gaussian')")
    if kind == "bernoulli" and levels != 2:
        raise ConfigError(f"vae.decoder = 'bernoulli' needs binary data; data.name = {cfg.data.name!r} has "
                          f"{levels or 'continuous'} levels (use 'discretized')")
    return DecoderLikelihood(kind, levels if kind == "discretized" else None)


def build_latent_model(cfg, data_shape: tuple[int, ...]) -> HierarchicalVAE:
    """The ``HierarchicalVAE`` for ``cfg.model.kind`` on data of per-example shape ``data_shape``."""
    kind, m, v = cfg.model.kind, cfg.model, cfg.vae
    if kind not in LATENT_KINDS:
        raise ConfigError(f"model.kind = {kind!r} is not a latent-variable model ({', '.join(LATENT_KINDS)})")
    if m.num_classes > 0:
        raise ConfigError(f"model.num_classes = {m.num_classes}: model.kind = {kind!r} is unconditional (set it to 0)")
    if kind == "autoencoder":
        if len(data_shape) != 3 or data_shape[1] % 4 or data_shape[2] % 4:
            raise ConfigError(f"model.kind = 'autoencoder' needs images (C, H, W) with H and W multiples of 4, "
                              f"got per-example shape {tuple(data_shape)}")
    return build_hierarchical_vae(kind, data_shape, build_likelihood(cfg), latent_dim=v.latent_dim,
                                  hierarchy=v.hierarchy, hidden=m.hidden, depth=m.depth,
                                  latent_channels=v.latent_channels, base_channels=m.base_channels,
                                  norm_groups=m.norm_groups)


def neg_bound_per_example(terms: dict[str, Tensor], k: int, kl_weight: float = 1.0) -> Tensor:
    """-ELBO (k = 1; reconstruction + kl_weight * latent terms) or -IWAE_k per example, in nats, from
    the output of ``HierarchicalVAE.forward(x, ..., k)``. IWAE_k = E log (1/k) sum_j w_j with
    log w_j = ``log_weight`` of chain j (Burda et al. 2016, eq. 8)."""
    if k == 1:
        return terms["reconstruction"] + kl_weight * (terms["prior"] + terms["consistency"].sum(1))
    log_w = terms["log_weight"].reshape(-1, k)
    return -(torch.logsumexp(log_w, dim=1) - math.log(k))


class LatentVariableObjective:
    """VAE / MHVAE / autoencoder training: one ``module(x, generator, k)`` forward per batch (DDP-safe);
    every reparameterization draw comes from the trainer's generator."""

    def __init__(self, cfg, data_shape: tuple[int, ...]):
        self.cfg, self.data_shape = cfg, tuple(data_shape)
        v = cfg.vae
        if v.iwae_k > 1 and v.kl_weight != 1.0:
            raise ConfigError(f"vae.iwae_k = {v.iwae_k} trains the IWAE bound, which has no kl_weight; "
                              f"set vae.kl_weight = 1 (got {v.kl_weight})")
        self.module = build_latent_model(cfg, self.data_shape)
        self.dims = math.prod(self.data_shape)

    def loss(self, module: nn.Module, x0: Tensor, cond: dict | None, generator: torch.Generator) -> Tensor:
        v = self.cfg.vae
        terms = module(x0, generator, v.iwae_k)
        return neg_bound_per_example(terms, v.iwae_k, v.kl_weight) / self.dims

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        return sample(module, range(n), self.cfg.vae.sample_noise, device)


def _register() -> None:
    from diffusekit.objectives import register_family

    for kind in LATENT_KINDS:
        register_family(kind, LatentVariableObjective)


_register()
