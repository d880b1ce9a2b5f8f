"""Text-to-image latent diffusion (Rombach et al. 2022), CPU-sized: the KL autoencoder as codec, a U-Net
with cross-attention over MiniLM caption features on its latents (``model``), and guided sampling from
prompts (``sampling``). Training, loading and evaluating such runs: ``families.text_latent``. See
docs/text2img.md.
"""

from diffusekit.latent.model import KIND, LatentCodec, LatentTextNet, build_latent_net, codec_fingerprint, latent_scale
from diffusekit.latent.sampling import null_text, prompt_features, sample_latents

__all__ = ["KIND", "LatentCodec", "LatentTextNet", "build_latent_net", "codec_fingerprint", "latent_scale", "null_text",
           "prompt_features", "sample_latents"]
