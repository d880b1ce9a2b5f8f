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

Two kinds share this family: ``latent_unet`` diffuses the autoencoder's latents, ``text_unet`` diffuses the
pixels themselves with the same cross-attention U-Net (the codec is the identity, ``PixelCodec``): the pair
measures what the latent space buys at equal budget (Rombach et al. 2022, sec. 4.1). The frozen codec's
latents of the whole training set are computed once when training starts (``encode_data``), not per batch.

With ``data.name = "scenes"`` (``data.scenes``) the captions describe compositional scenes: each training
scene has ``CAPTIONS_PER_SCENE`` captions drawn once from the training wording of its grammar (the label of a
scene is its index), one of them picked per example; evaluation scores every stated attribute of every digit
(``evaluate_scenes``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.captions import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption, caption_grid
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.scenes import Scene, adherence, heldout_combo_scenes, scene_table
from diffusekit.data.scenes import caption as scene_caption
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.evaluate.features import load_feature_net
from diffusekit.evaluate.quality import _snap_to_levels, image_quality, pixel_quality
from diffusekit.families import vae
from diffusekit.families.base import EvaluateSettings, Evaluation, Model, SampleRequest, Samples, load_run_dependency
from diffusekit.families.diffusion import build_schedule, check_class_labels, drop_labels, grid_columns
from diffusekit.io.checkpoint import check_state, load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.latent.model import KIND, LatentCodec, build_latent_net, codec_fingerprint, latent_scale

PIXEL_KIND = "text_unet"  # the same denoiser on pixels (no autoencoder)
KINDS = (KIND, PIXEL_KIND)
CAPTIONS_PER_SCENE = 4  # training captions drawn once per scene (data.name = "scenes")
from diffusekit.latent.sampling import AND, check_prompts, prompt_features, sample_latents, text_condition
from diffusekit.losses import diffusion_loss, sample_timesteps
from diffusekit.parameterization import Denoiser
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule
from diffusekit.text import CONTEXT_DIM, NULL_CAPTION, CaptionFeatures, load_text_encoder
from diffusekit.viz import save_image_grid

__all__ = [
    "GRID_PROMPTS",
    "KINDS",
    "PIXEL_KIND",
    "LabelCaptions",
    "PixelCodec",
    "SceneCaptions",
    "TextLatentModel",
    "TextLatentObjective",
    "check_config",
    "evaluate",
    "evaluate_prompts",
    "load",
    "load_codec",
    "sample",
    "sample_prompts",
    "save_prompt_grid",
]

GRID_PROMPTS = ("a handwritten {d}", "an image of the numeral {w}")  # one training template, one held out


def load_codec(path: str | Path, data_shape: tuple[int, ...] | None = None, device: torch.device | str = "cpu"
               ) -> vae.VAEModel:
    """The autoencoder of run folder ``path`` (EMA weights), or a one-line ``CheckpointError`` that
    names ``latent.autoencoder_run`` and the path when it is missing, incomplete or not an autoencoder."""
    where = f"latent.autoencoder_run = {str(path)!r}"
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{where}: autoencoder run folder {path} does not exist (train it: diffusekit train "
                              f"--config configs/autoencoder_mnist.toml --out {path}, or autoencoder_scenes.toml "
                              "for scenes)")
    return load_run_dependency(path, where, "an autoencoder", lambda rc: rc.kind == "autoencoder", vae.load,
                               data_shape, "the autoencoder codes", device)


def check_config(cfg: Config) -> None:
    """The keys a text-conditioned run needs, as one-line ``ConfigError``s."""
    kind = cfg.model.kind
    if cfg.data.name not in ("digits", "mnist", "scenes"):
        raise ConfigError(f"model.kind = {kind!r} captions digit labels or scenes; data.name must be 'digits', "
                          f"'mnist' or 'scenes', got {cfg.data.name!r}")
    if cfg.data.name == "scenes" and cfg.model.num_classes != 0:
        raise ConfigError(f"model.kind = {kind!r} on data.name = 'scenes' captions each scene from its digits: set "
                          f"model.num_classes = 0 (got {cfg.model.num_classes})")
    if cfg.data.name != "scenes" and cfg.model.num_classes != 10:
        raise ConfigError(f"model.kind = {kind!r} makes captions from the 10 digit labels: set model.num_classes = "
                          f"10 (got {cfg.model.num_classes})")
    if cfg.loss.objective != "discrete":
        raise ConfigError(f"model.kind = {kind!r} trains the discrete-time loss; set loss.objective = 'discrete'")
    if kind == KIND and cfg.data.hflip:
        raise ConfigError(f"data.hflip = true: model.kind = {KIND!r} encodes the training set once, unflipped; "
                          "set data.hflip = false")


class PixelCodec:
    """The identity codec of ``model.kind = "text_unet"``: the denoiser sees the images themselves."""

    def __init__(self, data_shape: tuple[int, ...]):
        self.data_shape, self.scale, self.source = tuple(data_shape), 1.0, ""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.data_shape

    def to(self, device: torch.device | str) -> PixelCodec:
        return self

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


class LabelCaptions:
    """Captions of digit labels: ``TRAIN_TEMPLATES``, one drawn per example; the null label is ""."""

    def __init__(self, cfg: Config):
        self.cfg, self.templates = cfg, TRAIN_TEMPLATES
        self.features = CaptionFeatures(caption_grid(TRAIN_TEMPLATES) + [NULL_CAPTION])
        self.null_row = len(self.features.captions) - 1

    def rows(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Row of the caption of each example: digit label * templates + a template drawn from
        ``generator``; the null label (``model.num_classes``) gets the empty caption."""
        labels = drop_labels(labels, self.cfg, generator).cpu()
        picks = torch.randint(len(self.templates), labels.shape, generator=generator)
        null = labels == self.cfg.model.num_classes
        rows = labels.clamp(max=9) * len(self.templates) + picks
        return torch.where(null, torch.full_like(rows, self.null_row), rows)

    def preview_rows(self, n: int) -> Tensor:
        return torch.arange(n) % 10 * len(self.templates)


def training_caption(scene: Scene, thresholds, rng: np.random.Generator, partial: float = 0.0) -> str:
    """One training caption of ``scene`` (training wording, each attribute stated with probability 0.8). With
    probability ``partial`` a two-digit scene is captioned by one of its digits alone (which one at random), so
    the model also learns p(x | one clause) with the other digit left free: what composing clauses with
    " AND " assumes (``latent.sampling.clause_features``). ``partial`` = 0 draws nothing extra from ``rng``."""
    if partial > 0 and len(scene.digits) == 2 and rng.random() < partial:
        scene = Scene((scene.digits[int(rng.integers(2))],))
    return scene_caption(scene, thresholds, "train", rng, p_state=0.8)


class SceneCaptions:
    """Captions of the training scenes: ``CAPTIONS_PER_SCENE`` per scene (``training_caption``, with
    ``data.partial_captions``), drawn once with a generator seeded by ``data.seed``; one is picked per example,
    and ``train.class_dropout`` of them are replaced by ""."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        table = scene_table("train", cfg.data.n_train, cfg.data.seed, cfg.data.image_size or 32)
        rng = np.random.default_rng([cfg.data.seed, 7])
        captions = [training_caption(scene, table.thresholds, rng, cfg.data.partial_captions)
                    for scene in table.scenes for _ in range(CAPTIONS_PER_SCENE)]
        self.features = CaptionFeatures(captions + [NULL_CAPTION])
        self.null_row = len(captions)
        self.test = scene_table("test", cfg.data.n_test, cfg.data.seed, cfg.data.image_size or 32)

    def rows(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        labels = labels.cpu()
        drop = torch.rand(labels.shape, generator=generator) < self.cfg.train.class_dropout
        picks = torch.randint(CAPTIONS_PER_SCENE, labels.shape, generator=generator)
        rows = labels * CAPTIONS_PER_SCENE + picks
        return torch.where(drop, torch.full_like(rows, self.null_row), rows)

    def preview_prompts(self, n: int) -> list[str]:
        scenes = self.test.scenes
        return [scene_caption(scenes[i % len(scenes)], self.test.thresholds, "train") for i in range(n)]


def build_net(cfg: Config, latent_shape: tuple[int, ...]):
    return build_latent_net(cfg.model, latent_shape, CONTEXT_DIM)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the network in .module


class TextLatentObjective:
    """The trainer's ``Objective`` for ``model.kind = "latent_unet"`` and ``"text_unet"`` (module docstring)."""

    def __init__(self, cfg: Config, data: ArrayDataset):
        check_config(cfg)
        if cfg.data.name != "scenes":
            check_class_labels(cfg, data)
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        self.schedule = build_schedule(cfg.diffusion)
        self.kind = cfg.model.prediction
        if cfg.model.kind == PIXEL_KIND:
            self.codec = PixelCodec(self.data_shape)
            self.module = build_net(cfg, self.data_shape)
        else:
            with torch.random.fork_rng(devices=[]):  # loading codec and encoder leaves the caller's RNG alone
                run = load_codec(cfg.latent.autoencoder_run, self.data_shape)
            self.module = build_net(cfg, tuple(run.module.latent_shape))
            with torch.random.fork_rng(devices=[]):
                scale = latent_scale(run.module, data.x)
            self.module.latent_scale.fill_(scale)
            self.module.codec_fingerprint.copy_(codec_fingerprint(run.module))
            self.codec = LatentCodec(run.module, scale, str(cfg.latent.autoencoder_run))
        self.latent_shape = tuple(self.codec.latent_shape)
        with torch.random.fork_rng(devices=[]):
            self.captions = SceneCaptions(cfg) if cfg.data.name == "scenes" else LabelCaptions(cfg)

    def denoiser(self, module: nn.Module) -> Denoiser:
        return Denoiser(module, self.kind)

    @torch.no_grad()
    def encode_data(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """The training set as the denoiser sees it: the frozen codec's scaled latents, computed once (the
        trainer then hands ``loss`` latents, not images); the images themselves for ``text_unet``."""
        if isinstance(self.codec, PixelCodec):
            return x
        return torch.cat([self.codec.encode(x[lo:lo + batch_size]) for lo in range(0, x.shape[0], batch_size)])

    def caption_rows(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Row of each example's caption in ``captions.features`` (caption dropout included)."""
        return self.captions.rows(labels, generator)

    def loss(self, module: nn.Module, z0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """Per-example loss on a batch of ``encode_data`` rows (latents, or images for ``text_unet``)."""
        if labels is None:
            raise ValueError(f"model.kind = {self.cfg.model.kind!r} needs the labels of the batch")
        text = self.captions.features.lookup(self.caption_rows(labels, generator).to(z0.device))
        lc = self.cfg.loss
        t = sample_timesteps(z0.shape[0], self.schedule.T, generator, lc.t_sampling)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        return diffusion_loss(self.denoiser(module), z0, t, self.schedule, noise, lc.weighting,
                              cond=text.as_cond(), gamma=lc.min_snr_gamma)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n decoded samples (DDPM, <= 100 steps) at the guidance scale of ``sample.guidance``, prompted
        "a handwritten 0", ..., "a handwritten 9" in turn, or with the captions of the first test scenes."""
        if isinstance(self.captions, SceneCaptions):
            text, null = prompt_features(load_text_encoder(), self.captions.preview_prompts(n), n)
        else:
            text = self.captions.features.lookup(self.captions.preview_rows(n))
            null = self.captions.features.lookup(torch.tensor([self.captions.null_row]))
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
    codec: LatentCodec | PixelCodec | None = None

    def sample_dir_name(self, settings: SampleSettings) -> str:
        return f"samples-{settings.sampler}-{settings.steps or self.schedule.T}"


def load(rc: RunCheckpoint, use_ema: bool = True, device: torch.device | str = "cpu") -> TextLatentModel:
    """The newest complete checkpoint of a ``latent_unet`` run and its autoencoder, or of a ``text_unet`` run."""
    cfg, ckpt = rc.cfg, rc.path
    pixel = cfg.model.kind == PIXEL_KIND
    codec_run = None if pixel else load_codec(cfg.latent.autoencoder_run, rc.data_shape, device)
    latent_shape = tuple(rc.data_shape) if pixel else tuple(codec_run.module.latent_shape)
    state, source, what = rc.weights(use_ema)
    try:
        with torch.device("meta"):  # shapes first, on a weightless copy
            check_state(build_net(cfg, latent_shape).state_dict(), state, source, what)
        net = build_net(cfg, latent_shape)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}.json: recorded model cannot be built ({exc})") from None
    load_module_state(net, state, source, what)
    if pixel:
        codec = PixelCodec(latent_shape)
    else:
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
    text, null = text_condition(encoder or load_text_encoder(), prompts, len(settings.seeds))
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
    check_prompts(prompts)
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


SCENE_SETS = ("train_wording", "heldout_wording", "heldout_combos")


def scene_prompts(data_cfg, n: int, name: str = "train_wording",
                  compose: bool = False) -> tuple[list[str], list, Tensor, Any]:
    """One prompt set of ``SCENE_SETS`` for the scenes of ``data_cfg``, ``n`` prompts: (prompts, scenes, the real
    images, the test split's attribute thresholds). "train_wording" and "heldout_wording" are the first ``n``
    test scenes in the training and the held-out wording (the same scenes, only the words differ);
    "heldout_combos" holds ``n`` scenes whose first digit sits in its held-out (position, size), in the training
    wording. Every prompt states every attribute its digits have. With ``compose`` a two-digit scene is asked
    as one caption per digit joined by " AND " (each in the one-digit frames of the same wording)."""
    canvas = data_cfg.image_size or 32
    test = scene_table("test", max(n, data_cfg.n_test), data_cfg.seed, canvas)
    if name == "heldout_combos":
        x, scenes = heldout_combo_scenes(n, data_cfg.seed, canvas)
    else:
        x, scenes = test.x[:n], test.scenes[:n]
    wording = "heldout" if name == "heldout_wording" else "train"
    rng = np.random.default_rng([data_cfg.seed, SCENE_SETS.index(name)])
    prompts = [scene_caption(s, test.thresholds, wording, rng) for s in scenes]
    if compose:  # two-digit scenes from their own stream, so a one-digit scene keeps its prompt exactly
        rng = np.random.default_rng([data_cfg.seed, SCENE_SETS.index(name), 1])
        prompts = [AND.join(scene_caption(Scene((d,)), test.thresholds, wording, rng) for d in s.digits)
                   if len(s.digits) > 1 else p for p, s in zip(prompts, scenes)]
    return prompts, list(scenes), x, test.thresholds


def scene_prompt_sets(model: TextLatentModel, n: int,
                      compose: bool = False) -> dict[str, tuple[list[str], list, Tensor]]:
    """The three prompt sets of a scenes run (``scene_prompts``), ``n`` prompts each: (prompts, scenes, images)."""
    return {name: scene_prompts(model.cfg.data, n, name, compose)[:3] for name in SCENE_SETS}


def evaluate_scenes(model: TextLatentModel, settings: SampleSettings, n_samples: int = 200, encoder=None,
                    device: torch.device | str = "cpu", progress: bool = False, compose: bool = False) -> dict[str, Any]:
    """Adherence per attribute (``data.scenes.adherence``) and realism (pixel sliced W2 to the test scenes,
    as a ratio to real training scenes) for each prompt set of ``scene_prompt_sets`` (``compose``: one clause
    per digit, joined by " AND "), sample i from seed i; the real scenes of each set, scored by the same
    ruler, are the reference (``real``)."""
    d = model.cfg.data
    canvas = d.image_size or 32
    test = scene_table("test", max(n_samples, d.n_test), d.seed, canvas)
    train = scene_table("train", d.n_train, d.seed, canvas)
    classifier = load_feature_net("scenes")
    base = settings.replace(seeds=list(range(n_samples)))
    out: dict[str, Any] = {"guidance": settings.guidance, "sampler": settings.sampler,
                           "steps": settings.steps or model.schedule.T, "n_samples": n_samples, "step": model.step,
                           "scene_classifier_test_accuracy": classifier.test_accuracy, "composed": compose}
    for name, (prompts, scenes, real) in scene_prompt_sets(model, n_samples, compose).items():
        t0 = time.process_time()
        x = sample_prompts(model, prompts, base, encoder, device, progress)
        seconds = (time.process_time() - t0) / n_samples
        score = adherence(x, scenes, test.thresholds, classifier)
        quality = pixel_quality(x, test.x, train.x, levels=256)
        out[name] = {"adherence": score, "real": adherence(real, scenes, test.thresholds, classifier),
                     "sliced_wasserstein_ratio": quality["sliced_wasserstein_ratio"],
                     "sliced_wasserstein": quality["sliced_wasserstein"], "cpu_s_per_image": seconds,
                     "examples": prompts[:8]}
    return out


def _scene_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name in SCENE_SETS:
        r = result[name]
        a, real = r["adherence"], r["real"]
        two, real_two = a["by_digits"]["2"], real["by_digits"]["2"]
        rows += [(f"{name}: digit / position / size / thickness / slant",
                  " / ".join(f"{a[k]:.2f}" if a[k] is not None else "-" for k in
                             ("digit", "position", "size", "thickness", "slant"))),
                 (f"{name}: all attributes right (two-digit scenes)",
                  (f"{a['all_right']:.3f} ({two['all_right']:.3f}); real scenes {real['all_right']:.3f} "
                  f"({real_two['all_right']:.3f})")),
                 (f"{name}: pixel sliced-W2 ratio", f"{r['sliced_wasserstein_ratio']:.2f}")]
    return rows


def _evaluation_sampling(model: TextLatentModel, settings: EvaluateSettings, minimum: int,
                         why: str) -> tuple[int, SampleSettings]:
    """(prompts per set, the sampler settings) of an evaluation: ``--n-samples`` (default 200, at least
    ``minimum``) and the run's [sample] with the command's overrides."""
    n = 200 if settings.n_samples is None else settings.n_samples
    if n < minimum:
        raise ConfigError(f"--n-samples must be at least {minimum}{why}, got {n}")
    sampling = SampleSettings.from_config(model.cfg.sample, key=settings.key, batch_size=250,
                                          **settings.sample_overrides())
    sampling.check(settings.key, T=model.schedule.T)
    return n, sampling


def evaluate(model: TextLatentModel, settings: EvaluateSettings, out_dir: Path, progress: bool = True) -> Evaluation:
    """Prompt accuracy (training and held-out templates), fd and fd_ratio at ``settings.guidance`` (default:
    the run's sample.guidance) on ``n_samples`` (default 200) samples per template set; writes
    ``text2img-g<S>.json`` and a picture with one row per prompt. A scenes run is scored per attribute
    (``evaluate_scenes``) instead."""
    if model.cfg.data.name == "scenes":
        return _evaluate_scenes_run(model, settings, out_dir, progress)
    if settings.compose:
        raise ConfigError(f"--compose: {model.source} is not a scenes run; composing applies to scene captions, "
                          "one clause per digit (data.name = 'scenes')")
    n, sampling = _evaluation_sampling(model, settings, 10, " (one per digit)")
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


def _evaluate_scenes_run(model: TextLatentModel, settings: EvaluateSettings, out_dir: Path,
                         progress: bool) -> Evaluation:
    n, sampling = _evaluation_sampling(model, settings, 2, "")
    result = evaluate_scenes(model, sampling, n_samples=n, progress=progress, compose=settings.compose)
    name = f"text2img-g{sampling.guidance:g}" + ("-and" if settings.compose else "")
    sets = scene_prompt_sets(model, 6, settings.compose)
    prompts = sets["train_wording"][0][:4] + sets["heldout_combos"][0][:2]
    grid = save_prompt_grid(model, prompts, 6, sampling, out_dir / f"{name}.png")
    rows = [("run", str(model.source)), ("checkpoint step", str(model.step)),
            ("sampler", f"{result['sampler']}, {result['steps']} steps, guidance {result['guidance']:g}"
                        + (", one clause per digit joined by AND" if settings.compose else "")),
            ("prompts per set", str(n)),
            ("scene digit classifier on real test digits", f"{result['scene_classifier_test_accuracy']:.3f}")]
    rows += _scene_rows(result)
    caption_text = ("One row per prompt (four test scenes in the training wording, then two held-out "
                    "combinations), six seeds each: " + "; ".join(repr(p) for p in prompts))
    return Evaluation(result, rows, {"prompts": (grid.name, caption_text)}, metrics_file=f"{name}.json")
