"""Sampling a text-conditioned latent model: prompts -> token features -> guided latents -> images.

Classifier-free guidance (``sampling.guidance.ClassifierFreeGuidance``) wraps the latent denoiser
unchanged; its null condition is the features of the empty caption "" with their own mask, made as
long as the batch's captions (padding is masked, so the length changes nothing). Every sample has
its own seed (``sampling.generate.generate``): a sample depends on its seed and prompt only, not on the
batch size or on the other prompts.

A prompt whose clauses are joined by " AND " (``AND``, upper case as in Liu et al. 2022's released code)
is sampled as the AND of its clauses (``sampling.guidance.ComposedGuidance``): each clause is encoded on its
own and the guided noise is eps_null + s sum_k (eps(c_k) - eps_null). A batch holding prompts with different
numbers of clauses pads the shorter ones with masked clauses (the null caption's features), which add
nothing; a prompt without " AND " in such a batch is then the plain guided prompt up to the network's batch
invariance (its rows share a call with the others' clauses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.parameterization import DenoiserFn
from diffusekit.sampling.generate import generate
from diffusekit.sampling.guidance import ClassifierFreeGuidance, ComposedGuidance
from diffusekit.schedules import DiscreteSchedule
from diffusekit.text import NULL_CAPTION, TextEncoder, TextFeatures

__all__ = ["AND", "ClauseFeatures", "check_prompts", "clause_features", "is_composed", "null_text", "prompt_features",
           "sample_latents", "split_clauses", "text_condition", "text_guidance"]

AND = " AND "  # joins the clauses of a composed prompt
MAX_CLAUSES = 8  # each clause is a batch of network rows per step


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


def split_clauses(prompt: str) -> list[str]:
    """The clauses of ``prompt`` split at " AND " (a prompt without it is one clause); an empty clause, as in
    "a 3 AND " or "AND a 7", is a ValueError naming the prompt."""
    clauses = [c.strip() for c in f" {prompt} ".split(AND)]
    if len(clauses) > 1 and not all(clauses):
        raise ValueError(f"prompt {prompt!r} has an empty clause around ' AND '; write 'a 3 on the left AND a 7 "
                         "on the right'")
    if len(clauses) > MAX_CLAUSES:
        raise ValueError(f"prompt {prompt[:60]!r}... has {len(clauses)} clauses joined by ' AND '; at most "
                         f"{MAX_CLAUSES} (each costs a network pass per step)")
    return clauses if len(clauses) > 1 else [prompt]


def check_prompts(prompts: Sequence[str]) -> None:
    """A one-line ConfigError naming --prompt for a prompt ``split_clauses`` refuses (an empty clause around
    " AND ", more than ``MAX_CLAUSES`` clauses)."""
    for p in prompts:
        try:
            split_clauses(p)
        except ValueError as e:
            raise ConfigError(f"--prompt: {e}") from None


def is_composed(prompts: Sequence[str]) -> bool:
    """True when some prompt joins clauses with " AND "."""
    return any(len(split_clauses(p)) > 1 for p in prompts)


@dataclass
class ClauseFeatures:
    """Token features of composed prompts: ``tokens`` (N, K, L, D), ``mask`` (N, K, L) and ``present`` (N, K),
    clause k of prompt n; a prompt with fewer than K clauses has its last ones absent, holding the null
    caption's features."""

    tokens: Tensor
    mask: Tensor
    present: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def clauses(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> ClauseFeatures:
        return ClauseFeatures(self.tokens.to(device), self.mask.to(device), self.present.to(device))

    def as_cond(self) -> dict[str, Tensor]:
        """``ComposedGuidance``'s condition: {"context", "context_mask", "clause_mask"}."""
        return {"context": self.tokens, "context_mask": self.mask, "clause_mask": self.present}


def clause_features(encoder: TextEncoder, prompts: Sequence[str], n: int) -> tuple[ClauseFeatures, TextFeatures]:
    """(the clauses of prompt i % len(prompts) for i < n, features of ""), every clause encoded in one call."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    split = [split_clauses(p) for p in prompts]
    flat = [c for clauses in split for c in clauses]
    feats = encoder.encode(flat + [NULL_CAPTION])
    null = feats[len(flat):]
    k = max(len(clauses) for clauses in split)
    rows, start = [], 0
    for clauses in split:  # row of each clause in feats, the null row for the padding
        rows.append(list(range(start, start + len(clauses))) + [len(flat)] * (k - len(clauses)))
        start += len(clauses)
    index = torch.tensor(rows)[torch.arange(n) % len(prompts)]  # (n, K)
    present = torch.tensor([[j < len(c) for j in range(k)] for c in split])[torch.arange(n) % len(prompts)]
    return ClauseFeatures(feats.tokens[index], feats.mask[index], present), null


def text_condition(encoder: TextEncoder, prompts: Sequence[str],
                   n: int) -> tuple[TextFeatures | ClauseFeatures, TextFeatures]:
    """``clause_features`` when a prompt has " AND ", else ``prompt_features``."""
    composed = is_composed(prompts)
    return (clause_features if composed else prompt_features)(encoder, prompts, n)


def text_guidance(denoiser: DenoiserFn, scale: float, text: TextFeatures | ClauseFeatures,
                  null: TextFeatures) -> ClassifierFreeGuidance | ComposedGuidance:
    """The guided denoiser of ``text``: classifier-free guidance, or its AND over the clauses."""
    if isinstance(text, ClauseFeatures):
        return ComposedGuidance(denoiser, scale, null_text(null), text.clauses)
    return ClassifierFreeGuidance(denoiser, scale, null_text(null))


def sample_latents(denoiser: DenoiserFn, schedule: DiscreteSchedule, latent_shape: Sequence[int], settings,
                   text: TextFeatures | ClauseFeatures, null: TextFeatures, device: torch.device | str = "cpu",
                   progress: bool = False, stats: dict[str, Any] | None = None) -> Tensor:
    """Latents (len(seeds), *latent_shape) for the per-seed ``text`` features, guided with scale
    ``settings.guidance`` toward them and away from ``null`` (eps_null + s (eps_text - eps_null)); for
    ``ClauseFeatures``, toward each clause (``ComposedGuidance``)."""
    if len(text) != len(settings.seeds):
        raise ValueError(f"{len(text)} text conditions for {len(settings.seeds)} seeds")
    guided = text_guidance(denoiser, settings.guidance, text, null)
    plain = settings.replace(guidance=1.0, classes=None)  # guidance is applied by the wrapper
    return generate(guided, schedule, tuple(latent_shape), plain, device=device, cond=text.to(device).as_cond(),
                    progress=progress, stats=stats)
