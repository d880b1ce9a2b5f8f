"""Sampler error against the exact target, on the analytic oracle, as the number of steps grows.

Data: ``oracle.default_mixture(2)``; model: its exact eps/x0 denoiser (no training error), so the
only error left is the sampler's discretization (and the finite sample). Error = sliced
2-Wasserstein distance (fixed projections) between n samples and a large reference sample; the
"floor" is the same distance for n exact draws (5 replicates), the best any sampler can read. Every sampler starts from the same x_T and,
where it adds noise, draws it from the same seeded generator. Prints JSON.

Samplers are a dict name -> (function(steps, seed) -> (n, 2) samples, stochastic): add a new one by
adding an entry. Stochastic samplers are averaged over ``--replicates`` noise seeds.

    .venv/bin/python bench/sampler_accuracy.py [--n 4000] [--steps 10,20,50,100,1000]

With ``--nfe 5,10,20,50`` it instead compares the fast deterministic solvers at equal numbers of
network calls (NFE): ours (UniPC of order 2 and 3 and DPM-Solver++(2M) on log-SNR, Karras, uniform-time
and trailing grids, Euler and Heun on the Karras grid, DDIM) against diffusers' DPMSolverMultistepScheduler
(orders 2 and 3, default, Karras and Lu's log-SNR spacings), UniPCMultistepScheduler (orders 2 and 3,
default, Karras and exponential spacings), EulerDiscreteScheduler and HeunDiscreteScheduler on the same
linear T = 1000 table, the same exact model and the same x_T. "best_by_nfe" is each side's lowest sliced W2. Two metrics, the same for all: sliced W2 to the exact target (per
projection, sorted samples against the exact quantiles of the projected mixture, so no reference
sample noise), and the RMS distance of each sample to the exact probability-flow ODE map of its
x_T (Dormand-Prince at rtol = atol = 1e-8, checked against scipy in the tests), which isolates the
solver error. Prints a table and JSON.

    .venv/bin/python bench/sampler_accuracy.py --nfe 5,10,20,50 [--n 4000]

With ``--family`` it runs over every target of ``oracle.mixture_family()`` (1 to 16 dimensions) at 3, 5,
10 and 20 network calls (``--calls``): every sampler of the catalog through the library's own dispatch
(``sampling.generate.generate`` with ``SampleSettings``; calls translated into steps by the catalog's
``calls`` column, rounded down: heun 2 steps - 1, pc 2 steps, langevin one step per level + 1; rk45 is
adaptive and left out) against the best of the diffusers configurations of ``--nfe`` on the same linear
T = 1000 table, exact denoiser and x_T (the library's first per-seed draw). Metric: sliced W2 to the exact
mixture; "floor" is the median over 3 draws of n exact samples, the noise level of the metric. Also the
largest sample norm over the data's largest (20000 draws), per side. Prints a table and JSON.

    .venv/bin/python bench/sampler_accuracy.py --family [--calls 3,5,10,20] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

from diffusekit.oracle import default_mixture
from diffusekit.sampling.ddim import sample_ddim
from diffusekit.sampling.ddpm import sample_ddpm
from diffusekit.schedules import make_schedule

F64 = torch.float64
T = 1000


class SlicedWasserstein:
    """SW2 to a fixed reference with fixed projections; the reference's sorted projections are kept,
    and quantiles are matched, so samples and reference may differ in size."""

    def __init__(self, reference: torch.Tensor, n_proj: int = 128):
        dirs = torch.randn(reference.shape[1], n_proj, generator=torch.Generator().manual_seed(7), dtype=F64)
        self.dirs = dirs / dirs.norm(dim=0)
        self.ref = (reference.to(F64) @ self.dirs).sort(0).values

    def __call__(self, x: torch.Tensor) -> float:
        px = (x.to(F64) @ self.dirs).sort(0).values
        q = (torch.arange(px.shape[0], dtype=F64) + 0.5) / px.shape[0]
        idx = (q * self.ref.shape[0]).long().clamp(max=self.ref.shape[0] - 1)
        return ((px - self.ref[idx]) ** 2).mean().sqrt().item()


def whitened_normal(n: int, dim: int, seed: int) -> torch.Tensor:
    """n standard normal draws shifted and linearly mapped to have exactly mean 0 and covariance I.

    A deterministic sampler maps x_T's own finite-sample error onto its output (a 3-standard-error
    mean of one x_T draw tripled the error at 1000 steps), so removing it leaves the sampler's
    discretization error; samplers that add noise still carry the noise's sampling error."""
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def _noise(seed: int, shape) -> Callable[[], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=gen, dtype=F64)


Sampler = Callable[[int, int], torch.Tensor]  # (steps, noise seed) -> samples


def make_samplers(mix, sch, x_T: torch.Tensor) -> dict[str, tuple[Sampler, bool]]:
    """name -> (sampler, stochastic). Every sampler starts at x_T; stochastic ones draw their
    noise from a generator seeded with the given seed."""
    shape = tuple(x_T.shape)

    def ours_ddpm(variance: str, spacing: str = "trailing"):
        return lambda steps, seed: sample_ddpm(mix.denoiser, sch, x_T, _noise(seed, shape), steps=steps,
                                               spacing=spacing, variance=variance)

    def ours_ddim(spacing: str):
        return lambda steps, seed: sample_ddim(mix.denoiser, sch, x_T, steps=steps, spacing=spacing, eta=0.0)

    def diffusers_loop(kind: str, spacing: str, **cfg):
        import diffusers

        def run(steps: int, seed: int) -> torch.Tensor:
            if kind == "ddpm":
                sched = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False, timestep_spacing=spacing, **cfg)
            else:
                sched = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, timestep_spacing=spacing,
                                                set_alpha_to_one=True, **cfg)
            sched.set_timesteps(steps)
            gen, x = torch.Generator().manual_seed(seed), x_T.clone()
            for k in sched.timesteps:
                eps = mix.denoiser(x, sch.logsnr[int(k) + 1]).eps  # diffusers' k is our t - 1
                kw = {"generator": gen} if kind == "ddpm" else {"eta": 0.0}
                x = sched.step(eps, k, x, **kw).prev_sample
            return x

        return run

    return {
        "ours-ddpm-beta_tilde": (ours_ddpm("beta_tilde"), True),
        "ours-ddpm-beta": (ours_ddpm("beta"), True),
        "ours-ddim-eta0": (ours_ddim("trailing"), False),
        "ours-ddim-eta0-leading": (ours_ddim("leading"), False),
        "diffusers-ddpm-fixed_small-leading": (diffusers_loop("ddpm", "leading", variance_type="fixed_small"), True),
        "diffusers-ddim-eta0-leading": (diffusers_loop("ddim", "leading"), False),
        "diffusers-ddim-eta0-trailing": (diffusers_loop("ddim", "trailing"), False),
    }


# -- equal-NFE comparison of the fast solvers -----------------------------------------------------
def sw2_to_mixture(x: torch.Tensor, mix, n_proj: int = 64, grid: int = 8001) -> float:
    """Sliced W2 to the exact mixture: sorted projections against the exact quantiles
    (i + 1/2) / n of each projected 1-D mixture (CDF on a fine grid, inverted by interpolation)."""
    x = x.to(F64)
    th = torch.randn(n_proj, x.shape[1], generator=torch.Generator().manual_seed(7), dtype=F64)
    th = th / th.norm(dim=1, keepdim=True)
    m = th @ mix.means.T
    s = torch.einsum("pi,kij,pj->pk", th, mix.covs, th).sqrt()
    lo, hi = (m - 8 * s).min(1).values, (m + 8 * s).max(1).values
    xs = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, grid, dtype=F64)
    cdf = (mix.weights * torch.special.ndtr((xs[..., None] - m[:, None]) / s[:, None])).sum(-1)
    q = ((torch.arange(x.shape[0], dtype=F64) + 0.5) / x.shape[0]).expand(n_proj, -1).contiguous()
    j = torch.searchsorted(cdf, q).clamp(1, grid - 1)
    c0, c1, x0, x1 = cdf.gather(1, j - 1), cdf.gather(1, j), xs.gather(1, j - 1), xs.gather(1, j)
    quant = x0 + (x1 - x0) * (q - c0) / (c1 - c0).clamp_min(1e-300)
    return ((x @ th.T).T.sort(1).values - quant).pow(2).mean().sqrt().item()


def fast_solvers(mix, sch, x_T: torch.Tensor, table: dict | None = None) -> dict[str, Callable[[int], torch.Tensor | None]]:
    """name -> (NFE -> samples, or None where that NFE cannot be met exactly). ``table``: the diffusers
    schedule arguments of ``sch`` (default: the linear T = 1000 table; another schedule passes
    ``trained_betas``)."""
    import diffusers

    from diffusekit.sampling.dpm_solver import sample_dpmpp_2m
    from diffusekit.sampling.ode import sample_euler, sample_heun
    from diffusekit.sampling.unipc import sample_unipc
    from diffusekit.sde import vp_from_schedule

    sde = vp_from_schedule(sch)
    table = table or dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

    def vp_loop(cls, **cfg):  # schedulers on x in VP space, model at integer timesteps k = t - 1
        def run(nfe: int):
            sched = cls(**table, **cfg)
            sched.set_timesteps(nfe)
            x = x_T.clone()
            for k in sched.timesteps:
                x = sched.step(mix.denoiser(x, sch.logsnr[int(k) + 1]).eps, k, x).prev_sample
            return x
        return run

    def sigma_loop(cls, heun: bool, **cfg):  # Karras-style schedulers on x * sqrt(1 + sigma^2)
        def run(nfe: int):
            if heun and nfe % 2 == 0:
                return None  # Heun spends 2 steps - 1 calls: odd budgets only
            sched = cls(**table, **cfg)
            sched.set_timesteps((nfe + 1) // 2 if heun else nfe)
            x = x_T.clone() * sched.init_noise_sigma
            for i, k in enumerate(sched.timesteps):
                sigma = float(sched.sigmas[i])
                x_in = sched.scale_model_input(x, k)
                eps = mix.denoiser(x_in, torch.tensor(-2.0 * math.log(sigma), dtype=F64)).eps
                x = sched.step(eps, k, x).prev_sample
            return x
        return run

    def heun_ours(nfe: int):
        return None if nfe % 2 == 0 else sample_heun(mix.denoiser, sde, x_T, steps=(nfe + 1) // 2, grid="karras")

    def unipc(order: int, grid: str, coefficients: str = "solve"):
        return lambda nfe: sample_unipc(mix.denoiser, sde, x_T, steps=nfe, order=order, grid=grid,
                                        coefficients=coefficients)

    return {
        "ours-unipc2-logsnr_trailing": unipc(2, "logsnr_trailing"),
        "ours-unipc3-logsnr_trailing": unipc(3, "logsnr_trailing"),
        "ours-unipc3-bh2-logsnr_trailing": unipc(3, "logsnr_trailing", "bh2"),
        "ours-unipc2-logsnr": unipc(2, "logsnr"),
        "ours-unipc2-bh2-time_trailing": unipc(2, "time_trailing", "bh2"),
        "ours-dpmpp_2m-logsnr_trailing": lambda nfe: sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=nfe,
                                                                     grid="logsnr_trailing"),
        "ours-dpmpp_2m-time_trailing": lambda nfe: sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=nfe, grid="time_trailing"),
        "ours-dpmpp_2m-logsnr": lambda nfe: sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=nfe, grid="logsnr"),
        "ours-dpmpp_2m-karras": lambda nfe: sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=nfe, grid="karras"),
        "ours-dpmpp_2m-time": lambda nfe: sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=nfe, grid="time"),
        "ours-euler-karras": lambda nfe: sample_euler(mix.denoiser, sde, x_T, steps=nfe, grid="karras"),
        "ours-heun-karras": heun_ours,
        "ours-ddim-trailing": lambda nfe: sample_ddim(mix.denoiser, sch, x_T, steps=nfe, spacing="trailing"),
        "diffusers-dpmpp_2m": vp_loop(diffusers.DPMSolverMultistepScheduler),
        "diffusers-dpmpp_2m-karras": vp_loop(diffusers.DPMSolverMultistepScheduler, use_karras_sigmas=True),
        "diffusers-dpmpp_2m-lu": vp_loop(diffusers.DPMSolverMultistepScheduler, use_lu_lambdas=True),
        "diffusers-dpmpp_3m": vp_loop(diffusers.DPMSolverMultistepScheduler, solver_order=3),
        "diffusers-dpmpp_3m-lu": vp_loop(diffusers.DPMSolverMultistepScheduler, solver_order=3, use_lu_lambdas=True),
        "diffusers-unipc": vp_loop(diffusers.UniPCMultistepScheduler),
        "diffusers-unipc-3": vp_loop(diffusers.UniPCMultistepScheduler, solver_order=3),
        "diffusers-unipc-karras": vp_loop(diffusers.UniPCMultistepScheduler, use_karras_sigmas=True),
        "diffusers-unipc-exp": vp_loop(diffusers.UniPCMultistepScheduler, use_exponential_sigmas=True),
        "diffusers-unipc-3-exp": vp_loop(diffusers.UniPCMultistepScheduler, solver_order=3, use_exponential_sigmas=True),
        "diffusers-euler": sigma_loop(diffusers.EulerDiscreteScheduler, False),
        "diffusers-euler-karras": sigma_loop(diffusers.EulerDiscreteScheduler, False, use_karras_sigmas=True),
        "diffusers-heun": sigma_loop(diffusers.HeunDiscreteScheduler, True),
    }


def nfe_table(args) -> None:
    from diffusekit.sampling.ode import sample_rk45
    from diffusekit.sde import vp_from_schedule

    budgets = [int(s) for s in args.nfe.split(",")]
    mix, sch = default_mixture(2), make_schedule("linear", T)
    x_T = whitened_normal(args.n, 2, seed=0)
    exact_map, stats = sample_rk45(mix.denoiser, vp_from_schedule(sch), x_T, rtol=1e-8, atol=1e-8)
    floor = sw2_to_mixture(exact_map, mix)
    sw2, ode_err, seconds = {}, {}, {}
    for name, fn in fast_solvers(mix, sch, x_T).items():
        t0 = time.perf_counter()
        sw2[name], ode_err[name] = {}, {}
        for nfe in budgets:
            x = fn(nfe)
            if x is not None:
                sw2[name][str(nfe)] = round(sw2_to_mixture(x, mix), 5)
                ode_err[name][str(nfe)] = round((x - exact_map).pow(2).sum(1).mean().sqrt().item(), 5)
        seconds[name] = round(time.perf_counter() - t0, 1)
    best = {}
    for nfe in map(str, budgets):
        for side in ("ours", "diffusers"):
            cands = {k: v[nfe] for k, v in sw2.items() if k.startswith(side) and nfe in v}
            k = min(cands, key=cands.get)
            best.setdefault(nfe, {})[side] = {"sampler": k, "sw2": cands[k], "ode_rms": ode_err[k][nfe]}
    width = max(map(len, sw2))
    print(f"sliced W2 to the exact target / RMS distance to the exact ODE map, by NFE (n = {args.n}; "
          f"exact ODE map itself: sliced W2 {floor:.4f})")
    print(f"{'sampler':<{width}}  " + "  ".join(f"{'NFE ' + str(b):>17}" for b in budgets))
    for name in sw2:
        cells = [f"{sw2[name][str(b)]:.4f} / {ode_err[name][str(b)]:.4f}" if str(b) in sw2[name] else "-"
                 for b in budgets]
        print(f"{name:<{width}}  " + "  ".join(f"{c:>17}" for c in cells))
    print(json.dumps({"bench": "sampler_accuracy_nfe", "data": "default_mixture(2)", "schedule": "linear, T=1000",
                      "model": "exact oracle", "n": args.n, "x_T": "whitened N(0, I) sample",
                      "metric": "sliced W2 (64 projections) to the exact mixture; RMS distance to the exact PF-ODE map",
                      "exact_map_sw2": round(floor, 5), "exact_map_nfe": stats.nfe, "sw2_by_nfe": sw2,
                      "ode_rms_by_nfe": ode_err, "best_by_nfe": best, "seconds": seconds}, indent=1))


# -- the mixture family: every catalog sampler at small budgets ----------------------------------------------
def _catalog_settings(name: str, calls: int, n: int):
    """(SampleSettings, network calls it costs) for catalog sampler ``name`` within ``calls``, or None."""
    from diffusekit.sampling.settings import SampleSettings

    extra: dict = {}
    if name == "heun":
        steps, cost = (calls + 1) // 2, 2 * ((calls + 1) // 2) - 1
    elif name == "pc":
        steps, cost = calls // 2, 2 * (calls // 2)
    elif name == "langevin":
        steps, cost, extra = calls - 1, calls, {"langevin_steps": 1}
    else:
        steps, cost = calls, calls
    if steps < 1:
        return None
    return SampleSettings(sampler=name, steps=steps, seeds=list(range(n)), batch_size=n, **extra), cost


def family_table(args) -> None:
    from diffusekit.oracle import mixture_family
    from diffusekit.sampling.catalog import SAMPLERS
    from diffusekit.sampling.generate import generate
    from diffusekit.sampling.noise import PerSampleNoise

    budgets = [int(c) for c in args.calls.split(",")]
    sch = make_schedule("linear", T)
    ours_names = [name for name in SAMPLERS if name != "rk45"]
    results, norms, floors, seconds = {}, {}, {}, {}
    for target, mix in mixture_family().items():
        t0 = time.perf_counter()
        data_norm = mix.sample(20000, torch.Generator().manual_seed(1)).norm(dim=1).max().item()
        floors[target] = round(statistics.median(
            sw2_to_mixture(mix.sample(args.n, torch.Generator().manual_seed(300 + r)), mix) for r in range(3)), 5)
        x_T = PerSampleNoise(list(range(args.n)), (mix.dim,), dtype=F64)()  # what generate draws first
        theirs = {k: v for k, v in fast_solvers(mix, sch, x_T).items() if k.startswith("diffusers")}
        res, nrm = results.setdefault(target, {}), norms.setdefault(target, {})
        for calls in budgets:
            row, nrow = res.setdefault(str(calls), {}), nrm.setdefault(str(calls), {})
            for name in ours_names:
                made = _catalog_settings(name, calls, args.n)
                if made is None:
                    continue
                settings, cost = made
                x = generate(mix.denoiser, sch, (mix.dim,), settings, progress=False, dtype=F64)
                key = name if cost == calls else f"{name} ({cost} calls)"
                row[key] = round(sw2_to_mixture(x, mix), 4)
                nrow[key] = round(x.norm(dim=1).max().item() / data_norm, 3)
            best = None
            for k, fn in theirs.items():
                x = fn(calls)
                if x is None or not bool(torch.isfinite(x).all()):
                    continue
                d = sw2_to_mixture(x, mix)
                nrow[k] = round(x.norm(dim=1).max().item() / data_norm, 3)
                if best is None or d < best[1]:
                    best = (k, d)
            if best is not None:
                row["diffusers best"] = round(best[1], 4)
                row["diffusers best is"] = best[0]
        seconds[target] = round(time.perf_counter() - t0, 1)
        print(f"{target}: floor {floors[target]:.4f}, {seconds[target]} s", flush=True, file=sys.stderr)
    cols = ours_names + ["diffusers best"]
    print(f"sliced W2 to the exact mixture by network calls (n = {args.n}; linear T = {T}; floor = n exact samples; "
          "* = one call under the budget: heun at even, pc at odd budgets)")
    for target, res in results.items():
        print(f"\n{target} (floor {floors[target]:.4f})")
        print(f"{'calls':>5}  " + "  ".join(f"{c:>9}" for c in cols) + "  diffusers best is")
        for calls, row in res.items():
            cells = []
            for c in cols:
                fewer = next((k for k in row if k.startswith(c + " (")), None)  # one call under the budget
                v = row.get(c, row.get(fewer))
                cells.append(f"{v:>8.4f}{'*' if fewer else ' '}" if isinstance(v, float) else f"{'-':>9}")
            print(f"{calls:>5}  " + "  ".join(cells) + f"  {row.get('diffusers best is', '-')}")
    worst_ours = max(v for t in norms.values() for r in t.values() for k, v in r.items()
                     if not k.startswith("diffusers"))
    print(json.dumps({"bench": "sampler_accuracy_family", "data": "oracle.mixture_family()",
                      "schedule": f"linear, T={T}",
                      "model": "exact oracle", "n": args.n, "x_T": "generate's per-seed draws (seeds 0..n-1)",
                      "metric": "sliced W2 (64 projections) to the exact mixture",
                      "note": "heun uses 2 steps - 1 calls and pc 2 steps: at an even or odd budget they spend one "
                              "call less (marked in sw2_by_calls)",
                      "floor": floors, "sw2_by_calls": results, "max_norm_over_data_max": norms,
                      "worst_max_norm_ratio_ours": worst_ours, "seconds": seconds}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="samples per sampler")
    p.add_argument("--n-ref", type=int, default=100_000, help="reference sample size")
    p.add_argument("--steps", default="10,20,50,100,1000")
    p.add_argument("--only", default="", help="comma-separated sampler names (default: all)")
    p.add_argument("--replicates", type=int, default=3, help="noise seeds averaged for stochastic samplers")
    p.add_argument("--nfe", default="", help="e.g. 5,10,20,50: compare the fast solvers at these budgets instead")
    p.add_argument("--family", action="store_true", help="every catalog sampler on oracle.mixture_family() instead")
    p.add_argument("--calls", default="3,5,10,20", help="network-call budgets of --family")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # thousands of tiny ops: one thread is faster and steadier
    if args.family:
        family_table(args)
        return
    if args.nfe:
        nfe_table(args)
        return
    steps_list = [int(s) for s in args.steps.split(",")]

    mix, sch = default_mixture(2), make_schedule("linear", T)
    ref = mix.sample(args.n_ref, torch.Generator().manual_seed(123))
    x_T = whitened_normal(args.n, 2, seed=0)
    distance = SlicedWasserstein(ref)
    floors = sorted(distance(mix.sample(args.n, torch.Generator().manual_seed(300 + r))) for r in range(5))
    samplers = make_samplers(mix, sch, x_T)
    if args.only:
        samplers = {k: v for k, v in samplers.items() if k in args.only.split(",")}

    results, seconds = {}, {}
    for name, (fn, stochastic) in samplers.items():
        t0 = time.perf_counter()
        seeds = range(1, 1 + (args.replicates if stochastic else 1))
        results[name] = {str(s): round(statistics.mean(distance(fn(s, seed)) for seed in seeds), 5)
                         for s in steps_list}
        seconds[name] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"bench": "sampler_accuracy", "data": "default_mixture(2)", "schedule": "linear, T=1000",
                      "model": "exact oracle eps", "metric": "sliced W2 (128 projections) to reference",
                      "replicates_stochastic": args.replicates,
                      "n": args.n, "n_ref": args.n_ref, "x_T": "whitened N(0, I) sample (exact mean and covariance)",
                      "floor_exact_samples": {"median": round(floors[2], 5), "min": round(floors[0], 5),
                                              "max": round(floors[-1], 5), "replicates": 5},
                      "sw2_by_steps": results, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
