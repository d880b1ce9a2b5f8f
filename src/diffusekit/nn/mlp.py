"""A residual MLP denoiser for low-dimensional data (2-D toys, Gaussian-mixture oracles).

Same contract as the U-Net: (x, c_noise = logsnr) -> a tensor shaped like x, with no knowledge of
what the output means (the wrappers of ``diffusekit.parameterization`` give it one). The noise level is
embedded as in DDPM (Vidal, "Deep Generative Models" (Fall 2025), slides "Implementation (DDPM)":
sinusoidal or Fourier features, then Linear-SiLU-Linear) and enters every residual block through a
scale-shift, the MLP analogue of adaptive group norm (Zhu, "Generative Model Zoo (part III)" (CMU
16-726), slide "Implementation Considerations: Network Architectures"; Dhariwal & Nichol 2021):

    h <- h + W2 dropout(SiLU((W1 SiLU(h)) * gain + shift)),    (gain, shift) = Linear(SiLU(emb))

The output layer is zero-initialised, so the untrained network outputs exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.nn.embeddings import (
    EmbeddingKind,
    embedding_mlp,
    input_fourier_features,
    make_time_embedding,
    noise_and_class_embedding,
)

__all__ = ["MLPDenoiser"]


class MLPDenoiser(nn.Module):
    """Residual MLP: (B, dim), (B,) logsnr -> (B, out_dim).

    ``hidden`` is the width, ``depth`` the number of residual blocks, ``emb_dim`` both the size of
    the noise-level features and the embedding width. With ``num_classes > 0`` an
    ``nn.Embedding(num_classes + 1, emb_dim)`` is added to the embedding; label ``num_classes`` is
    the null label of classifier-free guidance and ``class_labels=None`` means all null.
    ``fourier_exponents``: the input layer also reads sin/cos(2^k pi x) for each k
    (``embeddings.input_fourier_features``); ``out_dim`` (None: ``dim``) is the width of the output.
    """

    def __init__(
        self,
        *,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 3,
        time_embedding: EmbeddingKind = "sinusoidal",
        emb_dim: int = 64,
        num_classes: int = 0,
        dropout: float = 0.0,
        fourier_exponents: tuple[int, ...] = (),
        out_dim: int | None = None,
    ):
        super().__init__()
        self.dim, self.hidden, self.depth = dim, hidden, depth
        self.num_classes, self.dropout = num_classes, dropout
        self.fourier_exponents = tuple(fourier_exponents)
        self.time_embed = make_time_embedding(time_embedding, emb_dim)
        self.time_mlp = embedding_mlp(emb_dim, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.inp = nn.Linear(dim * (1 + 2 * len(self.fourier_exponents)), hidden)
        self.fc1 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        # (gain, shift) for every block from one Linear; gain = 1 + scale, the 1 sits in the bias
        self.emb_proj = nn.Linear(emb_dim, 2 * hidden * depth)
        with torch.no_grad():
            self.emb_proj.bias.view(depth, 2, hidden)[:, 0] += 1.0
        self.out = nn.Linear(hidden, dim if out_dim is None else out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, **unsupported: Any) -> Tensor:
        """``unsupported`` conditioning (context, residuals) must be None: an MLP takes neither."""
        if any(v is not None for v in unsupported.values()):
            raise ValueError(f"MLPDenoiser supports neither {' nor '.join(sorted(unsupported))}; use UNet")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"MLPDenoiser expects x of shape (B, {self.dim}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        emb = noise_and_class_embedding(self, c_noise, class_labels, batch, "MLPDenoiser")
        gain_shift = self.emb_proj(F.silu(emb)).view(batch, self.depth, 2, self.hidden)

        h = self.inp(input_fourier_features(x, self.fourier_exponents))
        for i in range(self.depth):
            a = torch.addcmul(gain_shift[:, i, 1], self.fc1[i](F.silu(h)), gain_shift[:, i, 0])
            a = F.silu(a, inplace=True)  # addcmul's backward does not read its output
            if self.dropout > 0:
                a = F.dropout(a, self.dropout, self.training)
            h = h + self.fc2[i](a)
        return self.out(F.silu(h))
