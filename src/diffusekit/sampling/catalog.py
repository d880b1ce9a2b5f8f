"""The one table of sampler, grid, spacing, evaluation and restoration names: torch-free, so that the config, the
command line (which must answer ``--help`` without importing torch) and the dispatch in
``sampling.generate`` all read the same rows.

A sampler is one function in ``diffusekit.sampling`` plus one ``SamplerSpec`` row here. The row says
how ``generate`` calls the function (``call``), which ``SampleSettings`` fields it reads (``options``:
the function's keyword -> the settings field), which time grid it walks by default, and how many
network calls a run of ``steps`` costs. Adding a sampler = writing the function + adding its row.

Call shapes (the arguments ``generate`` passes besides the denoiser and ``cond``/``callback``):

- ``discrete``: ``fn(denoiser, schedule, x_T, noise, steps=, **options)`` on the discrete table
  (t = 1..T, a ``spacing`` picks the visited steps);
- ``ode``: ``fn(denoiser, sde, x_T, times, **options)`` on the VP SDE of the table, ``times`` from the
  named grid (``sampling.ode.time_grid``);
- ``sde``: as ``ode`` with the per-sample noise after ``x_T``: ``fn(denoiser, sde, x_T, noise, times, ...)``;
- ``adaptive``: ``fn(denoiser, sde, x_T, **options)`` with its own step-size control (no grid);
- ``levels``: ``fn(denoiser, sde, x_T, noise, levels=steps, **options)`` over geometric noise levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["SamplerSpec", "SAMPLERS", "SAMPLER_NAMES", "DISCRETE_SAMPLERS", "GRIDS", "GRID_CHOICES", "TUNED_GRID",
           "TUNABLE_SAMPLERS", "SPACINGS",
           "VARIANCES", "EVAL_METRICS", "BOUND_VARIANCES", "DEQUANTIZATIONS", "RESTORE_TASKS", "RESTORE_METHODS",
           "DPS_ONLY_TASKS", "DPS_ZETA_SQRT_STEPS", "IMG2IMG_METHOD", "MASKS", "DEFAULT_MASK", "sampler_spec", "default_grid"]

CallShape = Literal["discrete", "ode", "sde", "adaptive", "levels"]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its name, where its function lives, how it is called and what it reads."""

    name: str
    function: str  # "<module of diffusekit.sampling>.<function>"
    call: CallShape
    summary: str  # one line for --help and the docs
    options: dict[str, str] = field(default_factory=dict)  # function keyword -> SampleSettings field
    grid: str | None = None  # the time grid of grid = "auto" (ode and sde calls): chosen on the oracle family
    # (docs/samplers.md, "Default grids": the lowest sliced W2 over 6 targets x 3 schedules x 5-20 calls)
    calls: str = "steps"  # network calls per run of ``steps`` (documentation)


_ROWS = (
    SamplerSpec("ddpm", "ddpm.sample_ddpm", "discrete", "ancestral sampling (Ho et al. 2020, Algorithm 2)",
                {"spacing": "spacing", "variance": "variance", "clip_x0": "clip_x0"}),
    SamplerSpec("ddim", "ddim.sample_ddim", "discrete", "DDIM (Song et al. 2021), eta = 0 deterministic",
                {"spacing": "spacing", "eta": "eta", "clip_x0": "clip_x0"}),
    SamplerSpec("euler", "ode.sample_euler", "ode", "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1)",
                grid="time_trailing"),
    SamplerSpec("heun", "ode.sample_heun", "ode",
                "Heun on the probability-flow ODE (Karras et al. 2022, Alg. 2; the exponential-integrator step "
                "ETD2RK where Alg. 2 would extrapolate)", grid="time_trailing", calls="2 steps - 1"),
    SamplerSpec("rk45", "ode.sample_rk45", "adaptive", "adaptive Dormand-Prince 5(4) on the probability-flow ODE",
                {"rtol": "rtol", "atol": "atol"}, calls="adaptive (rtol, atol)"),
    SamplerSpec("dpmpp_2m", "dpm_solver.sample_dpmpp_2m", "ode", "DPM-Solver++(2M) (Lu et al. 2022)", grid="logsnr_trailing"),
    SamplerSpec("unipc", "unipc.sample_unipc", "ode", "UniPC predictor-corrector (Zhao et al. 2023)",
                {"order": "order"}, grid="logsnr_trailing"),
    SamplerSpec("sde", "stochastic.sample_euler_maruyama", "sde",
                "the reverse SDE (Song et al. 2021), first order, exponential integrator (the DDPM posterior step)",
                grid="time_trailing"),
    SamplerSpec("pc", "stochastic.sample_pc", "sde",
                "predictor-corrector (Song et al. 2021): Langevin corrector, exponential-integrator reverse-SDE "
                "predictor", {"snr": "snr", "corrector_steps": "corrector_steps"}, grid="time_trailing",
                calls="steps (1 + corrector_steps)"),
    SamplerSpec("langevin", "stochastic.sample_annealed_langevin", "levels",
                "annealed Langevin dynamics over geometric noise levels (Song & Ermon 2019), carried between "
                "levels by the probability-flow ODE",
                {"steps_each": "langevin_steps", "step_size": "step_size"}, calls="steps x langevin_steps + 1"),
    SamplerSpec("consistency", "consistency.sample_consistency", "sde",
                "multistep consistency sampling (Song et al. 2023, Alg. 1): denoise, re-noise to the next time, "
                "denoise; for consistency-distilled runs", grid="karras_trailing"),
)

SAMPLERS: dict[str, SamplerSpec] = {row.name: row for row in _ROWS}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
DISCRETE_SAMPLERS: tuple[str, ...] = tuple(n for n, row in SAMPLERS.items() if row.call == "discrete")

# named time grids of the continuous-time samplers (``sampling.ode.time_grid``); "auto" = the sampler's own;
# "tuned" = the times tuned for the run, sampler and budget (``sampling.tune``, stored in <run>/grids.json)
GRIDS: tuple[str, ...] = ("time", "logsnr", "karras", "time_trailing", "logsnr_trailing", "karras_trailing")
TUNED_GRID = "tuned"
GRID_CHOICES: tuple[str, ...] = ("auto",) + GRIDS + (TUNED_GRID,)
# the deterministic fixed-grid ODE samplers, whose time grid ``diffusekit tune-grid`` optimises
TUNABLE_SAMPLERS: tuple[str, ...] = tuple(n for n, row in SAMPLERS.items() if row.call == "ode")
# which of the T steps a discrete sampler visits (``sampling.grids.timestep_grid``)
SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")
# the reverse variance of ancestral steps: sigma_t^2 = beta_t or the posterior's beta_tilde_t
VARIANCES: tuple[str, ...] = ("beta", "beta_tilde")

# evaluation (``diffusekit evaluate``): what it measures, and the reverse variances of the discrete bound
EVAL_METRICS: tuple[str, ...] = ("bpd", "fd", "nll_ode")
BOUND_VARIANCES: tuple[str, ...] = ("fitted", "beta_tilde", "beta", "learned")  # learned: model.learned_variance runs
# how the PF-ODE likelihood bounds the probability of a bin of discrete data (``likelihood_ode.ode_nll``)
DEQUANTIZATIONS: tuple[str, ...] = ("uniform", "importance", "truncated_normal")

# restoration (``diffusekit restore``, ``runs.restore``)
RESTORE_TASKS: tuple[str, ...] = ("inpaint", "outpaint", "superres", "colorize", "blur", "saturation")
RESTORE_METHODS: tuple[str, ...] = ("repaint", "ddnm", "dps")  # training-free: any unconditional run
IMG2IMG_METHOD = "img2img"  # the trained conditional sampler of an image-to-image run (families.img2img)
# the tasks only DPS can undo: no pseudo-inverse with A A^T = c I (blur) or not linear (saturation)
DPS_ONLY_TASKS: tuple[str, ...] = ("blur", "saturation")
# DPS's default step size: zeta = DPS_ZETA_SQRT_STEPS / sqrt(sampling steps), measured on digits
# (docs/restoration.md, "Choosing zeta")
DPS_ZETA_SQRT_STEPS = 5.0
# "random": scattered pixels; "freeform", "box", "uncrop": one mask per input from the masks image-to-image runs
# are trained on (families.img2img: Palette's free-form strokes, boxes and uncropping)
MASKS: tuple[str, ...] = ("center", "border", "left", "right", "top", "bottom", "random", "freeform", "box", "uncrop")
DEFAULT_MASK = {"inpaint": "center", "outpaint": "border"}


def sampler_spec(name: str) -> SamplerSpec:
    """The row of sampler ``name``; ValueError naming the known samplers otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]


def default_grid(name: str) -> str:
    """The time grid sampler ``name`` walks with grid = "auto"."""
    return sampler_spec(name).grid or "logsnr"
