"""Stateless samplers over the one denoiser convention (STYLE 2), with explicit grids and seeds.

- ``sample_ddpm``: ancestral sampling, seed 000 "Algorithm 2 Sampling" (sigma^2 = beta or beta_tilde).
- ``sample_ddim`` / ``ddim_invert``: DDIM with eta in [0, 1] and its eta = 0 inversion.
- ``timestep_grid``: leading / linspace / trailing grids in the notes' t = 1..T.
- ``PerSampleNoise``: sample i depends only on seed i.
- continuous time (``sde.py`` SDEs): probability-flow ODE ``sample_euler`` / ``sample_heun`` /
  ``sample_rk45`` (adaptive Dormand-Prince), ``sample_dpmpp_2m`` (DPM-Solver++(2M)), ``sample_unipc``
  (UniPC), and the
  stochastic ``sample_euler_maruyama`` / ``sample_pc`` / ``sample_annealed_langevin``.
- ``ClassifierFreeGuidance``: wraps a conditional denoiser into a guided one (Ho & Salimans 2022).
- ``generate`` / ``write_samples`` / ``SampleSettings``: batched runs over seeds and their files.
"""

from diffusekit.sampling.ddim import ddim_invert, ddim_sigma, sample_ddim
from diffusekit.sampling.ddpm import predict_x0_eps, sample_ddpm
from diffusekit.sampling.grids import SPACINGS, sampling_schedule, timestep_grid
from diffusekit.sampling.guidance import ClassifierFreeGuidance, class_labels_for, null_class_labels
from diffusekit.sampling.noise import PerSampleNoise, parse_seeds
from diffusekit.sampling.dpm_solver import sample_dpmpp_2m
from diffusekit.sampling.unipc import sample_unipc
from diffusekit.sampling.ode import sample_euler, sample_heun, sample_rk45, time_grid
from diffusekit.sampling.run import SampleSettings, TrajectoryRecorder, generate, write_samples
from diffusekit.sampling.stochastic import sample_annealed_langevin, sample_euler_maruyama, sample_pc

__all__ = [
    "sample_euler",
    "sample_heun",
    "sample_rk45",
    "sample_dpmpp_2m",
    "sample_unipc",
    "sample_euler_maruyama",
    "sample_pc",
    "sample_annealed_langevin",
    "time_grid",
    "sample_ddpm",
    "sample_ddim",
    "ddim_invert",
    "ddim_sigma",
    "predict_x0_eps",
    "timestep_grid",
    "sampling_schedule",
    "SPACINGS",
    "PerSampleNoise",
    "parse_seeds",
    "ClassifierFreeGuidance",
    "null_class_labels",
    "class_labels_for",
    "SampleSettings",
    "TrajectoryRecorder",
    "generate",
    "write_samples",
]
