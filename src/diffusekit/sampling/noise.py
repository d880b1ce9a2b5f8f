"""Per-sample seeded noise: sample i depends only on its seed, whatever the batch.

EDM's ``StackedRandomGenerator`` idea: every example owns a ``torch.Generator``; each row of every
draw comes from its own generator on the CPU (the CPU stream is the same on every machine), so the
initial x_T and every later z of "Algorithm 2 Sampling" (Vidal, "Deep Generative Models" (Fall 2025))
for seed s are the same numbers whether s is
sampled alone or as row 37 of a batch of 64.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PerSampleNoise"]


class PerSampleNoise:
    """Callable noise source: each call returns the next (B, *shape) standard normal tensor.

    Row i comes from ``torch.Generator().manual_seed(seeds[i])`` alone; draws happen on the CPU in
    ``dtype`` and are moved to ``device``. The first call is conventionally x_T. To keep the
    per-step cost low, each generator draws ``chunk`` calls' worth at once, (chunk, *shape), and
    the calls are served from that block; ``chunk`` depends only on the per-example shape (about
    1 MB of float32 per row, at most 16), never on the batch, so it is part of the stream's
    definition and sample i is the same in any batch.
    """

    MAX_CHUNK = 16
    CHUNK_ELEMENTS = 2**18

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("PerSampleNoise needs at least one seed")
        self.seeds = seeds
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.chunk = self.chunk_size(self.shape)
        self._block: Tensor | None = None  # (B, chunk, *shape) on device
        self._pos = self.chunk

    @classmethod
    def chunk_size(cls, shape: Sequence[int]) -> int:
        """Draws per generator call for a per-example ``shape`` (a function of the shape only)."""
        numel = max(1, math.prod(shape))
        return max(1, min(cls.MAX_CHUNK, cls.CHUNK_ELEMENTS // numel))

    def __len__(self) -> int:
        return len(self.seeds)

    def __call__(self) -> Tensor:
        if self._pos == self.chunk:
            block = torch.empty((len(self.seeds), self.chunk) + self.shape, dtype=self.dtype)
            for row, gen in zip(block, self.generators):
                torch.randn(row.shape, generator=gen, dtype=self.dtype, out=row)
            self._block = block.to(self.device) if self.device.type != "cpu" else block
            self._pos = 0
        out = self._block[:, self._pos].contiguous()  # blocks are never rewritten: callers may keep it
        self._pos += 1
        return out
