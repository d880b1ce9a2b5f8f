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
the data density convolved with N(0, s(t_min)^2) noise.

Dequantization. For data on ``levels`` values in [-1, 1] (bin width Delta = 2 / (levels - 1)) the
model's probability of the bin B(x) = x + [-Delta/2, Delta/2]^D is P(x) = int_B(x) p(u) du, and for
any density q on B(x) (Jensen)

    log P(x) = log E_q[p(u) / q(u)] >= E_q[log p(u) - log q(u)],    gap = KL(q || p(. | B(x))),

where p(u | B(x)) = p(u) / P(x) on the bin. -log P(x) is the number comparable with the discrete
bound of ``likelihood.py``, which scores x on the same grid; bits/dim = nats / (D log 2). Each
example gets K draws u_k = x + e_k (``dequant_samples``), all from one generator seeded by (seed, i),
and log w_k = log p(u_k) - log q(u_k). ``ode_nll(dequantization=...)`` offers three estimators:

- ``uniform`` (the default; Theis et al. 2016, sec. 3.1; Ho et al. 2019, sec. 3.1): q = Delta^-D, so
  -log P(x) <= -E log p(u) - D log Delta; nll = -(1/K) sum_k log w_k, the same bound with K draws
  averaged (K = 1: one draw, as always).
- ``importance`` (Burda et al. 2016, sec. 3, Theorem 1; used for dequantization by Ho et al. 2019,
  sec. 3.1, and Zheng et al. 2023, sec. 4): the same uniform draws, nll = -log (1/K) sum_k w_k. Since
  (1/K) sum_k w_k is unbiased for P(x), Jensen gives a bound for every K; averaging the K-sample mean
  over a random K-subset of K+1 draws shows the bound does not grow with K, and by the law of large
  numbers it tends to -log P(x). For large K the gap is about Var_q[w] / (2 K P(x)^2) (delta method),
  so it falls like 1 / K. K = 1 is ``uniform``, bit for bit. With the Hutchinson trace the log w_k
  are noisy, and log-mean-exp is convex, so the probe noise biases this number low (Jensen the other
  way): it is a bound only with ``trace = "exact"``; ``uniform`` and ``truncated_normal``, linear in
  log w, stay unbiased estimates of their bounds with either trace.
- ``truncated_normal`` (Zheng et al. 2023, "i-DODE", sec. 4): e ~ N(0, sigma^2 I) restricted to the
  bin, per coordinate log q(e) = log N(e; 0, sigma^2) - log(Phi(b) - Phi(-b)), b = Delta / (2 sigma);
  nll = -(1/K) sum_k log w_k. Why this q and which sigma: the model at t_min is the (learned) data
  density convolved with N(0, s^2 I), s = s(t_min) (and scaled by a = a(t_min), within 1e-4 of 1 for
  the usual schedules); the network never sees less noise than s. Data on a grid is a sum of point
  masses, so inside B(x) the model density is proportional to N(u; a x, s^2 I), up to the tails of the
  neighbouring grid points, each of which puts a share of order Phi(-b) of its own mass into B(x)
  (per dimension) when s << Delta. The best q, p(. | B(x)), is then the normal of std s cut to the
  bin, and sigma = s(t_min) (the default) makes the gap vanish to that order. Uniform noise instead
  puts u up to Delta/2 = b s away from the grid point, where the model density is down by exp(-b^2 / 2): for that
  model its gap is KL(U || N_s cut to the bin) = Delta^2 / (24 s^2) - log(Delta / s) + 1/2 log(2 pi)
  + log(Phi(b) - Phi(-b)) per dimension, 0.15 nats at b = 2 and 4.9 nats at b = 6.25 (17 levels,
  s = 0.01): the train/evaluation mismatch i-DODE removes without training anything. For a smooth
  density (s >> Delta) b -> 0, log q -> -log Delta and the two coincide; on a density flat across
  the bin the truncated normal is the looser one (its gap is then KL(q || uniform)). The draws are
  exact: the inverse CDF of the truncated normal at the same uniforms the uniform option uses,
  evaluated in float64 from the nearer tail (``truncated_normal_icdf``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.likelihood import nats_to_bits_per_dim
from diffusekit.parameterization import DenoiserFn
from diffusekit.sampling.catalog import DEQUANTIZATIONS
from diffusekit.sampling.ode import ODEStats, _slice_cond, dopri5, ve_denoise
from diffusekit.sde import SDE

__all__ = ["DEQUANTIZATIONS", "ODELikelihood", "dequantization_uniforms", "divergence_exact", "divergence_hutchinson",
           "hutchinson_probes", "ode_log_prob", "ode_nll", "truncated_normal_icdf", "truncated_normal_log_prob"]

F64 = torch.float64
Trace = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]
Dequantization = Literal["uniform", "importance", "truncated_normal"]


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
        velocity = lambda yy: yy - ve_denoise(denoiser, yy, torch.exp(u), c)
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


def truncated_normal_icdf(v: Tensor, sigma: float, half_width: float) -> Tensor:
    """The inverse CDF of N(0, sigma^2) truncated to [-half_width, half_width] at v in [0, 1), float64.

    F(e) = (Phi(e / sigma) - Phi(-b)) / (1 - 2 Phi(-b)), b = half_width / sigma. Solved from the
    nearer tail: with c = 2 v - 1 and m = 1 - |c|, the magnitude solves Phi(-|e| / sigma) = Phi(-b) +
    m (1/2 - Phi(-b)) and the sign is that of c, which is F^-1(v) (for v < 1/2, m = 2 v and the two
    equations agree; the other half by symmetry) without the cancellation of Phi(b) near 1."""
    if not (sigma > 0 and half_width > 0):
        raise ValueError(f"sigma and half_width must be positive, got {sigma!r}, {half_width!r}")
    v = v.to(F64)
    tail = torch.special.ndtr(torch.tensor(-half_width / sigma, dtype=F64))
    c = 2.0 * v - 1.0
    mag = -torch.special.ndtri(tail + (1.0 - c.abs()) * (0.5 - tail))
    return (torch.sign(c) * sigma * mag).clamp(-half_width, half_width)


def truncated_normal_log_prob(e: Tensor, sigma: float, half_width: float) -> Tensor:
    """Elementwise log density of N(0, sigma^2) truncated to [-half_width, half_width] (float64; -inf
    outside): log N(e; 0, sigma^2) - log(Phi(b) - Phi(-b)), b = half_width / sigma, with the
    normaliser erf(b / sqrt 2) taken as log1p(-erfc) for large b."""
    if not (sigma > 0 and half_width > 0):
        raise ValueError(f"sigma and half_width must be positive, got {sigma!r}, {half_width!r}")
    r = half_width / (sigma * math.sqrt(2.0))
    log_z = math.log(math.erf(r)) if r < 1.0 else math.log1p(-math.erfc(r))
    e = e.to(F64)
    out = -0.5 * (e / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2.0 * math.pi) - log_z
    return torch.where(e.abs() <= half_width, out, torch.full_like(out, -math.inf))


def dequantization_uniforms(seed: int, shape: tuple[int, ...], samples: int) -> Tensor:
    """One example's K = ``samples`` uniform draws (K, *shape) in [0, 1), float64, from
    ``torch.Generator().manual_seed(seed)`` alone, one ``torch.rand(shape)`` per draw in turn: draw 0 is
    the single draw ``ode_nll`` has always made. The uniform options use u = x + Delta (v - 1/2); the
    truncated normal maps the same v through its inverse CDF (``truncated_normal_icdf``)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.rand(shape, generator=g, dtype=F64) for _ in range(samples)])


def _repeat_rows(cond: Any, k: int) -> Any:
    if k == 1 or cond is None:
        return cond
    if isinstance(cond, Tensor):
        return cond.repeat_interleave(k, dim=0)
    if isinstance(cond, dict):
        return {key: _repeat_rows(v, k) for key, v in cond.items()}
    return cond


def ode_nll(denoiser: DenoiserFn, sde: SDE, x: Tensor, levels: int | None = None, *, trace: Trace = "hutchinson",
            probe: Probe = "rademacher", seed: int = 0, rtol: float = 1e-5, atol: float = 1e-5,
            batch_size: int = 256, cond: dict | None = None, progress: bool = False,
            dequantization: Dequantization = "uniform", dequant_samples: int = 1, dequant_sigma: float | None = None,
            prior_log_prob: Callable[[Tensor], Tensor] | None = None) -> ODELikelihood:
    """-log p(x) through the PF-ODE for every example, in batches.

    With ``levels`` (data on that many values in [-1, 1]) each x is dequantized in its bin of width
    Delta = 2 / (levels - 1) and -log P(x) is bounded as the module docstring derives:
    ``dequantization`` "uniform" (nll = -log p(u) - D log Delta, averaged over ``dequant_samples`` draws),
    "importance" (-log of the mean of p(u_k) Delta^D over K uniform draws; a bound with the exact trace)
    or "truncated_normal" (normal noise of std ``dequant_sigma``, default s(t_min), cut to the bin;
    -(log p(u) - log q(u)) averaged over K draws). Example i's dequantization noise and probe come from
    seeds derived from (seed, i) only, so the result does not depend on ``batch_size`` (rows per solver
    call: ``batch_size // dequant_samples`` examples, at least one). ``prior_log_prob`` (default
    ``sde.prior_log_prob``) scores x at t_max."""
    if levels is not None and (not isinstance(levels, int) or levels < 2):
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(f"dequantization must be one of {', '.join(DEQUANTIZATIONS)}, got {dequantization!r}")
    k = dequant_samples
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"dequant_samples must be an integer >= 1, got {k!r}")
    if dequant_sigma is not None:
        if dequantization != "truncated_normal":
            raise ValueError(f"dequant_sigma is the truncated_normal dequantization's; got it with {dequantization!r}")
        if not (isinstance(dequant_sigma, (int, float)) and math.isfinite(dequant_sigma) and dequant_sigma > 0):
            raise ValueError(f"dequant_sigma must be a finite number > 0, got {dequant_sigma!r}")
    if levels is None and (dequantization != "uniform" or k != 1):
        raise ValueError(f"dequantization = {dequantization!r} with {k} samples needs discrete data (levels); "
                         "continuous data is scored as it is")
    sigma = None
    if levels is not None and dequantization == "truncated_normal":
        sigma = float(dequant_sigma) if dequant_sigma is not None else float(sde.std(sde.t_min))
    n, dims = x.shape[0], x[0].numel()
    shape = tuple(x.shape[1:])
    t0 = time.time()
    nll = torch.zeros(n, dtype=F64)
    nfe = 0
    per = max(1, batch_size // k)
    for lo in tqdm(range(0, n, per), desc="ode nll", disable=not progress):
        hi = min(n, lo + per)
        xb = x[lo:hi]
        c = _repeat_rows({key: v[lo:hi] for key, v in cond.items()}, k) if cond else None
        probe_seeds = [seed * 1_000_003 + 2 * i for i in range(lo, hi) for _ in range(k)]
        if levels is None:
            logp, stats = ode_log_prob(denoiser, sde, xb, trace=trace, probe=probe, seeds=probe_seeds, rtol=rtol,
                                       atol=atol, cond=c, prior_log_prob=prior_log_prob)
            nll[lo:hi] = -logp
            nfe += stats.nfe
            continue
        width = 2.0 / (levels - 1)
        v = torch.stack([dequantization_uniforms(seed * 1_000_003 + 2 * i + 1, shape, k) for i in range(lo, hi)])
        if sigma is None:  # uniform: the offset in the data's dtype, computed as it has always been
            u = v.to(xb.dtype).to(xb.device)
            ub = xb[:, None] + width * (u - 0.5)
            log_q = torch.full((hi - lo, k), -(dims * math.log(width)), dtype=F64)
        else:
            e = truncated_normal_icdf(v, sigma, width / 2)  # (b, K, *shape) float64
            ub = xb[:, None] + e.to(xb.dtype).to(xb.device)
            log_q = truncated_normal_log_prob(e, sigma, width / 2).reshape(hi - lo, k, -1).sum(2)
        logp, stats = ode_log_prob(denoiser, sde, ub.reshape((-1,) + shape), trace=trace, probe=probe,
                                   seeds=probe_seeds, rtol=rtol, atol=atol, cond=c, prior_log_prob=prior_log_prob)
        log_w = logp.reshape(hi - lo, k) - log_q
        if dequantization == "importance":
            nll[lo:hi] = -(torch.logsumexp(log_w, dim=1) - math.log(k))
        else:
            nll[lo:hi] = -log_w.mean(dim=1)
        nfe += stats.nfe
    settings = {"trace": trace, "probe": probe if trace == "hutchinson" else None, "rtol": rtol, "atol": atol,
                "t_min": sde.t_min, "seed": seed,
                "dequantization": dequantization if levels is not None else None,
                "dequant_samples": k if levels is not None else None, "dequant_sigma": sigma}
    return ODELikelihood(nll=nll, dims=dims, levels=levels, nfe=nfe, seconds=time.time() - t0, settings=settings)
