"""The table of model families, and how a run folder finds its row.

Each family is one module of this package and one row of ``FAMILIES`` (what the row holds:
``families.base.Family``). A run is looked up by what it says it is, read once: the ``model.kind`` and
``loss.objective`` recorded in its newest checkpoint (``family_for_config``), or, for a folder saved by
diffusers, the scheduler and U-Net configs it holds. Adding a family = one module + one row here.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch

from diffusekit.config import Config
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.families import (
    consistency,
    continuous,
    controlnet,
    diffusers,
    diffusion,
    img2img,
    progressive,
    text_latent,
    vae,
)
from diffusekit.families.base import Family, Model
from diffusekit.io.runfolder import read_run_checkpoint

__all__ = ["FAMILIES", "family_named", "family_for_config", "read_run", "open_run", "families_taking"]

FAMILIES: tuple[Family, ...] = (
    Family("diffusion", "discrete-time diffusion (DDPM): a U-Net or MLP denoiser on the [loss] of a discrete schedule",
           kinds=("unet", "mlp"), objective="discrete", build_objective=diffusion.DiffusionObjective,
           load=diffusion.load, sample=diffusion.sample, evaluate=diffusion.evaluate, restore=True),
    Family("continuous", "continuous-time diffusion: the VDM ELBO or a weighted objective, maybe a learned schedule",
           kinds=("unet", "mlp"), objective="continuous", build_objective=continuous.ContinuousObjective,
           load=continuous.load, sample=diffusion.sample, evaluate=diffusion.evaluate, restore=True),
    Family("vae", "VAE, Markov hierarchical VAE and KL autoencoder (ancestral sampling)",
           kinds=vae.VAE_KINDS, objective=None, build_objective=vae.VAEObjective, load=vae.load, sample=vae.sample,
           evaluate=vae.evaluate, settings=vae.settings, read_settings=vae.read_settings),
    Family("text_latent", "text-to-image diffusion with cross-attention over MiniLM, on an autoencoder's latents "
           "(latent_unet) or on pixels (text_unet)", kinds=text_latent.KINDS, objective="discrete", build_objective=text_latent.TextLatentObjective,
           load=text_latent.load, sample=text_latent.sample, evaluate=text_latent.evaluate,
           conditioning=("prompts",), guidance=True),
    Family("controlnet", "ControlNet: a trainable encoder copy steering a frozen U-Net (class- or text-conditioned) "
           "with hints: edges, low-resolution edges, a skeleton or a box layout",
           kinds=(controlnet.KIND,), objective="discrete", build_objective=controlnet.build_objective,
           load=controlnet.load, sample=controlnet.sample, evaluate=controlnet.evaluate,
           conditioning=("prompts", "control_from", "control_images", "control_scale"), guidance=True),
    Family("consistency", "consistency distillation of a diffusion run (Song et al. 2023): 1-4 step sampling",
           kinds=consistency.KINDS, objective="consistency", build_objective=consistency.build_objective,
           load=consistency.load, sample=diffusion.sample, evaluate=consistency.evaluate),
    Family("progressive", "progressive distillation of a diffusion run (Salimans & Ho 2022): a v-prediction student "
           "that halves its DDIM steps each round", kinds=("unet", "mlp"), objective="progressive",
           build_objective=progressive.ProgressiveObjective, load=progressive.load, sample=progressive.sample,
           evaluate=diffusion.evaluate),
    Family("img2img", "image-to-image diffusion trained on pairs (SR3, Palette): a U-Net reading the degraded image "
           "restores the tasks of img2img.tasks", kinds=(img2img.KIND,), objective="discrete",
           build_objective=img2img.Img2ImgObjective, load=img2img.load, sample=img2img.sample, trained_restore=True),
    Family("diffusers", "a diffusers UNet2DModel + DDPM scheduler folder (sampled by our samplers; not trained here)",
           kinds=(), objective=None, build_objective=None, load=diffusers.load, sample=diffusion.sample),
)


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def families_taking(field: str) -> list[Family]:
    """The families whose models take request field ``field`` (``SampleRequest``)."""
    return [f for f in FAMILIES if field in f.conditioning]


def family_for_config(cfg: Config) -> Family:
    """The family of a config: its ``model.kind`` and, where a family says, its ``loss.objective``."""
    kind, objective = cfg.model.kind, cfg.loss.objective
    for family in FAMILIES:
        if kind in family.kinds and family.objective in (None, objective):
            return family
    offered = [f for f in FAMILIES if kind in f.kinds]
    if offered:
        raise ConfigError(f"model.kind = {kind!r} takes loss.objective = "
                          f"{' or '.join(repr(f.objective) for f in offered)}, not {objective!r}")
    kinds = sorted(k for f in FAMILIES for k in f.kinds)
    close = difflib.get_close_matches(kind, kinds, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"model.kind = {kind!r} is not a model family; {hint}known kinds: {', '.join(kinds)}")


def read_run(path: Path | str) -> tuple[Family, Any]:
    """(family, source) of a run folder, read once: a diffusekit run's newest checkpoint (a
    ``RunCheckpoint``, verified) or a diffusers folder (its path). One-line errors name the folder."""
    path = Path(path)
    if diffusers.is_diffusers_folder(path):
        return family_named("diffusers"), path
    rc = read_run_checkpoint(path)
    try:
        return family_for_config(rc.cfg), rc
    except ConfigError as exc:
        raise CheckpointError(f"{rc.path}.json: {exc}") from None


def open_run(path: Path | str, use_ema: bool = True, device: str | torch.device = "cpu") -> Model:
    """The trained model of a run folder (or diffusers folder), whatever its family."""
    family, source = read_run(path)
    return family.load(source, use_ema, device)

