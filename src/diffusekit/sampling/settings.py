"""``SampleSettings``: everything that determines a set of samples besides the model, validated once.

It is the ``[sample]`` section of the config (``config.SampleConfig``: sampler, steps, grid, guidance...)
plus what a sampling call adds: the seeds, the batch size, the EMA choice and the class labels. Build it
from a run's config with overrides (``SampleSettings.from_config(cfg.sample, steps=20)``); every value is
checked once, when the settings are made, by the same rules whatever its source (config file, flag or
``settings.json``), and an error names the value as its source spelled it (``key``). ``settings.json``
round-trips it (``to_json`` / ``from_json``). Torch-free, like the config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import re
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any, Callable

from diffusekit.config import SampleConfig, json_object
from diffusekit.errors import ConfigError
from diffusekit.sampling.catalog import TUNABLE_SAMPLERS, TUNED_GRID

__all__ = ["SampleSettings", "MAX_SEEDS", "MAX_BATCH", "settings_to_json", "settings_from_json", "parse_int_list",
           "parse_seeds", "times_ok"]

MAX_SEEDS = 1_000_000  # samples in one call
MAX_BATCH = 100_000


_RANGE = re.compile(r"^\s*(\d{1,19})\s*(?:-\s*(\d{1,19})\s*)?$")


def parse_int_list(text: str, flag: str, *, distinct: bool, max_count: int = MAX_SEEDS,
                   example: str = "0-63 or 1,5,9-12") -> list[int]:
    """Comma-separated non-negative integers and inclusive ranges ("0-63", "1,5,9-12"), in order; a
    ConfigError naming ``flag`` for bad syntax, a reversed range, repeats (when ``distinct``), values of
    2**63 or more, or more than ``max_count`` values (checked before any list is built)."""
    bounds: list[tuple[int, int]] = []
    total = 0
    for part in str(text).split(","):
        m = _RANGE.match(part)
        if m is None:
            raise ConfigError(f"{flag}: cannot parse {part.strip()!r} in {text!r}; use e.g. {example}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"{flag}: range {part.strip()!r} is reversed")
        if hi >= 2**63:
            raise ConfigError(f"{flag}: values must be below 2**63, got {hi}")
        total += hi - lo + 1
        if total > max_count:
            raise ConfigError(f"{flag}: {text!r} names more than {max_count} values")
        bounds.append((lo, hi))
    values = [v for lo, hi in bounds for v in range(lo, hi + 1)]
    if distinct and len(set(values)) != len(values):
        raise ConfigError(f"{flag}: {text!r} names a value more than once")
    return values


def parse_seeds(text: str) -> list[int]:
    """``--seeds`` syntax: "0-63" -> [0, ..., 63]; "1,5,9-12" -> [1, 5, 9, 10, 11, 12] (distinct)."""
    return parse_int_list(text, "--seeds", distinct=True)


def settings_to_json(settings: Any, extra: dict[str, Any] | None = None) -> str:
    """A settings dataclass as indented JSON, with ``extra`` (not a setting) under key "extra"."""
    d = asdict(settings)
    if extra is not None:
        d["extra"] = extra
    return json.dumps(d, indent=1)


def settings_from_json(cls: type, text: str, what: str, **kwargs: Any) -> Any:
    """``cls(**settings, **kwargs)`` from JSON written by ``settings_to_json`` ("extra" ignored); a
    non-object or an unknown key is a ConfigError naming ``what`` settings."""
    d = json_object(text, f"{what} settings")
    d.pop("extra", None)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} settings keys {unknown}")
    return cls(**d, **kwargs)


def _as_int_list(v: Any) -> Any:
    """A range, tuple or list of integers as a list of ints (numpy integers included); other values as given."""
    if isinstance(v, (range, tuple, list)) and all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                   for s in v):
        return [int(s) for s in v]
    return v


def _as_float_list(v: Any) -> Any:
    """A tuple or list of real numbers (ints included, bools not) as a list of floats; other values as given."""
    if isinstance(v, (tuple, list)) and all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in v):
        return [float(s) for s in v]
    return v


def times_ok(v: Any, steps: int) -> bool:
    """``times``: absent, or ``steps`` finite floats in (0, 1], strictly decreasing."""
    if v is None:
        return True
    return (isinstance(v, list) and steps > 0 and len(v) == steps and all(isinstance(t, float) for t in v)
            and all(0.0 < t <= 1.0 for t in v) and all(a > b for a, b in itertools.pairwise(v)))


def _int_list(v: Any, lo: int, hi: int, max_len: int) -> bool:
    return (isinstance(v, list) and 0 < len(v) <= max_len
            and all(isinstance(s, int) and not isinstance(s, bool) and lo <= s < hi for s in v))


@dataclass
class SampleSettings(SampleConfig):
    """The ``[sample]`` settings (see ``config.SampleConfig``) and, per call: ``seeds`` (sample i depends
    only on seed i), ``batch_size`` (changes no sample), ``use_ema`` (recorded for the caller that loads
    the weights) and ``classes`` (class-conditional models: sample i gets ``classes[i % len]``; None =
    0..K-1 in turn).

    ``steps = 0`` is the full chain (T steps); ``eta`` is DDIM's, ``variance`` DDPM's; ``clip_x0 = c``
    clamps the predicted x0 to [-c, c]. The continuous-time samplers run on the VP SDE of the schedule
    (``sde.vp_from_schedule``: t in [1/T, 1]); for them ``steps`` (0 = T) is the number of grid times
    and ``grid`` the time grid ("auto": the sampler's own, ``sampling.catalog``); ``snr`` and
    ``corrector_steps`` are the predictor-corrector's, ``step_size`` and ``langevin_steps`` annealed
    Langevin's, ``order`` UniPC's (1-3), ``rtol``/``atol`` RK45's. ``guidance`` is the classifier-free
    guidance scale (eps_uncond + s (eps_cond - eps_uncond); 1 = the conditional model).

    ``times`` is the explicit time grid of ``grid = "tuned"`` (``steps`` floats in (0, 1], strictly
    decreasing; ``sampling.tune``): ``diffusekit sample --grid tuned`` reads them from the run's
    ``grids.json`` and records them here, so a ``settings.json`` reproduces the samples without that file.

    ``key`` (not stored) names a field in error messages, e.g. ``lambda f: "--" + f.replace("_", "-")``.
    """

    seeds: list[int] = field(default_factory=lambda: list(range(64)))
    use_ema: bool = True
    batch_size: int = 64
    classes: list[int] | None = None
    times: list[float] | None = None
    key: InitVar[Callable[[str], str] | None] = None

    def __post_init__(self, key: Callable[[str], str] | None) -> None:
        self.seeds, self.classes = _as_int_list(self.seeds), _as_int_list(self.classes)
        self.times = _as_float_list(self.times)
        for f in fields(SampleConfig):  # integers given for float settings are stored as floats
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
        self.check(key or str)

    def check(self, key: Callable[[str], str] = str, T: int | None = None) -> None:
        """``SampleConfig.check`` and the per-call fields; ``T`` bounds the discrete samplers' steps."""
        super().check(key, T)
        rules = (
            ("seeds", _int_list(self.seeds, 0, 2**63, MAX_SEEDS) and len(set(self.seeds)) == len(self.seeds),
             f"a non-empty list of at most {MAX_SEEDS} distinct integers in 0..2^63-1"),
            ("use_ema", isinstance(self.use_ema, bool), "true or false"),
            ("batch_size", isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
             and 1 <= self.batch_size <= MAX_BATCH, f"an integer in 1..{MAX_BATCH}"),
            ("classes", self.classes is None or _int_list(self.classes, 0, 2**31, MAX_SEEDS),
             "absent or a non-empty list of class labels >= 0"),
            ("grid", self.grid != TUNED_GRID or self.sampler in TUNABLE_SAMPLERS,
             f"a named grid for sampler {self.sampler!r} ({TUNED_GRID!r} is for {', '.join(TUNABLE_SAMPLERS)})"),
            ("times", times_ok(self.times, self.steps),
             f"absent or a list of steps = {self.steps} times in (0, 1], strictly decreasing"),
            ("times", self.times is None or self.grid == TUNED_GRID,
             f"absent unless grid = {TUNED_GRID!r} (the times are the tuned grid)"),
        )
        for name, ok, want in rules:
            if not ok:
                shown = getattr(self, name)
                shown = f"{len(shown)} values" if isinstance(shown, list) and len(shown) > 8 else repr(shown)
                raise ConfigError(f"{key(name)} must be {want}; got {shown}")

    @classmethod
    def from_config(cls, sample_cfg: SampleConfig, key: Callable[[str], str] | None = None,
                    **overrides: Any) -> "SampleSettings":
        """The run's ``[sample]`` section with ``overrides`` (only the values given), validated."""
        base = {f.name: getattr(sample_cfg, f.name) for f in fields(SampleConfig)}
        return cls(**{**base, **overrides}, key=key)

    def replace(self, **changes: Any) -> "SampleSettings":
        """A copy with ``changes``, validated."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, extra: dict[str, Any] | None = None) -> str:
        """JSON of the settings; ``extra`` (run folder, checkpoint step...) goes under key "extra"."""
        return settings_to_json(self, extra)

    @classmethod
    def from_json(cls, text: str, source: str = "settings") -> "SampleSettings":
        """Read settings written by ``to_json`` (a ``settings.json``); unknown keys and bad values are
        ConfigErrors naming ``source`` and the key."""
        return settings_from_json(cls, text, "sample", key=lambda f: f"{source}: {f}")
