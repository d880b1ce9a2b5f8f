"""The continuous family: ``model.kind`` = unet | mlp with ``loss.objective = "continuous"``, trained on
the continuous-time ELBO of Kingma et al. (2021) or a weighted objective of Kingma & Gao (2023), maybe
with a learned log-SNR schedule (``continuous.module.ContinuousDiffusion``: the network and lambda(t) in
one module). Loaded, it is a ``DiffusionModel`` whose schedule is lambda(t) laid out on diffusion.T
steps, so it samples, evaluates and restores as the diffusion family does (plus its continuous bound).

``loss.t_sampling = "importance"`` (fixed schedules only) draws t from the binned proposal of
``timestep_proposal.BinnedTimeProposal`` and weights the diffusion term, not the t-free prior and
reconstruction terms, by 1 / q(t); the derivation is in ``diffusekit.timestep_proposal``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.continuous.elbo import continuous_bound, prior_kl_at, reconstruction_nll, sample_times
from diffusekit.continuous.module import build_continuous_module, load_continuous
from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import ConfigError
from diffusekit.families.base import TimeHistoryState
from diffusekit.families.diffusion import DiffusionModel, check_class_labels, drop_labels, preview_settings
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.sampling.generate import generate
from diffusekit.timestep_proposal import BinnedTimeProposal
from diffusekit.train.distributed import gather_tensors

__all__ = ["ContinuousObjective", "load"]


class ContinuousObjective(TimeHistoryState):
    """The trainer's ``Objective`` for ``loss.objective = "continuous"``: the whole loss is the module's
    forward, so DistributedDataParallel wraps it and a learned schedule trains with the network.

    With ``loss.t_sampling = "importance"`` it keeps ``t_history`` (``timestep_proposal.BinnedTimeProposal``:
    the recent diffusion terms D in each of B bins of t), draws t from its proposal and returns
    C + D / q(t) per example (C: the prior and reconstruction terms, which do not depend on t); ``state_tensors``
    / ``load_state_tensors`` carry the history through checkpoints (``objective.t_history.*``)."""

    t_history: BinnedTimeProposal | None = None  # loss.t_sampling = "importance" only

    def __init__(self, cfg: Config, data: ArrayDataset):
        check_class_labels(cfg, data)
        if cfg.model.bound_clip and data.levels is None:
            raise ConfigError(f"model.bound_clip = true needs image data on discrete levels in [-1, 1]; data.name = "
                              f"{cfg.data.name!r} is continuous")
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        self.module = build_continuous_module(cfg, self.data_shape, data.levels)
        lc = cfg.loss
        self.t_sampling = "antithetic" if lc.t_sampling == "stratified" else "uniform"
        if lc.t_sampling == "importance":
            self.t_history = BinnedTimeProposal(lc.importance_history, lc.importance_uniform)

    def t_free_terms(self, x0: Tensor, noise: Tensor, like: Tensor) -> Tensor:
        """C per example in bits/dim as ``like``: prior + reconstruction, computed as the module adds them
        to the ELBO (``weighting = "elbo"``), else zero (L_w has no t-free terms)."""
        m = self.module
        if m.weighting != "elbo":
            return torch.zeros_like(like)
        with torch.no_grad():
            const = prior_kl_at(x0, m.schedule.logsnr_min) + reconstruction_nll(x0, m.schedule.logsnr_max, noise,
                                                                               m.levels)
        return (const / (x0[0].numel() * math.log(2.0))).to(like)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """Per-example losses (bits/dim) at t drawn by ``loss.t_sampling``. Importance sampling appends the
        unweighted diffusion terms of every rank to ``t_history`` and, once it is full, returns C + D / q(t);
        before that the losses (and every draw) are those of ``loss.t_sampling = "uniform"``."""
        labels = drop_labels(labels, self.cfg, generator)
        history = self.t_history
        weighted = history is not None and history.full
        if history is None:
            t = sample_times(x0.shape[0], generator, self.t_sampling)
        else:
            t, bins, weights = history.draw(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        losses = module(x0, t.to(x0.device), noise, None if labels is None else {"class_labels": labels})
        if history is None:
            return losses
        const = self.t_free_terms(x0, noise, losses)
        diffusion = losses - const
        # every rank appends the same values in the same order, so the histories stay equal across ranks
        history.update(torch.cat(gather_tensors(bins)),
                       torch.cat(gather_tensors(diffusion.detach().to("cpu", torch.float64))))
        return const + diffusion * weights.to(losses.device, losses.dtype) if weighted else losses

    def heldout_bound(self, module: nn.Module, x: Tensor, seed: int) -> dict[str, Any]:
        """The continuous-time negative ELBO on ``x`` with ``module``'s weights (8 stratified draws of t per
        example), for the trainer's ``train.bound_every``."""
        b = continuous_bound(module.denoiser.eval(), module.schedule, x, module.levels, n_draws=8, seed=seed)
        return {"bits_per_dim": b.bits_per_dim, "stderr_bits_per_dim": b.stderr_bits_per_dim, "n_examples": x.shape[0],
                "variance": "continuous ELBO", "x0_clipped": module.clip_x0}

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        schedule = module.schedule.discretize(self.cfg.diffusion.T)
        return generate(module.denoiser.eval(), schedule, self.data_shape, preview_settings(n, schedule.T),
                        device=device, progress=False, num_classes=self.cfg.model.num_classes)


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> DiffusionModel:
    """A continuous run: samplers and the discrete bound get the table of lambda(t) on diffusion.T steps."""
    state, _, _ = rc.weights(use_ema)
    module = load_continuous(rc.cfg, rc.data_shape, rc.levels, state, rc.path).to(device)
    return DiffusionModel(rc.run_dir, rc.cfg, rc.data_shape, rc.levels, rc.step, rc.path,
                          denoiser=module.denoiser.eval(), schedule=module.schedule.discretize(rc.cfg.diffusion.T),
                          logsnr_schedule=module.schedule)
