"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, sec. 4.3 and app. D.2;
the instantaneous change of variables of Chen et al. 2018, "Neural ODEs", Theorem 1).

If dx/dt = v(x, t) transports densities, then d/dt log p_t(x(t)) = -div v(x(t), t), so along the
trajectory from the data at t_min to t_max,

    log p_{t_min}(x) = log p_{t_max}(x(t_max)) + int_{t_min}^{t_max} div v(x(t), t) dt.

The ODE is integrated in the variables of ``sampling/ode.py``: y = x / a, u = log sigma, where
dy/du = v(y, u) = y - x0_hat(y, e^u) and div_y v = D - div_y x0_hat. The change from x to y adds
D log a at both ends: log p_x(x) = log p_y(x / a) - D log a. The divergence is either exact (D
backward passes per evaluation, for small D) or Hutchinson's estimate z^T (dv/dy) z with one probe z
per example held fixed along the trajectory (Grathwohl et al. 2019, FFJORD), Rademacher or Gaussian,
drawn from a generator seeded by (seed, example index): unbiased, E[z^T J z] = tr J.

The density is that of the model at t_min, the SDE's explicit truncation (``sde.SDE.t_min``; the NLL
depends on it, so it is stated rather than hidden); with the exact score it is
the data density convolved with N(0, s(t_min)^2) noise. For data on ``levels`` values in [-1, 1] (bin
width Delta = 2 / (levels - 1)) the discrete probability of a bin is bounded with uniform
dequantization, u = x + Delta (U - 1/2): -log P(x) <= -E_U log p(u) - D log Delta (Theis et al. 2016;
Ho et al. 2019). That is the number comparable with the discrete bound of ``likelihood.py``, which
also scores x on the ``levels`` grid; bits/dim = nats / (D log 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.likelihood import nats_to_bits_per_dim
from diffusekit.parameterization import DenoiserFn
from diffusekit.sampling.ode import ODEStats, _slice_cond, dopri5, ve_denoise
from diffusekit.sde import SDE

__all__ = ["ode_log_prob", "ode_nll", "ODELikelihood", "hutchinson_probes", "divergence_exact",
           "divergence_hutchinson"]

F64 = torch.float64
Trace = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]


def hutchinson_probes(seeds: list[int], shape: tuple[int, ...], kind: Probe = "rademacher",
                      dtype: torch.dtype = F64) -> Tensor:
    """One probe per example, example i from ``torch.Generator().manual_seed(seeds[i])`` alone."""
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        z = torch.randn(shape, generator=g, dtype=F64)
        out.append(z.sign() if kind == "rademacher" else z)
    return torch.stack(out).to(dtype)


def divergence_exact(fn: Callable[[Tensor], Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(y), div fn(y)) per example, by one backward pass per dimension (fn acts row-wise)."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        out = fn(y)
        flat = out.reshape(out.shape[0], -1)
        div = torch.zeros(y.shape[0], dtype=F64, device=y.device)
        for j in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, j].sum(), y, retain_graph=j < flat.shape[1] - 1)
            div += g.reshape(g.shape[0], -1)[:, j].to(F64)
    return out.detach(), div


def divergence_hutchinson(fn: Callable[[Tensor], Tensor], y: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(y), z^T (d fn / dy) z) per example with probe z (a vector-Jacobian product)."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        out = fn(y)
        (g,) = torch.autograd.grad((out * probe).sum(), y)
    return out.detach(), (g * probe).reshape(y.shape[0], -1).sum(1).to(F64)


def ode_log_prob(denoiser: DenoiserFn, sde: SDE, x: Tensor, *, trace: Trace = "hutchinson",
                 probe: Probe = "rademacher", seeds: list[int] | None = None, rtol: float = 1e-5,
                 atol: float = 1e-5, cond: Any = None,
                 prior_log_prob: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, ODEStats]:
    """log p_{t_min}(x) in nats per example (float64) under the model's probability-flow ODE.

    ``x`` is data at t_min (x = a(t_min) y); ``seeds`` (default 0..N-1) seed the Hutchinson probes;
    ``prior_log_prob`` (default ``sde.prior_log_prob``) scores x at t_max. Returns the log-density
    and the solver's ``ODEStats`` (batched function calls; each is a network call plus its
    backward passes)."""
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    n, dims = x.shape[0], x[0].numel()
    a_min, a_max = float(sde.mean_coef(sde.t_min)), float(sde.mean_coef(sde.t_max))
    u_min, u_max = -0.5 * float(sde.logsnr(sde.t_min)), -0.5 * float(sde.logsnr(sde.t_max))
    shape = tuple(x.shape[1:])
    probes = None
    if trace == "hutchinson":
        probes = hutchinson_probes(list(range(n)) if seeds is None else seeds, shape, probe, x.dtype).to(x.device)

    def rhs(state: Tensor, u: Tensor, rows: Tensor) -> Tensor:
        y = state[:, :-1].reshape((-1,) + shape)
        c = _slice_cond(cond, rows)
        velocity = lambda yy: yy - ve_denoise(denoiser, yy, torch.exp(u), c)  # noqa: E731
        if trace == "exact":
            v, div = divergence_exact(velocity, y)
        else:
            v, div = divergence_hutchinson(velocity, y, probes[rows.to(x.device)])
        return torch.cat([v.reshape(v.shape[0], -1), div.to(state.dtype)[:, None]], dim=1)

    state = torch.cat([(x / a_min).reshape(n, -1), torch.zeros(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    end, stats = dopri5(rhs, state, u_min, u_max, rtol=rtol, atol=atol)
    x_max = end[:, :-1].reshape(x.shape) * a_max
    prior = (prior_log_prob or sde.prior_log_prob)(x_max).to(F64).cpu()
    log_py_min = prior + dims * math.log(a_max) + end[:, -1].to(F64).cpu()
    return log_py_min - dims * math.log(a_min), stats


@dataclass
class ODELikelihood:
    """Per-example NLL in nats through the PF-ODE (dequantized when ``levels`` is set)."""

    nll: Tensor  # (N,) float64 nats
    dims: int
    levels: int | None
    nfe: int
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def bits_per_dim(self) -> float:
        return float(nats_to_bits_per_dim(self.nll.mean().item(), self.dims))

    @property
    def stderr_bits_per_dim(self) -> float:
        """Standard error of the mean over examples (data, dequantization and probe noise together)."""
        n = self.nll.numel()
        se = self.nll.std().item() / math.sqrt(n) if n > 1 else 0.0
        return float(nats_to_bits_per_dim(se, self.dims))


def ode_nll(denoiser: DenoiserFn, sde: SDE, x: Tensor, levels: int | None = None, *, trace: Trace = "hutchinson",
            probe: Probe = "rademacher", seed: int = 0, rtol: float = 1e-5, atol: float = 1e-5,
            batch_size: int = 256, cond: dict | None = None, progress: bool = False) -> ODELikelihood:
    """-log p(x) through the PF-ODE for every example, in batches.

    With ``levels`` (data on that many values in [-1, 1]) each x is dequantized with uniform noise
    in its bin and the bin width is accounted for: nll = -log p(u) - D log(2 / (levels - 1)).
    Example i's dequantization noise and probe come from seeds derived from (seed, i) only, so the
    result does not depend on ``batch_size``."""
    if levels is not None and (not isinstance(levels, int) or levels < 2):
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    n, dims = x.shape[0], x[0].numel()
    t0 = time.time()
    nll = torch.zeros(n, dtype=F64)
    nfe = 0
    for lo in tqdm(range(0, n, batch_size), desc="ode nll", disable=not progress):
        hi = min(n, lo + batch_size)
        xb = x[lo:hi]
        c = {k: v[lo:hi] for k, v in cond.items()} if cond else None
        log_bin = 0.0
        if levels is not None:
            width = 2.0 / (levels - 1)
            u = torch.stack([torch.rand(tuple(xb.shape[1:]), generator=torch.Generator().manual_seed(
                seed * 1_000_003 + 2 * i + 1), dtype=F64) for i in range(lo, hi)]).to(xb.dtype).to(xb.device)
            xb = xb + width * (u - 0.5)
            log_bin = dims * math.log(width)
        probe_seeds = [seed * 1_000_003 + 2 * i for i in range(lo, hi)]
        logp, stats = ode_log_prob(denoiser, sde, xb, trace=trace, probe=probe, seeds=probe_seeds, rtol=rtol,
                                   atol=atol, cond=c)
        nll[lo:hi] = -(logp + log_bin)
        nfe += stats.nfe
    settings = {"trace": trace, "probe": probe if trace == "hutchinson" else None, "rtol": rtol, "atol": atol,
                "t_min": sde.t_min, "seed": seed}
    return ODELikelihood(nll=nll, dims=dims, levels=levels, nfe=nfe, seconds=time.time() - t0, settings=settings)
