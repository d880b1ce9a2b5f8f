"""``diffusekit sample`` and ``diffusekit evaluate`` for text-to-image latent runs (``cli.py`` routes
runs with ``model.kind = "latent_unet"`` here). Thin: parse, check, call ``latent.run``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Callable

from diffusekit.errors import ConfigError

__all__ = ["sample_command", "evaluate_command", "DEFAULT_GRID_PROMPTS"]

DEFAULT_GRID_PROMPTS = ("a handwritten {d}", "an image of the numeral {w}")  # one training template, one held out


def _prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` (repeatable), else the prompts recorded in ``--settings``; none is an error."""
    if args.prompt is not None:
        return list(args.prompt)
    if args.settings is not None:
        try:
            recorded = json.loads(args.settings.read_text()).get("extra", {}).get("prompts")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"--settings {args.settings}: cannot read it ({exc})") from None
        if isinstance(recorded, list) and recorded and all(isinstance(p, str) for p in recorded):
            return recorded
    raise ConfigError(f"--prompt: {args.run} is a text-conditioned run; give at least one --prompt "
                      "(e.g. --prompt \"a handwritten 3\"; --prompt \"\" samples unconditionally)")


def sample_command(args: argparse.Namespace, build_settings: Callable) -> int:
    """Sample a text run: sample i gets ``--prompt`` i % P; ``--guidance S`` (default: the run's
    sample.guidance) guides toward it with "" as the null condition. ``build_settings(args, run)``
    is the CLI's own flag parser for sampler settings."""
    from diffusekit.latent.run import load_text_latent_run, sample_prompts
    from diffusekit.sampling.run import write_samples

    if args.classes is not None:
        raise ConfigError(f"--classes: {args.run} is text-conditioned; prompt it with --prompt instead")
    prompts = _prompts(args)
    run = load_text_latent_run(args.run, use_ema=args.ema)
    settings = dataclasses.replace(build_settings(args, run), classes=None)
    if settings.use_ema != args.ema:
        run = load_text_latent_run(args.run, use_ema=settings.use_ema)
    out = args.out or args.run / f"samples-{settings.sampler}-{settings.steps or run.schedule.T}"
    t0 = time.time()
    x = sample_prompts(run, prompts, settings, progress=not args.no_progress)
    write_samples(x, settings.seeds, out, settings, run.levels, nrow=len(prompts) if 1 < len(prompts) <= 16 else None,
                  extra={"run": str(args.run), "checkpoint": str(run.checkpoint), "step": run.step, "prompts": prompts})
    print(f"{len(settings.seeds)} samples ({len(prompts)} prompt{'s' * (len(prompts) > 1)}, guidance "
          f"{settings.guidance:g}) in {time.time() - t0:.1f} s -> {out}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Prompt accuracy (training and held-out templates), fd and fd_ratio at ``--guidance`` (default:
    the run's sample.guidance); writes <run>/eval/text2img-g<S>.json and a picture, one row per prompt."""
    from diffusekit.data.captions import caption
    from diffusekit.latent.run import (evaluate_prompts, format_prompt_table, load_text_latent_run,
                                       save_prompt_grid, write_evaluation)
    from diffusekit.sampling.run import SampleSettings

    run = load_text_latent_run(args.run)
    sc = run.cfg.sample
    guidance = sc.guidance if args.guidance is None else args.guidance
    if not (guidance >= 0 and guidance != float("inf")):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {guidance}")
    n = 200 if args.n_samples is None else args.n_samples
    if n < 10:
        raise ConfigError(f"--n-samples must be at least 10 (one per digit), got {n}")
    steps = sc.steps if args.steps is None else args.steps
    try:
        settings = SampleSettings(sampler=args.sampler or sc.sampler, steps=steps, eta=sc.eta, variance=sc.variance,
                                  spacing=sc.spacing, guidance=float(guidance), batch_size=250)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    t0 = time.time()
    result = evaluate_prompts(run, settings, n_samples=n, progress=not args.no_progress)
    result["seconds"] = time.time() - t0
    path = write_evaluation(args.run, result)
    prompts = [caption(d, t) for t in DEFAULT_GRID_PROMPTS for d in range(10)]
    grid = save_prompt_grid(run, prompts, 6, settings, path.with_suffix(".png"))
    print(json.dumps(result, indent=1) if args.json else format_prompt_table(result))
    if not args.json:
        print(f"results: {path}\npicture (one row per prompt): {grid}")
    return 0
