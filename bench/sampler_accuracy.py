"""Sampler error against the exact target, on the analytic oracle, as the number of steps grows.

Data: ``oracle.default_mixture(2)``; model: its exact eps/x0 denoiser (no training error), so the
only error left is the sampler's discretization (and the finite sample). Error = sliced
2-Wasserstein distance (fixed projections) between n samples and a large reference sample; the
"floor" is the same distance for n exact draws (5 replicates), the best any sampler can read. Every sampler starts from the same x_T and,
where it adds noise, draws it from the same seeded generator. Prints JSON.

Samplers are a dict name -> (function(steps, seed) -> (n, 2) samples, stochastic): add a new one by
adding an entry. Stochastic samplers are averaged over ``--replicates`` noise seeds.

    .venv/bin/python bench/sampler_accuracy.py [--n 4000] [--steps 10,20,50,100,1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Callable

import torch

from diffusekit.oracle import default_mixture
from diffusekit.sampling import sample_ddim, sample_ddpm
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="samples per sampler")
    p.add_argument("--n-ref", type=int, default=100_000, help="reference sample size")
    p.add_argument("--steps", default="10,20,50,100,1000")
    p.add_argument("--only", default="", help="comma-separated sampler names (default: all)")
    p.add_argument("--replicates", type=int, default=3, help="noise seeds averaged for stochastic samplers")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # thousands of tiny ops: one thread is faster and steadier
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
