"""``diffusekit tune-grid``: tune an ODE sampler's time grid for a run at given budgets (``runs.grids``)."""

from __future__ import annotations

import argparse

from diffusekit.cli.common import device_from_flag
from diffusekit.runs.grids import TuneSettings, tune_run
from diffusekit.sampling.settings import parse_int_list

__all__ = ["run"]

_FLAGS = {"sampler": "--sampler", "nfes": "--nfe", "order": "--order", "examples": "--examples",
          "heldout": "--examples", "seed": "--seed", "max_evals": "--max-evals"}


def run(args: argparse.Namespace) -> int:
    nfes = tuple(parse_int_list(args.nfe, "--nfe", distinct=True, max_count=32, example="5 or 5,10"))
    settings = TuneSettings(sampler=args.sampler, nfes=nfes, order=args.order, examples=args.examples,
                            heldout=args.examples, seed=args.seed, use_ema=args.ema, max_evals=args.max_evals,
                            key=lambda f: _FLAGS.get(f, f))
    results, path = tune_run(args.run, settings, device=device_from_flag(args.device), progress=not args.no_progress)
    print(f"mean squared distance to the exact probability-flow ODE map, on {settings.heldout} held-out draws")
    print(f"{'sampler':<14} {'nfe':>4} {'steps':>5} {'default':>10} {'tuned':>10} {'ratio':>6}  times")
    for r in results:
        name = f"{r.sampler}" + (f"-order{r.order}" if r.order is not None else "")
        d, t = r.heldout_error["default"], r.heldout_error["tuned"]
        ratio = f"{t / d:6.3f}" if d > 0 else f"{'-':>6}"
        times = ", ".join(f"{x:.4f}" for x in r.times)
        note = f"  (kept the default {r.default_grid} grid: the tuned one was not better on held-out draws)" \
            if r.fell_back else ""
        print(f"{name:<14} {r.nfe:>4} {r.steps:>5} {d:>10.3e} {t:>10.3e} {ratio}  [{times}]{note}")
    print(f"-> {path}")
    return 0
