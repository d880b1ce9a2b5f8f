"""Latent-variable models on the same ELBO machinery as diffusion: the VAE, the Markov hierarchical
VAE and the KL-regularised convolutional autoencoder (seed 000; seed 001), their training objective,
evaluation (bits/dim bound, IWAE, posterior-collapse diagnostics, reconstruction quality) and sampling.

Importing this package registers ``model.kind`` = vae, mhvae and autoencoder with the trainer.
"""

from diffusekit.vae.models import DecoderLikelihood, HierarchicalVAE, build_hierarchical_vae, sample
from diffusekit.vae.objective import LATENT_KINDS, LatentVariableObjective, build_latent_model

__all__ = ["DecoderLikelihood", "HierarchicalVAE", "build_hierarchical_vae", "sample", "LATENT_KINDS",
           "LatentVariableObjective", "build_latent_model"]
