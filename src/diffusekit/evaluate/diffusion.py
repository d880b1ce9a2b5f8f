"""``diffusekit evaluate``: how good is a trained run, in units people compare.

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
  dequantized and in bits/dim for discrete data, on the first ``ode_examples`` of the split, with
  its standard error, the number of network calls and the time; beside the bound, which it should
  not exceed by more than noise.
The results go to ``<run>/eval/metrics.json`` and ``<run>/eval/report.md`` with pictures.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from diffusekit.errors import ConfigError

__all__ = ["METRICS", "evaluate_run", "format_table", "write_report"]

METRICS = ("bpd", "fd", "nll_ode")


VARIANCES = ("fitted", "beta_tilde", "beta")
FIT_VALUES = 8192  # the reverse variances are fitted on ceil(FIT_VALUES / dims) training images (>= 8)


def _bound(run, test, exact: bool, n_strata: int, seed: int, progress: bool, variance: str = "fitted",
           out_dir: Path | None = None) -> dict[str, Any]:
    from diffusekit.evaluate.baselines import categorical_baseline, gaussian_baseline
    from diffusekit.likelihood import fit_reverse_log_variances, nats_to_bits_per_dim, vlb_estimate, vlb_exact

    from diffusekit.data import load_dataset

    if run.levels is None:
        return {"skipped": "continuous data: the discrete bound needs data on a finite number of levels"}
    train = load_dataset(run.cfg.data, "train")
    x = test.x
    t0 = time.time()
    table: Any = variance
    if variance == "fitted":
        n_fit = max(8, -(-FIT_VALUES // x[0].numel()))  # 128 digits, 11 MNIST images: ~8k values per t
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_fit]
        table = fit_reverse_log_variances(run.denoiser, train.x[pick], run.schedule, run.levels, seed=seed,
                                          progress=progress)
        if out_dir is not None:
            from diffusekit.train.checkpoint import atomic_write_text

            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "reverse_log_variances.json", json.dumps(
                {"fitted_on": f"{len(pick)} images of the train split", "seed": seed,
                 "log_variance_t0_to_T": table.tolist()}))
    fit_seconds = time.time() - t0
    if exact:
        bound = vlb_exact(run.denoiser, x, run.schedule, run.levels, seed=seed, variance=table, progress=progress)
    else:
        bound = vlb_estimate(run.denoiser, x, run.schedule, run.levels, n_strata=n_strata, seed=seed,
                             variance=table, progress=progress,
                             compare_variance="beta_tilde" if variance == "fitted" else None)
    conditional = None
    if run.cfg.model.num_classes > 0 and test.labels is not None:  # -log p(x | y): the same t, noise and variances
        cond = {"class_labels": test.labels}
        conditional = (vlb_exact(run.denoiser, x, run.schedule, run.levels, seed=seed, variance=table, cond=cond,
                                 progress=progress) if exact else
                       vlb_estimate(run.denoiser, x, run.schedule, run.levels, n_strata=n_strata, seed=seed,
                                    variance=table, cond=cond, progress=progress))
    out = {"bits_per_dim": bound.bits_per_dim, "mode": "exact" if exact else f"stratified ({n_strata} strata x 2)",
           "variance": variance if variance != "fitted" else f"fitted on {len(pick)} train images",
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


def _continuous_bound(run, test, seed: int, progress: bool, n_draws: int = 32) -> dict[str, Any]:
    """The continuous-time negative ELBO (VDM) of a continuous run on the split, with its terms
    (``diffusekit.continuous.continuous_bound``); a bound on -log density for continuous data."""
    from diffusekit.continuous import continuous_bound

    t0 = time.time()
    bound = continuous_bound(run.denoiser, run.logsnr_schedule, test.x, run.levels, n_draws=n_draws, seed=seed,
                             progress=progress)
    return {**bound.summary(), "n_draws": n_draws, "seconds": time.time() - t0}


def _nll_ode(run, test, n: int, seed: int, trace: str, rtol: float, atol: float, progress: bool) -> dict[str, Any]:
    """Bits/dim through the probability-flow ODE on the first ``n`` examples of the split."""
    from diffusekit.likelihood_ode import ode_nll
    from diffusekit.sde import vp_from_schedule

    sde = vp_from_schedule(run.schedule)
    x = test.x[:n]
    res = ode_nll(run.denoiser, sde, x, run.levels, trace=trace, seed=seed, rtol=rtol, atol=atol, batch_size=128,
                  progress=progress)
    return {"bits_per_dim": res.bits_per_dim, "stderr_bits_per_dim": res.stderr_bits_per_dim,
            "n_examples": x.shape[0], "levels": run.levels, "dequantized": run.levels is not None,
            "nfe": res.nfe, "seconds": res.seconds, **res.settings}


def _quality(run, test, settings, progress: bool) -> tuple[dict[str, Any], torch.Tensor]:
    from diffusekit.sampling.run import generate

    t0 = time.time()
    stats: dict[str, Any] = {}
    num_classes = run.cfg.model.num_classes
    x = generate(run.denoiser, run.schedule, run.data_shape, settings, progress=progress, stats=stats,
                 num_classes=num_classes)
    seconds = time.time() - t0
    if x.ndim == 4:
        from diffusekit.evaluate.quality import image_quality

        name = run.cfg.data.name
        if name in ("digits", "mnist"):
            out = image_quality(x, name, levels=run.levels, labels=stats.get("labels"))
        else:  # no feature network for this data: calibrated distances in pixel space
            from diffusekit.data import load_dataset
            from diffusekit.evaluate.quality import pixel_quality

            space = f"pixels (no feature network for data.name = {name!r})"
            if test.x.shape[0] < 2:
                return {"feature_space": space, "skipped": f"the {test.name} split has {test.x.shape[0]} image(s); "
                        "pixel-space distances need at least 2", "sampling_seconds": seconds}, x
            out = pixel_quality(x, test.x, load_dataset(run.cfg.data, "train").x, levels=run.levels)
            out["feature_space"] = space
    else:
        from diffusekit.evaluate.quality import vector_quality

        oracle = None
        if run.cfg.data.name == "gmm":
            from diffusekit.oracle import default_mixture

            oracle = default_mixture(x.shape[1])
        out = vector_quality(x, test.x, oracle=oracle)
    if num_classes > 0:
        out["guidance"] = settings.guidance
    out.update(sampling_seconds=seconds, seconds_per_sample=seconds / x.shape[0], sampler=settings.sampler,
               nfe=stats.get("nfe"),
               steps=settings.steps or run.schedule.T, n_samples=x.shape[0])
    return out, x


def _trajectory(run, out_dir: Path, seed: int) -> Path:
    """The reverse process of a few samples as a strip (x_t above the predicted x0), 100 DDPM steps."""
    from diffusekit.sampling.run import SampleSettings, TrajectoryRecorder, generate
    from diffusekit.viz import save_trajectory_strip

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


def evaluate_run(run_dir: Path | str, *, metrics: Sequence[str] = ("bpd", "fd"), split: str = "test", exact: bool = False,
                 n_strata: int = 50, n_samples: int | None = None, sampler: str | None = None,
                 steps: int | None = None, seed: int = 0, progress: bool = True,
                 variance: str = "fitted", ode_examples: int = 100, trace: str = "hutchinson",
                 ode_rtol: float = 1e-5, ode_atol: float = 1e-5, guidance: float | None = None) -> dict[str, Any]:
    """Evaluate a run folder; writes ``eval/metrics.json``, ``eval/report.md`` and pictures.
    ``guidance`` (class-conditional runs) overrides the run's ``sample.guidance`` for the samples."""
    from diffusekit.data import load_dataset
    from diffusekit.models import load_run
    from diffusekit.sampling.run import SampleSettings
    from diffusekit.vae.evaluate import evaluate_latent_run, is_latent_run

    if is_latent_run(run_dir):  # VAE / MHVAE / autoencoder: ELBO and IWAE bounds, collapse, reconstruction
        return evaluate_latent_run(run_dir, metrics=metrics, split=split, n_samples=n_samples, seed=seed,
                                   progress=progress)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"--metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if variance not in VARIANCES:
        raise ConfigError(f"--variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    if split not in ("train", "test"):
        raise ConfigError(f"--split must be 'train' or 'test', got {split!r}")
    run = load_run(run_dir, use_ema=True)
    test = load_dataset(run.cfg.data, split)
    sc = run.cfg.sample
    guidance = sc.guidance if guidance is None else guidance
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {guidance}")
    if guidance != 1.0 and run.cfg.model.num_classes == 0:
        raise ConfigError(f"--guidance: run {run_dir} is unconditional (model.num_classes = 0); guidance needs a "
                          "class-conditional run")
    n = n_samples or min(len(test), 1000)
    settings = SampleSettings(sampler=sampler or sc.sampler, steps=sc.steps if steps is None else steps, eta=sc.eta,
                              variance=sc.variance, spacing=sc.spacing, seeds=list(range(seed, seed + n)),
                              batch_size=min(n, 500), grid=sc.grid, snr=sc.snr, corrector_steps=sc.corrector_steps,
                              langevin_steps=sc.langevin_steps, step_size=sc.step_size, rtol=sc.rtol, atol=sc.atol,
                              guidance=guidance)
    result: dict[str, Any] = {"run": str(run_dir), "step": run.step, "split": split, "data": run.cfg.data.name,
                              "seed": seed, "settings": {  # everything needed to repeat this evaluation
                                  "metrics": list(metrics), "exact": exact, "n_strata": n_strata,
                                  "variance": variance, "n_samples": n, "ode_examples": ode_examples,
                                  "trace": trace, "ode_rtol": ode_rtol, "ode_atol": ode_atol,
                                  "sampling": {**settings.to_dict(), "seeds": f"{seed}-{seed + n - 1}"}}}
    samples = None
    with torch.random.fork_rng():
        if "bpd" in metrics:
            result["bpd"] = _bound(run, test, exact, n_strata, seed, progress, variance, Path(run_dir) / "eval")
            if getattr(run, "logsnr_schedule", None) is not None:  # continuous-time run: the bound it trained on
                result["bpd"]["continuous"] = _continuous_bound(run, test, seed, progress)
        if "nll_ode" in metrics:
            result["nll_ode"] = _nll_ode(run, test, ode_examples, seed, trace, ode_rtol, ode_atol, progress)
        if "fd" in metrics:
            result["quality"], samples = _quality(run, test, settings, progress)
        trajectory = _trajectory(run, Path(run_dir) / "eval", seed)
    write_report(run, test, result, samples, Path(run_dir) / "eval", extra_pictures={"trajectory": trajectory})
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers."""
    if result.get("kind") in ("vae", "mhvae", "autoencoder"):
        from diffusekit.vae.evaluate import format_latent_table

        return format_latent_table(result)
    rows = [("run", result["run"]), ("checkpoint step", result["step"]), ("split", result["split"])]
    b = result.get("bpd", {})
    if "bits_per_dim" in b:
        se = f" ± {b['stderr_bits_per_dim']:.3f}" if b["stderr_bits_per_dim"] else ""
        rows += [(f"bound, bits/dim ({b['mode']})", f"{b['bits_per_dim']:.4f}{se}"),
                 ("  reverse variances", b.get("variance", "beta_tilde"))]
        if "bits_per_dim_beta_tilde" in b:
            rows.append(("  same bound, variances beta_tilde",
                         f"{b['bits_per_dim_beta_tilde']:.4f} ± {b['stderr_bits_per_dim_beta_tilde']:.3f}"))
        if "conditional" in b:
            c = b["conditional"]
            rows.append(("  conditional bound -log p(x | y), bits/dim",
                         f"{c['bits_per_dim']:.4f}" + (f" ± {c['stderr_bits_per_dim']:.3f}"
                                                       if c["stderr_bits_per_dim"] else "")))
        rows += [("  prior term L_T", f"{b['prior_bits_per_dim']:.2e}"),
                 ("baseline: per-pixel categorical", f"{b['baselines']['categorical_per_pixel']:.4f}"),
                 ("baseline: full-covariance Gaussian", f"{b['baselines']['gaussian_full_covariance']:.4f}")]
        if "L0_bits_per_dim" in b:
            rows += [("  L_0 (decoder)", f"{b['L0_bits_per_dim']:.4f}")] + \
                [(f"  {k[:-13]}", f"{v:.4f}") for k, v in b.items() if k.startswith("L_t")]
    elif b:
        rows.append(("bound", b.get("skipped", "")))
    c = b.get("continuous")
    if c:
        rows += [(f"continuous bound, bits/dim ({c['n_draws']} draws of t)",
                  f"{c['bits_per_dim']:.4f} ± {c['stderr_bits_per_dim']:.3f}"),
                 ("  prior / reconstruction / diffusion", f"{c['prior_bits_per_dim']:.2e} / "
                  f"{c['reconstruction_bits_per_dim']:.4f} / {c['diffusion_bits_per_dim']:.4f}")]
    o = result.get("nll_ode")
    if o:
        unit = "bits/dim" + (f", dequantized, {o['levels']} levels" if o["dequantized"] else "")
        rows += [(f"PF-ODE NLL, {unit} ({o['n_examples']} examples, {o['trace']} trace)",
                  f"{o['bits_per_dim']:.4f} ± {o['stderr_bits_per_dim']:.3f}"),
                 ("  network calls / seconds", f"{o['nfe']} / {o['seconds']:.1f}")]
    q = result.get("quality", {})
    for key in ("guidance", "fd", "fd_train_test", "fd_ratio", "class_accuracy", "confidence", "class_entropy_bits",
                "class_histogram", "classifier_test_accuracy", "feature_space", "sliced_wasserstein",
                "sliced_wasserstein_train_test", "sliced_wasserstein_ratio", "mmd", "mmd_train_test",
                "oracle_nll", "oracle_entropy", "seconds_per_sample", "skipped"):
        if key in q:
            rows.append((key, f"{q[key]:.4f}" if isinstance(q[key], float) else str(q[key])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_EXPLAIN = {
    "kernel": "The forward process of this run's schedule: the kernel q(x_t | x_0) with its mean and "
              "±2σ band over t, and the marginal q(x_t) of a 1-D mixture.",
    "noising": "Held-out images noised to several t (x_t = α_t x_0 + σ_t ε).",
    "trajectory": "The reverse process (100 DDPM steps): x_t in the upper row of each pair, the model's "
                  "prediction of x_0 below it.",
    "samples": "Samples drawn with the run's sampler settings (EMA weights), the ones scored above.",
    "classes": "Classes of the samples according to the feature classifier, beside the held-out split's "
               "true class shares: a missing or swollen bar is a dropped or over-produced mode.",
    "terms": "Every term of the bound in bits/dim (left) and the share of the bound accumulated up to t "
             "(right): where the model's bits go.",
}

_GUIDE = """How to read the numbers:
- bits/dim is -log2 p(x) per dimension of the held-out data under the bound (lower is better; an upper
  bound on the model's true negative log-likelihood). The two baselines are computed on the same split in
  the same units: a model worse than the per-pixel categorical baseline has not learned the pixels'
  dependencies.
- fd is the Fréchet distance of the samples to the held-out split in the feature space of diffusekit's
  own classifier; fd_train_test is the same distance for real training images (as many as there are
  samples), so fd_ratio = fd / fd_train_test near 1 means the samples are as close to the test split as
  real data is. confidence is the classifier's mean top probability on the samples, class_entropy_bits
  the entropy of their predicted classes (log2 10 = 3.32 when all ten are equally frequent).
- class_accuracy (class-conditional runs) is the classifier's accuracy on the samples against the labels
  they were drawn for (cycling through the classes, at classifier-free guidance scale `guidance`); compare
  it with the classifier's accuracy on real test images, classifier_test_accuracy.
- Without a feature network (feature_space = pixels): sliced_wasserstein and mmd are pixel-space
  distances of the samples to the held-out split, *_train_test the same for real training images, and
  sliced_wasserstein_ratio their quotient (near 1: as close as real data); mmd_train_test is the noise
  floor of mmd (the unbiased estimate scatters around 0 for real data)."""


def write_report(run, test, result: dict[str, Any], samples, out_dir: Path,
                 extra_pictures: dict[str, Path] | None = None) -> Path:
    """metrics.json, pictures and report.md (numbers, a reading guide, each picture with a caption) in
    ``out_dir``."""
    from diffusekit.evaluate.figures import (plot_class_histogram, plot_diffusion_kernel, plot_vlb_terms,
                                             save_noising_strip)
    from diffusekit.train.checkpoint import atomic_write_text
    from diffusekit.viz import save_samples_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1))
    pics = {"kernel": plot_diffusion_kernel(run.schedule, out_dir / "diffusion_kernel.png")}
    if test.x.ndim == 4:
        pics["noising"] = save_noising_strip(test.x[:6], run.schedule, out_dir / "noising.png", levels=run.levels)
    pics.update(extra_pictures or {})
    if samples is not None:
        ref = test.x if test.x.ndim == 2 else None
        k = run.cfg.model.num_classes  # class-conditional samples cycle through the classes: one per column
        pics["samples"] = save_samples_figure(samples[:64], out_dir / "samples.png", levels=run.levels, reference=ref,
                                              nrow=k if 1 < k <= 16 else None)
    q = result.get("quality", {})
    if "class_histogram" in q and test.labels is not None:
        reference = torch.bincount(test.labels, minlength=len(q["class_histogram"])).tolist()
        pics["classes"] = plot_class_histogram(q["class_histogram"], reference, out_dir / "classes.png")
    b = result.get("bpd", {})
    if "terms_bits_per_dim" in b:
        pics["terms"] = plot_vlb_terms(b["terms_bits_per_dim"], out_dir / "bound_terms.png", b["prior_bits_per_dim"])
    lines = [f"# Evaluation of `{result['run']}` (step {result['step']}, {result['split']} split)", "",
             "```", format_table(result), "```", "", _GUIDE, ""]
    for name, path in pics.items():
        lines += [f"## {name}", "", _EXPLAIN.get(name, ""), "", f"![{name}]({path.name})", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return out_dir / "report.md"
