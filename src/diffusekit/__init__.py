"""diffusekit: diffusion generative models that are correct, measurable and fast."""

__version__ = "0.1.0"
