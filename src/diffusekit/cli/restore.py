"""``diffusekit restore``: inpainting, outpainting, super-resolution, colorization, deblurring and desaturation
with a trained unconditional run (RePaint, DDNM or DPS, no training) or an image-to-image run (its own trained
sampler); the flags become ``RestoreSettings`` (or ``--settings`` reproduces a call)."""

from __future__ import annotations

import argparse

from diffusekit.cli.common import device_from_flag
from diffusekit.errors import ConfigError
from diffusekit.io.atomic import read_input_file
from diffusekit.runs.restore import RestoreSettings, restore_run
from diffusekit.sampling.catalog import DEFAULT_MASK, RESTORE_TASKS
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
        raise ConfigError(f"--task is required ({', '.join(RESTORE_TASKS)}) unless --settings is given")
    if args.mask is not None and args.task not in DEFAULT_MASK:
        raise ConfigError(f"--mask applies to inpaint and outpaint, not --task {args.task}")
    for flag, value, task in (("--factor", args.factor, "superres"), ("--blur-size", args.blur_size, "blur"),
                              ("--blur-width", args.blur_width, "blur"), ("--gain", args.gain, "saturation")):
        if value is not None and args.task != task:
            raise ConfigError(f"{flag} applies to {task}, not --task {args.task}")
    for flag, value in (("--noise-std", args.noise_std), ("--zeta", args.zeta),
                        ("--measurement-seed", args.measurement_seed)):
        if value is not None and args.method != "dps":
            raise ConfigError(f"{flag} applies to --method dps, not {args.method or 'the default method'}")
    dps = {name: value for name, value in (("blur_size", args.blur_size), ("blur_width", args.blur_width),
                                           ("gain", args.gain), ("noise_std", args.noise_std), ("zeta", args.zeta),
                                           ("measurement_seed", args.measurement_seed)) if value is not None}
    return RestoreSettings(task=args.task, method=args.method or "", mask=args.mask or "", fraction=args.fraction,
                           mask_seed=args.mask_seed, factor=2 if args.factor is None else args.factor,
                           steps=args.steps, spacing=args.spacing, resample=args.resample, jump=args.jump,
                           variance=args.variance, clip_x0=args.clip_x0, seeds=parse_seeds(args.seeds), n=args.n,
                           images=[str(p) for p in args.images or []], split=args.split, use_ema=args.ema,
                           batch_size=args.batch_size, **dps)


BASELINES = {"blur": "the blurred y", "saturation": "the pixel-wise inverse"}  # the degraded image, if not A+ y


def format_metrics(m: dict) -> str:
    """One line: PSNR on the unknown region (beside the degraded image), DPS's residual beside the noise,
    classifier accuracy where there is one."""
    where = "the unknown pixels" if m["task"] in DEFAULT_MASK else "all pixels"
    if m["method"] == "dps":
        how = f"zeta={m['zeta']:.3g}, noise std {m['noise_std']:g}"
    else:
        how = "trained on pairs" if m["method"] == "img2img" else f"U={m['resample']}"
    text = (f"{m['task']} with {m['method']} ({how}): PSNR {m['psnr']:.2f} dB on {where} "
            f"({BASELINES.get(m['task'], 'A+ y')}: {m['psnr_pinv']:.2f} dB)")
    if "psnr_of_mean" in m:
        text += f", of the mean over seeds {m['psnr_of_mean']:.2f} dB"
    if "residual_rms" in m:
        text += f", RMS of y - A(x) {m['residual_rms']:.3f}"
    if "accuracy" in m:
        text += (f", classifier accuracy {m['accuracy']:.3f} (originals {m['accuracy_original']:.3f}, "
                 f"degraded {m['accuracy_degraded']:.3f}; gap to the originals {m['accuracy_gap']:.3f}")
        if m["accuracy_gap_stderr"] is not None:
            text += f" ± {m['accuracy_gap_stderr']:.3f}"
        text += ")"
    return text + f"; {m['n_samples']} samples, {m['nfe']} network calls each, {m['seconds']:.1f} s"


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    metrics, out = restore_run(args.run, settings, args.out, device=device_from_flag(args.device),
                               progress=not args.no_progress)
    print(f"{format_metrics(metrics)} -> {out}")
    return 0
