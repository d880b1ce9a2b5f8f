"""Latent-variable models on the same ELBO machinery as diffusion: the VAE, the Markov hierarchical VAE
and the KL-regularised convolutional autoencoder (Vidal, "Deep Generative Models"; Gao, "VAEs and
Diffusion Models"): the models and their ELBO (``models``) and their numbers (``metrics``: bits/dim
bounds, IWAE, posterior-collapse diagnostics, reconstruction quality). Training, loading and sampling
runs of them: ``families.vae``.
"""

from diffusekit.vae.models import DecoderLikelihood, HierarchicalVAE, build_hierarchical_vae, sample

__all__ = ["DecoderLikelihood", "HierarchicalVAE", "build_hierarchical_vae", "sample"]
