"""``diffusekit demo``: train on the bundled digits (resuming a run that exists), then evaluate and write
a summary (``make demo``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffusekit.config import load_config
from diffusekit.families.base import EvaluateSettings
from diffusekit.io.atomic import atomic_write_text
from diffusekit.io.checkpoint import list_checkpoints
from diffusekit.runs.evaluate import evaluate_run, format_table
from diffusekit.train.trainer import train

__all__ = ["run", "DEMO_METRICS"]

DEMO_METRICS = ("bpd", "fd")


def run(args: argparse.Namespace) -> int:
    config = args.config or (Path("configs/digits.toml") if Path("configs/digits.toml").exists() else None)
    cfg = load_config(config, args.overrides)
    resume = bool(list_checkpoints(args.out))  # a run killed before its first checkpoint starts afresh
    t0 = time.time()
    result = train(cfg, args.out, resume=resume, progress=not args.no_progress)
    train_s = time.time() - t0
    evaluation, report = evaluate_run(args.out, EvaluateSettings(metrics=DEMO_METRICS, strata=25),
                                      progress=not args.no_progress)
    summary = (f"trained to step {result['step']} in {train_s:.0f} s; total {time.time() - t0:.0f} s\n\n"
               f"{format_table(evaluation.rows)}\n\nsamples: {args.out / 'samples.png'}\n"
               f"loss curve: {args.out / 'loss_curve.png'}\nreport: {report}\n")
    atomic_write_text(args.out / "summary.txt", summary)
    print(summary)
    return 0
