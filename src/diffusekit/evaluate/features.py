"""A small classifier the project trains itself, whose penultimate layer is the feature space for
sample quality ("FD-digits", "FD-mnist").

No Inception weights can be downloaded here, so image samples are scored in the feature space of
``FeatureNet``, a small CNN trained on the train split of the same data (digits, MNIST-5k, or the digits
cut out of the scenes, ``data.scenes.scene_crops``: the reader of the scenes' prompt adherence), in the
spirit of FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium"), which uses Inception-v3's pool3 layer the same way.

Training is deterministic under its seed (explicit ``torch.Generator`` for shuffling and
augmentation; weights initialised inside ``torch.random.fork_rng`` so the caller's RNG state is
untouched). ``load_feature_net`` caches the weights as safetensors + a JSON record (architecture,
seed, test accuracy, SHA-256 of the weights, version tag), written atomically; a cache entry that
fails to load or verify is retrained with a warning, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusekit.data import load_digits, load_mnist
from diffusekit.data.scenes import scene_crops
from diffusekit.io.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["FEATURE_NET_VERSION", "FEATURE_DIM", "FeatureNetConfig", "FeatureNet", "feature_net_config",
           "train_feature_net", "load_feature_net", "default_cache_dir", "cache_paths", "correct", "evaluate_accuracy",
           "feature_dataset"]

FEATURE_NET_VERSION = 1  # bump when the architecture or the training recipe changes: old caches retrain
FEATURE_DIM = 64
DatasetName = Literal["digits", "mnist", "scenes"]


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture of a ``FeatureNet``: a stem conv of width ``stem`` at full resolution, then
    ``stages`` of (width, number of convs), each after a 2x2 max pool, then global average pooling
    and a feature layer of ``feature_dim`` units."""

    image_size: int
    stem: int
    stages: tuple[tuple[int, int], ...]
    feature_dim: int = FEATURE_DIM
    num_classes: int = 10


@dataclass(frozen=True)
class _Recipe:
    """How a feature net is trained on one dataset."""

    epochs: int
    batch_size: int
    lr: float
    max_shift: int  # random translations of up to this many pixels (background-filled)


# 8x8 -> 4x4 -> 2x2 and 28x28 -> 14 -> 7 -> 3: chosen for test accuracy per CPU second
_CONFIGS = {"digits": FeatureNetConfig(image_size=8, stem=32, stages=((64, 2), (128, 1))),
            "mnist": FeatureNetConfig(image_size=28, stem=16, stages=((32, 2), (64, 2), (128, 1)))}
_CONFIGS["scenes"] = _CONFIGS["mnist"]  # the digits cut out of scenes (data.scenes.scene_crops), 28x28
_RECIPES = {"digits": _Recipe(epochs=15, batch_size=64, lr=3e-3, max_shift=1),
            "mnist": _Recipe(epochs=8, batch_size=64, lr=3e-3, max_shift=2)}
_RECIPES["scenes"] = _RECIPES["mnist"]


def feature_net_config(dataset_name: DatasetName) -> FeatureNetConfig:
    """The architecture used for ``dataset_name``."""
    if dataset_name not in _CONFIGS:
        raise ValueError(f"no feature network for dataset {dataset_name!r}; choose 'digits', 'mnist' or 'scenes'")
    return _CONFIGS[dataset_name]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FeatureNet(nn.Module):
    """A small CNN classifier for 1-channel images in [-1, 1] (8x8 digits, 28x28 MNIST).

    trunk: conv3x3-BN-ReLU stem, then per stage a 2x2 max pool and conv3x3-BN-ReLU layers; global
    average pooling; ``features``: Linear(width, 64) + ReLU (the penultimate layer, like
    Inception's pool3); ``forward``: a linear head on the features -> logits (N, num_classes).
    """

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = _conv_bn_relu(1, config.stem)
        c_in = config.stem
        for width, n_convs in config.stages:
            layers.append(nn.MaxPool2d(2))
            for _ in range(n_convs):
                layers += _conv_bn_relu(c_in, width)
                c_in = width
        self.trunk = nn.Sequential(*layers)
        self.project = nn.Linear(c_in, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def _check(self, x: Tensor) -> None:
        s = self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"FeatureNet expects images (N, 1, {s}, {s}), got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) in [-1, 1] -> penultimate features (N, feature_dim)."""
        self._check(x)
        h = self.trunk(x).mean(dim=(2, 3))
        return F.relu(self.project(h))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) in [-1, 1] -> class logits (N, num_classes)."""
        return self.head(self.features(x))

    def features_and_logits(self, x: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """Features and logits of many images, in eval mode and without gradients, batched."""
        was_training = self.training
        self.eval()
        feats, logits = [], []
        with torch.no_grad():
            for chunk in x.to(torch.float32).split(batch_size):
                f = self.features(chunk)
                feats.append(f)
                logits.append(self.head(f))
        self.train(was_training)
        return torch.cat(feats), torch.cat(logits)


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift]^2 (background -1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def feature_dataset(dataset_name: DatasetName, split: Literal["train", "test"]):
    """The labelled ``split`` of the dataset a feature net is trained on (digits, MNIST-5k, or the digits
    cut out of the 32x32 scenes)."""
    if dataset_name == "scenes":
        return scene_crops(split)
    return (load_digits if dataset_name == "digits" else load_mnist)(split)


def correct(net: FeatureNet, x: Tensor, labels: Tensor) -> Tensor:
    """1.0 where the classifier labels an image of ``x`` correctly, else 0.0 (float64, one per image)."""
    _, logits = net.features_and_logits(x)
    return (logits.argmax(1) == labels).double()


def evaluate_accuracy(net: FeatureNet, x: Tensor, labels: Tensor) -> float:
    """Fraction of ``x`` the classifier labels correctly."""
    return correct(net, x, labels).mean().item()


def train_feature_net(dataset_name: DatasetName, seed: int = 0, epochs: int | None = None,
                      progress: bool = False) -> FeatureNet:
    """Train a ``FeatureNet`` on the train split of ``dataset_name`` (digits, MNIST-5k or scene digits).

    AdamW with a one-cycle learning rate, cross-entropy, random shifts of up to 1 (digits) or 2
    (MNIST) pixels. Deterministic under ``seed``; the caller's global RNG state is left as it was.
    ``epochs`` defaults to the dataset's recipe. The returned net is in eval mode, with
    ``test_accuracy`` and ``train_seconds`` attributes.
    """
    config, recipe = feature_net_config(dataset_name), _RECIPES[dataset_name]
    epochs = recipe.epochs if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    train, test = feature_dataset(dataset_name, "train"), feature_dataset(dataset_name, "test")
    t0 = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureNet(config)
        gen = torch.Generator().manual_seed(seed)
        n = len(train)
        steps_per_epoch = -(-n // recipe.batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=epochs * steps_per_epoch)
        net.train()

        for _ in tqdm(range(epochs), desc=f"feature net ({dataset_name})", disable=not progress, unit="epoch"):
            order = torch.randperm(n, generator=gen)
            for idx in order.split(recipe.batch_size):
                xb = _random_shift(train.x[idx], recipe.max_shift, gen)
                loss = F.cross_entropy(net(xb), train.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval().requires_grad_(False)
    net.train_seconds = time.time() - t0
    net.test_accuracy = evaluate_accuracy(net, test.x, test.labels)
    return net


# -- the cache ------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$DIFFUSEKIT_CACHE/features`` when DIFFUSEKIT_CACHE is set, else ``~/.cache/diffusekit/features``."""
    root = os.environ.get("DIFFUSEKIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "diffusekit") / "features"


def cache_paths(dataset_name: DatasetName, cache_dir: str | Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(weights .safetensors, record .json) of one cached feature net."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = folder / f"featurenet-{dataset_name}-seed{seed}-v{FEATURE_NET_VERSION}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _read_cache(dataset_name: DatasetName, seed: int, st_path: Path, json_path: Path) -> FeatureNet:
    """Load and verify one cache entry; raises ValueError saying what is wrong."""
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
        blob = st_path.read_bytes()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot be read ({type(exc).__name__})") from None
    config = feature_net_config(dataset_name)
    expected = {"version": FEATURE_NET_VERSION, "dataset": dataset_name, "seed": seed,
                "config": json.loads(json.dumps(asdict(config)))}
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
        raise ValueError("record does not match this version, dataset, seed or architecture")
    if hashlib.sha256(blob).hexdigest() != record.get("sha256"):
        raise ValueError("weights do not match the recorded SHA-256 (truncated or corrupted)")
    try:
        tensors = st_load(blob)
        net = FeatureNet(config)
        net.load_state_dict(tensors, strict=True)
    except Exception as exc:  # any parse or shape failure means: retrain
        raise ValueError(f"weights do not load ({type(exc).__name__})") from None
    net.eval().requires_grad_(False)
    net.test_accuracy = float(record.get("test_accuracy", float("nan")))
    net.train_seconds = float(record.get("train_seconds", float("nan")))
    return net


def _write_cache(net: FeatureNet, dataset_name: DatasetName, seed: int, st_path: Path, json_path: Path) -> None:
    blob = st_save({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()})
    record = {"version": FEATURE_NET_VERSION, "dataset": dataset_name, "seed": seed, "config": asdict(net.config),
              "sha256": hashlib.sha256(blob).hexdigest(), "test_accuracy": net.test_accuracy,
              "train_seconds": net.train_seconds, "torch": torch.__version__}
    st_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(st_path, blob)  # weights first; the record (with their hash) commits them
    atomic_write_text(json_path, json.dumps(record, indent=1, sort_keys=True))


def load_feature_net(dataset_name: DatasetName, cache_dir: str | Path | None = None, seed: int = 0,
                     progress: bool = False) -> FeatureNet:
    """The cached feature net for ``dataset_name``; trains and caches it when missing.

    ``cache_dir`` defaults to ``default_cache_dir()``. A cache entry that does not load or verify
    (bad JSON, other version/architecture, hash mismatch, unreadable safetensors) is retrained with
    a warning; a cache folder that cannot be written is warned about and the net returned anyway.
    """
    feature_net_config(dataset_name)  # validates the name
    st_path, json_path = cache_paths(dataset_name, cache_dir, seed)
    if st_path.exists() or json_path.exists():
        try:
            return _read_cache(dataset_name, seed, st_path, json_path)
        except ValueError as exc:
            warnings.warn(f"{st_path}: cached feature network is unusable ({exc}); retraining", stacklevel=2)
    net = train_feature_net(dataset_name, seed=seed, progress=progress)
    try:
        _write_cache(net, dataset_name, seed, st_path, json_path)
    except OSError as exc:
        warnings.warn(f"{st_path.parent}: cannot cache the feature network ({exc})", stacklevel=2)
    return net
