"""Training-time augmentation: random horizontal flips (``data.hflip``).

The coin flips come from a generator the caller passes (the trainer's checkpointed noise stream), never
from a global RNG, so a run that is stopped and resumed draws the same flips as one that never stopped.
Ho et al. (2020), Appendix B, train their CIFAR-10 model with random horizontal flips.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_hflip"]


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of ``x`` (N, C, H, W) mirrored left-right with probability 1/2; N coin flips drawn from
    ``generator`` (a CPU generator: the flips do not depend on the device)."""
    if x.ndim != 4:
        raise ValueError(f"random_hflip needs images (N, C, H, W), got shape {tuple(x.shape)}")
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
