"""How close a set of samples is to held-out data, by the best measure the data allows: the project's
feature network for digits and MNIST (``quality.image_quality``), calibrated pixel-space distances for
other images (``quality.pixel_quality``), sliced Wasserstein / MMD (and the oracle's exact NLL for
``gmm``) for vectors (``quality.vector_quality``). Every model family scores its samples with it."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.registry import load_dataset
from diffusekit.evaluate.quality import image_quality, pixel_quality, vector_quality
from diffusekit.oracle import default_mixture

__all__ = ["FEATURE_DATASETS", "has_feature_net", "score_samples"]

FEATURE_DATASETS = ("digits", "mnist")  # the datasets with a feature network (``evaluate.features``)


def has_feature_net(data_cfg) -> bool:
    """Whether images of the dataset of ``data_cfg`` have a feature network: digits and MNIST at 28x28
    (MNIST average-pooled to 14x14 or 7x7 has none)."""
    return data_cfg.name in FEATURE_DATASETS and (data_cfg.name != "mnist" or data_cfg.image_size in (0, 28))


def score_samples(x: Tensor, data_cfg, test: ArrayDataset, levels: int | None,
                  labels: Tensor | None = None, groups: Tensor | None = None) -> dict[str, Any]:
    """The quality numbers of samples ``x`` against the ``test`` split of the data of ``data_cfg``
    (``labels``: the classes they were drawn for, for class accuracy; ``groups``: per sample, the ids of
    draws that are not independent, for the intervals)."""
    if x.ndim != 4:
        oracle = default_mixture(x.shape[1]) if data_cfg.name == "gmm" else None
        return vector_quality(x, test.x, oracle=oracle)
    pooled = data_cfg.name == "mnist" and data_cfg.image_size not in (0, 28)
    if has_feature_net(data_cfg):
        return image_quality(x, data_cfg.name, levels=levels, labels=labels, groups=groups)
    space = (f"pixels (the MNIST feature network reads 28x28, not data.image_size = {data_cfg.image_size})" if pooled
             else f"pixels (no feature network for data.name = {data_cfg.name!r})")
    if test.x.shape[0] < 2:
        return {"feature_space": space, "skipped": f"the {test.name} split has {test.x.shape[0]} image(s); "
                "pixel-space distances need at least 2"}
    out = pixel_quality(x, test.x, load_dataset(data_cfg, "train").x, levels=levels, groups=groups)
    out["feature_space"] = space
    return out
