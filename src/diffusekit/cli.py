"""The command-line tool. Thin: parse flags, build the config, call the library.

Errors about the user's input (``DiffusekitError``) are printed as one line and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from diffusekit import cli_restore
from diffusekit.errors import ConfigError, DiffusekitError

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it (no usage block); exit status 2 as before."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusekit", description="Diffusion models that are correct, measurable and fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a TOML config")
    p.add_argument("--config", type=Path, help="TOML config file (defaults: the digits demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (with the run's config.toml "
                        "unless --config is given)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    _add_common(p)

    p = sub.add_parser("sample", help="draw samples from a trained run (or a diffusers UNet2DModel folder)")
    p.add_argument("--run", type=Path, required=True,
                   help="run folder written by `diffusekit train`, or a diffusers folder saved by save_pretrained")
    p.add_argument("--seeds", default="0-63", help="sample seeds, e.g. 0-63 or 1,5,9-12 (image i depends only on seed i)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                   help="ddpm, ddim (discrete); euler, heun, rk45, dpmpp_2m, unipc (probability-flow ODE); "
                        "sde, pc, langevin")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: the run's config; 0 = T)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1]")
    p.add_argument("--variance", choices=["beta", "beta_tilde"], default=None, help="DDPM reverse variance")
    p.add_argument("--spacing", choices=["leading", "linspace", "trailing"], default=None, help="timestep grid spacing")
    p.add_argument("--clip-x0", type=float, default=None, metavar="C", help="clip predicted x0 to [-C, C]")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale of a class-conditional run: eps_uncond + S (eps_cond - "
                        "eps_uncond); 1 = the conditional model (default: the run's sample.guidance), 0 = unconditional")
    p.add_argument("--classes", default=None, metavar="LIST",
                   help="class labels of a class-conditional run, e.g. 3 or 0,1,2 or 0-4, repeated over the seeds "
                        "(default: all classes in turn, sample i gets class i %% K)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text-conditioned runs (model.kind = latent_unet): a caption, repeatable; sample i gets "
                        "prompt i %% P (\"\" = unconditional)")
    p.add_argument("--control-from", default=None, metavar="SPLIT",
                   help="ControlNet runs (model.kind = controlnet): sample i follows the hint of example seed i of "
                        "this split (default: test)")
    p.add_argument("--control-images", nargs="+", type=Path, default=None, metavar="PNG",
                   help="ControlNet runs: take the hints from these images instead (sample i follows image i %% n)")
    p.add_argument("--control-scale", type=float, default=None, metavar="C",
                   help="ControlNet runs: multiply the ControlNet residuals by C (default 1; 0 = the base model)")
    _add_continuous_sampler_flags(p)
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True, help="use EMA weights (default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--settings", type=Path, help="settings.json of an earlier `sample` call: reproduce it exactly")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/samples-<sampler>-<steps>)")
    _add_common(p)

    p = sub.add_parser("evaluate", help="bits/dim (term by term, with baselines) and sample quality of a run")
    p.add_argument("--run", type=Path, required=True, help="run folder written by `diffusekit train`")
    p.add_argument("--split", default="test", help="data split to evaluate on (test or train)")
    p.add_argument("--metrics", default="bpd,fd",
                   help="comma-separated: bpd (the bound), fd (sample quality), nll_ode (probability-flow ODE likelihood)")
    p.add_argument("--exact", action="store_true", help="compute all T terms of the bound (default: stratified estimate)")
    p.add_argument("--strata", type=int, default=50, help="strata of t for the estimated bound (2 draws each)")
    p.add_argument("--variance", choices=["fitted", "beta_tilde", "beta"], default="fitted",
                   help="reverse variances of the bound: fitted to the train split for the model's means "
                        "(default), or the fixed beta_tilde / beta")
    p.add_argument("--n-samples", type=int, default=None, help="samples for the quality score (default: split size, <= 1000)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps for the quality score (0 = T)")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="class-conditional runs: guidance scale of the quality samples, which cycle through the "
                        "classes (default: the run's sample.guidance)")
    p.add_argument("--ode-examples", type=int, default=100,
                   help="examples of the split scored by nll_ode (the probability-flow ODE likelihood)")
    p.add_argument("--trace", choices=["hutchinson", "exact"], default="hutchinson",
                   help="nll_ode divergence: Hutchinson estimate (one Rademacher probe) or exact (D backward passes)")
    p.add_argument("--ode-rtol", type=float, default=1e-5, help="nll_ode solver relative tolerance")
    p.add_argument("--ode-atol", type=float, default=1e-5, help="nll_ode solver absolute tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--iwae-k", type=int, default=100, help="importance samples of the IWAE bound (VAE-family runs)")
    _add_common(p)

    p = sub.add_parser("demo", help="train on the bundled digits, sample and report (a few minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--config", type=Path, default=None, help="config to use (default: configs/digits.toml if present)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_common(p)
    cli_restore.add_parser(sub)
    return parser


SAMPLER_CHOICES = ["ddpm", "ddim", "euler", "heun", "rk45", "dpmpp_2m", "unipc", "sde", "pc", "langevin"]
CONTINUOUS_FLAGS = ("grid", "snr", "corrector_steps", "langevin_steps", "step_size", "rtol", "atol", "order")


def _add_continuous_sampler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", choices=["auto", "time", "logsnr", "karras", "time_trailing", "logsnr_trailing",
                                      "karras_trailing"], default=None,
                   help="time grid of the continuous-time samplers (auto: karras for euler/heun, logsnr for "
                        "dpmpp_2m, logsnr_trailing for unipc, time for sde/pc; *_trailing: the last call one "
                        "spacing above t_min)")
    p.add_argument("--snr", type=float, default=None, help="pc: Langevin corrector signal-to-noise ratio")
    p.add_argument("--corrector-steps", type=int, default=None, help="pc: Langevin steps per noise level")
    p.add_argument("--langevin-steps", type=int, default=None, help="langevin: steps per noise level")
    p.add_argument("--step-size", type=float, default=None, help="langevin: step size / noise variance")
    p.add_argument("--rtol", type=float, default=None, help="rk45: relative tolerance")
    p.add_argument("--atol", type=float, default=None, help="rk45: absolute tolerance")
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None,
                   help="unipc: order of the predictor (the corrector adds one)")


def _continuous_settings(args: argparse.Namespace, sc) -> dict:
    """The continuous-time sampler flags (falling back on the run's [sample] config), checked."""
    out = {k: getattr(sc, k) if getattr(args, k, None) is None else getattr(args, k) for k in CONTINUOUS_FLAGS}
    rules = {"snr": (lambda v: v > 0, "positive"), "corrector_steps": (lambda v: v >= 0, ">= 0"),
             "langevin_steps": (lambda v: v >= 1, ">= 1"), "step_size": (lambda v: v > 0, "positive"),
             "rtol": (lambda v: v > 0, "positive"), "atol": (lambda v: v > 0, "positive"),
             "order": (lambda v: 1 <= v <= 3, "1, 2 or 3")}
    for key, (ok, want) in rules.items():
        if not ok(out[key]):  # also rejects NaN
            raise ConfigError(f"--{key.replace('_', '-')} must be {want}, got {out[key]}")
    return out


# -- commands -------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from diffusekit.config import format_config, load_config
    from diffusekit.train.trainer import train

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


def _sample_settings(args: argparse.Namespace, run):
    from diffusekit.sampling.noise import parse_seeds
    from diffusekit.sampling.run import SampleSettings

    if args.settings:
        try:
            return SampleSettings.from_json(args.settings.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--settings {args.settings}: cannot read sampler settings ({exc})") from None
    sc = run.cfg.sample
    steps = sc.steps if args.steps is None else args.steps
    sampler = args.sampler or sc.sampler
    if sampler in ("ddpm", "ddim") and (steps < 0 or steps > run.schedule.T):
        raise ConfigError(f"--steps must lie in 0..{run.schedule.T} (0 = all steps), got {steps}")
    if steps < 0:
        raise ConfigError(f"--steps must be >= 0 (0 = T), got {steps}")
    eta = sc.eta if args.eta is None else args.eta
    if not 0.0 <= eta <= 1.0:  # also rejects NaN
        raise ConfigError(f"--eta must lie in [0, 1], got {eta}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.clip_x0 is not None and not args.clip_x0 > 0:
        raise ConfigError(f"--clip-x0 must be positive, got {args.clip_x0}")
    clip_x0 = args.clip_x0 if args.clip_x0 is not None else (1.0 if sc.clip_x0 else None)
    if clip_x0 is not None and sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"--clip-x0 applies to ddpm and ddim only, not --sampler {sampler}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    guidance, classes = _conditioning_flags(args, sc, run.cfg.model.num_classes)
    return SampleSettings(sampler=sampler, steps=steps, eta=eta,
                          variance=args.variance or sc.variance, spacing=args.spacing or sc.spacing,
                          clip_x0=clip_x0, seeds=seeds, use_ema=args.ema, batch_size=args.batch_size,
                          **_continuous_settings(args, sc), guidance=guidance, classes=classes)


def parse_classes(text: str) -> list[int]:
    """``--classes`` syntax: comma-separated labels and inclusive ranges, repeats allowed ("3", "0,1,2",
    "0-4,7"); ValueError naming the flag otherwise."""
    import re

    classes: list[int] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"--classes: cannot parse {part.strip()!r} in {text!r}; use e.g. 3 or 0,1,2 or 0-4")
        lo, hi = int(m.group(1)), int(m.group(m.lastindex))
        if hi - lo > 100_000:
            raise ValueError(f"--classes: range {part.strip()!r} is longer than any model's label set")
        classes.extend(range(lo, hi + 1))
    return classes


def _check_guidance(value: float, flag: str, num_classes: int, run: Path) -> None:
    import math

    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if value != 1.0 and num_classes == 0:
        raise ConfigError(f"{flag}: run {run} is unconditional (model.num_classes = 0); guidance needs a "
                          "class-conditional run")


def _check_classes(classes: list[int] | None, flag: str, num_classes: int, run: Path) -> None:
    if classes is None:
        return
    if num_classes == 0:
        raise ConfigError(f"{flag}: run {run} is unconditional (model.num_classes = 0) and takes no class labels")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"{flag}: class {bad[0]} is out of range for run {run} (model.num_classes = {num_classes}: "
                          f"classes 0..{num_classes - 1})")


def _conditioning_flags(args: argparse.Namespace, sc, num_classes: int) -> tuple[float, list[int] | None]:
    """``--guidance`` (default: the run's sample.guidance) and ``--classes`` (default: every class in
    turn, recorded explicitly so settings.json reproduces), checked against the run's model."""
    guidance = sc.guidance if args.guidance is None else args.guidance
    _check_guidance(guidance, "--guidance" if args.guidance is not None else "sample.guidance", num_classes, args.run)
    classes = None
    if args.classes is not None:
        try:
            classes = parse_classes(args.classes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check_classes(classes, "--classes", num_classes, args.run)
    elif num_classes > 0:
        classes = list(range(num_classes))
    return guidance, classes


def _sample_latent(args: argparse.Namespace) -> int:
    """``sample`` for VAE / MHVAE / autoencoder runs: ancestral samples, one seed each."""
    from diffusekit.sampling.noise import parse_seeds
    from diffusekit.vae.evaluate import sample_latent_run

    for flag in ("sampler", "steps", "eta", "variance", "spacing", "clip_x0", "guidance", "classes",
                 "prompt") + CONTINUOUS_FLAGS:
        if getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to diffusion runs only; {args.run} is a "
                              "latent-variable model (ancestral sampling, no steps)")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    t0 = time.time()
    x, out = sample_latent_run(args.run, seeds, args.out, use_ema=args.ema, batch_size=args.batch_size,
                               settings_path=args.settings)
    print(f"{x.shape[0]} samples in {time.time() - t0:.1f} s -> {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from diffusekit.models import load_run
    from diffusekit.sampling.run import generate, write_samples
    from diffusekit.vae.evaluate import is_latent_run

    from diffusekit.foreign import is_diffusers_folder

    if is_diffusers_folder(args.run):  # a diffusers UNet2DModel + scheduler folder: diffusekit.foreign
        from diffusekit.foreign import sample_command as diffusers_sample

        return diffusers_sample(args, _sample_settings)
    if is_latent_run(args.run):
        return _sample_latent(args)
    from diffusekit.latent.run import is_text_latent_run

    if is_text_latent_run(args.run):  # text-to-image latent diffusion: diffusekit.latent.cli
        from diffusekit.latent.cli import sample_command

        return sample_command(args, _sample_settings)
    from diffusekit.control import is_control_run

    if is_control_run(args.run):  # ControlNet on a frozen unet: diffusekit.control
        from diffusekit.control import sample_command as control_sample

        return control_sample(args, _sample_settings)
    for flag, value in (("--control-from", args.control_from), ("--control-images", args.control_images),
                        ("--control-scale", args.control_scale)):
        if value is not None:
            raise ConfigError(f"{flag} applies to ControlNet runs (model.kind = 'controlnet'); {args.run} is not one")
    if args.prompt is not None:
        raise ConfigError(f"--prompt applies to text-conditioned runs (model.kind = 'latent_unet'); "
                          f"{args.run} is not one")
    run = load_run(args.run, use_ema=True if args.settings else args.ema)
    settings = _sample_settings(args, run)
    if settings.use_ema != (True if args.settings else args.ema):
        run = load_run(args.run, use_ema=settings.use_ema)
    num_classes = run.cfg.model.num_classes
    if args.settings:  # a settings.json may come from another run: check it against this model
        where = f"--settings {args.settings}"
        _check_guidance(settings.guidance, f"{where}: guidance", num_classes, args.run)
        _check_classes(settings.classes, f"{where}: classes", num_classes, args.run)
    out = args.out or args.run / f"samples-{settings.sampler}-{settings.steps or run.schedule.T}"
    t0 = time.time()
    x = generate(run.denoiser, run.schedule, run.data_shape, settings, progress=not args.no_progress,
                 num_classes=num_classes)
    period = len(settings.classes or range(num_classes))
    write_samples(x, settings.seeds, out, settings, run.levels,  # conditional: one class per grid column
                  extra={"run": str(args.run), "checkpoint": str(run.checkpoint), "step": run.step},
                  nrow=period if 1 < period <= 16 else None)
    print(f"{len(settings.seeds)} samples in {time.time() - t0:.1f} s -> {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diffusekit.evaluate.report import evaluate_run, format_table

    if args.strata < 1:
        raise ConfigError(f"--strata must be positive, got {args.strata}")
    if args.n_samples is not None and args.n_samples < 2:
        raise ConfigError(f"--n-samples must be at least 2, got {args.n_samples}")
    if args.steps is not None and args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    if args.ode_examples < 1:
        raise ConfigError(f"--ode-examples must be positive, got {args.ode_examples}")
    for flag in ("ode_rtol", "ode_atol"):
        if not getattr(args, flag) > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    from diffusekit.latent.run import is_text_latent_run
    from diffusekit.vae.evaluate import evaluate_latent_run, is_latent_run

    if is_text_latent_run(args.run):  # prompt accuracy and fd of a text-to-image latent run
        from diffusekit.latent.cli import evaluate_command

        return evaluate_command(args)
    from diffusekit.control import edge_agreement, is_control_run

    if is_control_run(args.run):  # ControlNet: how well the samples' hints follow the requested ones
        result = edge_agreement(args.run, n=args.n_samples or 200, sampler=args.sampler or "ddim",
                                steps=100 if args.steps is None else args.steps)
        print(json.dumps(result) if args.json else "  ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return 0

    if is_latent_run(args.run):  # VAE / MHVAE / autoencoder: ELBO and IWAE bounds, collapse, reconstruction
        if args.guidance is not None:
            raise ConfigError(f"--guidance applies to class-conditional diffusion runs; {args.run} is a latent-variable model")
        result = evaluate_latent_run(args.run, metrics=metrics, split=args.split, n_samples=args.n_samples,
                                     iwae_k=args.iwae_k, seed=args.seed, progress=not args.no_progress)
        print(json.dumps(result, indent=1) if args.json else format_table(result))
        if not args.json:
            print(f"report: {args.run / 'eval' / 'report.md'}")
        return 0
    result = evaluate_run(args.run, metrics=metrics, split=args.split, exact=args.exact, n_strata=args.strata, variance=args.variance,
                          n_samples=args.n_samples, sampler=args.sampler, steps=args.steps, seed=args.seed,
                          guidance=args.guidance,
                          ode_examples=args.ode_examples, trace=args.trace, ode_rtol=args.ode_rtol,
                          ode_atol=args.ode_atol, progress=not args.no_progress)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    if not args.json:
        print(f"report: {args.run / 'eval' / 'report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train on the bundled digits (resuming if the run exists), then evaluate and report."""
    from diffusekit.config import load_config
    from diffusekit.evaluate.report import evaluate_run, format_table
    from diffusekit.train.checkpoint import list_checkpoints
    from diffusekit.train.trainer import train

    config = args.config or (Path("configs/digits.toml") if Path("configs/digits.toml").exists() else None)
    cfg = load_config(config, args.overrides)
    resume = bool(list_checkpoints(args.out))  # a run killed before its first checkpoint starts afresh
    t0 = time.time()
    result = train(cfg, args.out, resume=resume, progress=not args.no_progress)
    train_s = time.time() - t0
    evaluation = evaluate_run(args.out, metrics=DEMO_METRICS, n_strata=25, progress=not args.no_progress)
    table = format_table(evaluation)
    summary = (f"trained to step {result['step']} in {train_s:.0f} s; total {time.time() - t0:.0f} s\n\n"
               f"{table}\n\nsamples: {args.out / 'samples.png'}\nloss curve: {args.out / 'loss_curve.png'}\n"
               f"report: {args.out / 'eval' / 'report.md'}\n")
    from diffusekit.train.checkpoint import atomic_write_text

    atomic_write_text(args.out / "summary.txt", summary)
    print(summary)
    return 0


DEMO_METRICS = ("bpd", "fd")

COMMANDS = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "restore": cli_restore.main}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DiffusekitError as exc:
        if args.debug:
            raise
        print(f"diffusekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffusekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
