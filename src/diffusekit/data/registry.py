"""``load_dataset``: the ``[data]`` config section -> an in-memory ``ArrayDataset``.

Splits: digits and MNIST have fixed stratified splits; photo patches (``data/photos.py``) come from
disjoint pixels of each photo, its column ranges or its tiles (``data.photo_split``; ``n_train`` / ``n_test``
patches); scenes (``data/scenes.py``) place digits
of the MNIST-5k split of the same name on a canvas (``n_train`` / ``n_test`` scenes, drawn with a seed derived from
``(data.seed, split)``); toys and the Gaussian-mixture oracle draw
``n_train`` / ``n_test`` points with seeds derived from ``(data.seed, split)``, so the two splits
are independent and every seed gives different data; an image folder (``data/folder.py``) holds out a
fixed 10% for "test" (``folder_split``: the same files for every seed) when it has at least 10 images, and
otherwise uses all its images for both splits (too few to spare any; likelihoods on "test" are then
training-set numbers). A folder reads neither ``n_train``/``n_test`` nor ``seed``: it uses every image.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch

from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.folder import load_image_folder
from diffusekit.data.images import load_digits, load_mnist
from diffusekit.data.photos import load_photos
from diffusekit.data.scenes import load_scenes
from diffusekit.data.toys import TOYS, make_toy
from diffusekit.errors import ConfigError
from diffusekit.oracle import default_mixture

__all__ = ["DATASETS", "GMM_DIM", "folder_split", "load_dataset", "pooled", "resolved_data_config", "split_seed"]

DATASETS = ("digits", "mnist", "photos", "scenes", *TOYS, "gmm", "folder")
GMM_DIM = 2  # dimension of the oracle mixture behind data.name = "gmm"
DEFAULT_IMAGE_SIZE = 32  # data.image_size = 0 means this for an image folder
PHOTO_PATCH_SIZE = 16  # and this for the photo patches
_SPLIT_ID = {"train": 0, "test": 1}


def split_seed(seed: int, split: Literal["train", "test"]) -> int:
    """A 32-bit seed for one split, derived from (seed, split) with numpy's SeedSequence."""
    if seed < 0:
        raise ConfigError(f"data.seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, _SPLIT_ID[split]]).generate_state(1)[0])


def folder_split(n: int, split: Literal["train", "test"]) -> torch.Tensor:
    """Positions of ``split`` among n folder images: a fixed 10% holdout for "test" when n >= 10
    (same for every seed and machine), otherwise all n images for both splits."""
    if n < 10:
        return torch.arange(n)
    order = np.random.default_rng(0).permutation(n)
    n_test = n // 10
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return torch.from_numpy(np.sort(chosen))


def _gmm(n: int, seed: int, split: str) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = default_mixture(GMM_DIM).sample(n, generator=g).to(torch.float32)
    return ArrayDataset(x, None, levels=None, num_classes=0, name=f"gmm-{split}")


def pooled(data: ArrayDataset, factor: int) -> ArrayDataset:
    """Images average-pooled by ``factor`` (each pixel the mean of a factor x factor block: the ``A`` of
    super-resolution in ``sampling/restore.py``, so a low-resolution model learns exactly the distribution
    a super-resolution run is conditioned on). The mean of f^2 values on a grid of L levels lies on a grid
    of f^2 (L - 1) + 1 levels over the same range, which the likelihood bound bins by."""
    if factor == 1:
        return data
    x = torch.nn.functional.avg_pool2d(data.x.to(torch.float64), factor).to(torch.float32)
    levels = None if data.levels is None else factor**2 * (data.levels - 1) + 1
    return ArrayDataset(x, data.labels, levels=levels, num_classes=data.num_classes,
                        name=f"{data.name}-{x.shape[-1]}x{x.shape[-2]}")


def load_dataset(cfg, split: Literal["train", "test"]) -> ArrayDataset:
    """The ``split`` of the dataset named by ``cfg.name`` (a ``DataConfig``)."""
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    name = cfg.name
    if name == "digits":
        return load_digits(split)
    if name == "mnist":
        return pooled(load_mnist(split), 28 // cfg.image_size if cfg.image_size else 1)
    n = cfg.n_train if split == "train" else cfg.n_test
    if name == "scenes":
        return load_scenes(split, n, cfg.seed, cfg.image_size or 32)
    if name == "photos":
        return load_photos(split, cfg.image_size or PHOTO_PATCH_SIZE, n, split_seed(cfg.seed, split), cfg.photo_split)
    if name in TOYS:
        x = make_toy(name, n, split_seed(cfg.seed, split))
        return ArrayDataset(x, None, levels=None, num_classes=0, name=f"{name}-{split}")
    if name == "gmm":
        return _gmm(n, split_seed(cfg.seed, split), split)
    if name == "folder":
        if not cfg.path:
            raise ConfigError("data.name = 'folder' needs data.path, the folder of images (e.g. --set data.path=photos)")
        data = load_image_folder(cfg.path, cfg.image_size or DEFAULT_IMAGE_SIZE, cfg.channels)
        return data.subset(folder_split(len(data), split), name=f"{data.name}-{split}")
    raise ConfigError(f"data.name = {name!r} is not a dataset; choose one of {', '.join(DATASETS)}")


def resolved_data_config(cfg, data: ArrayDataset):
    """``cfg`` (a ``DataConfig``) with what was inferred from ``data`` written in: a folder's
    ``channels = 0`` becomes the channels it was read with (1 or 3), so a run records, and later reads
    its folder with, what it trained on."""
    if cfg.name == "folder" and cfg.channels == 0:
        return replace(cfg, channels=int(data.shape[0]))
    return cfg
