"""Which time grid should each sampler use by default? Measured on the oracle family, printed as JSON.

For every grid-walking sampler of the catalog, every named grid, the six exact targets of
``oracle.mixture_family()``, three schedules (linear and cosine at T = 1000, log-SNR-linear) and budgets
of 5, 10 and 20 network calls: the sliced W2 of 4000 samples to the exact target, scored as
log(W2 / floor), the floor being the W2 of 4000 exact draws. For each sampler it prints every grid's
mean score and, against the current default, the paired mean difference over the 54 cases with its
standard error and how many cases improve (docs/samplers.md, "Default grids").

    OMP_NUM_THREADS=2 python bench/default_grids.py            # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics

import torch

from diffusekit.continuous.logsnr import LinearLogSNR
from diffusekit.evaluate.quality import sliced_wasserstein
from diffusekit.oracle import mixture_family
from diffusekit.sampling.catalog import GRIDS, SAMPLERS, default_grid
from diffusekit.sampling.generate import generate
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import make_schedule

# steps per sampler for a budget of 5, 10 and 20 network calls (heun: 2 steps - 1 calls; pc: 2 per step)
STEPS = {"euler": (5, 10, 20), "heun": (3, 5, 10), "dpmpp_2m": (5, 10, 20), "unipc": (5, 10, 20), "sde": (5, 10, 20),
         "pc": (2, 5, 10)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="samples per case")
    args = parser.parse_args()
    schedules = {"linear": make_schedule("linear", 1000), "cosine": make_schedule("cosine", 1000),
                 "logsnr": LinearLogSNR(-10.0, 10.0).discretize(1000)}
    scores: dict[tuple[str, str], list[float]] = {}
    cases: dict[tuple, dict[str, float]] = {}
    for (sname, schedule), (tname, mix) in itertools.product(schedules.items(), mixture_family().items()):
        dim = mix.means.shape[1]
        ref = mix.sample(20000, generator=torch.Generator().manual_seed(5))
        floor = sliced_wasserstein(mix.sample(args.n, generator=torch.Generator().manual_seed(6)), ref)
        for sampler, budget in STEPS.items():
            for calls, steps in zip((5, 10, 20), budget):
                for grid in GRIDS:
                    settings = SampleSettings(sampler=sampler, steps=steps, grid=grid, seeds=list(range(args.n)),
                                              batch_size=args.n)
                    x = generate(mix.denoiser, schedule, (dim,), settings, progress=False, dtype=torch.float64)
                    score = math.log(max(sliced_wasserstein(x, ref), floor) / floor)
                    scores.setdefault((sampler, grid), []).append(score)
                    cases.setdefault((sampler, sname, tname, calls), {})[grid] = score
    report = {}
    for sampler in STEPS:
        current = default_grid(sampler)
        rows = {}
        for grid in GRIDS:
            diffs = [c[grid] - c[current] for key, c in cases.items() if key[0] == sampler]
            rows[grid] = {"mean_log_ratio": statistics.mean(scores[(sampler, grid)]),
                          "diff_vs_default": statistics.mean(diffs),
                          "diff_stderr": statistics.stdev(diffs) / math.sqrt(len(diffs)),
                          "better_in": sum(d < 0 for d in diffs), "cases": len(diffs)}
        report[sampler] = {"default": current, "summary": SAMPLERS[sampler].summary, "grids": rows}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
