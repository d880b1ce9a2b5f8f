"""ControlNet as a trainable family (``model.kind = "controlnet"``): hints, loss, loading, evaluation.

The frozen base is the EMA network of ``controlnet.base_run`` (a discrete-time ``model.kind = "unet"``
run); its schedule and prediction kind are used as they were trained (the run's own ``[diffusion]`` and
``model.prediction`` are ignored, ``[model]``'s architecture keys too: the ControlNet copies the base).
The control image of an example is computed from the example itself (``controlnet.hint``):

    edges(x) = sqrt(G_x^2 + G_y^2) / 4,    G = Sobel filters on the channel mean, edges replicated

so training needs no extra data: the loss is the base family's per-example denoising loss of
``ControlledUNet`` with control = edges(x0) (Zhang et al. 2023, eq. 5). Sampling asks for the edges
of given images; ``edge_agreement`` measures how well the samples' own edges follow them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.nn.controlnet import ControlledUNet, ControlNet
from diffusekit.objectives import register_family

__all__ = ["KIND", "sobel_edges", "make_hint", "edge_correlation", "ControlObjective", "load_control_run",
           "edge_agreement"]

KIND = "controlnet"
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_edges(x: Tensor) -> Tensor:
    """(B, C, H, W) images -> (B, 1, H, W) Sobel gradient magnitude of their channel mean, / 4
    (a unit step then reads 1 per unit of intensity change; borders are replicated)."""
    if x.ndim != 4:
        raise ValueError(f"sobel_edges expects images (B, C, H, W), got {tuple(x.shape)}")
    gray = F.pad(x.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor(_SOBEL_X, dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(gray, kernels)
    return g.square().sum(dim=1, keepdim=True).sqrt() / 4


def make_hint(kind: str, x: Tensor) -> Tensor:
    """The control image ``controlnet.hint`` derives from images ``x``."""
    if kind == "edges":
        return sobel_edges(x)
    raise ConfigError(f"controlnet.hint = {kind!r} is unknown; known: 'edges'")


def edge_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-example Pearson correlation of two stacks of maps (B, ...) -> (B,); 0 where one is constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def _load_base(cfg, data_shape: tuple[int, ...] | None):
    from diffusekit.models import load_run

    where = f"controlnet.base_run = {cfg.controlnet.base_run!r}"
    try:
        run = load_run(cfg.controlnet.base_run, use_ema=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if run.cfg.model.kind != "unet" or run.logsnr_schedule is not None:
        raise CheckpointError(f"{where}: the base must be a discrete-time model.kind = 'unet' run")
    if data_shape is not None and tuple(run.data_shape) != tuple(data_shape):
        raise CheckpointError(f"{where}: the base models images of shape {tuple(run.data_shape)}, "
                              f"the data has {tuple(data_shape)}")
    return run


class ControlObjective:
    """The trainer's ``Objective`` for ``model.kind = "controlnet"`` (see the module docstring)."""

    def __init__(self, cfg, data_shape: tuple[int, ...]):
        if cfg.loss.objective != "discrete":
            raise ConfigError(f"model.kind = {KIND!r} trains the discrete-time loss; set loss.objective = 'discrete'")
        self.cfg, self.data_shape = cfg, tuple(data_shape)
        with torch.random.fork_rng(devices=[]):  # loading the base leaves the caller's RNG alone
            base = _load_base(cfg, self.data_shape)
        self.base_cfg, self.schedule, self.kind = base.cfg, base.schedule, base.cfg.model.prediction
        self.module = ControlledUNet(base.denoiser.net, ControlNet(base.denoiser.net, hint_channels=1))

    def denoiser(self, module: nn.Module):
        from diffusekit.parameterization import Denoiser

        return Denoiser(module, self.kind)

    def hint(self, x: Tensor) -> Tensor:
        return make_hint(self.cfg.controlnet.hint, x)

    def loss(self, module: nn.Module, x0: Tensor, cond: dict | None, generator: torch.Generator) -> Tensor:
        from diffusekit.losses import diffusion_loss, sample_timesteps

        lc = self.cfg.loss
        t = sample_timesteps(x0.shape[0], self.schedule.T, generator, lc.t_sampling)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        full = {**(cond or {}), "control": self.hint(x0)}
        return diffusion_loss(self.denoiser(module), x0, t, self.schedule, noise, lc.weighting, cond=full,
                              gamma=lc.min_snr_gamma)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n samples (DDPM, <= 100 steps) asked for the edges of the first n test images."""
        from diffusekit.data import load_dataset
        from diffusekit.sampling.run import SampleSettings, generate

        with torch.random.fork_rng(devices=[]):
            x = load_dataset(self.cfg.data, "test").x[:n]
        settings = SampleSettings(sampler="ddpm", steps=min(100, self.schedule.T), seeds=list(range(x.shape[0])),
                                  batch_size=max(x.shape[0], 1))
        return generate(self.denoiser(module).eval(), self.schedule, self.data_shape, settings, device=device,
                        progress=False, cond={"control": self.hint(x).to(device)})


register_family(KIND, ControlObjective)


def load_control_run(run_dir: Path | str, use_ema: bool = True, device: str | torch.device = "cpu"):
    """(objective, denoiser) of a trained ControlNet run: the objective rebuilt from the recorded config
    (its base run must still exist), the weights from the newest checkpoint."""
    from diffusekit.models import read_run_checkpoint
    from diffusekit.train.checkpoint import load_module_state

    rc = read_run_checkpoint(run_dir)
    if rc.cfg.model.kind != KIND:
        raise CheckpointError(f"{run_dir} is a model.kind = {rc.cfg.model.kind!r} run, not {KIND!r}")
    objective = ControlObjective(rc.cfg, rc.data_shape)
    load_module_state(objective.module, *rc.weights(use_ema))
    objective.module.to(device).eval()
    return objective, objective.denoiser(objective.module)


@torch.no_grad()
def edge_agreement(run_dir: Path | str, n: int = 200, sampler: str = "ddim", steps: int = 100,
                   batch_size: int = 200, device: str | torch.device = "cpu") -> dict[str, float]:
    """Ask a ControlNet run for the hints of the first ``n`` test images; return the mean correlation
    between the hint of each sample and the requested hint ("controlnet"), the same for the base alone
    on the same seeds ("base"), and between the requested hints and those of the test images shifted
    by one ("chance": unrelated digits)."""
    from diffusekit.data import load_dataset
    from diffusekit.parameterization import Denoiser
    from diffusekit.sampling.run import SampleSettings, generate

    objective, controlled = load_control_run(run_dir, device=device)
    x = load_dataset(objective.cfg.data, "test").x[:n]
    wanted = objective.hint(x)
    settings = SampleSettings(sampler=sampler, steps=steps, seeds=list(range(x.shape[0])), batch_size=batch_size)
    ours = generate(controlled, objective.schedule, objective.data_shape, settings, device=device,
                    progress=False, cond={"control": wanted.to(device)})
    base = generate(Denoiser(objective.module.base, objective.kind), objective.schedule, objective.data_shape,
                    settings, device=device, progress=False)
    score = lambda s: float(edge_correlation(objective.hint(s), wanted).mean())  # noqa: E731
    return {"n": float(x.shape[0]), "controlnet": score(ours), "base": score(base),
            "chance": float(edge_correlation(wanted.roll(1, 0), wanted).mean())}


def is_control_run(run_dir: Path | str) -> bool:
    from diffusekit.vae.evaluate import run_model_kind

    return run_model_kind(run_dir) == KIND


def control_images(paths, data_shape: tuple[int, ...]) -> Tensor:
    """Image files -> (n, C, H, W) in [-1, 1] at the run's size and channels, to take hints from; a bad
    file is a one-line ``DataError`` naming it (``data.images.read_image``)."""
    from diffusekit.data.images import read_image

    c, h, w = data_shape
    if h != w:
        raise ConfigError(f"--control-images needs a run on square images, this one has {h}x{w}")
    arrays = [read_image(p, h, c) for p in paths]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255 * 2 - 1)


def sample_command(args, make_settings) -> int:
    """``diffusekit sample`` for a ControlNet run: sample i asks for the hint of example seed_i (mod the
    split's size) of ``--control-from`` (default test); prints the mean edge correlation achieved."""
    import time
    from types import SimpleNamespace

    from diffusekit.data import load_dataset
    from diffusekit.sampling.run import generate, write_samples

    objective, denoiser = load_control_run(args.run, use_ema=args.ema)
    settings = make_settings(args, SimpleNamespace(cfg=objective.cfg, schedule=objective.schedule))
    scale = 1.0 if args.control_scale is None else args.control_scale
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"--control-scale must be a finite number >= 0, got {scale}")
    objective.module.scale = float(scale)
    if args.control_images and args.control_from is not None:
        raise ConfigError("--control-images and --control-from are alternatives; give one")
    if args.control_images:
        source = [str(p) for p in args.control_images]
        data = control_images(args.control_images, objective.data_shape)
    else:
        source = args.control_from or "test"
        try:
            data = load_dataset(objective.cfg.data, source).x
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"--control-from {source!r}: {exc}") from None
    wanted = objective.hint(data[torch.tensor(settings.seeds) % data.shape[0]])
    out = args.out or args.run / f"samples-{settings.sampler}-{settings.steps or objective.schedule.T}-control"
    t0 = time.time()
    x = generate(denoiser, objective.schedule, objective.data_shape, settings, progress=not args.no_progress,
                 cond={"control": wanted})
    write_samples(x, settings.seeds, out, settings,
                  extra={"run": str(args.run), "control_from": source, "hint": objective.cfg.controlnet.hint,
                         "control_scale": scale})
    corr = float(edge_correlation(objective.hint(x), wanted).mean())
    where = source if isinstance(source, str) else f"{len(source)} images"
    print(f"{len(settings.seeds)} samples in {time.time() - t0:.1f} s -> {out}; mean correlation of their "
          f"{objective.cfg.controlnet.hint} with the requested ones (from {where}): {corr:.3f}")
    return 0
