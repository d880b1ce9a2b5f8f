"""``diffusekit sample``: samples of a trained run (or a diffusers folder), one per seed, into a folder."""

from __future__ import annotations

import argparse

from diffusekit.cli.common import device_from_flag, flag_names, sampler_overrides
from diffusekit.cli.flags import SAMPLER_FLAGS
from diffusekit.families.base import SampleRequest
from diffusekit.runs.sample import sample_run
from diffusekit.sampling.settings import parse_int_list, parse_seeds

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    request = SampleRequest(prompts=args.prompt, control_from=args.control_from, control_images=args.control_images,
                            control_scale=args.control_scale)
    overrides = {} if args.settings else sampler_overrides(args)
    if not args.settings:
        overrides.update(seeds=parse_seeds(args.seeds), use_ema=args.ema, batch_size=args.batch_size)
        overrides.update({name: getattr(args, name) for name in ("precision", "compile")
                          if getattr(args, name) is not None})
        if args.classes is not None:
            overrides["classes"] = parse_int_list(args.classes, "--classes", distinct=False, example="3 or 0,1,2 or 0-4")
    names = {**flag_names(SAMPLER_FLAGS), "seeds": "--seeds", "batch_size": "--batch-size", "use_ema": "--no-ema",
             "classes": "--classes", "precision": "--precision", "compile": "--compile"}
    result = sample_run(args.run, overrides, request, settings_file=args.settings, out=args.out, names=names,
                        device=device_from_flag(args.device), progress=not args.no_progress, then=args.then,
                        then_steps=args.then_steps)
    note = f" ({result.samples.note})" if result.samples.note else ""
    print(f"{len(result.settings.seeds)} samples in {result.seconds:.1f} s -> {result.out}{note}")
    return 0

