"""Pictures the notes draw, for a trained run's report.

- ``plot_diffusion_kernel``: the figures of Manwani, "Diffusion Models" (IIIT Hyderabad), slides
  "Example: Diffusion Kernel" and "Example: Marginal Diffusion Density q(z_t)": the kernel
  q(x_t | x_0 = x*) with its mean and +-2 sigma band over t, and the marginal q(x_t) of a 1-D data
  distribution (the oracle mixture) as a density image over (t, x).
- ``save_noising_strip``: x_t = alpha_t x_0 + sigma_t eps for a few images at several t.
- ``plot_vlb_terms``: the per-t terms L_{t-1} of the bound (Vidal, "Deep Generative Models" (Fall 2025),
  slide "Interpretation of the ELBO for MHVAE").
- ``plot_class_histogram``: classes of samples (by the feature classifier) beside the data's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from diffusekit.gaussian import q_sample
from diffusekit.oracle import default_mixture
from diffusekit.schedules import DiscreteSchedule
from diffusekit.viz import _figure, _save_figure, save_image_grid

__all__ = ["plot_diffusion_kernel", "save_noising_strip", "plot_vlb_terms", "plot_class_histogram"]


def _two_panels():
    fig, axes = _figure(1, 2, size=(10, 3.6))
    return fig, axes[0, 0], axes[0, 1]


def _save(fig, path: Path | str) -> Path:
    return _save_figure(fig, path)


def plot_diffusion_kernel(schedule: DiscreteSchedule, path: Path | str, x_star: float = 2.0, mixture=None) -> Path:
    """Two panels over t = 0..T: the kernel q(x_t | x_0 = x_star) (mean and +-2 sigma band) and the
    exact marginal density q(x_t) of ``mixture`` (default: the 1-D oracle mixture)."""
    mixture = mixture or default_mixture(1)
    t = np.arange(schedule.T + 1)
    alpha, sigma = schedule.alpha.numpy(), schedule.sigma.numpy()
    fig, ax1, ax2 = _two_panels()
    ax1.plot(t, alpha * x_star, color="C0", label=r"mean $\sqrt{\bar\alpha_t}\,x^*$")
    ax1.fill_between(t, alpha * x_star - 2 * sigma, alpha * x_star + 2 * sigma, color="C0", alpha=0.2,
                     label=r"$\pm 2\sqrt{1-\bar\alpha_t}$")
    ax1.set(xlabel="t", ylabel="$x_t$", title=f"diffusion kernel $q(x_t | x_0 = {x_star:g})$")
    ax1.legend(fontsize=8, loc="upper right")
    xs = torch.linspace(-3.5, 3.5, 281, dtype=torch.float64)[:, None]
    cols = np.linspace(0, schedule.T, min(schedule.T + 1, 200)).round().astype(int)
    dens = np.stack([torch.exp(mixture.log_prob(xs, float(alpha[c]), float(sigma[c]))).numpy() for c in cols], 1)
    ax2.imshow(dens, origin="lower", aspect="auto", extent=(0, schedule.T, -3.5, 3.5), cmap="magma")
    ax2.set(xlabel="t", ylabel="$x_t$", title="marginal $q(x_t)$ of a 1-D mixture")
    return _save(fig, path)


def save_noising_strip(x0: Tensor, schedule: DiscreteSchedule, path: Path | str, n_steps: int = 8,
                       seed: int = 0, levels: int | None = None) -> Path:
    """Rows: images; columns: x_t at ``n_steps`` times from t = 0 to T (same noise along a row)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ts = np.linspace(0, schedule.T, n_steps).round().astype(int)
    frames = []
    for t in ts:
        if t == 0:
            frames.append(x0)
        else:
            frames.append(q_sample(x0, torch.full((x0.shape[0],), int(t)), schedule, noise))
    strip = torch.stack(frames, 1).reshape(-1, *x0.shape[1:]).clamp(-1, 1)
    return save_image_grid(strip, path, nrow=n_steps)


def plot_vlb_terms(term_bpd: Sequence[float], path: Path | str, prior_bpd: float | None = None,
                   title: str = "terms of the bound") -> Path:
    """Per-t terms of the bound in bits/dim (log scale), with L_0 marked and the cumulative share."""
    y = np.asarray(term_bpd, dtype=np.float64)
    t = np.arange(1, y.size + 1)
    fig, ax1, ax2 = _two_panels()
    ax1.semilogy(t[1:], np.clip(y[1:], 1e-12, None), color="C0", lw=1, label=r"$L_{t-1}$, t >= 2")
    ax1.scatter([1], [max(y[0], 1e-12)], color="C3", zorder=3, label=f"$L_0$ = {y[0]:.3f}")
    ax1.set(xlabel="t", ylabel="bits/dim", title=title)
    ax1.set_xscale("log")
    ax1.legend(fontsize=8)
    total = y.sum() + (prior_bpd or 0.0)
    ax2.plot(t, np.cumsum(y) / total, color="C1")
    ax2.set(xlabel="t", ylabel="share of the bound", title=f"cumulative share (total {total:.3f} bits/dim)",
            xscale="log", ylim=(0, 1.02))
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def plot_class_histogram(sample_counts: Sequence[int], reference_counts: Sequence[int], path: Path | str,
                         title: str = "predicted classes of the samples") -> Path:
    """Share of samples the feature classifier puts in each class, beside the held-out split's true
    class shares (a missing or swollen bar is a dropped or over-produced mode)."""
    s = np.asarray(sample_counts, dtype=np.float64)
    r = np.asarray(reference_counts, dtype=np.float64)
    if s.shape != r.shape or s.sum() <= 0 or r.sum() <= 0:
        raise ValueError(f"class histograms must have the same length and positive totals, got {s} and {r}")
    k = np.arange(s.size)
    fig, axes = _figure(1, 1, size=(6, 3))
    ax = axes[0, 0]
    ax.bar(k - 0.2, s / s.sum(), width=0.4, label=f"samples (n={int(s.sum())})", color="C0")
    ax.bar(k + 0.2, r / r.sum(), width=0.4, label=f"held-out data (n={int(r.sum())})", color="C7")
    ax.set(xticks=k, xlabel="class", ylabel="share", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)
