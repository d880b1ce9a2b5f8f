"""Captions for labelled digit images (digits, MNIST-5k), made from the class labels.

Training draws one of ``TRAIN_TEMPLATES`` per example (from a seeded generator); the
``HELDOUT_TEMPLATES`` are paraphrases never seen in training, used only at test time: if samples
prompted with them still show the right digit, the conditioning generalizes through the text
encoder's meaning rather than memorizing a few strings. ``{d}`` is the numeral ("7"), ``{w}`` the
word ("seven").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["DIGIT_WORDS", "TRAIN_TEMPLATES", "HELDOUT_TEMPLATES", "caption", "caption_grid", "prompts_for"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a handwritten {d}",
    "the digit {w}",
    "number {w}",
    "a {d} written by hand",
    "handwritten digit {w}",
    "the number {d}",
)
HELDOUT_TEMPLATES = (
    "an image of the numeral {w}",
    "a picture showing a {d}",
    "someone wrote the figure {w}",
)


def caption(label: int, template: str) -> str:
    """The caption of digit ``label`` under ``template``."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must lie in 0..9, got {label}")
    return template.format(d=int(label), w=DIGIT_WORDS[int(label)])


def caption_grid(templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
    """All captions, digit-major: row ``label * len(templates) + j`` is digit ``label`` under template j."""
    return [caption(label, t) for label in range(10) for t in templates]


def prompts_for(labels: Tensor | Sequence[int], templates: Sequence[str], generator: torch.Generator | None = None
                ) -> list[str]:
    """One caption per label: template i % len(templates) in turn, or drawn from ``generator``."""
    labels = [int(v) for v in labels]
    if generator is None:
        picks = [i % len(templates) for i in range(len(labels))]
    else:
        picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    return [caption(label, templates[j]) for label, j in zip(labels, picks)]
