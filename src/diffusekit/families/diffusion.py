"""The diffusion family: discrete-time models (``model.kind`` = unet | mlp, ``loss.objective`` = discrete)
trained on the per-example denoising loss of ``[loss]``, sampled by every sampler of the catalog,
evaluated by their bound in bits/dim and their sample quality, and restorable without training.

Its loaded model (``DiffusionModel``: a denoiser and a float64 schedule) is also what the continuous
family loads, so both share ``sample`` and ``evaluate`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.registry import load_dataset
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.evaluate import diffusion as metrics
from diffusekit.evaluate.figures import plot_class_histogram, plot_diffusion_kernel, plot_vlb_terms, save_noising_strip
from diffusekit.families.base import (
    EvaluateSettings,
    Evaluation,
    Model,
    SampleRequest,
    Samples,
    TimeHistoryState,
    check_labels_and_guidance,
)
from diffusekit.io.checkpoint import check_state, load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.likelihood import fit_reverse_log_variances, vlb_estimate
from diffusekit.losses import diffusion_loss, hybrid_loss, sample_timesteps
from diffusekit.nn.build import build_network
from diffusekit.parameterization import Denoiser, DenoiserFn
from diffusekit.sampling.generate import generate
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule, make_schedule
from diffusekit.timestep_proposal import LossHistory
from diffusekit.train.distributed import gather_tensors
from diffusekit.viz import save_samples_figure

__all__ = ["build_schedule", "check_class_labels", "drop_labels", "DiffusionObjective", "DiffusionModel", "load_network", "load",
           "sample", "evaluate", "preview_settings", "grid_columns"]


DEFAULT_QUALITY_SAMPLES = 1000  # fewer make fd_ratio too noisy to rank by (see evaluate.quality)


def build_schedule(diffusion_cfg) -> DiscreteSchedule:
    """The discrete schedule named by ``[diffusion]`` (float64 tables)."""
    name, T = diffusion_cfg.schedule, diffusion_cfg.T
    if name == "linear":
        return make_schedule("linear", T, beta_start=diffusion_cfg.beta_start, beta_end=diffusion_cfg.beta_end)
    if name == "cosine":
        return make_schedule("cosine", T, s=diffusion_cfg.cosine_s)
    if name == "logsnr_linear":
        return make_schedule(name, T, logsnr_min=diffusion_cfg.logsnr_min, logsnr_max=diffusion_cfg.logsnr_max)
    return make_schedule(name, T)


def check_class_labels(cfg: Config, data: ArrayDataset) -> None:
    """One-line ConfigErrors when ``model.num_classes`` does not fit the labels of the data."""
    k = cfg.model.num_classes
    if k > 0 and data.labels is None:
        raise ConfigError(f"model.num_classes = {k} but data.name = {cfg.data.name!r} has no labels "
                          "(set model.num_classes = 0)")
    if 0 < k < data.num_classes:
        raise ConfigError(f"model.num_classes = {k} but data.name = {cfg.data.name!r} has {data.num_classes} classes")


def drop_labels(labels: Tensor | None, cfg: Config, generator: torch.Generator) -> Tensor | None:
    """The batch's labels with each replaced by the null label (``model.num_classes``) with probability
    ``train.class_dropout``: one model learns p(x | y) and p(x) for classifier-free guidance (Ho &
    Salimans 2022). None for an unconditional model."""
    k = cfg.model.num_classes
    if k == 0 or labels is None:
        return None
    drop = torch.rand(labels.shape[0], generator=generator) < cfg.train.class_dropout
    out = labels.clone()
    out[drop.to(labels.device)] = k
    return out


def preview_settings(n: int, T: int, guidance: float = 1.0) -> SampleSettings:
    """The sampler of the pictures drawn during training: DDPM on at most 100 steps, seeds 0..n-1."""
    return SampleSettings(sampler="ddpm", steps=min(100, T), seeds=list(range(n)), batch_size=max(n, 1),
                          guidance=guidance)


def grid_columns(period: int) -> int | None:
    """Columns of a sample grid whose samples cycle through ``period`` conditions (one per column)."""
    return period if 1 < period <= 16 else None


class DiffusionObjective(TimeHistoryState):
    """The discrete-time denoising loss of ``[loss]`` for a network predicting ``model.prediction``; with
    ``model.learned_variance``, the hybrid loss L_simple + ``loss.vlb_weight`` L_vlb (``losses.hybrid_loss``).

    With ``loss.t_sampling = "importance"`` it keeps ``t_history``, the recent per-example losses at each t
    (``timestep_proposal.LossHistory``), draws t from its proposal and weights each example by 1 / (T p_t),
    as Nichol & Dhariwal's code does for the whole per-example loss (sec. 3.3); ``state_tensors`` /
    ``load_state_tensors`` carry the history through checkpoints (``objective.t_history.*``)."""

    t_history: LossHistory | None = None  # loss.t_sampling = "importance" only

    def __init__(self, cfg: Config, data: ArrayDataset):
        check_class_labels(cfg, data)
        if cfg.model.bound_clip and data.levels is None:
            raise ConfigError(f"model.bound_clip = true needs image data on discrete levels in [-1, 1]; data.name = "
                              f"{cfg.data.name!r} is continuous")
        if cfg.model.learned_variance and data.levels is None:
            raise ConfigError(f"model.learned_variance = true needs data on discrete levels (its L_vlb term at t = 1 "
                              f"is the discretized decoder); data.name = {cfg.data.name!r} is continuous")
        self.cfg, self.data_shape, self.levels = cfg, tuple(data.shape), data.levels
        self.fit_x = data.x[:1024]  # heldout_bound fits fixed-variance runs' reverse variances on the first of these
        self.schedule = build_schedule(cfg.diffusion)
        self.module = build_network(cfg.model, self.data_shape)
        self.kind = cfg.model.prediction
        lc = cfg.loss
        if lc.t_sampling == "importance":
            self.t_history = LossHistory(self.schedule.T, lc.importance_history, lc.importance_uniform)

    def denoiser(self, module: nn.Module) -> Denoiser:
        return Denoiser(module, self.kind, learned_variance=self.cfg.model.learned_variance)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator,
             extra_cond: dict | None = None) -> Tensor:
        """Per-example losses at t drawn by ``loss.t_sampling`` (``losses.diffusion_loss``); ``extra_cond``
        joins the labels in the network's conditioning (ControlNet's hint). Importance sampling returns them
        weighted by 1 / (T p_t) and appends the unweighted ones of every rank to ``t_history``."""
        labels = drop_labels(labels, self.cfg, generator)
        cond = {**({"class_labels": labels} if labels is not None else {}), **(extra_cond or {})} or None
        lc = self.cfg.loss
        if self.t_history is not None:
            t, weights = self.t_history.draw(x0.shape[0], generator)
        else:
            t = sample_timesteps(x0.shape[0], self.schedule.T, generator, lc.t_sampling)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        if self.cfg.model.learned_variance:
            losses = hybrid_loss(self.denoiser(module), x0, t, self.schedule, noise, self.levels, lc.weighting,
                                 vlb_weight=lc.vlb_weight, cond=cond, gamma=lc.min_snr_gamma,
                                 clip=self.cfg.model.bound_clip)
        else:
            losses = diffusion_loss(self.denoiser(module), x0, t, self.schedule, noise, lc.weighting, cond=cond,
                                    gamma=lc.min_snr_gamma)
        if self.t_history is None:
            return losses
        # every rank appends the same values in the same order, so the histories stay equal across ranks
        self.t_history.update(torch.cat(gather_tensors(t.cpu())),
                              torch.cat(gather_tensors(losses.detach().to("cpu", torch.float64))))
        return losses * weights.to(losses.device, losses.dtype)

    def heldout_bound(self, module: nn.Module, x: Tensor, seed: int) -> dict[str, Any]:
        """The bound ``diffusekit evaluate`` reports, on ``x`` with ``module``'s weights (the trainer's
        ``train.bound_every``): stratified over t (50 strata x 2), with the run's learned variances or with
        variances fitted on the first training images as evaluate fits them, and the run's ``bound_clip``."""
        den, clip = self.denoiser(module).eval(), self.cfg.model.bound_clip
        variance: Any = "learned"
        if not self.cfg.model.learned_variance:
            fit = self.fit_x[: max(8, -(-metrics.FIT_VALUES // x[0].numel()))].to(x.device)
            variance = fit_reverse_log_variances(den, fit, self.schedule, self.levels, seed=seed, clip=clip)
        b = vlb_estimate(den, x, self.schedule, self.levels, n_strata=min(50, self.schedule.T), seed=seed,
                         variance=variance, clip=clip)
        return {"bits_per_dim": b.bits_per_dim, "stderr_bits_per_dim": b.stderr_bits_per_dim, "n_examples": x.shape[0],
                "variance": "learned" if isinstance(variance, str) else "fitted", "x0_clipped": clip}

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        return generate(self.denoiser(module).eval(), self.schedule, self.data_shape,
                        preview_settings(n, self.schedule.T), device=device, progress=False,
                        num_classes=self.cfg.model.num_classes)  # conditional: classes in turn


@dataclass
class DiffusionModel(Model):
    """A trained diffusion model: the denoiser (EMA or raw weights) and its float64 schedule; continuous
    runs also keep their log-SNR schedule lambda(t) (``schedule`` is then its table on diffusion.T steps)."""

    denoiser: DenoiserFn | None = None
    schedule: DiscreteSchedule | None = None
    logsnr_schedule: nn.Module | None = None

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes

    def sample_dir_name(self, settings: SampleSettings) -> str:
        return f"samples-{settings.sampler}-{settings.steps or self.schedule.T}"


def load_network(rc: RunCheckpoint, state: dict[str, Tensor], source: str, what: str) -> nn.Module:
    """The network of the run's recorded ``[model]`` with ``state`` loaded; the shapes are checked on a
    weightless ("meta") copy first, so a hostile record allocates nothing, and a model that cannot be
    built is a one-line CheckpointError naming the record."""
    try:
        with torch.device("meta"):
            check_state(build_network(rc.cfg.model, rc.data_shape).state_dict(), state, source, what)
        net = build_network(rc.cfg.model, rc.data_shape)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{rc.path}.json: recorded model cannot be built ({exc})") from None
    load_module_state(net, state, source, what)
    return net


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> DiffusionModel:
    """A discrete-time run's denoiser and schedule from its newest checkpoint."""
    cfg, data_shape, ckpt = rc.cfg, rc.data_shape, rc.path
    net = load_network(rc, *rc.weights(use_ema))
    denoiser = Denoiser(net, cfg.model.prediction, learned_variance=cfg.model.learned_variance).to(device).eval()
    return DiffusionModel(rc.run_dir, cfg, data_shape, rc.levels, rc.step, ckpt, denoiser=denoiser,
                          schedule=build_schedule(cfg.diffusion))


def sample(model: DiffusionModel, settings: SampleSettings, request: SampleRequest, device: torch.device | str = "cpu",
           progress: bool = True) -> Samples:
    """Samples of ``settings``; a class-conditional model's sample i gets ``settings.classes[i % len]``
    (every class in turn by default), one class per grid column."""
    x = generate(model.denoiser, model.schedule, model.data_shape, settings, device=device, progress=progress,
                 num_classes=model.num_classes)
    return Samples(x, nrow=grid_columns(len(settings.classes or range(model.num_classes))))


def evaluation_sample_settings(model: Model, settings: EvaluateSettings, n: int) -> SampleSettings:
    """The run's own sampler settings (``[sample]``, every field of it) with the evaluation's overrides and
    the seeds seed..seed+n-1."""
    return SampleSettings.from_config(model.cfg.sample, key=settings.key, batch_size=min(n, 500),
                                      seeds=list(range(settings.seed, settings.seed + n)), **settings.sample_overrides())


def evaluate(model: DiffusionModel, settings: EvaluateSettings, out_dir: Path, progress: bool = True) -> Evaluation:
    """The bound (and the continuous bound of a continuous run), the PF-ODE likelihood and the sample
    quality of ``settings.metrics``, with pictures written to ``out_dir``."""
    test = load_dataset(model.cfg.data, settings.split)
    variance = settings.variance or ("learned" if model.cfg.model.learned_variance else "fitted")
    clip = model.cfg.model.bound_clip if settings.bound_clip is None else settings.bound_clip
    n = settings.n_samples or DEFAULT_QUALITY_SAMPLES
    sampling = evaluation_sample_settings(model, settings, n)
    sampling.check(settings.key, T=model.schedule.T)
    check_labels_and_guidance(model, sampling, settings.key)
    result: dict[str, Any] = {
        "run": str(model.source), "step": model.step, "split": settings.split, "data": model.cfg.data.name,
        "seed": settings.seed, "settings": {  # everything needed to repeat this evaluation
            "metrics": list(settings.metrics), "exact": settings.exact, "n_strata": settings.strata,
            "variance": variance, "bound_clip": clip, "n_samples": n, "ode_examples": settings.ode_examples,
            "trace": settings.trace, "ode_rtol": settings.ode_rtol, "ode_atol": settings.ode_atol,
            "dequantization": settings.dequantization, "dequant_samples": settings.dequant_samples,
            "sampling": {**sampling.to_dict(), "seeds": f"{settings.seed}-{settings.seed + n - 1}"}}}
    samples = None
    with torch.random.fork_rng():
        if "bpd" in settings.metrics:
            result["bpd"] = metrics.bound(model, test, settings.exact, settings.strata, settings.seed, progress,
                                          variance, out_dir, clip)
            if model.logsnr_schedule is not None:  # continuous-time run: the bound it trained on
                result["bpd"]["continuous"] = metrics.continuous_bound_summary(model, test, settings.seed, progress)
        if "nll_ode" in settings.metrics:
            result["nll_ode"] = metrics.nll_ode(model, test, settings.ode_examples, settings.seed, settings.trace,
                                                settings.ode_rtol, settings.ode_atol, progress,
                                                settings.dequantization, settings.dequant_samples)
        if "fd" in settings.metrics:
            result["quality"], samples = metrics.sample_quality(model, test, sampling, progress)
        trajectory = metrics.trajectory(model, out_dir, settings.seed)
    pictures = _pictures(model, test, result, samples, out_dir, trajectory)
    return Evaluation(result, table_rows(result), pictures, GUIDE)


_CAPTIONS = {
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


def _pictures(model: DiffusionModel, test: ArrayDataset, result: dict[str, Any], samples: Tensor | None,
              out_dir: Path, trajectory: Path) -> dict[str, tuple[str, str]]:
    paths = {"kernel": plot_diffusion_kernel(model.schedule, out_dir / "diffusion_kernel.png")}
    if test.x.ndim == 4:
        paths["noising"] = save_noising_strip(test.x[:6], model.schedule, out_dir / "noising.png", levels=model.levels)
    paths["trajectory"] = trajectory
    if samples is not None:
        ref = test.x if test.x.ndim == 2 else None
        paths["samples"] = save_samples_figure(samples[:64], out_dir / "samples.png", levels=model.levels,
                                               reference=ref, nrow=grid_columns(model.num_classes))
    q = result.get("quality", {})
    if "class_histogram" in q and test.labels is not None:
        reference = torch.bincount(test.labels, minlength=len(q["class_histogram"])).tolist()
        paths["classes"] = plot_class_histogram(q["class_histogram"], reference, out_dir / "classes.png")
    b = result.get("bpd", {})
    if "terms_bits_per_dim" in b:
        paths["terms"] = plot_vlb_terms(b["terms_bits_per_dim"], out_dir / "bound_terms.png", b["prior_bits_per_dim"])
    return {name: (Path(path).name, _CAPTIONS[name]) for name, path in paths.items()}


def table_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers of a diffusion evaluation as (name, value) rows."""
    rows = [("run", result["run"]), ("checkpoint step", str(result["step"])), ("split", result["split"])]
    b = result.get("bpd", {})
    if "bits_per_dim" in b:
        se = f" ± {b['stderr_bits_per_dim']:.3f}" if b["stderr_bits_per_dim"] else ""
        rows += [(f"bound, bits/dim ({b['mode']})", f"{b['bits_per_dim']:.4f}{se}"),
                 ("  reverse variances", b.get("variance", "beta_tilde")),
                 ("  reverse mean", "x0 clipped to [-1, 1] at t >= 2" if b.get("x0_clipped") else "x0 as predicted")]
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
        k = o.get("dequant_samples") or 1
        how = f"{o.get('dequantization') or 'uniform'}" + (f" x{k}" if k > 1 else "")
        unit = "bits/dim" + (f", dequantized ({how}), {o['levels']} levels" if o["dequantized"] else "")
        rows += [(f"PF-ODE NLL, {unit} ({o['n_examples']} examples, {o['trace']} trace)",
                  f"{o['bits_per_dim']:.4f} ± {o['stderr_bits_per_dim']:.3f}"),
                 ("  network calls / seconds", f"{o['nfe']} / {o['seconds']:.1f}")]
    return rows + quality_rows(result.get("quality", {}))


QUALITY_KEYS = ("guidance", "fd", "fd_train_test", "fd_ratio", "fd_ratio_interval", "kid", "kid_train_test", "kid_excess",
                "class_accuracy", "confidence", "class_entropy_bits",
                "class_histogram", "classifier_test_accuracy", "feature_space", "sliced_wasserstein",
                "sliced_wasserstein_train_test", "sliced_wasserstein_ratio", "sliced_wasserstein_ratio_interval",
                "mmd", "mmd_train_test", "oracle_nll", "oracle_entropy", "seconds_per_sample", "skipped")


def _quality_value(q: dict[str, Any], key: str) -> str:
    value = q[key]
    if key in ("kid", "kid_train_test", "kid_excess"):
        return f"{value:.5f} ± {q[key + '_stderr']:.5f}"
    if key in ("fd_ratio_interval", "sliced_wasserstein_ratio_interval"):
        return f"[{value[0]:.3f}, {value[1]:.3f}] (95% bootstrap)"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def quality_rows(q: dict[str, Any]) -> list[tuple[str, str]]:
    """The sample-quality numbers (``evaluate.quality``) as rows, in a fixed order."""
    return [(key, _quality_value(q, key)) for key in QUALITY_KEYS if key in q]


GUIDE = """How to read the numbers:
- bits/dim is -log2 p(x) per dimension of the held-out data under the bound (lower is better; an upper
  bound on the model's true negative log-likelihood). The two baselines are computed on the same split in
  the same units: a model worse than the per-pixel categorical baseline has not learned the pixels'
  dependencies.
- fd is the Fréchet distance of the samples to the held-out split in the feature space of diffusekit's
  own classifier; fd_train_test is the same distance for real training images (as many as there are
  samples), so fd_ratio = fd / fd_train_test near 1 means the samples are as close to the test split as
  real data is. fd_ratio_interval is its 95% bootstrap interval (redrawing the samples and the real
  images): two models or samplers differ only where these intervals do not overlap. kid is the kernel
  distance of the same features (unbiased at any number of samples, ± its standard error over the
  samples), kid_train_test the same for real training images (the level of real data on this finite test
  split, not exactly 0), and kid_excess their difference, the number to rank by. confidence is the classifier's mean top probability on the samples,
  class_entropy_bits the entropy of their predicted classes (log2 10 = 3.32 when all ten are equally
  frequent).
- class_accuracy (class-conditional runs) is the classifier's accuracy on the samples against the labels
  they were drawn for (cycling through the classes, at classifier-free guidance scale `guidance`); compare
  it with the classifier's accuracy on real test images, classifier_test_accuracy.
- Without a feature network (feature_space = pixels): sliced_wasserstein and mmd are pixel-space
  distances of the samples to the held-out split, *_train_test the same for real training images, and
  sliced_wasserstein_ratio their quotient (near 1: as close as real data), with its 95% bootstrap interval
  sliced_wasserstein_ratio_interval (built as fd_ratio_interval is); mmd_train_test is the noise
  floor of mmd (the unbiased estimate scatters around 0 for real data)."""
