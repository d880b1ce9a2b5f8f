"""Likelihood baselines in the same units (bits/dim on the same split), so a bound has a meaning.

Data are on ``levels`` equally spaced values in [-1, 1] (bin width delta = 2 / (levels - 1)).

- ``categorical_baseline``: every dimension an independent categorical over the levels, fitted on
  the train split with add-``alpha`` smoothing; exact discrete NLL on the test split.
- ``gaussian_baseline``: one full-covariance Gaussian fitted to uniformly dequantized train data;
  on the test split, E_u[-log p(x + u)] - D log(delta) with u ~ U(-delta/2, delta/2)^D, which is an
  upper bound on the discrete NLL of the bins (Jensen; Theis et al. 2016).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["to_level_index", "categorical_baseline", "gaussian_baseline"]


def to_level_index(x: Tensor, levels: int) -> Tensor:
    """Integer level 0..levels-1 of data scaled to [-1, 1]."""
    return torch.round((x.double() + 1) * (levels - 1) / 2).long().clamp(0, levels - 1)


def categorical_baseline(train: Tensor, test: Tensor, levels: int, alpha: float = 0.5) -> float:
    """Bits/dim of independent per-dimension categorical distributions (add-alpha smoothing)."""
    tr = to_level_index(train, levels).reshape(train.shape[0], -1)
    te = to_level_index(test, levels).reshape(test.shape[0], -1)
    dims = tr.shape[1]
    counts = torch.zeros(dims, levels, dtype=torch.float64)
    counts.scatter_add_(1, tr.T, torch.ones_like(tr.T, dtype=torch.float64))
    log_p = torch.log(counts + alpha) - math.log(tr.shape[0] + alpha * levels)
    nll = -log_p.gather(1, te.T).sum(0)  # per test example, nats
    return nll.mean().item() / (dims * math.log(2))


def gaussian_baseline(train: Tensor, test: Tensor, levels: int, samples: int = 4, seed: int = 0) -> float:
    """Bits/dim (upper bound) of a full-covariance Gaussian on dequantized data."""
    g = torch.Generator().manual_seed(seed)
    delta = 2.0 / (levels - 1)
    tr = train.double().reshape(train.shape[0], -1)
    te = test.double().reshape(test.shape[0], -1)
    dims = tr.shape[1]
    deq = lambda x: x + (torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5) * delta
    fit = torch.cat([deq(tr) for _ in range(samples)])
    mean = fit.mean(0)
    cov = torch.cov(fit.T).reshape(dims, dims) + 1e-9 * torch.eye(dims, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    nll = torch.stack([-dist.log_prob(deq(te)) for _ in range(samples)]).mean(0) - dims * math.log(delta)
    return nll.mean().item() / (dims * math.log(2))
