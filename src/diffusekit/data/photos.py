"""Colour patches cut from the photos that ship inside scikit-image (no download).

Seven RGB photos (``PHOTOS``) are shrunk so their longer side is ``PHOTO_SIDE`` pixels (Pillow's
box filter, 8-bit), then cut into ``image_size`` x ``image_size`` patches at seeded random
positions. The split is spatial, so no pixel is in both splits, in one of two layouts
(``data.photo_split``):

- ``"columns"`` (the default): train patches come from the left 80% of each photo's columns, test
  patches from the right 20%. The test strips are a different part of each scene: they hold less
  colour than the training columns (RMS chroma 0.14 against 0.24 for 16x16 patches), so a test on
  them measures extrapolation to other content.
- ``"tiles"``: each photo is cut into ``TILE`` x ``TILE`` tiles and tile (i, j) (row i, column j)
  is a test tile when (i + 2 j) mod 5 = 0, one tile in five in every row and column; a test patch
  lies inside one test tile, a train patch inside the train tiles (it may span several). Both
  splits then sample every photo's content alike (RMS chroma 0.22 train, 0.22 test), at the price
  of neighbouring tiles being alike: a test measures interpolation within the same scenes.

Values are 8-bit (256 levels),
scaled to [-1, 1] like every image set. This is the colour data for colorization, super-resolution
and inpainting demos on a CPU.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
from PIL import Image

from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import DataError

__all__ = ["PHOTOS", "PHOTO_SIDE", "PHOTO_SPLITS", "TILE", "TRAIN_FRACTION", "load_photos", "photo_arrays",
           "split_mask"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
PHOTO_SIDE = 128  # longer side of each shrunk photo, in pixels
TRAIN_FRACTION = 0.8  # "columns": share of each photo's columns (from the left) that train patches come from
TILE = 32  # "tiles": side of a tile, in pixels of the shrunk photo
PHOTO_SPLITS = ("columns", "tiles")


@functools.lru_cache(maxsize=1)
def photo_arrays() -> tuple[np.ndarray, ...]:
    """The shrunk photos as uint8 (H, W, 3) arrays, in ``PHOTOS`` order."""
    try:
        import skimage.data  # optional (the photos extra)
    except ImportError:
        raise DataError("data.name = 'photos' needs scikit-image (the photos ship in it): "
                        "pip install 'diffusekit[photos]'") from None

    out = []
    for name in PHOTOS:
        rgb = np.asarray(getattr(skimage.data, name)())[..., :3]
        h, w = rgb.shape[:2]
        scale = PHOTO_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        out.append(np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX), dtype=np.uint8))
    return tuple(out)


def split_mask(photo: np.ndarray, split: str, layout: str = "columns") -> np.ndarray:
    """(H, W) bool: the pixels of ``photo`` that belong to ``split`` under ``layout``; the two splits' masks
    partition the photo."""
    h, w = photo.shape[:2]
    if layout == "columns":
        test = np.broadcast_to(np.arange(w)[None, :] >= round(w * TRAIN_FRACTION), (h, w))
    elif layout == "tiles":
        test = (np.arange(h)[:, None] // TILE + 2 * (np.arange(w)[None, :] // TILE)) % 5 == 0
    else:
        raise ValueError(f"layout must be one of {PHOTO_SPLITS}, got {layout!r}")
    return np.array(test if split == "test" else ~test)


def _windows(photo: np.ndarray, split: str, layout: str, size: int) -> np.ndarray:
    """(K, 2) top-left corners of the size x size windows of ``photo`` lying wholly inside ``split``'s pixels;
    under "tiles" a test window lies inside one tile (a train window may span several)."""
    mask = split_mask(photo, split, layout)
    if min(mask.shape) < size:
        return np.zeros((0, 2), dtype=np.int64)
    inside = np.lib.stride_tricks.sliding_window_view(mask, (size, size)).all(axis=(2, 3))
    if layout == "tiles" and split == "test":
        tops, lefts = np.arange(inside.shape[0]), np.arange(inside.shape[1])
        same_tile = (((tops + size - 1) // TILE == tops // TILE)[:, None]
                     & ((lefts + size - 1) // TILE == lefts // TILE)[None, :])
        inside &= same_tile
    return np.argwhere(inside)


def load_photos(split: Literal["train", "test"] = "train", image_size: int = 16, n: int = 20000,
                seed: int = 0, layout: str = "columns") -> ArrayDataset:
    """``n`` RGB patches (n, 3, image_size, image_size) in [-1, 1] from ``split``'s pixels of each photo.

    Patch i comes from photo i mod 7 (so every photo is equally represented) at a window drawn
    uniformly, with numpy's generator seeded with ``seed``, among those lying wholly inside ``split``'s
    pixels under ``layout`` ("columns" or "tiles", ``split_mask``); the same arguments give the same
    patches on every machine.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if layout not in PHOTO_SPLITS:
        raise DataError(f"data.photo_split = {layout!r} is not a layout; use one of {', '.join(PHOTO_SPLITS)}")
    photos = photo_arrays()
    windows = [_windows(p, split, layout, image_size) for p in photos]
    too_small = [name for name, w in zip(PHOTOS, windows) if len(w) == 0]
    if too_small:
        where = f"the {split} tiles ({TILE} px)" if layout == "tiles" else f"the {split} columns"
        raise DataError(f"data.image_size = {image_size} does not fit in {where} of {too_small[0]}; "
                        f"use {'16 or 24' if layout == 'columns' else 'at most 32'}")
    cuts = [round(p.shape[1] * TRAIN_FRACTION) for p in photos]
    regions = [p[:, :c] if split == "train" else p[:, c:] for p, c in zip(photos, cuts)]
    rng = np.random.default_rng(seed)
    patches = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        photo, corners = photos[i % len(photos)], windows[i % len(photos)]
        if layout == "columns":  # top, then left, within the region: the draw every earlier run used
            region = regions[i % len(photos)]
            top = rng.integers(0, region.shape[0] - image_size + 1)
            left = rng.integers(0, region.shape[1] - image_size + 1)
            patches[i] = region[top:top + image_size, left:left + image_size]
        else:
            top, left = corners[rng.integers(0, len(corners))]
            patches[i] = photo[top:top + image_size, left:left + image_size]
    x = torch.from_numpy(patches.astype(np.float32) / 255 * 2 - 1).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(x, None, levels=256, num_classes=0, name=f"photos-{split}")
