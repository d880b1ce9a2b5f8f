"""The text-to-image latent family (``model.kind = "latent_unet"``): Stable Diffusion's recipe, CPU-sized.

Training (Rombach et al. 2022, sec. 3.3): the frozen autoencoder of ``latent.autoencoder_run`` codes
the images (``latent.model.LatentCodec``), and a U-Net with cross-attention over the MiniLM features of
a caption learns the per-example denoising loss on the scaled latents,

    L = E_{E(x), y, eps, t} || eps - eps_theta(z_t, t, tau(y)) ||^2      (any prediction kind)

Captions come from the labels (``data.captions``, ``model.num_classes = 10``): each label is replaced by
the null label with probability ``train.class_dropout`` and the null label becomes the empty caption ""
(classifier-free guidance); a training template is drawn per example from the run's noise generator
(exact resume). The caption features of the fixed training set are computed once.

A trained run is self-contained enough to sample: its checkpoint holds the U-Net weights, the latent
scale and a fingerprint of the autoencoder, whose run is checked when loading (a retrained or replaced
codec is a one-line ``CheckpointError``). Samples are prompted (sample i gets prompt i % P) and guided;
the evaluation asks the project's classifier whether decoded samples show the digit of their prompt,
for the training templates and for held-out paraphrases (``evaluate_prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.captions import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption, caption_grid
from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.evaluate.features import load_feature_net
from diffusekit.evaluate.quality import _snap_to_levels, image_quality
from diffusekit.families import vae
from diffusekit.families.base import EvaluateSettings, Evaluation, Model, SampleRequest, Samples, load_run_dependency
from diffusekit.families.diffusion import build_schedule, check_class_labels, drop_labels, grid_columns
from diffusekit.io.checkpoint import check_state, load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.latent.model import KIND, LatentCodec, build_latent_net, codec_fingerprint, latent_scale
from diffusekit.latent.sampling import prompt_features, sample_latents
from diffusekit.losses import diffusion_loss, sample_timesteps
from diffusekit.parameterization import Denoiser
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule
from diffusekit.text import CONTEXT_DIM, NULL_CAPTION, CaptionFeatures, load_text_encoder
from diffusekit.viz import save_image_grid

__all__ = ["load_codec", "check_config", "TextLatentObjective", "TextLatentModel", "load", "sample", "sample_prompts",
           "save_prompt_grid", "evaluate_prompts", "evaluate", "GRID_PROMPTS"]

GRID_PROMPTS = ("a handwritten {d}", "an image of the numeral {w}")  # one training template, one held out


def load_codec(path: str | Path, data_shape: tuple[int, ...] | None = None, device: torch.device | str = "cpu"
               ) -> vae.VAEModel:
    """The autoencoder of run folder ``path`` (EMA weights), or a one-line ``CheckpointError`` that
    names ``latent.autoencoder_run`` and the path when it is missing, incomplete or not an autoencoder."""
    where = f"latent.autoencoder_run = {str(path)!r}"
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{where}: autoencoder run folder {path} does not exist (train it: diffusekit train "
                              f"--config configs/autoencoder_mnist.toml --out {path})")
    return load_run_dependency(path, where, "an autoencoder", lambda rc: rc.kind == "autoencoder", vae.load,
                               data_shape, "the autoencoder codes", device)


def check_config(cfg: Config) -> None:
    """The keys a text-conditioned latent run needs, as one-line ``ConfigError``s."""
    if cfg.data.name not in ("digits", "mnist"):
        raise ConfigError(f"model.kind = {KIND!r} captions digit labels; data.name must be 'digits' or 'mnist', "
                          f"got {cfg.data.name!r}")
    if cfg.model.num_classes != 10:
        raise ConfigError(f"model.kind = {KIND!r} makes captions from the 10 digit labels: set model.num_classes = "
                          f"10 (got {cfg.model.num_classes})")
    if cfg.loss.objective != "discrete":
        raise ConfigError(f"model.kind = {KIND!r} trains the discrete-time loss; set loss.objective = 'discrete'")


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the network in .module


class TextLatentObjective:
    """The trainer's ``Objective`` for ``model.kind = "latent_unet"`` (see the module docstring)."""

    def __init__(self, cfg: Config, data: ArrayDataset):
        check_config(cfg)
        check_class_labels(cfg, data)
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        self.schedule = build_schedule(cfg.diffusion)
        self.kind = cfg.model.prediction
        with torch.random.fork_rng(devices=[]):  # loading codec and encoder leaves the caller's RNG alone
            run = load_codec(cfg.latent.autoencoder_run, self.data_shape)
        self.latent_shape = tuple(run.module.latent_shape)
        self.module = build_latent_net(cfg.model, self.latent_shape, CONTEXT_DIM)
        with torch.random.fork_rng(devices=[]):
            scale = latent_scale(run.module, data.x)
            self.templates = TRAIN_TEMPLATES
            self.captions = CaptionFeatures(caption_grid(TRAIN_TEMPLATES) + [NULL_CAPTION])
        self.module.latent_scale.fill_(scale)
        self.module.codec_fingerprint.copy_(codec_fingerprint(run.module))
        self.codec = LatentCodec(run.module, scale, str(cfg.latent.autoencoder_run))
        self.null_row = len(self.captions.captions) - 1

    def denoiser(self, module: nn.Module) -> Denoiser:
        return Denoiser(module, self.kind)

    def caption_rows(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Row of the caption of each example: digit label * templates + a template drawn from
        ``generator``; the null label (``model.num_classes``) gets the empty caption."""
        labels = labels.cpu()
        picks = torch.randint(len(self.templates), labels.shape, generator=generator)
        null = labels == self.cfg.model.num_classes
        rows = labels.clamp(max=9) * len(self.templates) + picks
        return torch.where(null, torch.full_like(rows, self.null_row), rows)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        if labels is None:
            raise ValueError(f"model.kind = {KIND!r} needs the labels of the batch")
        labels = drop_labels(labels, self.cfg, generator)
        self.codec.scale = float(_unwrap(module).latent_scale)  # the checkpoint's scale, after a resume
        z0 = self.codec.to(x0.device).encode(x0)
        text = self.captions.lookup(self.caption_rows(labels, generator).to(x0.device))
        lc = self.cfg.loss
        t = sample_timesteps(z0.shape[0], self.schedule.T, generator, lc.t_sampling)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        return diffusion_loss(self.denoiser(module), z0, t, self.schedule, noise, lc.weighting,
                              cond=text.as_cond(), gamma=lc.min_snr_gamma)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n decoded samples prompted "a handwritten 0", ..., "a handwritten 9" in turn (DDPM, <= 100
        steps) at the guidance scale of ``sample.guidance``."""
        rows = torch.arange(n) % 10 * len(self.templates)
        text = self.captions.lookup(rows)
        null = self.captions.lookup(torch.tensor([self.null_row]))
        settings = SampleSettings(sampler="ddpm", steps=min(100, self.schedule.T), seeds=list(range(n)),
                                  batch_size=max(n, 1), guidance=self.cfg.sample.guidance)
        z = sample_latents(self.denoiser(module).eval(), self.schedule, self.latent_shape, settings, text, null,
                           device=device)
        self.codec.scale = float(_unwrap(module).latent_scale)
        return self.codec.to(device).decode(z.to(device))


@dataclass
class TextLatentModel(Model):
    """A trained ``latent_unet`` run: the latent denoiser, its schedule and the codec."""

    denoiser: Denoiser | None = None
    schedule: DiscreteSchedule | None = None
    latent_shape: tuple[int, ...] = ()
    codec: LatentCodec | None = None

    def sample_dir_name(self, settings: SampleSettings) -> str:
        return f"samples-{settings.sampler}-{settings.steps or self.schedule.T}"


def load(rc: RunCheckpoint, use_ema: bool = True, device: torch.device | str = "cpu") -> TextLatentModel:
    """The newest complete checkpoint of a ``latent_unet`` run and its autoencoder."""
    cfg, ckpt = rc.cfg, rc.path
    codec_run = load_codec(cfg.latent.autoencoder_run, rc.data_shape, device)
    latent_shape = tuple(codec_run.module.latent_shape)
    state, source, what = rc.weights(use_ema)
    try:
        with torch.device("meta"):  # shapes first, on a weightless copy
            check_state(build_latent_net(cfg.model, latent_shape, CONTEXT_DIM).state_dict(), state, source, what)
        net = build_latent_net(cfg.model, latent_shape, CONTEXT_DIM)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}.json: recorded model cannot be built ({exc})") from None
    load_module_state(net, state, source, what)
    scale = float(net.latent_scale)
    if not scale > 0:
        raise CheckpointError(f"{source}: latent_scale is {scale}, not a positive number")
    if not torch.equal(net.codec_fingerprint, codec_fingerprint(codec_run.module)):
        raise CheckpointError(f"latent.autoencoder_run = {str(cfg.latent.autoencoder_run)!r}: the autoencoder's "
                              f"weights differ from those {rc.run_dir} was trained with (retrained or replaced?)")
    codec = LatentCodec(codec_run.module, scale, cfg.latent.autoencoder_run)
    denoiser = Denoiser(net, cfg.model.prediction).to(device).eval()
    return TextLatentModel(rc.run_dir, cfg, rc.data_shape, rc.levels, rc.step, ckpt,
                           denoiser=denoiser, schedule=build_schedule(cfg.diffusion), latent_shape=latent_shape,
                           codec=codec)


def sample_prompts(model: TextLatentModel, prompts: Sequence[str], settings: SampleSettings, encoder=None,
                   device: torch.device | str = "cpu", progress: bool = False,
                   stats: dict[str, Any] | None = None) -> Tensor:
    """Decoded images (len(seeds), *data_shape) on the CPU: sample i is prompted with
    ``prompts[i % len(prompts)]`` and guided with ``settings.guidance`` (the null condition is "")."""
    if isinstance(prompts, str) or not list(prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    text, null = prompt_features(encoder or load_text_encoder(), prompts, len(settings.seeds))
    z = sample_latents(model.denoiser, model.schedule, model.latent_shape, settings, text, null, device=device,
                       progress=progress, stats=stats)
    images = [model.codec.to(device).decode(z[lo:lo + 500].to(device)).cpu() for lo in range(0, z.shape[0], 500)]
    return torch.cat(images)


def sample(model: TextLatentModel, settings: SampleSettings, request: SampleRequest,
           device: torch.device | str = "cpu", progress: bool = True) -> Samples:
    """Prompted samples (``request.prompts``; sample i gets prompt i % P), one prompt per grid column."""
    prompts = request.prompts
    if not prompts:
        raise ConfigError(f"--prompt: {model.source} is a text-conditioned run; give at least one --prompt "
                          "(e.g. --prompt \"a handwritten 3\"; --prompt \"\" samples unconditionally)")
    x = sample_prompts(model, prompts, settings, device=device, progress=progress)
    note = f"{len(prompts)} prompt{'s' * (len(prompts) > 1)}, guidance {settings.guidance:g}"
    return Samples(x, extra={"prompts": list(prompts)}, nrow=grid_columns(len(prompts)), note=note)


def save_prompt_grid(model: TextLatentModel, prompts: Sequence[str], per_prompt: int, settings: SampleSettings,
                     path: Path | str, encoder=None, device: torch.device | str = "cpu") -> Path:
    """A picture with one row per prompt and ``per_prompt`` samples (seeds 0, 1, ...) in each."""
    prompts = list(prompts)
    order = [i for i in range(per_prompt) for _ in prompts]  # sample j * P + p: prompt p, its j-th sample
    x = sample_prompts(model, prompts, settings.replace(seeds=list(range(len(order)))), encoder, device)
    x = x.reshape(per_prompt, len(prompts), *x.shape[1:]).transpose(0, 1).reshape(-1, *x.shape[1:])
    return save_image_grid(x, path, nrow=per_prompt, levels=model.levels)


def evaluate_prompts(model: TextLatentModel, settings: SampleSettings, n_samples: int = 200, encoder=None,
                     device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Classifier accuracy against the prompt's digit (``class_accuracy``), per-template accuracy,
    fd / fd_ratio and confidence, for ``n_samples`` samples with the training templates and as many
    with the held-out paraphrases (sample i: digit i % 10, template (i // 10) % #templates; both sets
    use seeds 0..n-1, so they differ only by the wording of the prompt)."""
    if n_samples < 10:
        raise ValueError(f"n_samples must be >= 10 (one per digit), got {n_samples}")
    labels = torch.arange(n_samples) % 10
    base = settings.replace(seeds=list(range(n_samples)))
    out: dict[str, Any] = {"guidance": settings.guidance, "sampler": settings.sampler,
                           "steps": settings.steps or model.schedule.T, "n_samples": n_samples, "step": model.step}
    for name, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        which = (torch.arange(n_samples) // 10) % len(templates)
        prompts = [caption(int(d), templates[int(j)]) for d, j in zip(labels, which)]
        x = sample_prompts(model, prompts, base, encoder, device, progress)
        q = image_quality(x, model.cfg.data.name, levels=model.levels, labels=labels)
        with torch.no_grad():  # the same classifier on the same quantized images, per template
            net = load_feature_net(model.cfg.data.name)
            predicted = net.features_and_logits(_snap_to_levels(x, model.levels))[1].argmax(1)
        per_template = {templates[j]: (predicted[which == j] == labels[which == j]).double().mean().item()
                        for j in range(len(templates)) if bool((which == j).any())}
        out[name] = {"class_accuracy": q["class_accuracy"], "fd": q["fd"], "fd_ratio": q["fd_ratio"],
                     "confidence": q["confidence"], "class_entropy_bits": q["class_entropy_bits"],
                     "per_template_accuracy": per_template,
                     "classifier_test_accuracy": q["classifier_test_accuracy"]}
    return out


def evaluate(model: TextLatentModel, settings: EvaluateSettings, out_dir: Path, progress: bool = True) -> Evaluation:
    """Prompt accuracy (training and held-out templates), fd and fd_ratio at ``settings.guidance`` (default:
    the run's sample.guidance) on ``n_samples`` (default 200) samples per template set; writes
    ``text2img-g<S>.json`` and a picture with one row per prompt."""
    n = 200 if settings.n_samples is None else settings.n_samples
    if n < 10:
        raise ConfigError(f"--n-samples must be at least 10 (one per digit), got {n}")
    sampling = SampleSettings.from_config(model.cfg.sample, key=settings.key, batch_size=250,
                                          **settings.sample_overrides())
    sampling.check(settings.key, T=model.schedule.T)
    result = evaluate_prompts(model, sampling, n_samples=n, progress=progress)
    name = f"text2img-g{sampling.guidance:g}"
    prompts = [caption(d, t) for t in GRID_PROMPTS for d in range(10)]
    grid = save_prompt_grid(model, prompts, 6, sampling, out_dir / f"{name}.png")
    rows = [("run", str(model.source)), ("checkpoint step", str(model.step)),
            ("sampler", f"{result['sampler']}, {result['steps']} steps, guidance {result['guidance']:g}"),
            ("samples per template set", str(n))]
    for which in ("train", "heldout"):
        r = result[which]
        rows += [(f"{which} templates: digit accuracy", f"{r['class_accuracy']:.3f}"),
                 (f"{which} templates: fd / fd_ratio", f"{r['fd']:.2f} / {r['fd_ratio']:.2f}"),
                 (f"{which} templates: confidence", f"{r['confidence']:.3f}")]
    rows.append(("classifier accuracy on real test images", f"{result['train']['classifier_test_accuracy']:.3f}"))
    caption_text = f"One row per prompt ({', '.join(repr(t) for t in GRID_PROMPTS)}, digits 0-9), six seeds each."
    return Evaluation(result, rows, {"prompts": (grid.name, caption_text)}, metrics_file=f"{name}.json")
