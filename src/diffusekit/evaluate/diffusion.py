"""How good is a trained diffusion model, in units people compare: the metrics of ``diffusekit evaluate``
for the diffusion families (``families.diffusion`` turns them into its report).

- ``bpd``: the discrete bound on the held-out split in bits/dim (exact: all T terms; or the
  stratified estimate with its standard error), term by term, beside two baselines computed in the
  same units on the same split (independent per-pixel categorical; dequantized full-covariance
  Gaussian). Needs discrete data (``levels``).
- ``fd``: samples drawn with the run's sampler settings, scored by the project's own feature
  network (Fréchet distance calibrated by the real train/test distance, classifier confidence and
  class histogram); for a class-conditional run the samples cycle through the classes at the run's
  guidance scale (``sample.guidance``, or ``guidance``) and ``class_accuracy`` is the classifier's
  accuracy on them against the requested labels; for vector data, sliced Wasserstein and MMD to the
  held-out data (and the exact NLL of the samples under the oracle for ``gmm`` data); for images
  without a feature network (photo patches, image folders), the same two distances in pixel space,
  calibrated by real train images (``quality.pixel_quality``).
- For a class-conditional run ``bpd`` is the bound with the null label (-log p(x), comparable with
  unconditional runs and the baselines) and, under ``conditional``, the bound on -log p(x | y) given
  the split's labels, from the same t, noise and reverse variances.
- ``nll_ode``: -log p(x) through the probability-flow ODE of the run's VP SDE (``likelihood_ode``),
  dequantized (uniform, importance-weighted or truncated-normal, with K draws per example: the
  ``dequantization`` and ``dequant_samples`` it records) and in bits/dim for discrete data, on the
  first ``ode_examples`` of the split, with
  its standard error, the number of network calls and the time; beside the bound, which it should
  not exceed by more than noise.
Each function takes a loaded model (``families.diffusion.DiffusionModel``: denoiser, schedule, config).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from diffusekit.continuous import continuous_bound
from diffusekit.data.registry import load_dataset
from diffusekit.errors import ConfigError
from diffusekit.evaluate.baselines import categorical_baseline, gaussian_baseline
from diffusekit.evaluate.samples import score_samples
from diffusekit.io.atomic import atomic_write_text
from diffusekit.likelihood import fit_reverse_log_variances, nats_to_bits_per_dim, vlb_estimate, vlb_exact
from diffusekit.likelihood_ode import ode_nll
from diffusekit.sampling.generate import TrajectoryRecorder, check_finite, generate
from diffusekit.sampling.settings import SampleSettings
from diffusekit.sde import vp_from_schedule
from diffusekit.viz import save_trajectory_strip

__all__ = ["bound", "continuous_bound_summary", "nll_ode", "sample_quality", "trajectory"]

FIT_VALUES = 8192  # the reverse variances are fitted on ceil(FIT_VALUES / dims) training images (>= 8)


def bound(run, test, exact: bool, n_strata: int, seed: int, progress: bool, variance: str = "fitted",
          out_dir: Path | None = None, clip: bool = False) -> dict[str, Any]:
    """The discrete bound on ``test`` in bits/dim (fitted, fixed or the network's learned reverse variances;
    ``clip``: the reverse mean's x0 clipped to [-1, 1], ``likelihood.reverse_x0``), its baselines and, for a
    class-conditional model, the conditional bound; the fitted variances go to ``out_dir``."""
    if run.levels is None:
        return {"skipped": "continuous data: the discrete bound needs data on a finite number of levels"}
    if variance == "learned" and not run.cfg.model.learned_variance:
        raise ConfigError("--variance learned needs a run trained with model.learned_variance = true; this run has "
                          "fixed variances (use fitted, beta_tilde or beta)")
    n_strata = min(n_strata, run.schedule.T)  # more strata than steps: one stratum per t (the mode says how many)
    train = load_dataset(run.cfg.data, "train")
    x = test.x
    t0 = time.time()
    table: Any = variance
    if variance == "fitted":
        n_fit = max(8, -(-FIT_VALUES // x[0].numel()))  # 128 digits, 11 MNIST images: ~8k values per t
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_fit]
        table = fit_reverse_log_variances(run.denoiser, train.x[pick], run.schedule, run.levels, seed=seed,
                                          progress=progress, clip=clip)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "reverse_log_variances.json", json.dumps(
                {"fitted_on": f"{len(pick)} images of the train split", "seed": seed,
                 "log_variance_t0_to_T": table.tolist()}))
    fit_seconds = time.time() - t0
    if exact:
        bound = vlb_exact(run.denoiser, x, run.schedule, run.levels, seed=seed, variance=table, progress=progress,
                          clip=clip)
    else:
        bound = vlb_estimate(run.denoiser, x, run.schedule, run.levels, n_strata=n_strata, seed=seed,
                             variance=table, progress=progress, clip=clip,
                             compare_variance="beta_tilde" if variance in ("fitted", "learned") else None)
    conditional = None
    if run.cfg.model.num_classes > 0 and test.labels is not None:  # -log p(x | y): the same t, noise and variances
        cond = {"class_labels": test.labels}
        conditional = (vlb_exact(run.denoiser, x, run.schedule, run.levels, seed=seed, variance=table, cond=cond,
                                 progress=progress, clip=clip) if exact else
                       vlb_estimate(run.denoiser, x, run.schedule, run.levels, n_strata=n_strata, seed=seed,
                                    variance=table, cond=cond, progress=progress, clip=clip))
    out = {"bits_per_dim": bound.bits_per_dim, "mode": "exact" if exact else f"stratified ({n_strata} strata x 2)",
           "variance": variance if variance != "fitted" else f"fitted on {len(pick)} train images",
           "x0_clipped": clip,
           "stderr_bits_per_dim": bound.stderr_bits_per_dim, "levels": run.levels, "n_examples": x.shape[0],
           "prior_bits_per_dim": float(nats_to_bits_per_dim(bound.prior.mean().item(), bound.dims)),
           "baselines": {"categorical_per_pixel": categorical_baseline(train.x, x, run.levels),
                         "gaussian_full_covariance": gaussian_baseline(train.x, x, run.levels)},
           "seconds": time.time() - t0, "fit_seconds": fit_seconds}
    if conditional is not None:
        out["conditional"] = {"bits_per_dim": conditional.bits_per_dim,
                              "stderr_bits_per_dim": conditional.stderr_bits_per_dim,
                              "what": "bound on -log p(x | y) given the split's labels (bits_per_dim above: the "
                                      "null label, -log p(x))"}
    if bound.comparison is not None:  # the same draws with the variances the model was trained for
        fixed = bound.comparison
        out["bits_per_dim_beta_tilde"] = fixed.bits_per_dim
        out["stderr_bits_per_dim_beta_tilde"] = fixed.stderr_bits_per_dim
    if exact:
        terms = bound.term_bits_per_dim()
        out["terms_bits_per_dim"] = terms.tolist()
        out["L0_bits_per_dim"] = terms[0].item()
        for a, b in ((2, 10), (11, 100), (101, run.schedule.T)):
            out[f"L_t{a}-{b}_bits_per_dim"] = terms[a - 1:b].sum().item()
    return out


def continuous_bound_summary(run, test, seed: int, progress: bool, n_draws: int = 32) -> dict[str, Any]:
    """The continuous-time negative ELBO (VDM) of a continuous run on the split, with its terms
    (``diffusekit.continuous.continuous_bound``); a bound on -log density for continuous data."""
    t0 = time.time()
    bound = continuous_bound(run.denoiser, run.logsnr_schedule, test.x, run.levels, n_draws=n_draws, seed=seed,
                             progress=progress)
    return {**bound.summary(), "n_draws": n_draws, "seconds": time.time() - t0}


def nll_ode(run, test, n: int, seed: int, trace: str, rtol: float, atol: float, progress: bool,
            dequantization: str = "uniform", dequant_samples: int = 1) -> dict[str, Any]:
    """Bits/dim through the probability-flow ODE on the first ``n`` examples of the split (discrete data:
    dequantized with ``dequantization``, ``dequant_samples`` draws per example; recorded with the result)."""
    if run.levels is None and (dequantization != "uniform" or dequant_samples != 1):
        raise ConfigError(f"--dequantization {dequantization} --dequant-samples {dequant_samples}: the data is "
                          "continuous, nll_ode dequantizes only data on discrete levels")
    sde = vp_from_schedule(run.schedule)
    x = test.x[:n]
    res = ode_nll(run.denoiser, sde, x, run.levels, trace=trace, seed=seed, rtol=rtol, atol=atol, batch_size=128,
                  progress=progress, dequantization=dequantization, dequant_samples=dequant_samples)
    return {"bits_per_dim": res.bits_per_dim, "stderr_bits_per_dim": res.stderr_bits_per_dim,
            "n_examples": x.shape[0], "levels": run.levels, "dequantized": run.levels is not None,
            "nfe": res.nfe, "seconds": res.seconds, **res.settings}


def sample_quality(run, test, settings, progress: bool) -> tuple[dict[str, Any], torch.Tensor]:
    """Samples drawn with ``settings``, scored against ``test`` (``evaluate.samples.score_samples``);
    returns (numbers, samples)."""
    t0 = time.time()
    stats: dict[str, Any] = {}
    num_classes = run.cfg.model.num_classes
    x = generate(run.denoiser, run.schedule, run.data_shape, settings, progress=progress, stats=stats,
                 num_classes=num_classes)
    seconds = time.time() - t0
    check_finite(x, "quality samples")
    out = score_samples(x, run.cfg.data, test, run.levels, stats.get("labels"))
    if num_classes > 0:
        out["guidance"] = settings.guidance
    out.update(sampling_seconds=seconds, seconds_per_sample=seconds / x.shape[0], sampler=settings.sampler,
               nfe=stats.get("nfe"),
               steps=settings.steps or run.schedule.T, n_samples=x.shape[0])
    return out, x


def trajectory(run, out_dir: Path, seed: int) -> Path:
    """The reverse process of a few samples as a strip (x_t above the predicted x0), 100 DDPM steps."""
    steps = min(100, run.schedule.T)
    n = 6 if len(run.data_shape) == 3 else 500
    settings = SampleSettings(sampler="ddpm", steps=steps, seeds=list(range(seed, seed + n)), batch_size=n)
    recorder = TrajectoryRecorder(every=max(1, steps // 8))
    x = generate(run.denoiser, run.schedule, run.data_shape, settings, callback=recorder, progress=False,
                 num_classes=run.cfg.model.num_classes)
    recorder.final(x)
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_trajectory_strip(recorder.frames("x"), out_dir / "trajectory.png",
                                 labels=[f"t={t}" for t in recorder.times], x0_frames=recorder.frames("x0"))
