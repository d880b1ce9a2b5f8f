"""What every model family fills in (``Family``), and the types the run layer passes to it.

A family is one module of ``diffusekit.families`` plus one row of the table in ``families/__init__.py``:

- ``build_objective(cfg, data)``: what ``diffusekit train`` optimises (an ``Objective``), or None when the
  family cannot be trained here (diffusers folders);
- ``load(source, use_ema, device)``: a trained model (a ``Model``) from a run's checkpoint (or folder);
- ``sample(model, settings, request, device, progress)``: samples and what to record beside them;
- ``evaluate(model, settings, out_dir, progress)``: its numbers and report (None: not offered);
- ``restore``: whether the training-free restorations of ``diffusekit restore`` run on its models;
- ``trained_restore``: whether its models restore by their own trained conditional sampler (image-to-image);
- ``conditioning``: which parts of a ``SampleRequest`` its models take.

Nothing registers itself on import: the table is the list of families.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.runfolder import RunCheckpoint, read_run_checkpoint
from diffusekit.sampling.catalog import BOUND_VARIANCES, DEQUANTIZATIONS, EVAL_METRICS

__all__ = ["Objective", "StatefulObjective", "Model", "SampleRequest", "Samples", "EvaluateSettings", "Evaluation", "Family",
           "CONDITIONING_FLAGS", "check_labels_and_guidance", "load_run_dependency", "check_student_architecture"]


class Objective(Protocol):
    """What the trainer optimises (``train.trainer`` knows nothing else about a family).

    - ``module``: the ``nn.Module`` whose parameters are trained, averaged by the EMA and written to
      checkpoints (``model.*`` and ``ema.*`` keys hold its state dict);
    - ``loss(module, x0, labels, generator)``: per-example losses (N,) of a batch; ``labels`` are the
      batch's class labels (None for unlabelled data). ``module`` is what the trainer passes, possibly
      wrapped in DistributedDataParallel, so the loss must call it rather than ``self.module``; every
      random draw comes from ``generator`` (the run's checkpointed noise stream), which keeps resume exact;
    - ``preview(module, n, device)``: n samples for the picture drawn during training;
    - optionally ``encode_data(x)``: the training set as ``loss`` wants it (a frozen codec's latents), called
      once when training starts; ``loss`` then receives rows of it instead of images.
    """

    module: nn.Module

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor: ...

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor: ...


@runtime_checkable
class StatefulObjective(Protocol):
    """An ``Objective`` that keeps state of its own beyond the module (the discrete family's t history under
    ``loss.t_sampling = "importance"``): the trainer writes ``state_tensors()`` into checkpoints under
    ``objective.<name>`` and hands them back on resume to ``load_state_tensors(tensors, source)``, which
    raises a one-line CheckpointError naming ``source`` when they do not fit."""

    def state_tensors(self) -> dict[str, Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str) -> None: ...


class TimeHistoryState:
    """``StatefulObjective`` for an objective whose only state is the history of importance-sampled t
    (``self.t_history``: ``timestep_proposal.LossHistory`` or ``BinnedTimeProposal``, None unless
    ``loss.t_sampling = "importance"``), kept in checkpoints as ``objective.t_history.*``."""

    t_history: Any = None

    def state_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint keeps of the objective beyond the module: the t history (importance only)."""
        if self.t_history is None:
            return {}
        return {f"t_history.{k}": v for k, v in self.t_history.state_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        """Restore ``state_tensors`` (a one-line CheckpointError naming ``source`` when it does not fit)."""
        if self.t_history is None:
            return
        try:
            self.t_history.load_state_tensors({k[10:]: v for k, v in tensors.items() if k.startswith("t_history.")},
                                              source)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None


@dataclass
class Model:
    """A trained model of some family, loaded for sampling and evaluation. Families subclass it with what
    their samplers need (a denoiser and schedule, a codec...)."""

    source: Path  # the run folder (or diffusers folder) it was loaded from
    cfg: Config  # the recorded config (a default one for foreign folders)
    data_shape: tuple[int, ...]
    levels: int | None  # values per data coordinate (None: continuous data)
    step: int | None  # the checkpoint's training step
    checkpoint: Path | None  # the checkpoint stem

    @property
    def num_classes(self) -> int:
        """Class labels the model takes (0: none)."""
        return 0

    def sample_dir_name(self, settings: Any) -> str:
        """The folder name of ``diffusekit sample`` output inside the run folder, when --out is not given."""
        return "samples"

    def provenance(self) -> dict[str, Any]:
        """What ``settings.json`` records of where samples came from."""
        return {"run": str(self.source), "checkpoint": str(self.checkpoint), "step": self.step}


def check_labels_and_guidance(model: Model, settings: Any, key: Callable[[str], str], takes_guidance: bool = False,
                              takes_prompts: bool = False) -> None:
    """One-line ConfigErrors for a guidance scale or class labels the model cannot use (``key`` names the
    setting as the user gave it): guidance needs a class-conditional model (or a family that guides
    otherwise, ``takes_guidance``), labels must lie in 0..K-1."""
    guidance, classes = getattr(settings, "guidance", 1.0), getattr(settings, "classes", None)
    if guidance != 1.0 and not (takes_guidance or model.num_classes > 0):
        raise ConfigError(f"{key('guidance')}: run {model.source} is unconditional (model.num_classes = 0); guidance "
                          "needs a class-conditional run")
    if classes is None:
        return
    if model.num_classes == 0:
        hint = "; prompt it with --prompt instead" if takes_prompts else ""
        raise ConfigError(f"{key('classes')}: run {model.source} is unconditional (model.num_classes = 0) and takes "
                          f"no class labels{hint}")
    bad = [c for c in classes if c >= model.num_classes]
    if bad:
        raise ConfigError(f"{key('classes')}: class {bad[0]} is out of range for run {model.source} "
                          f"(model.num_classes = {model.num_classes}: classes 0..{model.num_classes - 1})")


def load_run_dependency(path: str | Path, where: str, wanted: str, kind_ok: Callable[[RunCheckpoint], bool],
                        load: Callable[..., Model], data_shape: tuple[int, ...] | None, role: str,
                        device: str | torch.device = "cpu") -> Model:
    """The EMA model of another run a family builds on (ControlNet's base, text-to-image's autoencoder),
    named by config key ``where``: a missing or damaged run, one of another kind than ``wanted`` or one on
    images of another shape is a one-line ``CheckpointError`` naming the key."""
    try:
        rc = read_run_checkpoint(path)
        if not kind_ok(rc):
            raise CheckpointError(f"{path} is a model.kind = {rc.kind!r} (loss.objective = {rc.cfg.loss.objective!r}) "
                                  f"run, not {wanted}")
        model = load(rc, use_ema=True, device=device)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if data_shape is not None and tuple(model.data_shape) != tuple(data_shape):
        raise CheckpointError(f"{where}: {role} images of shape {tuple(model.data_shape)}, the data has "
                              f"{tuple(data_shape)}")
    return model


STUDENT_OWN_KEYS = {("model", "prediction"), ("model", "dropout")}


def check_student_architecture(cfg: Config, teacher_cfg: Config, teacher_run: str) -> None:
    """A distilled student repeats its teacher's network and schedule: a one-line ConfigError naming the first
    key of [model] or [diffusion] where ``cfg`` differs from the teacher's recorded config. Two [model] keys
    are the student's own: ``prediction`` (the same network is re-read in the new parameterisation) and
    ``dropout`` (a training-time regulariser; the weights are the same either way)."""
    for section in ("model", "diffusion"):
        ours, theirs = getattr(cfg, section), getattr(teacher_cfg, section)
        for f in fields(ours):
            a, b = getattr(ours, f.name), getattr(theirs, f.name)
            if (section, f.name) not in STUDENT_OWN_KEYS and a != b:
                raise ConfigError(f"{section}.{f.name} = {a!r} but the teacher (distill.teacher_run = {teacher_run!r}) "
                                  f"was trained with {b!r}; the student repeats the teacher's [model] and [diffusion]")


# the request fields, with the flag that sets each (for messages)
CONDITIONING_FLAGS = {"prompts": "--prompt", "control_from": "--control-from", "control_images": "--control-images",
                      "control_scale": "--control-scale"}


@dataclass
class SampleRequest:
    """What a caller asks of a sampling run besides ``SampleSettings``: prompts (text-conditioned
    models: sample i gets prompt i % P) or control hints (ControlNet: from the ``control_from`` split,
    seed i % its size, or from ``control_images``, and ``control_scale`` times the residuals)."""

    prompts: list[str] | None = None
    control_from: str | None = None
    control_images: list[Path] | None = None
    control_scale: float | None = None

    def given(self) -> list[str]:
        """The fields that were set."""
        return [name for name in CONDITIONING_FLAGS if getattr(self, name) is not None]


@dataclass
class Samples:
    """What a family's ``sample`` returns: the samples (N, *data_shape) on the CPU, what
    ``settings.json`` records beside the settings, the grid's columns and one clause for the message."""

    x: Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    nrow: int | None = None
    note: str = ""


MAX_SAMPLES = 100_000
MAX_STRATA = 10_000
MAX_IWAE_K = 10_000
MAX_DEQUANT_SAMPLES = 10_000


@dataclass
class EvaluateSettings:
    """What ``diffusekit evaluate`` measures, checked once (``check``); families read what applies to them.

    ``metrics``: bpd (the bound), fd (sample quality), nll_ode (probability-flow ODE likelihood); the
    bound is exact over all T terms (``exact``) or a stratified estimate (``strata``), with reverse
    variances ``variance`` and, with ``bound_clip``, the reverse mean's x0 clipped to [-1, 1]; quality samples: ``n_samples`` (None: the split's size, at most 1000), with
    the run's sampler settings unless ``sampler``/``steps``/``grid``/``guidance`` override them (``grid =
    "tuned"``: the run's tuned grid, ``runs.grids``); ``dequantization`` / ``dequant_samples``: how nll_ode
    bounds a bin of discrete data and with how many draws per example (``likelihood_ode.ode_nll``);
    ``iwae_k``: the importance samples of a VAE's IWAE bound."""

    metrics: tuple[str, ...] = ("bpd", "fd")
    split: str = "test"
    exact: bool = False
    strata: int = 50
    variance: str | None = None  # None: "learned" for a run with model.learned_variance, else "fitted"
    bound_clip: bool | None = None  # None: the run's model.bound_clip (likelihood.reverse_x0)
    n_samples: int | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    grid: str | None = None
    times: list[float] | None = None  # the tuned grid's times (set by runs.evaluate for grid = "tuned")
    ode_examples: int = 100
    trace: Literal["hutchinson", "exact"] = "hutchinson"
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    dequantization: str = "uniform"
    dequant_samples: int = 1
    seed: int = 0
    iwae_k: int = 100
    compose: bool = False  # scenes text runs: ask each scene as one clause per digit joined by " AND "

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        positive = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1  # noqa: E731
        rules = (
            ("--metrics", not unknown and self.metrics, f"a comma-separated list of {', '.join(EVAL_METRICS)}",
             unknown[0] if unknown else self.metrics),
            ("--split", self.split in ("train", "test"), "'train' or 'test'", self.split),
            ("--strata", integer(self.strata) and 1 <= self.strata <= MAX_STRATA, f"in 1..{MAX_STRATA}", self.strata),
            ("--variance", self.variance is None or self.variance in BOUND_VARIANCES,
             f"one of {', '.join(BOUND_VARIANCES)}", self.variance),
            ("--n-samples", self.n_samples is None or (integer(self.n_samples) and 2 <= self.n_samples <= MAX_SAMPLES),
             f"in 2..{MAX_SAMPLES}", self.n_samples),
            ("--steps", self.steps is None or (integer(self.steps) and self.steps >= 0), ">= 0", self.steps),
            ("--ode-examples", integer(self.ode_examples) and 1 <= self.ode_examples <= MAX_SAMPLES,
             f"in 1..{MAX_SAMPLES}", self.ode_examples),
            ("--trace", self.trace in ("hutchinson", "exact"), "hutchinson or exact", self.trace),
            ("--ode-rtol", positive(self.ode_rtol), "in (0, 1]", self.ode_rtol),
            ("--ode-atol", positive(self.ode_atol), "in (0, 1]", self.ode_atol),
            ("--dequantization", self.dequantization in DEQUANTIZATIONS, f"one of {', '.join(DEQUANTIZATIONS)}",
             self.dequantization),
            ("--dequant-samples", integer(self.dequant_samples) and 1 <= self.dequant_samples <= MAX_DEQUANT_SAMPLES,
             f"in 1..{MAX_DEQUANT_SAMPLES}", self.dequant_samples),
            ("--bound-clip", self.bound_clip in (None, True, False), "on or off", self.bound_clip),
            ("--seed", integer(self.seed) and 0 <= self.seed < 2**62, "an integer >= 0", self.seed),
            ("--iwae-k", integer(self.iwae_k) and 1 <= self.iwae_k <= MAX_IWAE_K, f"in 1..{MAX_IWAE_K}", self.iwae_k),
        )
        for flag, ok, want, got in rules:
            if not ok:
                raise ConfigError(f"{flag} must be {want}, got {got!r}")

    def sample_overrides(self) -> dict[str, Any]:
        """The sampler settings this evaluation sets (only those given)."""
        given = {"sampler": self.sampler, "steps": self.steps, "grid": self.grid, "times": self.times,
                 "guidance": self.guidance}
        return {k: v for k, v in given.items() if v is not None}

    def key(self, field: str) -> str:
        """How the user named a sampler setting: the evaluate flag that set it, else the run's config key."""
        return f"--{field.replace('_', '-')}" if field in self.sample_overrides() else f"sample.{field}"


@dataclass
class Evaluation:
    """What a family's ``evaluate`` returns: the results (JSON-ready), the rows of the table printed
    and put at the top of the report, the pictures it wrote into the output folder ({title: (file
    name, caption)}), a reading guide, and the names of the JSON and report files."""

    result: dict[str, Any]
    rows: list[tuple[str, str]]
    pictures: dict[str, tuple[str, str]] = field(default_factory=dict)
    guide: str = ""
    metrics_file: str = "metrics.json"


@dataclass(frozen=True)
class Family:
    """One row of the table of model families (see the module docstring)."""

    name: str
    summary: str
    kinds: tuple[str, ...]  # the model.kind values it trains and loads
    objective: str | None  # the loss.objective it takes (None: whatever the family decides)
    build_objective: Callable[[Config, ArrayDataset], Objective] | None
    load: Callable[..., Model]
    sample: Callable[..., Samples]
    evaluate: Callable[..., Evaluation] | None = None
    restore: bool = False
    trained_restore: bool = False  # restores with its own trained sampler (img2img): runs.restore routes to it
    conditioning: tuple[str, ...] = ()  # SampleRequest fields its models take
    guidance: bool = False  # takes a classifier-free guidance scale (besides class-conditional models)
    # the settings of a sampling call: (cfg, overrides, key) -> settings, and (settings.json text, its
    # name) -> settings; None: ``SampleSettings.from_config`` / ``SampleSettings.from_json``
    settings: Callable[..., Any] | None = None
    read_settings: Callable[[str, str], Any] | None = None
