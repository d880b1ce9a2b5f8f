"""Build networks, schedules and denoisers from a config, and load a trained run back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.parameterization import Denoiser
from diffusekit.schedules import DiscreteSchedule, make_schedule

__all__ = ["build_schedule", "build_network", "build_denoiser", "LoadedRun", "load_run", "RunCheckpoint",
           "read_run_checkpoint"]


def build_schedule(diffusion_cfg) -> DiscreteSchedule:
    """The discrete schedule named by ``[diffusion]`` (float64 tables)."""
    name, T = diffusion_cfg.schedule, diffusion_cfg.T
    if name == "linear":
        return make_schedule("linear", T, beta_start=diffusion_cfg.beta_start, beta_end=diffusion_cfg.beta_end)
    if name == "cosine":
        return make_schedule("cosine", T, s=diffusion_cfg.cosine_s)
    return make_schedule(name, T)


def build_network(model_cfg, data_shape: tuple[int, ...]) -> nn.Module:
    """The raw network for data of per-example shape ``data_shape``."""
    from diffusekit.nn import MLPDenoiser, UNet

    if model_cfg.kind == "unet":
        if len(data_shape) != 3:
            raise ConfigError(f"model.kind = 'unet' needs image data (C, H, W), got per-example shape {data_shape}")
        c, h, w = data_shape
        if h != w:
            raise ConfigError(f"model.kind = 'unet' needs square images, got {h}x{w}")
        _check_unet_fits(model_cfg, h)
        return UNet(in_channels=c, image_size=h, base_channels=model_cfg.base_channels,
                    channel_mult=tuple(model_cfg.channel_mult), num_res_blocks=model_cfg.num_res_blocks,
                    attn_resolutions=tuple(model_cfg.attn_resolutions), num_heads=model_cfg.num_heads,
                    dropout=model_cfg.dropout, time_embedding=model_cfg.time_embedding,
                    num_classes=model_cfg.num_classes, norm_groups=model_cfg.norm_groups)
    if model_cfg.kind == "mlp":
        if len(data_shape) != 1:
            raise ConfigError(f"model.kind = 'mlp' needs vector data (D,), got per-example shape {data_shape}")
        return MLPDenoiser(dim=data_shape[0], hidden=model_cfg.hidden, depth=model_cfg.depth,
                           time_embedding=model_cfg.time_embedding, num_classes=model_cfg.num_classes,
                           dropout=model_cfg.dropout)
    raise ConfigError(f"model.kind = {model_cfg.kind!r} cannot be trained as a diffusion model yet")


def _check_unet_fits(m, size: int) -> None:
    """One-line ConfigErrors naming the key, for U-Net settings that cannot fit ``size``-pixel images."""
    halvings = len(m.channel_mult) - 1
    if size % 2**halvings:
        raise ConfigError(f"model.channel_mult = {m.channel_mult} halves the image {halvings} times, so the image "
                          f"size must be divisible by {2**halvings}; the data has {size}x{size} images "
                          "(change data.image_size or model.channel_mult)")
    widths = [m.base_channels * k for k in m.channel_mult]
    if any(w % m.norm_groups for w in widths):
        raise ConfigError(f"model.norm_groups = {m.norm_groups} must divide every channel width "
                          f"(model.base_channels x model.channel_mult = {widths})")
    sizes = [size // 2**i for i in range(halvings + 1)]
    unknown = sorted(set(m.attn_resolutions) - set(sizes))
    if unknown:
        raise ConfigError(f"model.attn_resolutions = {m.attn_resolutions}: {unknown} match no level of "
                          f"{size}x{size} images (level sizes {sizes})")
    attended = [w for w, s in zip(widths, sizes) if s in m.attn_resolutions] + widths[-1:]
    if any(w % m.num_heads for w in attended):
        raise ConfigError(f"model.num_heads = {m.num_heads} must divide the channel widths with attention "
                          f"({sorted(set(attended))})")


def build_denoiser(cfg, data_shape: tuple[int, ...]) -> Denoiser:
    """Network wrapped in the denoiser convention for ``model.prediction``."""
    return Denoiser(build_network(cfg.model, data_shape), cfg.model.prediction)


@dataclass
class LoadedRun:
    """A trained run: config, denoiser (EMA or raw weights), schedule and data facts."""

    cfg: object
    denoiser: Denoiser
    schedule: DiscreteSchedule
    data_shape: tuple[int, ...]
    levels: int | None
    num_classes: int
    step: int
    checkpoint: Path
    logsnr_schedule: nn.Module | None = None  # continuous runs: lambda(t) (``schedule`` is its table on T steps)


def _load_continuous_run(cfg, state, data_shape, levels, num_classes, step, ckpt, device) -> LoadedRun:
    """A continuous-time run: one module holds the network and its (maybe learned) log-SNR schedule;
    samplers and the discrete bound get the discrete table of lambda(t) on diffusion.T grid steps."""
    from diffusekit.continuous import load_continuous

    module = load_continuous(cfg, data_shape, levels, state, ckpt).to(device)
    return LoadedRun(cfg, module.denoiser.eval(), module.schedule.discretize(cfg.diffusion.T), data_shape, levels,
                     num_classes, step, ckpt, module.schedule)


@dataclass
class RunCheckpoint:
    """The newest complete checkpoint of a run folder, its record parsed (``read_run_checkpoint``)."""

    path: Path  # checkpoint stem: path.json is the record, path.safetensors the tensors
    tensors: dict[str, torch.Tensor]
    cfg: object  # the recorded Config
    data_shape: tuple[int, ...]
    levels: int | None
    num_classes: int
    step: int

    def weights(self, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str, str]:
        """(state dict of the EMA or raw weights, the file they come from, what they are) for
        ``check_state`` / ``load_module_state``."""
        prefix = "ema." if use_ema else "model."
        state = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return state, f"{self.path}.safetensors", f"{prefix[:-1]} weights"


def read_run_checkpoint(run_dir: Path | str) -> RunCheckpoint:
    """Load and parse the newest complete checkpoint of ``run_dir``, for every model family; a missing
    folder or checkpoint, or a record without its config or data description, is a one-line
    ``CheckpointError`` naming the file."""
    from diffusekit.config import config_from_dict
    from diffusekit.train.checkpoint import latest_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder does not exist")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint found in {run_dir / 'checkpoints'}")
    tensors, record = load_checkpoint(ckpt)
    try:
        meta = record["meta"]
        cfg = config_from_dict(meta["config"])
        data_shape = tuple(meta["data"]["shape"])
        levels, num_classes = meta["data"]["levels"], meta["data"]["num_classes"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}.json: metadata lacks {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt}.json: recorded config is invalid ({exc})") from None
    return RunCheckpoint(ckpt, tensors, cfg, data_shape, levels, num_classes, int(record["step"]))


def load_run(run_dir: Path | str, use_ema: bool = True, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the newest complete checkpoint of a run folder for sampling or evaluation."""
    from diffusekit.train.checkpoint import check_state, load_module_state

    rc = read_run_checkpoint(run_dir)
    cfg, data_shape, ckpt = rc.cfg, rc.data_shape, rc.path
    state, source, what = rc.weights(use_ema)
    if cfg.loss.objective == "continuous" and cfg.model.kind in ("unet", "mlp"):
        return _load_continuous_run(cfg, state, data_shape, rc.levels, rc.num_classes, rc.step, ckpt, device)
    try:  # shapes are checked on a weightless ("meta") copy first: a hostile record allocates nothing
        with torch.device("meta"):
            check_state(build_denoiser(cfg, data_shape).net.state_dict(), state, source, what)
        denoiser = build_denoiser(cfg, data_shape)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}.json: recorded model cannot be built ({exc})") from None
    load_module_state(denoiser.net, state, source, what)
    denoiser.to(device).eval()
    return LoadedRun(cfg, denoiser, build_schedule(cfg.diffusion), data_shape, rc.levels, rc.num_classes, rc.step,
                     ckpt)
