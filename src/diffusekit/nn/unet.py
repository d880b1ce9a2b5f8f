"""The DDPM U-Net: residual blocks, self-attention, adaptive group norm, skip connections.

"DDPM uses U-Net with residual connection and self-attention layers to represent eps_theta(x_t, t)"
(Vidal, "Deep Generative Models" (Fall 2025), slides "Implementation (DDPM)"); "U-Net architectures
with ResNet blocks and self-attention layers ... time features are fed to the residual blocks using ...
adaptive group normalization layers" (Zhu, "Generative Model Zoo (part III)" (CMU 16-726), slide
"Implementation Considerations: Network Architectures"; Dhariwal and Nichol 2021). The network maps
(x, c_noise) to a tensor shaped like x and knows nothing about what that tensor means: the caller sets
c_noise = logsnr and reads the output as eps, x0, v or score.

Layout (Ho et al. 2020, appendix B): conv_in; per level ``num_res_blocks`` residual blocks (each
followed by self-attention at ``attn_resolutions``) and a stride-2 downsample between levels; a
middle block (res, attn, res); a decoder with ``num_res_blocks + 1`` blocks per level, each taking
the concatenation of the running features and one stored skip, and nearest-neighbour upsampling
plus a 3x3 conv between levels; GroupNorm, SiLU and a zero-initialised output conv.

Conditioning goes in through three arguments and the network stays one module (composition, not a
subclass per conditioning kind):
``class_labels`` (an embedding added to the time embedding; index ``num_classes`` is the null label
of classifier-free guidance), ``context`` (token features read by cross-attention in every
attention block; ``context_mask`` marks the real tokens of padded captions; with
``pooled_context`` their mean over the real tokens, through a linear map, is also added to the time
embedding, as Imagen and SDXL add a pooled text embedding) and ``residuals`` (ControlNet: added to
the skips and the middle output).

Speed (the step is dominated by 3x3 convolutions, so the wins come from doing fewer of them):
upsampling runs as one stride-2 transposed conv that equals nearest-upsample + 3x3 conv exactly but
costs 4 taps per output pixel instead of 9 (``Upsample``); every residual block's (gain, shift)
comes out of one Linear applied once per forward (gain = 1 + scale, the 1 sits in its bias); the
second GroupNorm of a block has no affine parameters (gain and shift subsume them) and
``h * gain + shift`` is one ``addcmul``; SiLU runs in place; attention runs
``scaled_dot_product_attention`` on views of a single qkv projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.nn.embeddings import (
    EmbeddingKind,
    add_pooled_context,
    embedding_mlp,
    input_fourier_features,
    make_time_embedding,
    noise_and_class_embedding,
)

__all__ = ["unet_fit_problems", "UNet", "ResBlock", "AttentionBlock", "Downsample", "Upsample"]


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (a block then starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with adaptive group norm (Zhu, "Generative Model Zoo (part III)" (CMU 16-726), slide
    "Implementation Considerations: Network Architectures"; Dhariwal & Nichol 2021, sec. 3):

        h = conv3x3(SiLU(GN(x)))
        h = conv3x3_0(dropout(SiLU(GN'(h) * gain + shift)))    gain = 1 + scale
        out = skip(x) + h                                        skip: 1x1 conv if channels change

    GN' has no affine parameters; (gain, shift) = Linear(SiLU(emb)) is computed by the owning
    network for all blocks at once and passed in as one (B, 2 * out_channels) tensor. The last
    conv is zero-initialised, so the block starts as its skip path.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm_groups = norm_groups
        self.dropout = dropout
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.emb_channels = 2 * out_channels

    def forward(self, x: Tensor, gain_shift: Tensor) -> Tensor:
        # SiLU runs in place on fresh tensors: GroupNorm's and addcmul's backward do not read them
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        gain, shift = gain_shift[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, F.group_norm(h, self.norm_groups), gain), inplace=True)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h)
        # in place is safe: a conv's backward needs its input and weight, not its output
        return h.add_(x if self.skip is None else self.skip(x))


def _split_heads(t: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """(B, N, parts * C) -> ``parts`` views of shape (B, heads, N, C / heads)."""
    b, n, _ = t.shape
    return t.view(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, then (optionally) cross-attention to ``context``.

        x <- x + W_o softmax(q k^T / sqrt(d)) v,    (q, k, v) = W_qkv GN(x)
        x <- x + W_o' softmax(q' k'^T / sqrt(d)) v', q' = W_q' GN'(x), (k', v') = W_kv' context

    The 1x1 convolutions of DDPM are written as Linear layers over the token axis (the same map).
    Output projections are zero-initialised, so each sub-block starts as the identity.
    ``context_mask`` (B, L) bool, True = a real token, is a key-padding mask: the softmax runs over
    the real tokens only, so padding a caption with more pad tokens leaves the output unchanged.
    """

    def __init__(
        self, channels: int, num_heads: int, norm_groups: int, context_dim: int | None = None
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.GroupNorm(norm_groups, channels)
            self.q_cross = nn.Linear(channels, channels)
            self.kv_cross = nn.Linear(context_dim, 2 * channels)
            self.proj_cross = zero_init(nn.Linear(channels, channels))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, proj: nn.Linear, key_mask: Tensor | None = None) -> Tensor:
        """Attention on (B, heads, N, d) views -> projected (B, C, N) view; ``key_mask`` (B, L) bool
        keeps the keys where it is True."""
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        b, _, n, _ = out.shape
        return proj(out.transpose(1, 2).reshape(b, n, -1)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = _split_heads(self.qkv(tokens), 3, self.num_heads)
        x = x + self._attend(q, k, v, self.proj).view(b, c, hgt, wid)
        if context is None or self.context_dim is None:
            return x
        tokens = self.norm_cross(x).flatten(2).transpose(1, 2)
        (q,) = _split_heads(self.q_cross(tokens), 1, self.num_heads)
        k, v = _split_heads(self.kv_cross(context), 2, self.num_heads)
        return x + self._attend(q, k, v, self.proj_cross, context_mask).view(b, c, hgt, wid)


def _check_context_mask(mask: Tensor, context: Tensor | None) -> None:
    """A key-padding mask must be bool (B, L) like ``context``'s first two dims, one real token per row."""
    if context is None:
        raise ValueError("context_mask given without context")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(context.shape[:2]):
        raise ValueError(f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} (True = real "
                         f"token), got {mask.dtype} {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("context_mask has a row without any real token (True); attention would be undefined")


class Downsample(nn.Conv2d):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, stride=2, padding=1)


# 1-D map from a 3x3 kernel tap (-1, 0, 1) to the 4 taps of the equivalent stride-2 transposed conv
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (DDPM), computed in one op.

    conv3x3(nearest2x(x)) is exactly a stride-2 transposed conv of x with a 4x4 kernel K whose
    rows are [w_1, w_0 + w_1, w_-1 + w_0, w_-1] of the 3x3 rows w_-1, w_0, w_1 (and the same for
    columns): output row 2i reads x rows i-1 (w_-1) and i (w_0 + w_1), row 2i+1 reads i
    (w_-1 + w_0) and i+1 (w_1). Each output pixel then costs 4 taps instead of 9, and the
    upsampled tensor is never built. The parameters stay the 3x3 conv's.
    """

    taps: Tensor

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("taps", torch.tensor(_UPSAMPLE_TAPS), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        taps = self.taps.to(self.conv.weight.dtype)
        kernel = torch.einsum("oihw,ph,qw->iopq", self.conv.weight, taps, taps)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


class UNetLayer(nn.Module):
    """One residual block, followed by self-attention when the level asks for it."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, h: Tensor, gain_shift: Tensor, context: Tensor | None,
                context_mask: Tensor | None = None) -> Tensor:
        h = self.res(h, gain_shift)
        return h if self.attn is None else self.attn(h, context, context_mask)


def encoder_path(net: nn.Module, h: Tensor, gain_shift, context: Tensor | None,
                 context_mask: Tensor | None) -> tuple[list[Tensor], Tensor]:
    """The down path and middle of ``net`` (a ``UNet``, or the ``ControlNet`` copy of one) from the
    input features ``h``: (the skip features, ``h`` first and one per down block; the middle output).
    ``gain_shift`` yields each residual block's (gain, shift) in order and is advanced past them."""
    skips = [h]
    for block in net.down:
        h = block(h) if isinstance(block, Downsample) else block(h, next(gain_shift), context, context_mask)
        skips.append(h)
    h = net.mid1(h, next(gain_shift))
    if net.mid_attn is not None:
        h = net.mid_attn(h, context, context_mask)
    return skips, net.mid2(h, next(gain_shift))



def unet_fit_problems(image_size: int, channel_mult: Sequence[int], base_channels: int, norm_groups: int,
                      attn_resolutions: Sequence[int], num_heads: int) -> list[tuple[str, str]]:
    """Why a U-Net with these settings cannot be built for ``image_size`` inputs: (argument, reason) pairs,
    empty when it fits. The image is halved len(channel_mult) - 1 times; group norm needs ``norm_groups``
    to divide every width; attention levels must exist and their widths split into ``num_heads``."""
    halvings = len(channel_mult) - 1
    if image_size % 2**halvings:
        return [("channel_mult", f"{list(channel_mult)} halves the image {halvings} times, so the image size must be "
                                 f"divisible by {2**halvings}; the images are {image_size}x{image_size}")]
    widths = [base_channels * m for m in channel_mult]
    problems = []
    if any(w % norm_groups for w in widths):
        problems.append(("norm_groups", f"{norm_groups} must divide every channel width (base_channels x "
                                        f"channel_mult = {widths})"))
    sizes = [image_size // 2**i for i in range(halvings + 1)]
    unknown = sorted(set(attn_resolutions) - set(sizes))
    if unknown:
        problems.append(("attn_resolutions", f"{list(attn_resolutions)}: {unknown} match no level of "
                                             f"{image_size}x{image_size} images (level sizes {sizes})"))
    attended = [w for w, size in zip(widths, sizes) if size in attn_resolutions] + widths[-1:]
    if any(w % num_heads for w in attended):
        problems.append(("num_heads", f"{num_heads} must divide the channel widths with attention "
                                      f"({sorted(set(attended))})"))
    return problems

class UNet(nn.Module):
    """DDPM U-Net mapping (x, c_noise = logsnr) to a tensor shaped like x (see module docstring).

    ``image_size`` fixes which levels get attention (``attn_resolutions`` are spatial sizes, as in
    DDPM) and the default of ``residual_shapes``; forward accepts any H, W divisible by
    2 ** (len(channel_mult) - 1). ``mid_attention=False`` drops the middle attention block.
    ``fourier_exponents``: conv_in also reads sin/cos(2^k pi x) of the input for each k
    (``embeddings.input_fourier_features``). ``pooled_context`` (needs ``context_dim``): the mean
    context token is embedded and added to the noise-level embedding (``embeddings.add_pooled_context``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 8,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (4,),
        num_heads: int = 1,
        dropout: float = 0.0,
        time_embedding: EmbeddingKind = "sinusoidal",
        num_classes: int = 0,
        norm_groups: int = 8,
        context_dim: int | None = None,
        mid_attention: bool = True,
        fourier_exponents: Sequence[int] = (),
        pooled_context: bool = False,
    ):
        super().__init__()
        if pooled_context and context_dim is None:
            raise ValueError("pooled_context needs context_dim (the pooled tokens are the cross-attention context)")
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1:
            raise ValueError("UNet needs at least one level and one residual block per level")
        problems = unet_fit_problems(image_size, channel_mult, base_channels, norm_groups, attn_resolutions, num_heads)
        if problems:
            name, why = problems[0]
            raise ValueError(f"{name}: {why}")
        widths = [base_channels * m for m in channel_mult]
        sizes = [image_size // 2**i for i in range(levels)]
        self.in_channels, self.image_size, self.levels = in_channels, image_size, levels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.num_classes, self.context_dim = num_classes, context_dim
        self.fourier_exponents = tuple(fourier_exponents)
        emb_dim = 4 * base_channels

        self.time_embed = make_time_embedding(time_embedding, base_channels)
        self.time_mlp = embedding_mlp(base_channels, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.pooled_embed = nn.Linear(context_dim, emb_dim) if pooled_context else None

        def layer(c_in: int, c_out: int, size: int) -> UNetLayer:
            attn = (
                AttentionBlock(c_out, num_heads, norm_groups, context_dim)
                if size in attn_resolutions
                else None
            )
            return UNetLayer(ResBlock(c_in, c_out, norm_groups, dropout), attn)

        self.conv_in = nn.Conv2d(in_channels * (1 + 2 * len(self.fourier_exponents)), base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [(base_channels, 1)]  # (channels, downsampling factor) of each stored skip
        ch = base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(layer(ch, width, sizes[level]))
                ch = width
                skips.append((ch, 2**level))
            if level < levels - 1:
                self.down.append(Downsample(ch))
                skips.append((ch, 2 ** (level + 1)))
        self._skip_specs = skips + [(ch, 2 ** (levels - 1))]  # the last entry is the middle

        self.mid1 = ResBlock(ch, ch, norm_groups, dropout)
        self.mid_attn = (
            AttentionBlock(ch, num_heads, norm_groups, context_dim) if mid_attention else None
        )
        self.mid2 = ResBlock(ch, ch, norm_groups, dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for _ in range(num_res_blocks + 1):
                self.up.append(layer(ch + skips.pop()[0], widths[level], sizes[level]))
                ch = widths[level]
            if level > 0:
                self.up.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1))

        # one Linear gives every residual block its (gain, shift); gain = 1 + scale, the 1 sits
        # in the bias. Order: encoder blocks, middle, decoder blocks (the order forward uses).
        blocks = [m.res for m in self.down if isinstance(m, UNetLayer)] + [self.mid1, self.mid2]
        blocks += [m.res for m in self.up if isinstance(m, UNetLayer)]
        self._emb_split = [b.emb_channels for b in blocks]
        self.emb_proj = nn.Linear(emb_dim, sum(self._emb_split))
        with torch.no_grad():
            for bias in self.emb_proj.bias.split(self._emb_split):
                bias[: bias.numel() // 2] += 1.0

    # ------------------------------------------------------------------ shapes and validation
    def residual_shapes(
        self, batch_size: int, size: int | tuple[int, int] | None = None
    ) -> list[tuple[int, int, int, int]]:
        """Shapes of the ControlNet ``residuals`` forward accepts for inputs of spatial ``size``.

        One entry per skip connection, in the order the encoder stores them (conv_in output
        first), then one for the middle-block output. ``size`` defaults to ``image_size``.
        """
        if size is None:
            size = self.image_size
        hgt, wid = (size, size) if isinstance(size, int) else size
        return [(batch_size, c, hgt // f, wid // f) for c, f in self._skip_specs]

    def _check_input(self, x: Tensor) -> None:
        div = 2 ** (self.levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % div or x.shape[3] % div:
            raise ValueError(
                f"UNet expects x of shape (B, {self.in_channels}, H, W) with H and W divisible by "
                f"{div}, e.g. (B, {self.in_channels}, {self.image_size}, {self.image_size}); "
                f"got {tuple(x.shape)}"
            )

    def _check_residuals(self, x: Tensor, residuals: Sequence[Tensor]) -> None:
        expected = self.residual_shapes(x.shape[0], (x.shape[2], x.shape[3]))
        if len(residuals) != len(expected):
            raise ValueError(
                f"expected {len(expected)} residuals ({len(expected) - 1} skip connections + 1 "
                f"middle block, shapes {expected}), got {len(residuals)}"
            )
        for i, (r, shape) in enumerate(zip(residuals, expected)):
            if tuple(r.shape) != shape:
                what = "middle block" if i == len(expected) - 1 else f"skip {i}"
                raise ValueError(
                    f"residuals[{i}] ({what}) must have shape {shape}, got {tuple(r.shape)}"
                )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        residuals: Sequence[Tensor] | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, C, H, W), (B,) logsnr -> (B, out_channels, H, W).

        ``context`` (B, L, context_dim) needs ``context_dim``; ``context_mask`` (B, L) bool marks
        its real tokens (True; padding False, never attended to; None: every token is real);
        ``residuals`` follow ``residual_shapes`` and are added to the skips and the middle output
        (never mutated).
        """
        self._check_input(x)
        batch = x.shape[0]
        if context is not None:
            if self.context_dim is None:
                raise ValueError(
                    "context given, but the UNet was built with context_dim=None "
                    "(no cross-attention)"
                )
            if context.ndim != 3 or context.shape[::2] != (batch, self.context_dim):
                raise ValueError(
                    f"context must have shape ({batch}, L, {self.context_dim}), "
                    f"got {tuple(context.shape)}"
                )
        if context_mask is not None:
            _check_context_mask(context_mask, context)
        if residuals is not None:
            self._check_residuals(x, residuals)

        emb = noise_and_class_embedding(self, c_noise, class_labels, batch, "UNet")
        emb = add_pooled_context(self, emb, context, context_mask)
        gain_shift = iter(self.emb_proj(F.silu(emb)).split(self._emb_split, dim=1))

        skips, h = encoder_path(self, self.conv_in(input_fourier_features(x, self.fourier_exponents)), gain_shift,
                                context, context_mask)
        if residuals is not None:  # ControlNet: a new list, the caller's is left untouched
            skips = [s + r for s, r in zip(skips, residuals)]
            h = h + residuals[-1]

        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), next(gain_shift), context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
