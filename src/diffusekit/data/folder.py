"""A folder of the user's own images (``data.name = "folder"``; docs/data.md).

Which files: every ``*.png``, ``*.jpg``, ``*.jpeg`` (any case) under ``data.path``, subfolders included,
sorted by relative path; hidden files and folders (names starting with '.') are skipped and symlinked
folders are not followed; other files are ignored (a one-line warning counts other image formats).
Every file is decoded by ``images.decode_image``: EXIF orientation applied, transparency composited on
white, the largest centred square cropped and resized to ``image_size`` (Lanczos), 8 bits (256 levels).
A file that cannot be read stops the load with a one-line ``DataError`` naming it: a skipped file would
change the data and the held-out split without a word.

Channels (``channels``): 0 infers them, 3 (RGB) when any image has colour (a pixel whose red, green and
blue values differ), else 1; 3 reads every image as RGB (a gray image's value goes into all three); 1
reads every image as gray (Pillow's 'L', 0.299 R + 0.587 G + 0.114 B) and warns in one line when some
images had colour.

Cache: the decoded, resized uint8 array is kept in ``folder_cache_dir()`` (outside the image folder; a
safetensors file, never a pickle), one file per (folder, image_size, channels, pixel limit), valid for
one listing of the folder (every file's relative path, size and modification time): a file added,
removed or changed rebuilds it. A damaged cache file (unreadable, wrong shape, SHA-256 mismatch) is
rebuilt with a warning; a cache that cannot be written is warned about and the data returned anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as st_save

from diffusekit.budget import fits, gib
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.images import MAX_PIXELS, decode_image
from diffusekit.errors import DataError
from diffusekit.io.atomic import atomic_write_bytes, describe_os_error

__all__ = ["CACHE_ENV", "IMAGE_SUFFIXES", "OTHER_IMAGE_SUFFIXES", "folder_cache_dir", "list_images",
           "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OTHER_IMAGE_SUFFIXES = (".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic")  # not read; counted in a warning
CACHE_ENV = "DIFFUSEKIT_FOLDER_CACHE"  # the cache folder, or "off"
CACHE_VERSION = "1"
CACHE_FORMAT = "diffusekit-folder-cache"


# -- the files ------------------------------------------------------------------------------------
def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_images(root: str | Path) -> list[Path]:
    """Every *.png, *.jpg, *.jpeg (any case) under ``root``, recursively, sorted by relative path.

    Hidden files and folders (names starting with '.', e.g. macOS '._x.png' or .ipynb_checkpoints)
    are skipped; symlinked folders are not followed. Files of other image formats (``OTHER_IMAGE_SUFFIXES``)
    are not read, with a one-line warning that counts them.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: image folder does not exist (data.path; set it with --set data.path=FOLDER)")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder (data.path must be a folder of images)")
    files, others = [], []
    for p in root.rglob("*"):
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES + OTHER_IMAGE_SUFFIXES and p.is_file() and not _hidden(p, root):
            (files if suffix in IMAGE_SUFFIXES else others).append(p)
    if others:
        warnings.warn(f"{root}: {len(others)} image file(s) of other formats are not read (e.g. "
                      f"{min(others).relative_to(root)}); diffusekit reads .png, .jpg and .jpeg", stacklevel=2)
    if not files:
        raise DataError(f"{root}: no .png, .jpg or .jpeg images found (searched recursively)")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# -- the cache ------------------------------------------------------------------------------------
def folder_cache_dir() -> Path | None:
    """Where decoded folders are cached: ``$DIFFUSEKIT_FOLDER_CACHE`` (None when it is "off"), else
    ``$DIFFUSEKIT_CACHE/folders``, else ``~/.cache/diffusekit/folders``."""
    own = os.environ.get(CACHE_ENV, "").strip()
    if own:
        return None if own.lower() == "off" else Path(own).expanduser()
    root = os.environ.get("DIFFUSEKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "diffusekit") / "folders"


def _listing_key(root: Path, files: list[Path]) -> str:
    """SHA-256 of the folder's listing: each file's relative path, size and modification time (ns)."""
    rows = []
    for p in files:
        try:
            st = p.stat()
        except OSError as exc:
            raise DataError(f"{p}: cannot read file ({describe_os_error(exc)})") from None
        rows.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _cache_file(cache_dir: Path, root: Path, image_size: int, channels: int, max_pixels: int) -> Path:
    """One cache file per (folder, settings); a changed listing overwrites it rather than adding another."""
    ident = json.dumps([CACHE_VERSION, str(root.resolve()), image_size, channels, max_pixels])
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", root.resolve().name)[:40] or "root"
    return cache_dir / f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.safetensors"


def _digest(pixels: np.ndarray, colour: np.ndarray) -> str:
    """SHA-256 of the arrays' bytes in C order (hashed in place: no copy of a large folder)."""
    h = hashlib.sha256()
    for a in (pixels, colour):
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def _read_cache(path: Path, key: str, n: int, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (pixels, colour flags) when ``path`` holds this listing's entry; None when it is absent or
    stale; a one-line warning (then None) when it is damaged."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION or meta.get("key") != key:
                return None  # another version or an older listing of the folder: rebuilt silently
            pixels, colour = f.get_tensor("pixels"), f.get_tensor("colour")
        shape_ok = (pixels.dtype == np.uint8 and pixels.ndim == 4 and pixels.shape[0] == n
                    and pixels.shape[1] in ((1, 3) if channels == 0 else (channels,))
                    and pixels.shape[2:] == (image_size, image_size) and colour.dtype == np.uint8
                    and colour.shape == (n,))
        if not shape_ok or meta.get("sha256") != _digest(pixels, colour):
            raise ValueError("its arrays do not match its record")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:  # any failure: decode again
        warnings.warn(f"{path}: damaged folder cache ({type(exc).__name__}); decoding the images again", stacklevel=3)
        return None
    return pixels, colour


def _write_cache(path: Path, pixels: np.ndarray, colour: np.ndarray, key: str, root: Path) -> None:
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "root": str(root.resolve()),
            "sha256": _digest(pixels, colour)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # decoded copies of the user's pictures
        atomic_write_bytes(path, st_save({"pixels": pixels, "colour": colour}, metadata=meta))
    except OSError as exc:
        warnings.warn(f"{path}: cannot write the folder cache ({describe_os_error(exc)}); the images will be "
                      f"decoded again next time (set {CACHE_ENV} to another folder, or to off)", stacklevel=3)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


# -- the dataset ----------------------------------------------------------------------------------
def _decode_all(files: list[Path], image_size: int, channels: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels (N, C, S, S), uint8 colour flags (N,)); ``channels = 0`` reads RGB and keeps one
    channel when no image has colour (equal, value for value, to reading them as gray)."""
    decoded = [decode_image(p, image_size, 1 if channels == 1 else 3, max_pixels) for p in files]
    pixels = np.ascontiguousarray(np.stack([arr for arr, _ in decoded]))  # safetensors writes memory order
    colour = np.array([c for _, c in decoded], dtype=np.uint8)
    if channels == 0 and not colour.any():
        pixels = np.ascontiguousarray(pixels[:, :1])
    return pixels, colour


def load_image_folder(root: str | Path, image_size: int = 32, channels: int = 0, max_pixels: int = MAX_PIXELS,
                      cache: bool = True) -> ArrayDataset:
    """Every image under ``root`` (``list_images``) as (N, C, image_size, image_size) in [-1, 1], 256 levels,
    unlabeled; ``channels`` 0 (infer), 1 or 3 as the module docstring says. ``cache`` uses the decoded-array
    cache of ``folder_cache_dir()`` (never inside ``root``)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8 or image_size % 4:
        raise DataError(f"data.image_size must be a multiple of 4 and >= 8, got {image_size!r}")
    if channels not in (0, 1, 3):
        raise DataError(f"data.channels must be 0 (infer from the images), 1 or 3, got {channels!r}")
    root = Path(root).expanduser()  # data.path = "~/pictures" (no shell expands a tilde after "data.path=")
    files = list_images(root)
    needed = len(files) * (channels or 3) * image_size**2 * (1 + 4)  # 8-bit pixels, then float32
    ok, free = fits(needed)
    if not ok:
        raise DataError(f"data.path = {str(root)!r}: {len(files)} images at data.image_size = {image_size} need about "
                        f"{gib(needed)} in memory; {gib(free)} is free here (lower data.image_size or use fewer images)")
    cache_dir = folder_cache_dir() if cache else None
    if cache_dir is not None and _inside(cache_dir, root):
        warnings.warn(f"{cache_dir}: the folder cache lies inside the image folder {root}; not caching (diffusekit "
                      f"never writes into an image folder: set {CACHE_ENV} elsewhere)", stacklevel=2)
        cache_dir = None
    key = _listing_key(root, files)
    path = _cache_file(cache_dir, root, image_size, channels, max_pixels) if cache_dir is not None else None
    hit = _read_cache(path, key, len(files), image_size, channels) if path is not None else None
    pixels, colour = hit if hit is not None else _decode_all(files, image_size, channels, max_pixels)
    if hit is None and path is not None:
        _write_cache(path, pixels, colour, key, root)
    if channels == 1 and colour.any():
        first = files[int(np.argmax(colour))].relative_to(root)
        warnings.warn(f"data.channels = 1: {int(colour.sum())} of {len(files)} images in {root} have colour (e.g. "
                      f"{first}) and are read as gray; set data.channels = 0 (infer) or 3 to keep the colour",
                      stacklevel=2)
    x = torch.from_numpy(pixels.astype(np.float32) / 255 * 2 - 1)
    return ArrayDataset(x, None, levels=256, num_classes=0, name=f"folder:{root.name}")
