"""Trained text-to-image latent runs: load one, sample it from prompts, measure it.

A run is self-contained enough to sample: its checkpoint holds the U-Net weights and the latent
scale (a buffer), its recorded config names the autoencoder run (``latent.autoencoder_run``), which
is checked when loading (a one-line ``CheckpointError`` naming the path when it is missing or
incomplete). The text encoder comes from the ``text`` extra.

``evaluate_prompts`` asks the project's MNIST (or digits) classifier whether decoded samples show
the digit of their prompt, for the training templates and for held-out paraphrases never seen in
training (``data.captions``), with the Fréchet distance of ``evaluate.quality.image_quality``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.latent.objective import KIND, LatentCodec, build_latent_net, codec_fingerprint, load_codec
from diffusekit.parameterization import Denoiser
from diffusekit.schedules import DiscreteSchedule

__all__ = ["TextLatentRun", "is_text_latent_run", "load_text_latent_run", "sample_prompts", "evaluate_prompts",
           "save_prompt_grid"]


@dataclass
class TextLatentRun:
    """A trained ``latent_unet`` run: config, latent denoiser, schedule, codec and data facts."""

    cfg: Any
    denoiser: Denoiser
    schedule: DiscreteSchedule
    latent_shape: tuple[int, ...]
    codec: LatentCodec
    data_shape: tuple[int, ...]
    levels: int | None
    step: int
    checkpoint: Path


def is_text_latent_run(run_dir: Path | str) -> bool:
    from diffusekit.vae.evaluate import run_model_kind

    return run_model_kind(run_dir) == KIND


def load_text_latent_run(run_dir: Path | str, use_ema: bool = True, device: torch.device | str = "cpu"
                         ) -> TextLatentRun:
    """The newest complete checkpoint of a ``latent_unet`` run and its autoencoder."""
    from diffusekit.models import build_schedule, read_run_checkpoint
    from diffusekit.text import CONTEXT_DIM
    from diffusekit.train.checkpoint import check_state, load_module_state

    rc = read_run_checkpoint(run_dir)
    cfg, data_shape, levels, ckpt = rc.cfg, rc.data_shape, rc.levels, rc.path
    if cfg.model.kind != KIND:
        raise CheckpointError(f"{ckpt}.json: model.kind = {cfg.model.kind!r}, not a {KIND!r} run")
    codec_run = load_codec(cfg.latent.autoencoder_run, data_shape, device)
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
                              f"weights differ from those {run_dir} was trained with (retrained or replaced?)")
    codec = LatentCodec(codec_run.module, scale, cfg.latent.autoencoder_run)
    denoiser = Denoiser(net, cfg.model.prediction).to(device).eval()
    return TextLatentRun(cfg, denoiser, build_schedule(cfg.diffusion), latent_shape, codec, data_shape, levels,
                         rc.step, ckpt)


def sample_prompts(run: TextLatentRun, prompts: Sequence[str], settings, encoder=None,
                   device: torch.device | str = "cpu", progress: bool = False,
                   stats: dict[str, Any] | None = None) -> Tensor:
    """Decoded images (len(seeds), *data_shape) on the CPU: sample i is prompted with
    ``prompts[i % len(prompts)]`` and guided with ``settings.guidance`` (the null condition is "")."""
    from diffusekit.latent.sampling import prompt_features, sample_latents
    from diffusekit.text import load_text_encoder

    if isinstance(prompts, str) or not list(prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    text, null = prompt_features(encoder or load_text_encoder(), prompts, len(settings.seeds))
    z = sample_latents(run.denoiser, run.schedule, run.latent_shape, settings, text, null, device=device,
                       progress=progress, stats=stats)
    images = [run.codec.to(device).decode(z[lo:lo + 500].to(device)).cpu() for lo in range(0, z.shape[0], 500)]
    return torch.cat(images)


def save_prompt_grid(run: TextLatentRun, prompts: Sequence[str], per_prompt: int, settings, path: Path | str,
                     encoder=None, device: torch.device | str = "cpu") -> Path:
    """A picture with one row per prompt and ``per_prompt`` samples (seeds 0, 1, ...) in each."""
    from diffusekit.viz import save_image_grid

    prompts = list(prompts)
    order = [i for i in range(per_prompt) for _ in prompts]  # sample j * P + p: prompt p, its j-th sample
    grid_settings = dataclasses.replace(settings, seeds=list(range(len(order))))
    x = sample_prompts(run, prompts, grid_settings, encoder, device)
    x = x.reshape(per_prompt, len(prompts), *x.shape[1:]).transpose(0, 1).reshape(-1, *x.shape[1:])
    return save_image_grid(x, path, nrow=per_prompt, levels=run.levels)


def evaluate_prompts(run: TextLatentRun, settings, n_samples: int = 200, encoder=None,
                     device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Classifier accuracy against the prompt's digit (``class_accuracy``), per-template accuracy,
    fd / fd_ratio and confidence, for ``n_samples`` samples with the training templates and as many
    with the held-out paraphrases (sample i: digit i % 10, template (i // 10) % #templates; both sets
    use seeds 0..n-1, so they differ only by the wording of the prompt)."""
    from diffusekit.data.captions import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption
    from diffusekit.evaluate.features import load_feature_net
    from diffusekit.evaluate.quality import _snap_to_levels, image_quality

    if n_samples < 10:
        raise ValueError(f"n_samples must be >= 10 (one per digit), got {n_samples}")
    labels = torch.arange(n_samples) % 10
    base = dataclasses.replace(settings, seeds=list(range(n_samples)))
    out: dict[str, Any] = {"guidance": settings.guidance, "sampler": settings.sampler,
                           "steps": settings.steps or run.schedule.T, "n_samples": n_samples, "step": run.step}
    for name, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        which = (torch.arange(n_samples) // 10) % len(templates)
        prompts = [caption(int(d), templates[int(j)]) for d, j in zip(labels, which)]
        x = sample_prompts(run, prompts, base, encoder, device, progress)
        q = image_quality(x, run.cfg.data.name, levels=run.levels, labels=labels)
        with torch.no_grad():  # the same classifier on the same quantized images, per template
            net = load_feature_net(run.cfg.data.name)
            predicted = net.features_and_logits(_snap_to_levels(x, run.levels))[1].argmax(1)
        per_template = {templates[j]: (predicted[which == j] == labels[which == j]).double().mean().item()
                        for j in range(len(templates)) if bool((which == j).any())}
        out[name] = {"class_accuracy": q["class_accuracy"], "fd": q["fd"], "fd_ratio": q["fd_ratio"],
                     "confidence": q["confidence"], "class_entropy_bits": q["class_entropy_bits"],
                     "per_template_accuracy": per_template,
                     "classifier_test_accuracy": q["classifier_test_accuracy"]}
    return out


def format_prompt_table(result: dict[str, Any]) -> str:
    """The result of ``evaluate_prompts`` as a few text lines."""
    head = (f"guidance {result['guidance']:g}, {result['sampler']} {result['steps']} steps, "
            f"{result['n_samples']} samples per template set, step {result['step']}")
    lines = [head, f"{'templates':<10} {'accuracy':>9} {'fd':>8} {'fd_ratio':>9} {'confidence':>11}"]
    for name in ("train", "heldout"):
        r = result[name]
        lines.append(f"{name:<10} {r['class_accuracy']:>9.3f} {r['fd']:>8.2f} {r['fd_ratio']:>9.2f} "
                     f"{r['confidence']:>11.3f}")
    lines.append(f"(classifier accuracy on real test images: {result['train']['classifier_test_accuracy']:.3f})")
    return "\n".join(lines)


def write_evaluation(run_dir: Path | str, result: dict[str, Any]) -> Path:
    """``<run>/eval/text2img-g<S>.json`` (atomically)."""
    from diffusekit.train.checkpoint import atomic_write_text

    path = Path(run_dir) / "eval" / f"text2img-g{result['guidance']:g}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path
