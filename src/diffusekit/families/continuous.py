"""The continuous family: ``model.kind`` = unet | mlp with ``loss.objective = "continuous"``, trained on
the continuous-time ELBO of Kingma et al. (2021) or a weighted objective of Kingma & Gao (2023), maybe
with a learned log-SNR schedule (``continuous.module.ContinuousDiffusion``: the network and lambda(t) in
one module). Loaded, it is a ``DiffusionModel`` whose schedule is lambda(t) laid out on diffusion.T
steps, so it samples, evaluates and restores as the diffusion family does (plus its continuous bound).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.continuous.elbo import sample_times
from diffusekit.continuous.module import build_continuous_module, load_continuous
from diffusekit.data.dataset import ArrayDataset
from diffusekit.families.diffusion import DiffusionModel, check_class_labels, drop_labels, preview_settings
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.sampling.generate import generate

__all__ = ["ContinuousObjective", "load"]


class ContinuousObjective:
    """The trainer's ``Objective`` for ``loss.objective = "continuous"``: the whole loss is the module's
    forward, so DistributedDataParallel wraps it and a learned schedule trains with the network."""

    def __init__(self, cfg: Config, data: ArrayDataset):
        check_class_labels(cfg, data)
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        self.module = build_continuous_module(cfg, self.data_shape, data.levels)
        self.t_sampling = "antithetic" if cfg.loss.t_sampling == "stratified" else "uniform"

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        labels = drop_labels(labels, self.cfg, generator)
        t = sample_times(x0.shape[0], generator, self.t_sampling)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return module(x0, t.to(x0.device), noise, None if labels is None else {"class_labels": labels})

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        schedule = module.schedule.discretize(self.cfg.diffusion.T)
        return generate(module.denoiser.eval(), schedule, self.data_shape, preview_settings(n, schedule.T),
                        device=device, progress=False, num_classes=self.cfg.model.num_classes)


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> DiffusionModel:
    """A continuous run: samplers and the discrete bound get the table of lambda(t) on diffusion.T steps."""
    state, source, _ = rc.weights(use_ema)
    module = load_continuous(rc.cfg, rc.data_shape, rc.levels, state, rc.path).to(device)
    return DiffusionModel(rc.run_dir, rc.cfg, rc.data_shape, rc.levels, rc.step, rc.path,
                          denoiser=module.denoiser.eval(), schedule=module.schedule.discretize(rc.cfg.diffusion.T),
                          logsnr_schedule=module.schedule)
