"""Likelihood baselines against exact entropies."""

import math

import pytest
import torch

from diffusekit.evaluate.baselines import categorical_baseline, gaussian_baseline, to_level_index


def test_level_index_round_trips_the_grid():
    grid = torch.linspace(-1, 1, 17)
    assert torch.equal(to_level_index(grid, 17), torch.arange(17))


def test_categorical_baseline_reaches_the_entropy():
    """Independent dims with known categorical laws: bits/dim -> mean entropy (in bits) as n grows."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    def draw(n):
        idx = torch.stack([torch.multinomial(p, n, replacement=True, generator=g) for p in probs], 1)
        return idx.double() * 2 / 3 - 1
    entropy = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(1).mean().item()
    bpd = categorical_baseline(draw(200_000), draw(200_000), levels=4)
    assert bpd == pytest.approx(entropy, abs=2e-3)


def test_gaussian_baseline_is_an_upper_bound_close_to_the_entropy():
    """Data: a correlated 2-D Gaussian binned to 256 levels; the dequantized Gaussian bound must lie
    just above the entropy of the binned data (fine bins: H ~ h(density) - D log delta)."""
    g = torch.Generator().manual_seed(1)
    cov = torch.tensor([[0.04, 0.02], [0.02, 0.05]], dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    def draw(n):
        x = (torch.randn(n, 2, generator=g, dtype=torch.float64) @ L.T).clamp(-1, 1)
        return torch.round((x + 1) * 255 / 2) * 2 / 255 - 1
    delta = 2 / 255
    h = 0.5 * math.log((2 * math.pi * math.e) ** 2 * torch.det(cov).item())
    entropy_bits = (h - 2 * math.log(delta)) / (2 * math.log(2))
    n_test = 200_000
    bpd = gaussian_baseline(draw(100_000), draw(n_test), levels=256)
    # standard error of the test mean: -log p is const + chi^2_2 / 2, variance D / 2 nats^2
    se_bits = math.sqrt(2 / 2 / n_test) / (2 * math.log(2))
    assert abs(bpd - entropy_bits) < 4 * se_bits + 1e-3
