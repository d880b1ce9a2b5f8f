"""``diffusekit demo``: train the demo config on the bundled digits (resuming a run that exists), then
evaluate it and write a summary that opens with a verdict (``make demo``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from diffusekit.config import load_config
from diffusekit.families.base import EvaluateSettings
from diffusekit.io.atomic import atomic_write_text
from diffusekit.io.checkpoint import list_checkpoints
from diffusekit.runs.evaluate import evaluate_run, format_table
from diffusekit.train.trainer import train

__all__ = ["DEMO_CONFIG", "DEMO_METRICS", "QUALITY_TARGET", "run", "verdict"]

DEMO_CONFIG = Path("configs/demo.toml")  # the best measured digits config (its header has the comparison)
DEMO_METRICS = ("bpd", "fd")
QUALITY_TARGET = 1.2  # fd_ratio at or below this reads "within 1.2x of real data" (real images score 1.0)

BASELINE_NAMES = {"categorical_per_pixel": "per-pixel categorical", "gaussian_full_covariance": "Gaussian"}


def _likelihood_line(bpd: dict[str, Any]) -> str:
    value, baselines = bpd["bits_per_dim"], bpd.get("baselines", {})
    named = ", ".join(f"{BASELINE_NAMES.get(k, k)} {v:.2f}" for k, v in baselines.items())
    above = [BASELINE_NAMES.get(k, k) for k, v in baselines.items() if value >= v]
    where = ("below both baselines" if not above and len(baselines) == 2 else
             "below the baselines" if not above else f"NOT below the {' and '.join(above)} baseline")
    return (f"likelihood: {value:.2f} bits/dim on the {bpd.get('n_examples', '?')} held-out images, {where} "
            f"({named}; lower is better)")


def _quality_line(q: dict[str, Any]) -> str:
    ratio, (lo, hi) = q["fd_ratio"], q["fd_ratio_interval"]
    if ratio <= QUALITY_TARGET:
        reading = f"within {QUALITY_TARGET}x of real data"
    else:
        reading = f"{ratio:.1f}x as far from the held-out images as real ones"
    return (f"samples: fd_ratio {ratio:.2f} (95% interval {lo:.2f}-{hi:.2f}; real images score 1.0): {reading}; "
            f"KID {q['kid_excess']:.2f} ± {q['kid_excess_stderr']:.2f} above real data, {q['n_samples']} samples")


def verdict(result: dict[str, Any], train_s: float, step: int, steps: int) -> list[str]:
    """The summary's opening lines, read off an evaluation's results: the bound against both baselines,
    the sample quality against real data, and the time it took."""
    lines = []
    if "bpd" in result:
        lines.append(_likelihood_line(result["bpd"]))
    if "quality" in result:
        lines.append(_quality_line(result["quality"]))
    stopped = "" if step >= steps else f", stopped by train.time_limit_s before {steps}"
    timing = f"time: {train_s:.0f} s of training ({step} steps{stopped}, {torch.get_num_threads()} threads)"
    if "quality" in result:
        q = result["quality"]
        timing += f", {q['seconds_per_sample']:.2f} s per sample ({q['sampler']}, {q['steps']} steps)"
    lines.append(timing)
    return lines


def run(args: argparse.Namespace) -> int:
    config = args.config or (DEMO_CONFIG if DEMO_CONFIG.exists() else None)
    cfg = load_config(config, args.overrides)
    resume = bool(list_checkpoints(args.out))  # a run killed before its first checkpoint starts afresh
    t0 = time.time()
    result = train(cfg, args.out, resume=resume, progress=not args.no_progress)
    train_s = time.time() - t0
    evaluation, report = evaluate_run(args.out, EvaluateSettings(metrics=DEMO_METRICS, strata=25),
                                      progress=not args.no_progress)
    lines = "\n".join(verdict(evaluation.result, train_s, result["step"], cfg.train.steps))
    details = (f"config: {config or 'the defaults'}; total {time.time() - t0:.0f} s\n\n"
               f"{format_table(evaluation.rows)}\n\nsamples: {args.out / 'samples.png'}\n"
               f"loss curve: {args.out / 'loss_curve.png'}\nreport: {report}\n")
    atomic_write_text(args.out / "summary.txt", f"{lines}\n\n{details}")  # the file opens with the verdict,
    print(f"{details}\n{lines}")  # the terminal ends with it
    return 0
