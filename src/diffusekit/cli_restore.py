"""``diffusekit restore``: training-free inpainting, outpainting, super-resolution and colorization.

Thin, like cli.py: parse the flags into ``RestoreSettings``, call ``sampling.restore_run.restore_run``.
Wiring into cli.py: ``cli_restore.add_parser(sub)`` in ``build_parser`` and ``"restore":
cli_restore.main`` in ``COMMANDS``. Until then (and in tests) ``run(argv)`` is the same command on its
own: bad input is one line naming the flag or file, exit status 2 (``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from diffusekit.errors import ConfigError

__all__ = ["add_parser", "main", "run", "settings_from_args", "format_metrics"]


# the choices of sampling.restore_run, repeated so that building the parser does not import torch
TASKS = ("inpaint", "outpaint", "superres", "colorize")
METHODS = ("repaint", "ddnm")
MASKS = ("center", "border", "left", "right", "top", "bottom", "random")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``restore`` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("restore", help="inpaint, outpaint, super-resolve or colorize images with a trained "
                                              "unconditional run (RePaint or DDNM, no training)")
    p.add_argument("--run", type=Path, required=True, help="run folder written by `diffusekit train`")
    p.add_argument("--task", choices=TASKS, default=None, help="the degradation to undo (required unless --settings)")
    p.add_argument("--method", choices=METHODS, default="repaint",
                   help="repaint: replace the measured part of x_{t-1} (Lugmayr et al. 2022); ddnm: project the "
                        "predicted x0 onto A x = y (Wang et al. 2023)")
    p.add_argument("--mask", default=None,
                   help=f"region to generate: {', '.join(MASKS)} (--fraction of the pixels), or a PNG of the image "
                        "size whose white pixels are generated (default: center for inpaint, border for outpaint)")
    p.add_argument("--fraction", type=float, default=0.5, help="random mask: share of unknown pixels")
    p.add_argument("--mask-seed", type=int, default=0, help="random mask: seed (each input gets its own mask)")
    p.add_argument("--factor", type=int, default=None, help="superres: downsampling factor (default 2)")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (0 = T, the full chain)")
    p.add_argument("--spacing", choices=["leading", "linspace", "trailing"], default="trailing")
    p.add_argument("--resample", type=int, default=1,
                   help="RePaint's U: denoise every segment U times (1 = no resampling)")
    p.add_argument("--jump", type=int, default=10, help="RePaint's jump length j (steps re-noised per resampling)")
    p.add_argument("--variance", choices=["beta", "beta_tilde"], default="beta_tilde", help="reverse variance")
    p.add_argument("--clip-x0", type=float, default=None, metavar="C", help="clip predicted x0 to [-C, C]")
    p.add_argument("--seeds", default="0-2", help="restorations per input, one per seed, e.g. 0-2 or 1,5")
    p.add_argument("--n", type=int, default=8, help="restore the first N images of --split")
    p.add_argument("--images", type=Path, nargs="+", default=None, help="restore these image files instead")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--no-ema", dest="ema", action="store_false", default=True, help="use the raw weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--settings", type=Path, help="settings.json of an earlier `restore`: reproduce it exactly")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/restore-<task>-<method>)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def settings_from_args(args: argparse.Namespace):
    """``RestoreSettings`` from the flags (or from ``--settings``); ConfigError naming the flag."""
    from diffusekit.sampling.noise import parse_seeds
    from diffusekit.sampling.restore_run import RestoreSettings

    if args.settings:
        try:
            return RestoreSettings.from_json(args.settings.read_text())
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise ConfigError(f"--settings {args.settings}: cannot read restore settings ({exc})") from None
    if args.task is None:
        raise ConfigError("--task is required (inpaint, outpaint, superres or colorize) unless --settings is given")
    if args.mask is not None and args.task not in ("inpaint", "outpaint"):
        raise ConfigError(f"--mask applies to inpaint and outpaint, not --task {args.task}")
    if args.factor is not None and args.task != "superres":
        raise ConfigError(f"--factor applies to superres, not --task {args.task}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return RestoreSettings(task=args.task, method=args.method, mask=args.mask or "", fraction=args.fraction,
                           mask_seed=args.mask_seed, factor=2 if args.factor is None else args.factor,
                           steps=args.steps, spacing=args.spacing, resample=args.resample, jump=args.jump,
                           variance=args.variance, clip_x0=args.clip_x0, seeds=seeds, n=args.n,
                           images=[str(p) for p in args.images or []], split=args.split, use_ema=args.ema,
                           batch_size=args.batch_size)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ... or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    return device


def format_metrics(m: dict) -> str:
    """One line: PSNR on the unknown region (beside A+ y), classifier accuracy where there is one."""
    where = "the unknown pixels" if m["task"] in ("inpaint", "outpaint") else "all pixels"
    text = (f"{m['task']} with {m['method']} (U={m['resample']}): PSNR {m['psnr']:.2f} dB on {where} "
            f"(A+ y: {m['psnr_pinv']:.2f} dB)")
    if "accuracy" in m:
        text += (f", classifier accuracy {m['accuracy']:.3f} (originals {m['accuracy_original']:.3f}, "
                 f"degraded {m['accuracy_degraded']:.3f})")
    return text + f"; {m['n_samples']} samples, {m['nfe']} network calls each, {m['seconds']:.1f} s"


def main(args: argparse.Namespace) -> int:
    """Run ``restore`` for parsed flags; errors are ``DiffusekitError`` (cli.main prints one line)."""
    from diffusekit.sampling.restore_run import restore_run

    for flag in ("steps", "resample", "jump", "batch_size", "n"):
        if getattr(args, flag) < (0 if flag == "steps" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'steps' else 'positive'}, "
                              f"got {getattr(args, flag)}")
    if args.clip_x0 is not None and not args.clip_x0 > 0:
        raise ConfigError(f"--clip-x0 must be positive, got {args.clip_x0}")
    settings = settings_from_args(args)
    device = _device(args.device)
    out = args.out or args.run / f"restore-{settings.task}-{settings.method}"
    metrics = restore_run(args.run, settings, out, device=device, progress=not args.no_progress)
    print(f"{format_metrics(metrics)} -> {out}")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """``diffusekit restore ARGS`` through the main command line (``python -m diffusekit.cli_restore ARGS``);
    a bad flag returns 2 after its one-line message instead of raising SystemExit."""
    from diffusekit.cli import main as cli_main

    args = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    try:
        return cli_main(["restore", *args])
    except SystemExit as exc:  # argparse: a bad flag (one line already printed) or --help
        return int(exc.code or 0)


if __name__ == "__main__":
    raise SystemExit(run())
