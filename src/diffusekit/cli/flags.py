"""The flags of every command, in one torch-free parser (``build_parser``): ``diffusekit --help`` and a
bad flag answer at once, without importing torch. Names and choices come from the tables
(``sampling.catalog``, ``config``); a bad flag is one line naming it, exit status 2."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusekit.sampling.catalog import (
    BOUND_VARIANCES,
    DEQUANTIZATIONS,
    DPS_ZETA_SQRT_STEPS,
    EVAL_METRICS,
    GRID_CHOICES,
    IMG2IMG_METHOD,
    MASKS,
    RESTORE_METHODS,
    RESTORE_TASKS,
    SAMPLERS,
    SPACINGS,
    TUNABLE_SAMPLERS,
    VARIANCES,
)

__all__ = ["build_parser", "SAMPLER_FLAGS", "flag_of"]

# the SampleSettings fields a command-line flag sets (flag = "--" + field with "-" for "_")
SAMPLER_FLAGS = ("sampler", "steps", "eta", "variance", "spacing", "clip_x0", "grid", "snr", "corrector_steps",
                 "langevin_steps", "step_size", "rtol", "atol", "order", "guidance")


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it (no usage block); exit status 2 as before."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="where the network runs: cpu, cuda, cuda:1, ... or auto (a GPU when there is one) "
                        "(default: cpu)")


def _outputs(p: argparse.ArgumentParser, command: str, default_out: str) -> None:
    """The flags of a command that writes a folder of outputs from a run (sample, restore)."""
    p.add_argument("--batch-size", type=int, default=64,
                   help="examples per network call; changes no output (default: 64)")
    p.add_argument("--settings", type=Path, help=f"settings.json of an earlier `{command}` call: reproduce it exactly")
    p.add_argument("--out", type=Path, help=f"output folder (default: <run>/{default_out})")
    _device(p)
    _common(p)


def _sampler_flags(p: argparse.ArgumentParser) -> None:
    names = ", ".join(f"{name} ({row.summary})" for name, row in SAMPLERS.items())
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help=f"the sampler (default: the run's sample.sampler): {names}")
    p.add_argument("--steps", type=int, default=None,
                   help="number of sampling steps, 0 = T (default: the run's sample.steps)")
    p.add_argument("--eta", type=float, default=None,
                   help="ddim: eta in [0, 1], 0 = deterministic (default: the run's sample.eta)")
    p.add_argument("--variance", choices=list(VARIANCES), default=None,
                   help="ddpm: reverse variance, beta or the posterior's beta_tilde (default: the run's "
                        "sample.variance)")
    p.add_argument("--spacing", choices=list(SPACINGS), default=None,
                   help="ddpm, ddim: which of the T discrete timesteps the discrete samplers visit; trailing "
                        "starts at t = T (default: the run's sample.spacing). The continuous-time samplers take "
                        "--grid instead")
    p.add_argument("--clip-x0", type=float, default=None, metavar="C",
                   help="ddpm, ddim: clip predicted x0 to [-C, C] (default: the run's sample.clip_x0; unset = "
                        "no clipping)")
    p.add_argument("--grid", choices=list(GRID_CHOICES), default=None,
                   help="time grid of the continuous-time samplers (euler, heun, dpmpp_2m, unipc, sde, pc, "
                        "consistency): auto = the sampler's own; time, logsnr, karras; *_trailing = the last call "
                        "one spacing above t_min; tuned = the run's grids.json from tune-grid (default: the run's "
                        "sample.grid). ddpm and ddim take --spacing instead")
    p.add_argument("--snr", type=float, default=None,
                   help="pc: Langevin corrector signal-to-noise ratio (default: the run's sample.snr)")
    p.add_argument("--corrector-steps", type=int, default=None,
                   help="pc: Langevin steps per noise level (default: the run's sample.corrector_steps)")
    p.add_argument("--langevin-steps", type=int, default=None,
                   help="langevin: steps per noise level (default: the run's sample.langevin_steps)")
    p.add_argument("--step-size", type=float, default=None,
                   help="langevin: step size / noise variance (default: the run's sample.step_size)")
    p.add_argument("--rtol", type=float, default=None,
                   help="rk45: relative tolerance (default: the run's sample.rtol)")
    p.add_argument("--atol", type=float, default=None,
                   help="rk45: absolute tolerance (default: the run's sample.atol)")
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None,
                   help="unipc: order of the predictor; the corrector adds one (default: the run's sample.order)")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale of a class- or text-conditioned run: eps_uncond + S (eps_cond "
                        "- eps_uncond); 1 = the conditional model (default: the run's sample.guidance), 0 = "
                        "unconditional")


def _train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config")
    p.add_argument("--config", type=Path,
                   help="TOML config file (default: none, the built-in defaults: the digits U-Net of "
                        "configs/digits.toml, 3000 steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (with the config recorded in it "
                        "unless --config is given)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    _common(p)


def _sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run (or a diffusers UNet2DModel folder)")
    p.add_argument("--run", type=Path, required=True,
                   help="run folder written by `diffusekit train`, or a diffusers folder saved by save_pretrained")
    p.add_argument("--seeds", default="0-63",
                   help="sample seeds, e.g. 0-63 or 1,5,9-12; image i depends only on seed i (default: 0-63)")
    _sampler_flags(p)
    p.add_argument("--classes", default=None, metavar="LIST",
                   help="class labels of a class-conditional run, e.g. 3 or 0,1,2 or 0-4, repeated over the seeds "
                        "(default: all classes in turn, sample i gets class i %% K)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text-conditioned runs (model.kind = latent_unet, text_unet, or a controlnet over a "
                        "text base): a caption, repeatable; sample i gets prompt i %% P (\"\" = unconditional)")
    p.add_argument("--control-from", choices=["train", "test"], default=None,
                   help="ControlNet runs (model.kind = controlnet): sample i follows the hint of example seed i of "
                        "this split (default: test)")
    p.add_argument("--control-images", nargs="+", type=Path, default=None, metavar="PNG",
                   help="ControlNet runs: take the hints from these images instead (sample i follows image i %% n)")
    p.add_argument("--control-scale", type=float, default=None, metavar="C",
                   help="ControlNet runs: multiply the ControlNet residuals by C (default: 1; 0 = the base model)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="the network under autocast in this precision; the sampler's arithmetic stays fp32/fp64 "
                        "(default: the run's sample.precision)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the network (eager, with a warning, where the backend is missing) "
                        "(default: the run's sample.compile)")
    p.add_argument("--then", type=Path, default=None, metavar="SR_RUN",
                   help="a cascade: upsample the samples with this super-resolution image-to-image run (model.kind "
                        "img2img trained for superres; its own sampler, one noise stream per seed) (default: none)")
    p.add_argument("--then-steps", type=int, default=0, metavar="N",
                   help="--then: ancestral steps of the super-resolution stage, 0 = its T (default: 0)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights (the default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false",
                     help="use the raw weights instead of the EMA weights")
    _outputs(p, "sample", "samples-<sampler>-<steps>")


def _evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="bits/dim (term by term, with baselines) and sample quality of a run")
    p.add_argument("--run", type=Path, required=True, help="run folder written by `diffusekit train`")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="data split to evaluate on (default: test)")
    p.add_argument("--metrics", default="bpd,fd",
                   help=f"comma-separated, of {', '.join(EVAL_METRICS)}: bpd (the bound), fd (sample quality), nll_ode "
                        "(probability-flow ODE likelihood) (default: bpd,fd)")
    p.add_argument("--exact", action="store_true", help="compute all T terms of the bound (default: stratified estimate)")
    p.add_argument("--strata", type=int, default=50,
                   help="strata of t for the estimated bound, 2 draws each (default: 50)")
    p.add_argument("--variance", choices=list(BOUND_VARIANCES), default=None,
                   help="reverse variances of the bound: fitted to the train split for the model's means, the "
                        "fixed beta_tilde / beta, or the network's own (learned; a run trained with "
                        "model.learned_variance = true) (default: learned for such a run, else fitted)")
    p.add_argument("--bound-clip", choices=["on", "off"], default=None,
                   help="the bound's reverse mean takes the predicted x0 clipped to [-1, 1] at t >= 2, never a looser "
                        "term (default: the run's model.bound_clip)")
    p.add_argument("--n-samples", type=int, default=None,
                   help="samples for the quality score (default: 1000, 200 for ControlNet and text-to-image "
                        "runs; fewer make fd_ratio too noisy to rank by)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="sampler of the quality samples (default: the run's sample.sampler)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps for the quality score, 0 = T (default: the run's sample.steps)")
    p.add_argument("--grid", choices=list(GRID_CHOICES), default=None,
                   help="time grid of the quality samples' continuous-time sampler (tuned: the run's grids.json, "
                        "written by tune-grid; default: the run's sample.grid)")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="conditional runs: guidance scale of the quality samples, which cycle through the classes "
                        "(default: the run's sample.guidance)")
    p.add_argument("--ode-examples", type=int, default=100,
                   help="examples of the split scored by nll_ode, the probability-flow ODE likelihood (default: 100)")
    p.add_argument("--trace", choices=["hutchinson", "exact"], default="hutchinson",
                   help="nll_ode divergence: Hutchinson estimate (one Rademacher probe) or exact (D backward "
                        "passes) (default: hutchinson)")
    p.add_argument("--ode-rtol", type=float, default=1e-5, help="nll_ode solver relative tolerance (default: 1e-5)")
    p.add_argument("--ode-atol", type=float, default=1e-5, help="nll_ode solver absolute tolerance (default: 1e-5)")
    p.add_argument("--dequantization", choices=list(DEQUANTIZATIONS), default="uniform",
                   help="nll_ode on discrete data, how the probability of a bin is bounded: uniform noise, the "
                        "importance-weighted bound over --dequant-samples uniform draws (a bound with --trace exact), "
                        "or normal noise of std s(t_min) cut to the bin (truncated_normal, i-DODE) (default: uniform)")
    p.add_argument("--dequant-samples", type=int, default=1, metavar="K",
                   help="nll_ode: dequantization draws per example, averaged (importance: log-mean-exp) "
                        "(default: 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed of the bound's draws and of the quality samples (default: 0)")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--iwae-k", type=int, default=100,
                   help="importance samples of the IWAE bound, VAE-family runs (default: 100)")
    p.add_argument("--compose", action="store_true",
                   help="text runs on scenes: ask each two-digit scene as one caption per digit joined by \" AND \" "
                        "(composable diffusion, Liu et al. 2022), scored as usual; writes text2img-g<S>-and.json")
    _device(p)
    _common(p)


def _restore(sub) -> None:
    p = sub.add_parser("restore", help="inpaint, outpaint, super-resolve, colorize, deblur or desaturate images with "
                                       "a trained unconditional run (RePaint, DDNM or DPS, no training) or with an "
                                       "image-to-image run trained on pairs (model.kind img2img)")
    p.add_argument("--run", type=Path, required=True, help="run folder written by `diffusekit train`")
    p.add_argument("--task", choices=list(RESTORE_TASKS), default=None,
                   help="the degradation to undo (required unless --settings)")
    p.add_argument("--method", choices=[*RESTORE_METHODS, IMG2IMG_METHOD], default=None,
                   help="repaint: replace the measured part of x_{t-1} (Lugmayr et al. 2022); ddnm: project the "
                        "predicted x0 onto A x = y (Wang et al. 2023); dps: step down the gradient of "
                        "||y - A(x0_hat)|| through the denoiser, for noisy and nonlinear measurements (Chung et al. "
                        "2023; the only method for blur and saturation); img2img: the trained conditional sampler of "
                        "an image-to-image run (SR3, Palette; the only method such a run takes) (default: repaint, "
                        "img2img for an image-to-image run)")
    p.add_argument("--mask", default=None,
                   help=f"region to generate: {', '.join(MASKS)} (--fraction of the pixels), or a PNG of the image "
                        "size whose white pixels are generated (default: center for inpaint, border for outpaint)")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="random mask: share of unknown pixels (default: 0.5)")
    p.add_argument("--mask-seed", type=int, default=0,
                   help="random, freeform, box and uncrop masks: seed; each input gets its own mask (default: 0)")
    p.add_argument("--factor", type=int, default=None, help="superres: downsampling factor (default: 2)")
    p.add_argument("--blur-size", type=int, default=None, help="blur: odd kernel side in pixels (default: 5)")
    p.add_argument("--blur-width", type=float, default=None,
                   help="blur: Gaussian standard deviation in pixels (default: 1)")
    p.add_argument("--gain", type=float, default=None, help="saturation: y = tanh(gain x) / tanh(gain) (default: 3)")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (default: 0 = T, the full chain)")
    p.add_argument("--spacing", choices=list(SPACINGS), default="trailing",
                   help="which of the T discrete timesteps the chain visits (default: trailing, which starts "
                        "at t = T)")
    p.add_argument("--resample", type=int, default=1,
                   help="RePaint's U: denoise every segment U times (default: 1 = no resampling)")
    p.add_argument("--jump", type=int, default=10,
                   help="RePaint's jump length j, steps re-noised per resampling (default: 10)")
    p.add_argument("--variance", choices=list(VARIANCES), default="beta_tilde",
                   help="reverse variance, beta or the posterior's beta_tilde (default: beta_tilde)")
    p.add_argument("--clip-x0", type=float, default=None, metavar="C",
                   help="clip predicted x0 to [-C, C] (default: no clipping)")
    p.add_argument("--noise-std", type=float, default=None, metavar="S",
                   help="dps: add Gaussian noise of standard deviation S to the measurement (default: 0)")
    p.add_argument("--zeta", type=float, default=None,
                   help="dps: step size zeta, the paper's zeta_t = zeta / ||y - A(x0_hat)|| (default: "
                        f"{DPS_ZETA_SQRT_STEPS:g} / sqrt(steps), measured on digits; see docs/restoration.md)")
    p.add_argument("--measurement-seed", type=int, default=None, help="dps: seed of the measurement noise (default: 0)")
    p.add_argument("--seeds", default="0-2",
                   help="restorations per input, one per seed, e.g. 0-2 or 1,5 (default: 0-2)")
    p.add_argument("--n", type=int, default=8, help="restore the first N images of --split (default: 8)")
    p.add_argument("--images", type=Path, nargs="+", default=None,
                   help="restore these image files instead of --split's first N")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="data split the inputs come from (default: test)")
    p.add_argument("--no-ema", dest="ema", action="store_false", default=True,
                   help="use the raw weights instead of the EMA weights")
    _outputs(p, "restore", "restore-<task>-<method>")


def _tune_grid(sub) -> None:
    p = sub.add_parser("tune-grid", help="optimise the time grid of an ODE sampler for a run at given numbers of "
                                         "network calls, stored in <run>/grids.json (sample --grid tuned)")
    p.add_argument("--run", type=Path, required=True, help="run folder written by `diffusekit train`")
    p.add_argument("--sampler", choices=list(TUNABLE_SAMPLERS), default="unipc",
                   help="the deterministic ODE sampler whose grid is tuned (default: unipc)")
    p.add_argument("--nfe", required=True, metavar="LIST",
                   help="network-call budgets, e.g. 5,10 (heun spends 2 steps - 1: odd budgets only)")
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=2,
                   help="unipc: order of the predictor (default: 2)")
    p.add_argument("--examples", type=int, default=256,
                   help="prior draws the grid is tuned on, and as many held-out ones reported beside "
                        "(default: 256)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed of the tuning draws; the held-out ones follow (default: 0)")
    p.add_argument("--max-evals", type=int, default=None, help="grids tried per start (default: 40 per free time)")
    p.add_argument("--no-ema", dest="ema", action="store_false", default=True,
                   help="tune on the raw weights instead of the EMA weights")
    _device(p)
    _common(p)


def _demo(sub) -> None:
    p = sub.add_parser("demo", help="train on the bundled digits, sample and report (a few minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="run folder; an existing run resumes (default: runs/demo)")
    p.add_argument("--config", type=Path, default=None,
                   help="config to use (default: configs/demo.toml, the best measured digits config, if present)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=300 (repeatable)")
    _common(p)


def _app(sub) -> None:
    p = sub.add_parser("app", help="a local web page over a trained run: sample, restore, measure (needs the `app` "
                                   "extra: pip install 'diffusekit[app]')")
    p.add_argument("--run", type=Path, required=True, help="run folder written by `diffusekit train` (or a diffusers "
                                                           "folder)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page and its "
                        "jobs to the network)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on, 0 = any free one (default: 8765)")
    _device(p)
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusekit", description="Diffusion models that are correct, measurable and fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train, _sample, _evaluate, _restore, _tune_grid, _demo, _app):
        add(sub)
    return parser
