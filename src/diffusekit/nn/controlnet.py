"""ControlNet (Zhang, Rao and Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") on a frozen U-Net.

The base network stays locked; a trainable copy of its encoder (noise-level embedding, input conv,
down path and middle block, initialised from the base weights) reads the noisy input plus an encoded
control image c (their eq. 2-4):

    h_0  = conv_in(x) + hint(c)                        hint: small conv net, last conv zero-initialised
    h_k  = copy of the base encoder layers applied in turn (the same skips the base stores)
    r_k  = Z_k(h_k)                                    Z_k: 1x1 conv, weight and bias zero-initialised
    out  = base(x, c_noise, residuals = [s * r_k])     added to the base's skips and middle output

Because every Z_k starts at zero, at initialisation ``ControlledUNet`` computes exactly the base's
output, while dL/dZ_k = dL/dr_k h_k^T is nonzero, so the zero convolutions (and, after their first
update, the copy and the hint encoder) learn. The base receives the residuals through its
``residuals`` argument; no list a caller passes is modified (the original ``cldm/cldm.py`` pops from
the caller's list).

Over a text-conditioned base (a U-Net built with ``context_dim``) the copied layers include its
cross-attention blocks, so the control branch reads the caption tokens too: Zhang et al. (2023, sec.
3.2 and Fig. 3) feed the prompt features c_t to the trainable copy as well as to the locked model.
``context`` and ``context_mask`` go to both unchanged; they are checked once, before either runs. A base
with a pooled caption embedding (``UNet(pooled_context=True)``) has it copied with the noise-level embedding.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.nn.embeddings import add_pooled_context, input_fourier_features, noise_and_class_embedding
from diffusekit.nn.unet import Downsample, UNet, _check_context_mask, encoder_path, zero_init

__all__ = ["ControlNet", "ControlledUNet", "HintEncoder"]


class HintEncoder(nn.Module):
    """Control image (B, C_hint, f H, f W) -> features (B, base_channels, H, W) added after conv_in.

    conv3x3-SiLU-conv3x3-SiLU-conv3x3, the last one zero-initialised (the control starts silent). With
    ``downsample`` f = 2^k > 1 (a base that diffuses an autoencoder's latents, f times smaller than the
    images the hints come from) the middle convolutions become k stride-2 ones, as Zhang et al. (2023, sec.
    3.2) map 512x512 hints to Stable Diffusion's 64x64 latents with a small strided network. f = 1: the
    hint has the resolution of x and nothing is downsampled.
    """

    def __init__(self, hint_channels: int, out_channels: int, width: int = 16, downsample: int = 1):
        super().__init__()
        if not (isinstance(downsample, int) and downsample >= 1 and downsample & (downsample - 1) == 0):
            raise ValueError(f"HintEncoder: downsample must be a power of 2 (1, 2, 4, ...), got {downsample!r}")
        self.downsample = downsample
        middle: list[nn.Module] = []
        for _ in range(max(1, downsample.bit_length() - 1)):
            middle += [nn.Conv2d(width, width, 3, stride=2 if downsample > 1 else 1, padding=1), nn.SiLU()]
        self.layers = nn.Sequential(
            nn.Conv2d(hint_channels, width, 3, padding=1), nn.SiLU(), *middle,
            zero_init(nn.Conv2d(width, out_channels, 3, padding=1)),
        )

    def forward(self, control: Tensor) -> Tensor:
        return self.layers(control)


class ControlNet(nn.Module):
    """Trainable copy of ``base``'s encoder that maps (x, c_noise, control) to the residual list
    ``base.residual_shapes(B, (H, W))`` describes (one per skip, then one for the middle block).

    The copy is independent of ``base`` (its own tensors, all trainable even if ``base`` is frozen);
    only the encoder and middle rows of the base's shared (gain, shift) projection are copied.
    """

    def __init__(self, base: UNet, hint_channels: int = 1, hint_width: int = 16, hint_downsample: int = 1):
        super().__init__()
        if not isinstance(base, UNet):
            raise TypeError(f"ControlNet copies a UNet's encoder, got {type(base).__name__}")
        self.in_channels, self.hint_channels = base.in_channels, hint_channels
        self.levels, self.num_classes, self.image_size = base.levels, base.num_classes, base.image_size
        self.skip_specs = list(base._skip_specs)
        self.fourier_exponents = base.fourier_exponents  # the copied conv_in reads the base's input features
        for name in ("time_embed", "time_mlp", "class_embed", "pooled_embed", "conv_in", "down", "mid1", "mid_attn",
                     "mid2"):
            setattr(self, name, copy.deepcopy(getattr(base, name)))
        # the base's emb_proj serves encoder, middle and decoder blocks in that order: keep the first rows
        n_blocks = sum(1 for m in base.down if not isinstance(m, Downsample)) + 2
        self.emb_split = base._emb_split[:n_blocks]
        rows = sum(self.emb_split)
        self.emb_proj = nn.Linear(base.emb_proj.in_features, rows)
        with torch.no_grad():
            self.emb_proj.weight.copy_(base.emb_proj.weight[:rows])
            self.emb_proj.bias.copy_(base.emb_proj.bias[:rows])
        self.hint = HintEncoder(hint_channels, base.conv_in.out_channels, hint_width, hint_downsample)
        self.hint_downsample = hint_downsample
        self.zero_convs = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c, _ in self.skip_specs)
        self.requires_grad_(True)  # a frozen base's copies arrive frozen

    def _check_control(self, x: Tensor, control: Tensor) -> None:
        f = self.hint_downsample
        expected = (x.shape[0], self.hint_channels, f * x.shape[2], f * x.shape[3])
        if not isinstance(control, Tensor) or tuple(control.shape) != expected:
            got = tuple(control.shape) if isinstance(control, Tensor) else type(control).__name__
            size = "H, W of x" if f == 1 else f"{f} H, {f} W of x"
            raise ValueError(f"ControlNet: control must have shape {expected} (B, hint channels, {size}), got {got}")

    def forward(self, x: Tensor, c_noise: Tensor, control: Tensor, class_labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None) -> list[Tensor]:
        """(B, C, H, W), (B,) logsnr, (B, C_hint, f H, f W) -> residuals shaped as ``base.residual_shapes``
        (f = ``hint_downsample``)."""
        self._check_control(x, control)
        emb = noise_and_class_embedding(self, c_noise, class_labels, x.shape[0], "base UNet")
        emb = add_pooled_context(self, emb, context, context_mask)
        gain_shift = iter(self.emb_proj(F.silu(emb)).split(self.emb_split, dim=1))
        h = self.conv_in(input_fourier_features(x, self.fourier_exponents)) + self.hint(control)
        skips, middle = encoder_path(self, h, gain_shift, context, context_mask)
        return [conv(f) for conv, f in zip(self.zero_convs, skips + [middle])]


class ControlledUNet(nn.Module):
    """A frozen ``base`` U-Net steered by a trainable ``controlnet``:

        forward(x, c_noise, control=c, **cond) = base(x, c_noise, residuals=[scale * r_k] (+ residuals), **cond)

    (over a latent base x are latents and c is the hint of the image, ``hint_downsample`` times larger).

    Only the ControlNet trains: the base's parameters have ``requires_grad=False`` and it stays in
    eval mode (no dropout) whatever ``train()`` is called with. ``residuals`` given by a caller (for
    example another ControlNet's) are added to a new list, never modified.
    """

    def __init__(self, base: UNet, controlnet: ControlNet, scale: float = 1.0):
        super().__init__()
        if len(controlnet.skip_specs) != len(base._skip_specs) or any(
                a != b for a, b in zip(controlnet.skip_specs, base._skip_specs)):
            raise ValueError("ControlledUNet: the ControlNet was copied from a U-Net of another layout")
        self.base, self.controlnet, self.scale = base, controlnet, float(scale)
        self.base.requires_grad_(False).eval()
        # the base's attributes the rest of the library reads off a network
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.image_size, self.num_classes, self.context_dim = base.image_size, base.num_classes, base.context_dim

    def train(self, mode: bool = True) -> ControlledUNet:
        super().train(mode)
        self.base.eval()
        return self

    def _check_context(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> None:
        """The base's checks of the caption tokens, made before the ControlNet reads them."""
        if context is not None:
            if self.context_dim is None:
                raise ValueError("ControlledUNet: context given, but the base U-Net has no cross-attention "
                                 "(context_dim=None)")
            if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[::2] != (x.shape[0],
                                                                                                 self.context_dim):
                got = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
                raise ValueError(f"ControlledUNet: context must have shape ({x.shape[0]}, L, {self.context_dim}), "
                                 f"got {got}")
        if context_mask is not None:
            _check_context_mask(context_mask, context)

    def residual_shapes(self, batch_size: int, size: int | tuple[int, int] | None = None):
        return self.base.residual_shapes(batch_size, size)

    def forward(self, x: Tensor, c_noise: Tensor, control: Tensor | None = None,
                class_labels: Tensor | None = None, context: Tensor | None = None,
                residuals: Sequence[Tensor] | None = None, context_mask: Tensor | None = None) -> Tensor:
        if control is None:
            raise ValueError("ControlledUNet: no control image given (pass control=(B, C_hint, H, W))")
        self.base._check_input(x)
        self._check_context(x, context, context_mask)
        cond = {"class_labels": class_labels, "context": context, "context_mask": context_mask}
        controls = [self.scale * r for r in self.controlnet(x, c_noise, control, **cond)]
        if residuals is not None:
            if len(residuals) != len(controls):
                raise ValueError(f"ControlledUNet: expected {len(controls)} extra residuals, got {len(residuals)}")
            controls = [r + extra for r, extra in zip(controls, residuals)]
        return self.base(x, c_noise, residuals=controls, **cond)
