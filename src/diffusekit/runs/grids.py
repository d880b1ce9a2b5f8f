"""Tuned time grids of a run folder (``diffusekit tune-grid``, ``diffusekit sample --grid tuned``).

``tune_run`` opens a diffusion run (families "diffusion" and "continuous"; a diffusers folder, whose files
are not the project's, and the VAE, text-to-image and ControlNet families are refused in one line), tunes
the time grid of one ODE sampler at each budget (``sampling.tune.tune_grid``) and merges the results into
``<run>/grids.json``, written atomically:

    {"format": "diffusekit-grids", "version": 1,
     "grids": {"unipc-order2": {"5": ENTRY, "10": ENTRY}, "dpmpp_2m": {"5": ENTRY}}}

keyed by sampler (UniPC also by its order, which changes the map) and network calls. An ENTRY holds the
``times`` (float64 values, strictly decreasing, in (0, 1]), ``steps``, the checkpoint ``step`` and file
stem it was tuned on, the held-out errors of the tuned and default grids, and the tuning ``settings``.
``read_grids`` trusts nothing in the file: a damaged or hostile one (not JSON, too large, wrong types, an
unknown sampler, times out of order or range, more than ``MAX_ENTRIES`` grids) is a one-line error naming
it, and ``tune_run`` refuses to overwrite such a file rather than lose what it held.

A grid tuned on an older checkpoint than the run's newest is still a valid grid (any strictly decreasing
grid gives a correct sampler; only its optimality may have drifted), so ``tuned_settings`` uses it with a
one-line warning naming the step and the command that re-tunes it, rather than refusing to sample.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusekit.budget import activation_bytes, fits, gib
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.families import read_run
from diffusekit.families.base import Model
from diffusekit.io.atomic import atomic_write_text, read_input_file
from diffusekit.sampling.catalog import TUNABLE_SAMPLERS
from diffusekit.sampling.guidance import ClassifierFreeGuidance, class_labels_for, null_class_labels
from diffusekit.sampling.settings import SampleSettings, times_ok
from diffusekit.sampling.tune import MAX_TUNE_NFE, TunedGrid, network_calls, steps_for_nfe, tune_grid

__all__ = [
    "GRIDS_FILE",
    "TUNABLE_FAMILIES",
    "TuneSettings",
    "grid_key",
    "read_grids",
    "tune_command",
    "tune_run",
    "tuned_settings",
    "write_grids",
]

GRIDS_FILE = "grids.json"
FORMAT, VERSION = "diffusekit-grids", 1
TUNABLE_FAMILIES = ("diffusion", "continuous")
MAX_ENTRIES = 1000  # grids in one file
MAX_GRIDS_BYTES = 4 * 2**20
MAX_EXAMPLES = 100_000


def grid_key(sampler: str, order: int | None) -> str:
    """The key of a sampler's grids: its name, and UniPC's order ("unipc-order2")."""
    return f"{sampler}-order{order}" if sampler == "unipc" else sampler


def tune_command(run: Path | str, sampler: str, order: int | None, nfe: int) -> str:
    """The command that tunes the grid ``sample --grid tuned`` asks for."""
    order_flag = f" --order {order}" if sampler == "unipc" and order != 2 else ""
    return f"diffusekit tune-grid --run {run} --sampler {sampler}{order_flag} --nfe {nfe}"


# --------------------------------------------------------------------------------------------
# grids.json: read (never trusted), merge, write
# --------------------------------------------------------------------------------------------
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_entry(entry: Any, key: str, nfe_key: str) -> str | None:
    """What is wrong with one entry of grids.json (None: nothing)."""
    if not isinstance(entry, dict):
        return "is not an object"
    sampler, order, nfe, steps, times = (entry.get(k) for k in ("sampler", "order", "nfe", "steps", "times"))
    if sampler not in TUNABLE_SAMPLERS:
        return f"sampler {sampler!r} is not one of {', '.join(TUNABLE_SAMPLERS)}"
    if sampler == "unipc" and not _integer(order, 1, 3):
        return f"order {order!r} is not 1, 2 or 3"
    if sampler != "unipc" and order is not None:
        return f"order {order!r} given for {sampler}"
    if grid_key(sampler, order) != key:
        return f"is filed under {key!r} but is a {grid_key(sampler, order)!r} grid"
    if not _integer(nfe, 1, MAX_TUNE_NFE) or str(nfe) != nfe_key:
        return f"nfe {nfe!r} does not match its key {nfe_key!r} (an integer in 1..{MAX_TUNE_NFE})"
    if not _integer(steps, 1, MAX_TUNE_NFE) or network_calls(sampler, steps) != nfe:
        return f"steps {steps!r} do not cost nfe = {nfe} network calls"
    if times is None or not times_ok(times, steps):  # the rule SampleSettings.times obeys
        return f"times must be {steps} floats in (0, 1], strictly decreasing"
    if not _integer(entry.get("step"), 0, 2**62) or not isinstance(entry.get("checkpoint"), str) \
            or len(entry["checkpoint"]) > 200:
        return "step (an integer) or checkpoint (a file stem) is missing or wrong"
    errors = entry.get("heldout_error")
    if not (isinstance(errors, dict) and all(_number(errors.get(k)) and errors[k] >= 0 for k in ("tuned", "default"))):
        return "heldout_error must hold the numbers tuned and default"
    return None


def read_grids(run_dir: Path | str) -> dict[str, dict[str, dict[str, Any]]]:
    """The validated grids of ``<run_dir>/grids.json`` (key -> nfe -> entry); {} when there is none. A
    damaged file is a ``CheckpointError`` naming it and the key."""
    path = Path(run_dir) / GRIDS_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        text = read_input_file(path, "grids file", limit=MAX_GRIDS_BYTES)
        data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not a number")))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: is not valid JSON ({str(exc).splitlines()[0][:120]}); remove it and tune "
                              "again") from None
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION
            and isinstance(data.get("grids"), dict)):
        raise CheckpointError(f"{path}: is not a diffusekit grids file (format {FORMAT!r}, version {VERSION}, "
                              "\"grids\" an object)")
    grids = data["grids"]
    if sum(len(v) if isinstance(v, dict) else 1 for v in grids.values()) > MAX_ENTRIES:
        raise CheckpointError(f"{path}: holds more than {MAX_ENTRIES} grids")
    for key, by_nfe in grids.items():
        if not isinstance(by_nfe, dict):
            raise CheckpointError(f"{path}: grids.{key} is not an object")
        for nfe_key, entry in by_nfe.items():
            problem = _check_entry(entry, key, nfe_key)
            if problem is not None:
                raise CheckpointError(f"{path}: grids.{key}.{nfe_key} {problem}; remove it and tune again")
    return grids


def write_grids(run_dir: Path | str, entries: list[dict[str, Any]]) -> Path:
    """Merge ``entries`` into ``<run_dir>/grids.json`` (replacing those of the same sampler and nfe) and
    write it atomically; a damaged file already there is refused, not overwritten."""
    grids = read_grids(run_dir)
    for entry in entries:
        key = grid_key(entry["sampler"], entry["order"])
        problem = _check_entry(entry, key, str(entry["nfe"]))
        if problem is not None:
            raise ValueError(f"grid entry {key}.{entry['nfe']} {problem}")
        grids.setdefault(key, {})[str(entry["nfe"])] = entry
    path = Path(run_dir) / GRIDS_FILE
    atomic_write_text(path, json.dumps({"format": FORMAT, "version": VERSION, "grids": grids}, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Tuning a run
# --------------------------------------------------------------------------------------------
@dataclass
class TuneSettings:
    """What ``diffusekit tune-grid`` asks: the sampler (and UniPC's ``order``), the budgets ``nfes``, the
    tuning and held-out batch sizes, the first seed, EMA weights or not, the search budget (None: the
    default of ``tune_grid``). Checked when made; ``key`` names a field in messages (e.g. "--nfe")."""

    sampler: str = "unipc"
    nfes: tuple[int, ...] = (5, 10)
    order: int = 2
    examples: int = 256
    heldout: int = 256
    seed: int = 0
    use_ema: bool = True
    max_evals: int | None = None
    key: Callable[[str], str] = str

    def __post_init__(self) -> None:
        key = self.key
        if self.sampler not in TUNABLE_SAMPLERS:
            raise ConfigError(f"{key('sampler')} {self.sampler!r} has no tunable time grid; choose one of "
                              f"{', '.join(TUNABLE_SAMPLERS)}")
        if not self.nfes:
            raise ConfigError(f"{key('nfes')} names no budget")
        for nfe in self.nfes:
            try:
                steps_for_nfe(self.sampler, nfe)
            except ValueError as exc:
                raise ConfigError(f"{key('nfes')}: {exc}") from None
        for name, lo, hi in (("order", 1, 3), ("examples", 1, MAX_EXAMPLES), ("heldout", 1, MAX_EXAMPLES),
                             ("seed", 0, 2**62), ("max_evals", 1, 100_000)):
            value = getattr(self, name)
            if not (name == "max_evals" and value is None) and not _integer(value, lo, hi):
                raise ConfigError(f"{key(name)} must be an integer in {lo}..{hi}; got {value!r}")


def _check_family(family_name: str, run: Path | str) -> None:
    if family_name == "diffusers":
        raise ConfigError(f"{run}: is a diffusers folder; tuned grids are stored in diffusekit run folders only "
                          "(files that are not the project's are never written)")
    if family_name not in TUNABLE_FAMILIES:
        raise ConfigError(f"{run}: is a {family_name} run; tuned time grids are for diffusion runs "
                          f"(families {', '.join(TUNABLE_FAMILIES)})")


def _conditioning(model: Model, device: str | torch.device) -> tuple[Any, Callable[[list[int]], Any] | None]:
    """The denoiser to tune and the conditioning of a batch of seeds: a class-conditional run is guided
    at its ``sample.guidance`` with the classes in turn (seed s gets class s mod K), as it samples."""
    k = model.num_classes
    if k == 0:
        return model.denoiser, None
    guided = ClassifierFreeGuidance(model.denoiser, model.cfg.sample.guidance, null_class_labels(k))
    return guided, lambda seeds: {"class_labels": class_labels_for(len(seeds), [s % k for s in seeds], k).to(device)}


def _check_memory(model: Model, denoiser, cond_of, batch: int, device: str | torch.device) -> None:
    """A one-line ConfigError naming --examples when one network call on the whole tuning (or held-out)
    batch cannot fit in the free memory (activations of one example, measured, times the batch, twice
    over for the guided halves and the solver's saved states)."""
    x = torch.zeros((1, *model.data_shape), device=device)
    logsnr = torch.zeros((), dtype=torch.float64)
    per_example = activation_bytes(model.denoiser if isinstance(model.denoiser, torch.nn.Module) else torch.nn.Module(),
                                   lambda: denoiser(x, logsnr, cond_of([0]) if cond_of else None))
    needed = 2 * per_example * batch
    ok, free = fits(needed, device)
    if not ok:
        raise ConfigError(f"--examples {batch}: one network call on the batch needs about {gib(needed)}, "
                          f"{gib(free)} is free here; use fewer examples")


def tune_run(run: Path | str, settings: TuneSettings, device: str | torch.device = "cpu",
             progress: bool = True) -> tuple[list[TunedGrid], Path]:
    """Tune ``settings.sampler``'s grid at each budget on run folder ``run`` and merge them into its
    grids.json (module docstring). Returns the tuned grids and the file."""
    family, source = read_run(run)
    _check_family(family.name, run)
    run_dir = Path(source.run_dir)
    read_grids(run_dir)  # a damaged file is refused before the work, not after
    model = family.load(source, settings.use_ema, device)
    denoiser, cond_of = _conditioning(model, device)
    _check_memory(model, denoiser, cond_of, max(settings.examples, settings.heldout), device)
    results, entries = [], []
    for nfe in settings.nfes:
        tuned = tune_grid(denoiser, model.schedule, settings.sampler, nfe, model.data_shape, order=settings.order,
                          examples=settings.examples, heldout=settings.heldout, seed=settings.seed,
                          max_evals=settings.max_evals, cond_of=cond_of, device=device, progress=progress)
        results.append(tuned)
        entries.append({"sampler": tuned.sampler, "order": tuned.order, "nfe": tuned.nfe, "steps": tuned.steps,
                        "times": tuned.times, "step": model.step, "checkpoint": Path(str(model.checkpoint)).name,
                        "heldout_error": tuned.heldout_error, "tuning_error": tuned.tuning_error,
                        "default_grid": tuned.default_grid, "start": tuned.start, "fell_back": tuned.fell_back,
                        "settings": {**tuned.settings, "use_ema": settings.use_ema, "T": model.schedule.T,
                                     "guidance": model.cfg.sample.guidance if model.num_classes else None}})
    return results, write_grids(run_dir, entries)


def tuned_settings(family_name: str, model: Model, settings: SampleSettings, run: Path | str,
                   key: Callable[[str], str]) -> SampleSettings:
    """``settings`` (grid = "tuned", no times yet) with the times of the run's grids.json for its sampler
    and steps; one-line errors for a run that has none (naming the tune-grid command to run), a diffusers
    folder or another family; a one-line warning for a grid tuned on an older checkpoint."""
    _check_family(family_name, run)
    steps = settings.steps or model.schedule.T
    order = settings.order if settings.sampler == "unipc" else None
    nfe = network_calls(settings.sampler, steps)
    entry = read_grids(model.source).get(grid_key(settings.sampler, order), {}).get(str(nfe))
    if entry is None:
        what = f"{settings.sampler}" + (f" (order {order})" if order is not None else "")
        raise ConfigError(f"{key('grid')} = tuned: {Path(model.source) / GRIDS_FILE} has no grid for {what} at "
                          f"{steps} steps ({nfe} network calls); run `{tune_command(run, settings.sampler, order, nfe)}`")
    if entry["step"] != model.step:
        warnings.warn(f"the tuned {grid_key(settings.sampler, order)} grid at {nfe} calls was tuned on checkpoint step "
                      f"{entry['step']}, the run's newest is step {model.step}; re-tune with "
                      f"`{tune_command(run, settings.sampler, order, nfe)}`", stacklevel=2)
    return settings.replace(steps=steps, times=list(entry["times"]))
