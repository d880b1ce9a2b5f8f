"""Sampling a text-conditioned latent model: prompts -> token features -> guided latents -> images.

Classifier-free guidance (``sampling.guidance.ClassifierFreeGuidance``) wraps the latent denoiser
unchanged; its null condition is the features of the empty caption "" with their own mask, made as
long as the batch's captions (padding is masked, so the length changes nothing). Every sample has
its own seed (``sampling.generate.generate``): a sample depends on its seed and prompt only, not on the
batch size or on the other prompts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffusekit.parameterization import DenoiserFn
from diffusekit.sampling.generate import generate
from diffusekit.sampling.guidance import ClassifierFreeGuidance
from diffusekit.schedules import DiscreteSchedule
from diffusekit.text import NULL_CAPTION, TextEncoder, TextFeatures

__all__ = ["null_text", "prompt_features", "sample_latents"]


def null_text(null: TextFeatures) -> Callable[[Any], dict]:
    """The null condition of a text batch: ``{"context", "context_mask"}`` -> the same keys holding the
    one row of ``null`` (features of "") for every example, padded to the batch's token count."""
    if len(null) != 1:
        raise ValueError(f"the null text condition must be one row, got {len(null)}")

    def null_cond(cond: Any) -> dict:
        if not isinstance(cond, dict) or not isinstance(cond.get("context_mask"), Tensor):
            raise ValueError("text guidance needs cond = {'context': tokens, 'context_mask': mask}")
        b, length = cond["context_mask"].shape
        feats = null.pad_to(length).to(cond["context"].device)
        return {**cond, "context": feats.tokens.expand(b, -1, -1), "context_mask": feats.mask.expand(b, -1)}

    return null_cond


def prompt_features(encoder: TextEncoder, prompts: Sequence[str], n: int) -> tuple[TextFeatures, TextFeatures]:
    """(features of prompt i % len(prompts) for i < n, features of ""), encoded in one call."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    feats = encoder.encode(prompts + [NULL_CAPTION])
    rows = torch.arange(n) % len(prompts)
    return feats[rows], feats[len(prompts):]


def sample_latents(denoiser: DenoiserFn, schedule: DiscreteSchedule, latent_shape: Sequence[int], settings,
                   text: TextFeatures, null: TextFeatures, device: torch.device | str = "cpu",
                   progress: bool = False, stats: dict[str, Any] | None = None) -> Tensor:
    """Latents (len(seeds), *latent_shape) for the per-seed ``text`` features, guided with scale
    ``settings.guidance`` toward them and away from ``null`` (eps_null + s (eps_text - eps_null))."""
    if len(text) != len(settings.seeds):
        raise ValueError(f"{len(text)} text conditions for {len(settings.seeds)} seeds")
    guided = ClassifierFreeGuidance(denoiser, settings.guidance, null_text(null))
    plain = settings.replace(guidance=1.0, classes=None)  # guidance is applied by the wrapper
    return generate(guided, schedule, tuple(latent_shape), plain, device=device, cond=text.to(device).as_cond(),
                    progress=progress, stats=stats)
