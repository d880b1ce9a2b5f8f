"""Text-to-image latent diffusion (``model.kind = "latent_unet"``, Rombach et al. 2022): a frozen KL
autoencoder as codec, a U-Net with cross-attention over MiniLM caption features on its latents,
classifier-free guidance toward a prompt. See docs/text2img.md.

Importing this package registers ``latent_unet`` with the trainer (``objectives.register_family``).
"""

from diffusekit.latent.objective import (KIND, LatentCodec, LatentTextNet, TextLatentObjective, build_latent_net,
                                         latent_scale, load_codec)
from diffusekit.latent.sampling import null_text, prompt_features, sample_latents

__all__ = ["KIND", "LatentCodec", "LatentTextNet", "TextLatentObjective", "build_latent_net", "latent_scale",
           "load_codec", "null_text", "prompt_features", "sample_latents"]


def _register() -> None:
    from diffusekit.objectives import register_family

    register_family(KIND, TextLatentObjective)


_register()
