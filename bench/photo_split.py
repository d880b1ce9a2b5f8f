"""What the photo split asks of a colorizer: colour statistics of each split, and a model-free colorizer against gray.

The photo patches (``data/photos.py``) can be split by columns (the right 20% of each photo is test) or by tiles
(one 32-px tile in five is test), ``data.photo_split``. For each layout this bench draws the train and test patches
a config with that split gives (``data.n_train`` / ``data.n_test``, seed 0) and reports:

- the RMS chroma of the patches (the RMS over pixels of x minus its channel mean; 0 for a gray patch), mean over
  the patches of each split, and the share of test patches that are nearly gray (RMS chroma below 0.05);
- the gray baseline A+ y (the channel mean in every channel): PSNR in dB (peak-to-peak 2) per test patch, mean
  and standard error over the patches, as ``diffusekit restore`` and ``bench/restoration.py`` score it;
- a colorizer with no network: the distance-weighted mean of the k training patches whose gray images are
  nearest the test patch's gray image (scikit-learn's ``KNeighborsRegressor``), then projected onto the
  measurement (its channel mean replaced by y). Its PSNR, its paired gain over gray (per patch, mean +- standard
  error) and the PSNR of its pooled MSE.

The nearest-neighbour mean estimates the posterior mean E[x | y] from the training patches alone, so where it
beats gray the training data carries the test patches' colour, and where it falls far below, the test patches'
colour is not what the training patches hold at that gray image.

    OMP_NUM_THREADS=2 .venv/bin/python bench/photo_split.py [--n-test 1000] [--k 8] [--json out.json]   # ~1 minute

Prints the result as JSON, then a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cascade import emit, run_bench
from restoration import mean_se
from sklearn.neighbors import KNeighborsRegressor

from diffusekit.config import DataConfig
from diffusekit.data import load_dataset
from diffusekit.data.photos import PHOTO_SPLITS
from diffusekit.errors import DiffusekitError
from diffusekit.runs.restore import psnr

NEARLY_GRAY = 0.05  # RMS chroma below which a patch counts as nearly gray


def rms_chroma(x: torch.Tensor) -> torch.Tensor:
    """(N,) RMS over pixels and channels of x minus its channel mean."""
    return (x - x.mean(1, keepdim=True)).pow(2).flatten(1).mean(1).sqrt()


def layout_row(layout: str, n_train: int, n_test: int, k: int) -> dict[str, Any]:
    cfg = DataConfig(name="photos", n_train=n_train, n_test=n_test, photo_split=layout)
    train, test = load_dataset(cfg, "train").x, load_dataset(cfg, "test").x
    y_train, y = train.mean(1, keepdim=True), test.mean(1, keepdim=True)
    gray = y.expand_as(test)
    knn = KNeighborsRegressor(n_neighbors=k, weights="distance").fit(y_train.flatten(1).numpy(),
                                                                      train.flatten(1).numpy())
    guess = torch.from_numpy(knn.predict(y.flatten(1).numpy())).float().view_as(test)
    guess = guess - guess.mean(1, keepdim=True) + y  # onto A x = y
    p_gray, p_knn = psnr(gray, test), psnr(guess, test)
    pooled = 10 * np.log10(4 / (guess.clamp(-1, 1) - test).pow(2).mean().item())
    pooled_gray = 10 * np.log10(4 / (gray - test).pow(2).mean().item())
    c_train, c_test = rms_chroma(train), rms_chroma(test)
    return {"layout": layout, "n_train": n_train, "n_test": n_test, "k": k,
            "rms_chroma_train": float(c_train.mean()), "rms_chroma_test": float(c_test.mean()),
            "nearly_gray_test": float((c_test < NEARLY_GRAY).double().mean()),
            "nearly_gray_train": float((c_train < NEARLY_GRAY).double().mean()),
            "psnr_gray": mean_se(p_gray.numpy()), "psnr_knn": mean_se(p_knn.numpy()),
            "gain_knn": mean_se((p_knn - p_gray).numpy()), "pooled_gray": pooled_gray, "pooled_knn": pooled}


def markdown(result: dict[str, Any]) -> str:
    header = ("| split | RMS chroma, train / test | nearly gray, train / test | gray: PSNR | nearest neighbours: PSNR "
              "| paired gain | pooled PSNR, gray / neighbours |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in result["layouts"]:
        lines.append(f"| {r['layout']} | {r['rms_chroma_train']:.3f} / {r['rms_chroma_test']:.3f} | "
                     f"{r['nearly_gray_train']:.2f} / {r['nearly_gray_test']:.2f} | "
                     f"{r['psnr_gray'][0]:.2f} ± {r['psnr_gray'][1]:.2f} | {r['psnr_knn'][0]:.2f} ± {r['psnr_knn'][1]:.2f} | "
                     f"{r['gain_knn'][0]:+.2f} ± {r['gain_knn'][1]:.2f} | {r['pooled_gray']:.2f} / {r['pooled_knn']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=20000, help="training patches the neighbours come from")
    p.add_argument("--n-test", type=int, default=1000, help="test patches scored (the first of the test split)")
    p.add_argument("--k", type=int, default=8, help="neighbours averaged")
    p.add_argument("--layouts", default=",".join(PHOTO_SPLITS), help="comma-separated: columns, tiles")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    for name, value, low in (("--n-train", args.n_train, args.k), ("--n-test", args.n_test, 2), ("--k", args.k, 1)):
        if not low <= value <= 1_000_000:
            raise DiffusekitError(f"{name} must be in {low}..1000000; got {value}")
    bad = [lay for lay in layouts if lay not in PHOTO_SPLITS]
    if bad:
        raise DiffusekitError(f"--layouts: {bad[0]!r} is not a photo split; use {', '.join(PHOTO_SPLITS)}")
    result = {"layouts": [layout_row(lay, args.n_train, args.n_test, args.k) for lay in layouts]}
    emit(result, args.json, markdown(result))
    return result


if __name__ == "__main__":
    run_bench(main, "bench/photo_split.py")
