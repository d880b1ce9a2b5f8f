"""Networks behind the denoiser convention: (x, c_noise = logsnr, conditioning) -> tensor like x.

The networks know nothing about noise semantics; ``diffusekit.parameterization`` reads
their output as eps, x0, v or score. ``build`` makes them from the ``[model]`` section of a config.
"""

from diffusekit.nn.controlnet import ControlledUNet, ControlNet
from diffusekit.nn.embeddings import FourierEmbedding, SinusoidalEmbedding, make_time_embedding
from diffusekit.nn.mlp import MLPDenoiser
from diffusekit.nn.unet import UNet

__all__ = ["UNet", "ControlNet", "ControlledUNet", "MLPDenoiser", "SinusoidalEmbedding", "FourierEmbedding", "make_time_embedding"]
