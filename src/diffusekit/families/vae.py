"""The latent-variable family: ``model.kind`` = vae | mhvae | autoencoder (``vae.models.HierarchicalVAE``).

Training: the per-example loss is the negative ELBO (or, with ``vae.iwae_k`` = k > 1, the negative IWAE
bound of Burda et al. 2016, eq. 8) divided by the number of data dimensions: nats per dimension, so
loss / ln 2 is the training bound in bits/dim. ``vae.kl_weight`` = beta < 1 scales the latent terms
(the beta-VAE objective of Higgins et al. 2017), which is how the KL-regularised autoencoder trades a
little latent regularity for sharp reconstructions (Rombach et al. 2022, sec. 3).

Sampling is ancestral (one draw of every latent level per seed; no sampler settings); evaluation
reports the ELBO and IWAE bounds in bits/dim beside the diffusion baselines, posterior collapse,
reconstruction quality and sample quality (``vae.metrics``). A trained autoencoder is also the codec
of text-to-image latent diffusion (``families.text_latent``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.registry import load_dataset
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.evaluate.baselines import categorical_baseline, gaussian_baseline
from diffusekit.evaluate.samples import score_samples
from diffusekit.families.base import EvaluateSettings, Evaluation, Model, SampleRequest, Samples
from diffusekit.families.diffusion import DEFAULT_QUALITY_SAMPLES, quality_rows
from diffusekit.io.checkpoint import load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.sampling.generate import check_finite
from diffusekit.sampling.settings import MAX_SEEDS, settings_from_json, settings_to_json
from diffusekit.vae.metrics import active_units, bound, neg_bound_per_example, reconstruction_quality
from diffusekit.vae.models import DecoderLikelihood, HierarchicalVAE, build_hierarchical_vae
from diffusekit.vae.models import sample as ancestral
from diffusekit.viz import save_image_grid, save_samples_figure

__all__ = ["VAE_KINDS", "build_likelihood", "build_vae", "VAEObjective", "VAEModel", "AncestralSettings", "load",
           "settings", "read_settings", "sample", "evaluate"]

VAE_KINDS = ("vae", "mhvae", "autoencoder")


def build_likelihood(cfg: Config, levels: int | None) -> DecoderLikelihood:
    """The decoder p(x | z_1) named by ``vae.decoder`` for data on ``levels`` values ("auto": discretized
    on discrete data, Gaussian on continuous data)."""
    kind = cfg.vae.decoder
    if kind == "auto":
        kind = "discretized" if levels is not None else "gaussian"
    if kind == "discretized" and levels is None:
        raise ConfigError(f"vae.decoder = 'discretized' needs data on a finite number of levels; "
                          f"data.name = {cfg.data.name!r} is continuous (use 'gaussian')")
    if kind == "bernoulli" and levels != 2:
        raise ConfigError(f"vae.decoder = 'bernoulli' needs binary data; data.name = {cfg.data.name!r} has "
                          f"{levels or 'continuous'} levels (use 'discretized')")
    return DecoderLikelihood(kind, levels if kind == "discretized" else None)


def build_vae(cfg: Config, data_shape: tuple[int, ...], levels: int | None) -> HierarchicalVAE:
    """The ``HierarchicalVAE`` of ``model.kind`` on data of per-example shape ``data_shape``."""
    kind, m, v = cfg.model.kind, cfg.model, cfg.vae
    if kind not in VAE_KINDS:
        raise ConfigError(f"model.kind = {kind!r} is not a latent-variable model ({', '.join(VAE_KINDS)})")
    if m.num_classes > 0:
        raise ConfigError(f"model.num_classes = {m.num_classes}: model.kind = {kind!r} is unconditional (set it to 0)")
    if kind == "autoencoder":
        if len(data_shape) != 3 or data_shape[1] % 4 or data_shape[2] % 4:
            raise ConfigError(f"model.kind = 'autoencoder' needs images (C, H, W) with H and W multiples of 4, "
                              f"got per-example shape {tuple(data_shape)}")
    return build_hierarchical_vae(kind, data_shape, build_likelihood(cfg, levels), latent_dim=v.latent_dim,
                                  hierarchy=v.hierarchy, hidden=m.hidden, depth=m.depth,
                                  latent_channels=v.latent_channels, base_channels=m.base_channels,
                                  norm_groups=m.norm_groups)


def _check_decoder_units(cfg: Config, levels: int | None, what: str) -> None:
    """A Gaussian density evaluated at the values of discrete data is not a probability of those values:
    its bits/dim are not comparable with the discrete baselines and can go below zero."""
    if levels is not None and build_likelihood(cfg, levels).kind == "gaussian":
        raise ConfigError(f"vae.decoder = 'gaussian' on data.name = {cfg.data.name!r} ({levels} levels): {what} "
                          "would be a density on discrete data, not a bound on -log P(x); use 'discretized' (or "
                          "'auto')")


class VAEObjective:
    """VAE / MHVAE / autoencoder training: one ``module(x, generator, k)`` forward per batch (DDP-safe);
    every reparameterization draw comes from the trainer's generator."""

    def __init__(self, cfg: Config, data: ArrayDataset):
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        v = cfg.vae
        if v.iwae_k > 1 and v.kl_weight != 1.0:
            raise ConfigError(f"vae.iwae_k = {v.iwae_k} trains the IWAE bound, which has no kl_weight; "
                              f"set vae.kl_weight = 1 (got {v.kl_weight})")
        _check_decoder_units(cfg, data.levels, "the training bound")
        self.module = build_vae(cfg, self.data_shape, data.levels)
        self.dims = math.prod(self.data_shape)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        v = self.cfg.vae
        terms = module(x0, generator, v.iwae_k)
        return neg_bound_per_example(terms, v.iwae_k, v.kl_weight) / self.dims

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        return ancestral(module, range(n), self.cfg.vae.sample_noise, device)


@dataclass
class VAEModel(Model):
    """A trained latent-variable model (EMA or raw weights)."""

    module: HierarchicalVAE | None = None

    def sample_dir_name(self, settings: "AncestralSettings") -> str:
        return f"samples-{self.cfg.model.kind}"


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> VAEModel:
    """The newest complete checkpoint of a VAE / MHVAE / autoencoder run."""
    try:
        module = build_vae(rc.cfg, rc.data_shape, rc.levels)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{rc.path}.json: recorded model cannot be built ({exc})") from None
    load_module_state(module, *rc.weights(use_ema))
    return VAEModel(rc.run_dir, rc.cfg, rc.data_shape, rc.levels, rc.step, rc.path, module=module.to(device).eval())


@dataclass
class AncestralSettings:
    """What determines ancestral samples of a latent-variable run: the seeds, the weights and whether the
    decoder adds its noise (a draw of p(x | z) instead of E[x | z]); ``settings.json`` round-trips it."""

    kind: str = "vae"
    seeds: list[int] = field(default_factory=lambda: list(range(64)))
    use_ema: bool = True
    decoder_noise: bool = False
    batch_size: int = 500

    def __post_init__(self) -> None:
        if isinstance(self.seeds, (range, tuple)):
            self.seeds = list(self.seeds)
        ok = (isinstance(self.seeds, list) and 0 < len(self.seeds) <= MAX_SEEDS
              and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in self.seeds)
              and len(set(self.seeds)) == len(self.seeds))
        for name, good, want in (("seeds", ok, "a non-empty list of distinct integers >= 0"),
                                 ("use_ema", isinstance(self.use_ema, bool), "true or false"),
                                 ("decoder_noise", isinstance(self.decoder_noise, bool), "true or false"),
                                 ("batch_size", isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                  and 1 <= self.batch_size <= 100_000, "an integer in 1..100000"),
                                 ("kind", self.kind in VAE_KINDS, " or ".join(VAE_KINDS))):
            if not good:
                raise ConfigError(f"{name} must be {want}; got {getattr(self, name)!r}")

    def to_json(self, extra: dict[str, Any] | None = None) -> str:
        return settings_to_json(self, extra)


def settings(cfg: Config, overrides: dict[str, Any], key: Callable[[str], str]) -> AncestralSettings:
    """The ancestral-sampling settings of a run (``vae.sample_noise``) with the call's seeds, weights, batch."""
    allowed = {"seeds", "use_ema", "batch_size"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ConfigError(f"{key(bad[0])} applies to diffusion runs only; model.kind = {cfg.model.kind!r} samples "
                          "ancestrally (no sampler, steps or guidance)")
    return AncestralSettings(kind=cfg.model.kind, decoder_noise=cfg.vae.sample_noise, **overrides)


def read_settings(text: str, source: str) -> AncestralSettings:
    try:
        return settings_from_json(AncestralSettings, text, "sample")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def sample(model: VAEModel, settings: AncestralSettings, request: SampleRequest, device: str | torch.device = "cpu",
           progress: bool = True) -> Samples:
    """Ancestral samples, one seed each (E[x | z] or, with ``decoder_noise``, a draw of p(x | z))."""
    x = ancestral(model.module, settings.seeds, settings.decoder_noise, device, batch_size=settings.batch_size)
    return Samples(x)


def evaluate(model: VAEModel, settings: EvaluateSettings, out_dir: Path, progress: bool = True) -> Evaluation:
    """The ELBO and IWAE bounds, collapse and reconstruction (``bpd``) and the sample quality (``fd``)."""
    unknown = [m for m in settings.metrics if m not in ("bpd", "fd")]
    if unknown:
        raise ConfigError(f"--metrics: {unknown[0]!r} is not offered for model.kind = {model.cfg.model.kind!r}; "
                          "choose from bpd, fd")
    for flag, value in (("--guidance", settings.guidance), ("--sampler", settings.sampler), ("--steps", settings.steps),
                        ("--grid", settings.grid)):
        if value is not None:
            raise ConfigError(f"{flag} applies to diffusion runs; {model.source} is a latent-variable model")
    test = load_dataset(model.cfg.data, settings.split)
    result: dict[str, Any] = {"run": str(model.source), "kind": model.cfg.model.kind, "step": model.step,
                              "split": settings.split, "data": model.cfg.data.name}
    samples = None
    with torch.random.fork_rng():
        if "bpd" in settings.metrics:
            _check_decoder_units(model.cfg, model.levels, "the bound in bits/dim")
            result.update(_bounds(model, test, settings))
        if "fd" in settings.metrics:
            n = settings.n_samples or DEFAULT_QUALITY_SAMPLES
            t0 = time.time()
            samples = ancestral(model.module, range(settings.seed, settings.seed + n), model.cfg.vae.sample_noise)
            seconds = time.time() - t0
            check_finite(samples, "quality samples")
            q = score_samples(samples, model.cfg.data, test, model.levels)
            q.update(sampling_seconds=seconds, seconds_per_sample=seconds / n, n_samples=n,
                     sampler="ancestral, " + ("draw of p(x|z)" if model.cfg.vae.sample_noise else "E[x|z]"))
            result["quality"] = q
    return Evaluation(result, _rows(result), _pictures(model, test, samples, out_dir))


def _bounds(model: VAEModel, test: ArrayDataset, settings: EvaluateSettings) -> dict[str, Any]:
    t0 = time.time()
    b = bound(model.module, test.x, settings.iwae_k, settings.seed)
    if model.levels is not None:
        train = load_dataset(model.cfg.data, "train")
        b["levels"] = model.levels
        b["baselines"] = {"categorical_per_pixel": categorical_baseline(train.x, test.x, model.levels),
                          "gaussian_full_covariance": gaussian_baseline(train.x, test.x, model.levels)}
    else:
        b["note"] = "continuous data: bits/dim of a density (not comparable to discrete-data numbers)"
    b["seconds"] = time.time() - t0
    return {"bpd": b, "collapse": active_units(model.module, test.x, settings.seed),
            "reconstruction": reconstruction_quality(model.module, test.x)}


def _rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("run", result["run"]), ("model", result["kind"]), ("checkpoint step", str(result["step"])),
            ("split", result["split"])]
    b = result.get("bpd", {})
    if b:
        rows += [("bound (-ELBO), bits/dim", f"{b['bits_per_dim']:.4f} ± {b['stderr_bits_per_dim']:.4f}"),
                 (f"IWAE bound (k = {b['iwae_k']}), bits/dim", f"{b['iwae_bits_per_dim']:.4f}"),
                 ("  reconstruction", f"{b['reconstruction_bits_per_dim']:.4f}")]
        levels = b["latent_bits_per_dim_per_level"]
        for t, v in enumerate(levels, 1):
            rows.append((f"  level {t} ({'prior matching' if t == len(levels) else 'consistency'})", f"{v:.4f}"))
        rows += [(f"baseline: {key.replace('_', ' ')}", f"{val:.4f}") for key, val in b.get("baselines", {}).items()]
    c = result.get("collapse")
    if c:
        rows.append(("active units per level", f"{c['active_units']} of {c['latent_units']}"))
    r = result.get("reconstruction")
    if r:
        rows += [("reconstruction MSE", f"{r['mse']:.5f}"), ("reconstruction PSNR (dB)", f"{r['psnr_db']:.2f}")]
    return rows + quality_rows(result.get("quality", {}))


def _pictures(model: VAEModel, test: ArrayDataset, samples: Tensor | None, out_dir: Path) -> dict[str, tuple[str, str]]:
    pictures: dict[str, tuple[str, str]] = {}
    if samples is not None:
        ref = test.x if test.x.ndim == 2 else None
        path = save_samples_figure(samples[:64], out_dir / "samples.png", levels=model.levels, reference=ref)
        pictures["samples"] = (path.name, "Ancestral samples, the ones scored above.")
    if test.x.ndim == 4:
        with torch.no_grad():
            x = test.x[:16]
            pair = torch.cat([x, model.module.decode(model.module.encode(x)).cpu()])
        path = save_image_grid(pair, out_dir / "reconstructions.png", nrow=16, levels=model.levels)
        pictures["reconstructions"] = (path.name, "Top: held-out data; bottom: E[x | z = E[z | x]].")
    return pictures

