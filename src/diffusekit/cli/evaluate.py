"""``diffusekit evaluate``: the numbers of a trained run and its report in ``<run>/eval/``."""

from __future__ import annotations

import argparse
import json

from diffusekit.cli.common import device_from_flag
from diffusekit.families.base import EvaluateSettings
from diffusekit.runs.evaluate import evaluate_run, format_table

__all__ = ["run", "settings_from_args"]


def settings_from_args(args: argparse.Namespace) -> EvaluateSettings:
    return EvaluateSettings(metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()), split=args.split,
                            exact=args.exact, strata=args.strata, variance=args.variance, n_samples=args.n_samples,
                            sampler=args.sampler, steps=args.steps, grid=args.grid,
                            guidance=args.guidance,
                            ode_examples=args.ode_examples, trace=args.trace, ode_rtol=args.ode_rtol,
                            ode_atol=args.ode_atol, dequantization=args.dequantization,
                            dequant_samples=args.dequant_samples, seed=args.seed, iwae_k=args.iwae_k,
                            bound_clip=None if args.bound_clip is None else args.bound_clip == "on",
                            compose=args.compose)


def run(args: argparse.Namespace) -> int:
    evaluation, report = evaluate_run(args.run, settings_from_args(args), progress=not args.no_progress,
                                      device=device_from_flag(args.device))
    if args.json:
        print(json.dumps(evaluation.result, indent=1))
    else:
        print(format_table(evaluation.rows))
        print(f"report: {report}")
    return 0
