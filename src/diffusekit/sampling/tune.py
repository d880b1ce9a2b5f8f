"""Tuned time grids: the sampling times of a deterministic ODE sampler, optimised for one model and budget.

A fixed-grid solver of the probability-flow ODE (the ``ode`` rows of ``sampling.catalog``: euler, heun,
dpmpp_2m, unipc) maps a prior draw x_T to a sample through its grid t_0 = t_max > t_1 > ... > t_{N-1}
(then one last step to clean data). Its discretisation error depends on where the N times sit, and the
best place depends on the model, the solver and N. Following the optimal-grid searches of Sabour et al.
2024 ("Align Your Steps", Sec. 3: minimise a bound on the sampler's error over the times), Zheng et al.
2023 (DPM-Solver-v3, Sec. 4 and App. on the "optimal" time steps) and Chen et al. 2024 (GITS, "On the
trajectory regularity of ODE-based diffusion sampling", Sec. 4: a search for the grid whose solution
stays closest to the exact trajectory), ``tune_grid`` minimises the measured error itself:

    E(grid) = mean over x_T of || solver(x_T; grid) - Phi(x_T) ||^2 / D,

the mean squared distance (per coordinate) between the solver's output and the exact probability-flow
ODE map Phi of the same x_T (the library's adaptive Dormand-Prince, ``sample_rk45``, at a tight
tolerance), over a tuning batch of prior draws (one seed each, as ``generate`` draws them). The error is
reported again on a separate held-out batch, before (the sampler's default grid) and after, and a tuned
grid that is not better there than the default is never returned (``fell_back``).

The parametrisation (``grid_from_params``) makes every candidate valid: with lambda the log-SNR,
lambda_0 = lambda(t_max) is fixed and lambda_k = lambda_0 + (lambda(t_min) - lambda_0) (w_1 + ... + w_k),
w = softmax(b tanh(z_1 / b), ..., b tanh(z_{N-1} / b), 0) over N entries (N - 1 increments and a slack),
so the times are strictly decreasing, start at t_max and stay above t_min whatever z is (b = 10 keeps
every increment within e^-10..e^10 times the slack, so neighbouring times stay apart in float64). The optimiser is derivative-free: a compass (coordinate pattern)
search (Kolda, Lewis & Torczon 2003, "Optimization by direct search", Sec. 3), started from the default
grid and from the best other named grid; the best on the tuning batch is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.parameterization import DenoiserFn
from diffusekit.sampling.catalog import GRIDS, SAMPLERS, TUNABLE_SAMPLERS, default_grid, sampler_spec
from diffusekit.sampling.generate import sampler_function
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.ode import inverse_logsnr, sample_rk45, time_grid
from diffusekit.schedules import DiscreteSchedule
from diffusekit.sde import SDE, vp_from_schedule

__all__ = [
    "MAX_TUNE_NFE",
    "TUNABLE_SAMPLERS",
    "TunedGrid",
    "check_tunable",
    "compass_search",
    "grid_from_params",
    "network_calls",
    "ode_map_error",
    "params_from_grid",
    "steps_for_nfe",
    "tune_grid",
    "valid_grid",
]

F64 = torch.float64
MAX_TUNE_NFE = 200  # a grid of more calls than this gains nothing from tuning (and the search grows with it)
LOGIT_BOUND = 10.0  # b in the module docstring
# the catalog's ``calls`` rules of the tunable samplers, as functions of the number of steps
_CALL_RULES: dict[str, Callable[[int], int]] = {"steps": lambda s: s, "2 steps - 1": lambda s: 2 * s - 1}


def check_tunable(sampler: str) -> None:
    """ValueError unless ``sampler`` is a deterministic fixed-grid ODE sampler (naming the ones that are)."""
    if sampler not in TUNABLE_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} has no tunable time grid; tune one of {', '.join(TUNABLE_SAMPLERS)} "
                         "(the deterministic ODE samplers)")


def network_calls(sampler: str, steps: int) -> int:
    """Network calls of ``steps`` steps of a tunable sampler (the catalog row's ``calls`` rule)."""
    check_tunable(sampler)
    rule = SAMPLERS[sampler].calls
    if rule not in _CALL_RULES:
        raise ValueError(f"sampler {sampler!r}: no rule for its cost {rule!r}")
    return _CALL_RULES[rule](steps)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The steps that cost exactly ``nfe`` network calls; a ValueError naming the nearest budgets the
    sampler can hit otherwise (heun spends 2 steps - 1: odd budgets only)."""
    check_tunable(sampler)
    if not isinstance(nfe, int) or isinstance(nfe, bool) or not 1 <= nfe <= MAX_TUNE_NFE:
        raise ValueError(f"the number of network calls must be an integer in 1..{MAX_TUNE_NFE}, got {nfe!r}")
    reachable = {network_calls(sampler, s): s for s in range(1, nfe + 2)}
    if nfe in reachable:
        return reachable[nfe]
    below = max((c for c in reachable if c < nfe), default=None)
    above = min(c for c in reachable if c > nfe)
    nearest = " or ".join(str(c) for c in (below, above) if c is not None)
    raise ValueError(f"{sampler} cannot spend exactly {nfe} network calls ({SAMPLERS[sampler].calls}); "
                     f"the nearest budgets are {nearest}")


# --------------------------------------------------------------------------------------------
# The parametrisation: any real vector -> a valid grid
# --------------------------------------------------------------------------------------------
def grid_from_params(sde: SDE, z: Sequence[float] | np.ndarray) -> Tensor:
    """The len(z) + 1 times (float64, strictly decreasing, t_0 = t_max, all in (t_min, t_max]) of the
    softmax parametrisation of the module docstring."""
    z = torch.as_tensor(np.asarray(z, dtype=np.float64), dtype=F64).flatten()
    logits = torch.cat([LOGIT_BOUND * torch.tanh(z / LOGIT_BOUND), torch.zeros(1, dtype=F64)])
    w = torch.softmax(logits, 0)
    lam_start, lam_end = float(sde.logsnr(torch.tensor(sde.t_max, dtype=F64))), float(sde.logsnr(
        torch.tensor(sde.t_min, dtype=F64)))
    lam = lam_start + (lam_end - lam_start) * torch.cumsum(w, 0)[:-1]
    t = torch.cat([torch.tensor([sde.t_max], dtype=F64), inverse_logsnr(sde, lam, iters=100)])
    return t


def params_from_grid(sde: SDE, times: Tensor, floor: float = 1e-7) -> np.ndarray:
    """z with ``grid_from_params(sde, z)`` close to ``times`` (a grid starting at t_max; weights below
    ``floor`` of the log-SNR range, e.g. a last time at t_min exactly, are raised to it)."""
    lam_start = float(sde.logsnr(torch.tensor(sde.t_max, dtype=F64)))
    lam_end = float(sde.logsnr(torch.tensor(sde.t_min, dtype=F64)))
    lam = sde.logsnr(torch.as_tensor(times, dtype=F64))
    frac = ((lam - lam_start) / (lam_end - lam_start)).clamp(0.0, 1.0)
    w = torch.diff(torch.cat([frac, torch.ones(1, dtype=F64)]), prepend=torch.zeros(1, dtype=F64))[1:]
    w = w.clamp_min(floor)
    v = torch.log(w[:-1] / w[-1]).clamp(-0.999 * LOGIT_BOUND, 0.999 * LOGIT_BOUND)
    return (LOGIT_BOUND * torch.atanh(v / LOGIT_BOUND)).numpy()


def valid_grid(sde: SDE, times: Tensor) -> bool:
    """Whether ``times`` is a grid a tuned sampler may walk: 1-D, finite, strictly decreasing, starting at
    t_max, every time in [t_min, t_max] (the named grids without "_trailing" end at t_min itself)."""
    t = torch.as_tensor(times, dtype=F64)
    return (t.ndim == 1 and t.numel() >= 1 and bool(torch.isfinite(t).all()) and float(t[0]) == sde.t_max
            and bool((t[1:] < t[:-1]).all()) and bool((t[1:] >= sde.t_min).all()))


# --------------------------------------------------------------------------------------------
# The optimiser
# --------------------------------------------------------------------------------------------
def compass_search(f: Callable[[np.ndarray], float], z0: np.ndarray, max_evals: int, step: float = 1.0,
                   min_step: float = 1.0 / 64) -> tuple[np.ndarray, float, int]:
    """Minimise ``f`` by compass search (Kolda, Lewis & Torczon 2003, Sec. 3): try z +- step along each
    coordinate, move to the first point that improves, halve the step when none does; stop below
    ``min_step`` or after ``max_evals`` evaluations. Returns (z, f(z), evaluations)."""
    z, fz, evals = np.array(z0, dtype=np.float64), f(np.asarray(z0, dtype=np.float64)), 1
    while step >= min_step and evals < max_evals:
        improved = False
        for k in range(len(z)):
            for sign in (1.0, -1.0):
                if evals >= max_evals:
                    break
                cand = z.copy()
                cand[k] += sign * step
                fc = f(cand)
                evals += 1
                if fc < fz:
                    z, fz, improved = cand, fc, True
                    break
        if not improved:
            step /= 2
    return z, fz, evals


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    """Prior draws x_T (one seed each), their conditioning and the exact ODE map of each."""

    x_T: Tensor
    cond: Any
    exact: Tensor


def _batch(denoiser: DenoiserFn, sde: SDE, seeds: list[int], shape: Sequence[int], cond_of, dtype, device,
           rtol: float) -> tuple[_Batch, int]:
    noise = PerSampleNoise(seeds, shape, dtype=dtype, device=device)
    x_T = sde.prior_sample(noise())
    cond = cond_of(seeds) if cond_of is not None else None
    exact, stats = sample_rk45(denoiser, sde, x_T, rtol=rtol, atol=rtol, cond=cond)
    return _Batch(x_T, cond, exact), stats.nfe


def ode_map_error(x: Tensor, exact: Tensor) -> float:
    """Mean over examples and coordinates of (x - exact)^2 (float64); infinity for a non-finite x."""
    d = (x.to(F64) - exact.to(F64)).reshape(x.shape[0], -1)
    err = float(d.pow(2).mean())
    return err if math.isfinite(err) else math.inf


@dataclass
class TunedGrid:
    """What ``tune_grid`` found: the ``times`` (float64 values; ``steps`` of them) for ``sampler`` at ``nfe``
    network calls, the grid it started from (``start``), the error (``ode_map_error``) on the tuning and
    held-out batches of the tuned and of the default grid (``default_grid``), and ``fell_back``: the tuned
    grid was no better on the held-out batch, so ``times`` are the default grid's."""

    sampler: str
    order: int | None
    nfe: int
    steps: int
    times: list[float]
    default_grid: str
    start: str
    tuning_error: dict[str, float]
    heldout_error: dict[str, float]
    fell_back: bool
    evaluations: int
    reference_nfe: int
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tune_grid(denoiser: DenoiserFn, schedule: DiscreteSchedule, sampler: str, nfe: int, shape: Sequence[int], *,
              order: int = 2, examples: int = 256, heldout: int = 256, seed: int = 0, max_evals: int | None = None,
              reference_rtol: float = 1e-6, cond_of: Callable[[list[int]], Any] | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              progress: bool = False) -> TunedGrid:
    """The time grid of ``sampler`` at ``nfe`` network calls that minimises the distance to the exact
    probability-flow ODE map (module docstring) for ``denoiser`` on the VP SDE of ``schedule``.

    The tuning batch is the prior draws of seeds seed..seed+examples-1 and the held-out batch the next
    ``heldout`` seeds (examples of per-example ``shape``, ``dtype``, on ``device``; ``cond_of(seeds)`` gives
    their conditioning). ``order`` is UniPC's. ``max_evals`` bounds the grids tried (default 40 per free
    time, at least 60); ``reference_rtol`` is the tolerance of the exact map (rtol = atol). Raises
    ValueError for a sampler without a tunable grid or a budget it cannot hit exactly."""
    spec = sampler_spec(sampler)
    steps = steps_for_nfe(sampler, nfe)
    for name, value, lo in (("examples", examples, 1), ("heldout", heldout, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    sde = vp_from_schedule(schedule)
    fn = sampler_function(spec)
    options = {"order": order} if "order" in spec.options else {}
    tuning, ref_nfe = _batch(denoiser, sde, list(range(seed, seed + examples)), shape, cond_of, dtype, device,
                             reference_rtol)
    held, _ = _batch(denoiser, sde, list(range(seed + examples, seed + examples + heldout)), shape, cond_of, dtype,
                     device, reference_rtol)

    def error(times: Tensor, batch: _Batch) -> float:
        if not valid_grid(sde, times):
            return math.inf
        x = fn(denoiser, sde, batch.x_T, times.clone(), cond=batch.cond, **options)
        return ode_map_error(x, batch.exact)

    default = default_grid(sampler)
    named = {g: time_grid(sde, steps, g) for g in GRIDS}
    named_err = {g: error(t, tuning) for g, t in named.items()}
    starts = [default] + sorted((g for g in GRIDS if g != default), key=named_err.get)[:1]
    budget = max_evals if max_evals is not None else max(60, 40 * (steps - 1))
    bar = tqdm(total=budget * len(starts), desc=f"tune {sampler} {nfe} calls", disable=not progress)

    def objective(z: np.ndarray) -> float:
        bar.update(1)
        return error(grid_from_params(sde, z), tuning)

    best_times, best_err, best_start, evals = named[default], named_err[default], default, len(GRIDS)
    if steps > 1:
        for g in starts:
            z, fz, n = compass_search(objective, params_from_grid(sde, named[g]), budget)
            evals += n
            if fz < best_err:
                best_times, best_err, best_start = grid_from_params(sde, z), fz, g
    bar.close()
    held_tuned, held_default = error(best_times, held), error(named[default], held)
    fell_back = held_tuned > held_default
    if fell_back:
        best_times, best_start, held_tuned, best_err = named[default], default, held_default, named_err[default]
    return TunedGrid(sampler=sampler, order=order if options else None, nfe=nfe, steps=steps,
                     times=[float(t) for t in best_times], default_grid=default, start=best_start,
                     tuning_error={"tuned": best_err, "default": named_err[default]},
                     heldout_error={"tuned": held_tuned, "default": held_default}, fell_back=fell_back,
                     evaluations=evals, reference_nfe=ref_nfe,
                     settings={"examples": examples, "heldout": heldout, "seed": seed, "max_evals": budget,
                               "reference": f"rk45 rtol = atol = {reference_rtol:g}", "objective":
                               "mean squared distance per coordinate to the exact probability-flow ODE map",
                               "optimiser": "compass search on softmax log-SNR increments",
                               "starts": starts})
