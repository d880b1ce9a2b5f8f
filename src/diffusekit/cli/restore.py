"""``diffusekit restore``: inpainting, outpainting, super-resolution and colorization with a trained run
(RePaint or DDNM, no training); the flags become ``RestoreSettings`` (or ``--settings`` reproduces a call)."""

from __future__ import annotations

import argparse

from diffusekit.cli.common import device_from_flag
from diffusekit.errors import ConfigError
from diffusekit.io.atomic import read_input_file
from diffusekit.runs.restore import RestoreSettings, restore_run
from diffusekit.sampling.catalog import DEFAULT_MASK
from diffusekit.sampling.settings import parse_seeds

__all__ = ["run", "settings_from_args", "format_metrics"]


def settings_from_args(args: argparse.Namespace) -> RestoreSettings:
    """``RestoreSettings`` from the flags (or from ``--settings``); ConfigError naming the flag."""
    if args.settings:
        text = read_input_file(args.settings, "settings file", flag="--settings")
        try:
            return RestoreSettings.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"--settings {args.settings}: cannot read restore settings ({exc})") from None
    if args.task is None:
        raise ConfigError("--task is required (inpaint, outpaint, superres or colorize) unless --settings is given")
    if args.mask is not None and args.task not in DEFAULT_MASK:
        raise ConfigError(f"--mask applies to inpaint and outpaint, not --task {args.task}")
    if args.factor is not None and args.task != "superres":
        raise ConfigError(f"--factor applies to superres, not --task {args.task}")
    return RestoreSettings(task=args.task, method=args.method, mask=args.mask or "", fraction=args.fraction,
                           mask_seed=args.mask_seed, factor=2 if args.factor is None else args.factor,
                           steps=args.steps, spacing=args.spacing, resample=args.resample, jump=args.jump,
                           variance=args.variance, clip_x0=args.clip_x0, seeds=parse_seeds(args.seeds), n=args.n,
                           images=[str(p) for p in args.images or []], split=args.split, use_ema=args.ema,
                           batch_size=args.batch_size)


def format_metrics(m: dict) -> str:
    """One line: PSNR on the unknown region (beside A+ y), classifier accuracy where there is one."""
    where = "the unknown pixels" if m["task"] in DEFAULT_MASK else "all pixels"
    text = (f"{m['task']} with {m['method']} (U={m['resample']}): PSNR {m['psnr']:.2f} dB on {where} "
            f"(A+ y: {m['psnr_pinv']:.2f} dB)")
    if "accuracy" in m:
        text += (f", classifier accuracy {m['accuracy']:.3f} (originals {m['accuracy_original']:.3f}, "
                 f"degraded {m['accuracy_degraded']:.3f})")
    return text + f"; {m['n_samples']} samples, {m['nfe']} network calls each, {m['seconds']:.1f} s"


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    metrics, out = restore_run(args.run, settings, args.out, device=device_from_flag(args.device),
                               progress=not args.no_progress)
    print(f"{format_metrics(metrics)} -> {out}")
    return 0
