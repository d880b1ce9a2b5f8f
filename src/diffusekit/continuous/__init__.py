"""Continuous-time diffusion objectives: the VDM ELBO, learned monotone log-SNR schedules and the
weighted objectives of Kingma & Gao (2023). See docs/continuous.md."""

from diffusekit.continuous.elbo import (
                                        KG_WEIGHTINGS,
                                        MONOTONE_WEIGHTINGS,
                                        ContinuousBound,
                                        continuous_bound,
                                        diffuse,
                                        diffusion_term,
                                        eps_sq_error,
                                        importance_weighted_loss,
                                        log_kg_weight,
                                        prior_kl_at,
                                        reconstruction_nll,
                                        sample_times,
)
from diffusekit.continuous.logsnr import CosineLogSNR, LinearLogSNR, LogSNRSchedule, MonotoneLogSNR, grid_times
from diffusekit.continuous.module import (
                                        ContinuousDiffusion,
                                        build_continuous_module,
                                        build_logsnr_schedule,
                                        load_continuous,
)

__all__ = ["KG_WEIGHTINGS", "MONOTONE_WEIGHTINGS", "ContinuousBound", "continuous_bound", "diffuse", "diffusion_term",
           "eps_sq_error", "importance_weighted_loss", "log_kg_weight", "prior_kl_at", "reconstruction_nll",
           "sample_times", "CosineLogSNR", "LinearLogSNR", "LogSNRSchedule", "MonotoneLogSNR", "grid_times",
           "ContinuousDiffusion", "build_continuous_module", "build_logsnr_schedule",
           "load_continuous"]
