"""Colour patches cut from the photos that ship inside scikit-image (no download).

Seven RGB photos (``PHOTOS``) are shrunk so their longer side is ``PHOTO_SIDE`` pixels (Pillow's
box filter, 8-bit), then cut into ``image_size`` x ``image_size`` patches at seeded random
positions. The split is spatial: train patches come from the left 80% of each photo's columns,
test patches from the right 20%, so no pixel is in both splits. Values are 8-bit (256 levels),
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

__all__ = ["PHOTOS", "PHOTO_SIDE", "TRAIN_FRACTION", "load_photos", "photo_arrays"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
PHOTO_SIDE = 128  # longer side of each shrunk photo, in pixels
TRAIN_FRACTION = 0.8  # share of each photo's columns (from the left) that train patches come from


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


def _region(photo: np.ndarray, split: str) -> np.ndarray:
    cut = int(round(photo.shape[1] * TRAIN_FRACTION))
    return photo[:, :cut] if split == "train" else photo[:, cut:]


def load_photos(split: Literal["train", "test"] = "train", image_size: int = 16, n: int = 20000,
                seed: int = 0) -> ArrayDataset:
    """``n`` RGB patches (n, 3, image_size, image_size) in [-1, 1] from ``split``'s region of each photo.

    Patch i comes from photo i mod 7 (so every photo is equally represented) at a position drawn
    from numpy's generator seeded with ``seed``; the same arguments give the same patches on every
    machine.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    regions = [_region(p, split) for p in photo_arrays()]
    too_small = [name for name, r in zip(PHOTOS, regions) if min(r.shape[:2]) < image_size]
    if too_small:
        raise DataError(f"data.image_size = {image_size} is larger than the {split} region of {too_small[0]} "
                        f"({regions[PHOTOS.index(too_small[0])].shape[1]} px wide); use 16 or 24")
    rng = np.random.default_rng(seed)
    patches = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        r = regions[i % len(regions)]
        top = rng.integers(0, r.shape[0] - image_size + 1)
        left = rng.integers(0, r.shape[1] - image_size + 1)
        patches[i] = r[top:top + image_size, left:left + image_size]
    x = torch.from_numpy(patches.astype(np.float32) / 255 * 2 - 1).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(x, None, levels=256, num_classes=0, name=f"photos-{split}")
