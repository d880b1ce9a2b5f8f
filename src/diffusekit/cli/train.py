"""``diffusekit train``: a config (file, ``--set`` overrides) into a run folder; ``--resume`` continues it."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusekit.config import format_config, load_config
from diffusekit.errors import ConfigError
from diffusekit.train.trainer import train

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / (args.config.stem if args.config else "digits")
    if args.resume and not out.is_dir():
        raise ConfigError(f"--resume: run folder {out} does not exist")
    config = args.config
    if args.resume and config is None and (out / "config.toml").is_file():
        config = out / "config.toml"  # resuming without --config continues with the run's own config
    cfg = load_config(config, args.overrides)
    if args.dry_run:
        print(format_config(cfg))
        return 0
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result.get("rank", 0) == 0:  # under torchrun, one line from rank 0
        print(f"trained to step {result['step']} ({result['stopped']}) in {result['train_seconds']:.0f} s; "
              f"run folder: {out}")
    return 0
