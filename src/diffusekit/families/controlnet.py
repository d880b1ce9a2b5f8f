"""The ControlNet family (``model.kind = "controlnet"``): hints, loss, loading, sampling, evaluation.

A trainable copy of the encoder of a frozen U-Net, joined to it through zero-initialised 1x1
convolutions (``nn.controlnet``; Zhang et al. 2023), learns to make samples follow a control image.
The frozen base is the EMA network of ``controlnet.base_run`` (a discrete-time ``model.kind = "unet"``
run); its schedule and prediction kind are used as they were trained (the run's own ``[diffusion]``
and ``model.prediction`` are ignored, ``[model]``'s architecture keys too: the ControlNet copies the
base). The control image of an example is computed from the example itself (``controlnet.hint``):

    edges(x) = sqrt(G_x^2 + G_y^2) / 4,    G = Sobel filters on the channel mean, edges replicated

so training needs no extra data: the loss is the base family's per-example denoising loss of
``ControlledUNet`` with control = edges(x0) (Zhang et al. 2023, eq. 5). Sampling asks for the edges
of given images; ``edge_agreement`` measures how well the samples' own edges follow them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.images import read_image
from diffusekit.data.registry import load_dataset
from diffusekit.errors import ConfigError
from diffusekit.families import diffusion
from diffusekit.families.base import EvaluateSettings, Evaluation, Model, SampleRequest, Samples, load_run_dependency
from diffusekit.io.checkpoint import load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.nn.controlnet import ControlledUNet, ControlNet
from diffusekit.parameterization import Denoiser
from diffusekit.sampling.generate import generate
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule

__all__ = ["KIND", "sobel_edges", "make_hint", "edge_correlation", "ControlObjective", "build_objective", "ControlNetModel", "load",
           "sample", "edge_agreement", "evaluate", "control_images"]

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


def _load_base(cfg: Config, data_shape: tuple[int, ...] | None) -> diffusion.DiffusionModel:
    """The frozen base: the EMA weights of ``controlnet.base_run``, a discrete-time unet run."""
    return load_run_dependency(cfg.controlnet.base_run, f"controlnet.base_run = {cfg.controlnet.base_run!r}",
                               "a discrete-time model.kind = 'unet' run",
                               lambda rc: rc.kind == "unet" and rc.cfg.loss.objective == "discrete", diffusion.load,
                               data_shape, "the base models")


class ControlObjective(diffusion.DiffusionObjective):
    """The denoising loss of the frozen base's family, for ``ControlledUNet`` with the hint of each example."""

    def __init__(self, cfg: Config, data_shape: tuple[int, ...]):
        if cfg.loss.objective != "discrete":
            raise ConfigError(f"model.kind = {KIND!r} trains the discrete-time loss; set loss.objective = 'discrete'")
        self.cfg, self.data_shape = cfg, tuple(data_shape)
        with torch.random.fork_rng(devices=[]):  # loading the base leaves the caller's RNG alone
            base = _load_base(cfg, self.data_shape)
        self.base_cfg, self.schedule, self.kind = base.cfg, base.schedule, base.cfg.model.prediction
        self.module = ControlledUNet(base.denoiser.net, ControlNet(base.denoiser.net, hint_channels=1))

    def hint(self, x: Tensor) -> Tensor:
        return make_hint(self.cfg.controlnet.hint, x)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        return super().loss(module, x0, labels, generator, extra_cond={"control": self.hint(x0)})

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n samples (DDPM, <= 100 steps) asked for the edges of the first n test images."""
        with torch.random.fork_rng(devices=[]):
            x = load_dataset(self.cfg.data, "test").x[:n]
        return generate(self.denoiser(module).eval(), self.schedule, self.data_shape,
                        diffusion.preview_settings(x.shape[0], self.schedule.T), device=device, progress=False,
                        cond={"control": self.hint(x).to(device)})


def build_objective(cfg: Config, data: ArrayDataset) -> ControlObjective:
    """The trainer's objective: a ControlNet over the base of ``controlnet.base_run`` for ``data``."""
    diffusion.check_class_labels(cfg, data)
    return ControlObjective(cfg, data.shape)


@dataclass
class ControlNetModel(Model):
    """A trained ControlNet over its frozen base: the controlled denoiser, the base's schedule, the module
    (whose ``scale`` multiplies the residuals) and the objective that rebuilds hints."""

    objective: ControlObjective | None = None
    denoiser: Denoiser | None = None
    schedule: DiscreteSchedule | None = None

    def hint(self, x: Tensor) -> Tensor:
        return self.objective.hint(x)

    def sample_dir_name(self, settings: SampleSettings) -> str:
        return f"samples-{settings.sampler}-{settings.steps or self.schedule.T}-control"


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> ControlNetModel:
    """A trained ControlNet run: the objective rebuilt from the recorded config (its base run must still
    exist), the weights from the newest checkpoint."""
    objective = ControlObjective(rc.cfg, rc.data_shape)
    load_module_state(objective.module, *rc.weights(use_ema))
    objective.module.to(device).eval()
    return ControlNetModel(rc.run_dir, rc.cfg, rc.data_shape, rc.levels, rc.step, rc.path,
                           objective=objective, denoiser=objective.denoiser(objective.module), schedule=objective.schedule)


def control_images(paths: list[Path], data_shape: tuple[int, ...]) -> Tensor:
    """Image files -> (n, C, H, W) in [-1, 1] at the run's size and channels, to take hints from; a bad
    file is a one-line ``DataError`` naming it (``data.images.read_image``)."""
    c, h, w = data_shape
    if h != w:
        raise ConfigError(f"--control-images needs a run on square images, this one has {h}x{w}")
    arrays = [read_image(p, h, c) for p in paths]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255 * 2 - 1)


def sample(model: ControlNetModel, settings: SampleSettings, request: SampleRequest,
           device: str | torch.device = "cpu", progress: bool = True) -> Samples:
    """Sample i asks for the hint of example seed_i (mod the split's size) of ``request.control_from``
    (default test), or of image i % n of ``request.control_images``; ``control_scale`` multiplies the
    residuals (0 = the base model). Notes the mean edge correlation achieved."""
    scale = 1.0 if request.control_scale is None else request.control_scale
    if not (math.isfinite(scale) and 0 <= scale <= 100):
        raise ConfigError(f"--control-scale must be a finite number in [0, 100], got {scale}")
    if request.control_images and request.control_from is not None:
        raise ConfigError("--control-images and --control-from are alternatives; give one")
    if request.control_images:
        source: Any = [str(p) for p in request.control_images]
        data = control_images(request.control_images, model.data_shape)
    else:
        source = request.control_from or "test"
        if source not in ("train", "test"):
            raise ConfigError(f"--control-from must be 'train' or 'test', got {source!r}")
        data = load_dataset(model.cfg.data, source).x
    wanted = model.hint(data[torch.tensor(settings.seeds) % data.shape[0]])
    model.objective.module.scale = float(scale)
    x = generate(model.denoiser, model.schedule, model.data_shape, settings, device=device, progress=progress,
                 cond={"control": wanted})
    corr = float(edge_correlation(model.hint(x), wanted).mean())
    where = source if isinstance(source, str) else f"{len(source)} images"
    note = (f"mean correlation of their {model.cfg.controlnet.hint} with the requested ones (from {where}): "
            f"{corr:.3f}")
    return Samples(x, extra={"control_from": source, "hint": model.cfg.controlnet.hint, "control_scale": scale},
                   note=note)


@torch.no_grad()
def edge_agreement(model: ControlNetModel, settings: SampleSettings, n: int = 200,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Ask the ControlNet for the hints of the first ``n`` test images; return the mean correlation
    between the hint of each sample and the requested hint ("controlnet"), the same for the base alone
    on the same seeds ("base"), and between the requested hints and those of the test images shifted
    by one ("chance": unrelated digits)."""
    x = load_dataset(model.cfg.data, "test").x[:n]
    wanted = model.hint(x)
    settings = settings.replace(seeds=list(range(x.shape[0])))
    ours = generate(model.denoiser, model.schedule, model.data_shape, settings, device=device, progress=False,
                    cond={"control": wanted.to(device)})
    base = generate(Denoiser(model.objective.module.base, model.objective.kind), model.schedule, model.data_shape,
                    settings, device=device, progress=False)
    score = lambda s: float(edge_correlation(model.hint(s), wanted).mean())  # noqa: E731
    return {"n": float(x.shape[0]), "controlnet": score(ours), "base": score(base),
            "chance": float(edge_correlation(wanted.roll(1, 0), wanted).mean())}


def evaluate(model: ControlNetModel, settings: EvaluateSettings, out_dir: Path, progress: bool = True) -> Evaluation:
    """How well samples follow requested hints (``edge_agreement``) on ``n_samples`` (default 200) test
    images, with ``sampler`` (default ddim), ``steps`` (default 100) and ``grid`` (default: the sampler's)."""
    if settings.guidance is not None:
        raise ConfigError(f"--guidance: {model.source} is a ControlNet run (its base samples with the null label)")
    sampling = SampleSettings(sampler=settings.sampler or "ddim", steps=100 if settings.steps is None else settings.steps,
                              batch_size=200, **({"grid": settings.grid} if settings.grid is not None else {}))
    sampling.check(lambda f: f"--{f}", T=model.schedule.T)
    result = edge_agreement(model, sampling, n=settings.n_samples or 200)
    rows = [("run", str(model.source)), ("checkpoint step", str(model.step)),
            ("sampler", f"{sampling.sampler}, {sampling.steps} steps"), ("test images", f"{result['n']:.0f}"),
            ("edge correlation, ControlNet", f"{result['controlnet']:.4f}"),
            ("edge correlation, base alone", f"{result['base']:.4f}"),
            ("edge correlation, unrelated images (chance)", f"{result['chance']:.4f}")]
    return Evaluation({"run": str(model.source), "step": model.step, **result}, rows)
