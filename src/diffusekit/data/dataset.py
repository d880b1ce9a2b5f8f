"""The one in-memory dataset container every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ArrayDataset"]


@dataclass
class ArrayDataset:
    """A whole dataset held in memory.

    ``x`` is float32, either images (N, C, H, W) scaled to [-1, 1] or vectors (N, D); ``labels`` are
    int64 (N,) or None; ``levels`` is the number of discrete values each data coordinate can take
    (17 for sklearn digits, 256 for 8-bit images, None for continuous data: the likelihood report
    needs it to turn densities into bits/dim); ``num_classes`` is 0 for unlabeled data.
    """

    x: Tensor
    labels: Tensor | None
    levels: int | None
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.dtype != torch.float32 or self.x.ndim not in (2, 4):
            raise ValueError(f"{self.name}: x must be a float32 tensor (N, D) or (N, C, H, W), "
                             f"got {getattr(self.x, 'dtype', type(self.x))} {tuple(getattr(self.x, 'shape', ()))}")
        if self.labels is not None and (self.labels.dtype != torch.int64 or self.labels.shape != self.x.shape[:1]):
            raise ValueError(f"{self.name}: labels must be int64 ({self.x.shape[0]},), "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")
        if (self.labels is None) != (self.num_classes == 0):
            raise ValueError(f"{self.name}: num_classes must be 0 exactly when there are no labels")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example: (C, H, W) or (D,)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: Tensor, name: str | None = None) -> "ArrayDataset":
        """The examples at ``index`` (an int64 tensor of positions), as a new dataset."""
        return ArrayDataset(self.x[index], None if self.labels is None else self.labels[index], self.levels,
                            self.num_classes, name or self.name)
