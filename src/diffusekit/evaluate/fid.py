"""FID (Heusel et al., 2017) with Inception-v3 weights the user supplies as a local file.

No weights can be downloaded here. ``InceptionV3FID`` is the network of pytorch-fid
(mseitzer/pytorch-fid, ``fid_inception_v3``): torchvision's Inception-v3 layout with 1008 classes,
no auxiliary head, and the "FIDInceptionA/C/E" patches that mimic TensorFlow's graph (average pools
that do not count padding; max pooling in the last block). Its parameter names match pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``, so that file, or a safetensors conversion of it, loads
with ``strict=True``. ``forward`` returns the 2048-d pool3 features of images resized to 299x299
(bilinear) with values in [-1, 1]; grayscale images are repeated to three channels.

``compute_fid`` takes any feature function, so the same code scores samples in the project's own
feature space (see ``quality.py``) or with a small network built in a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from diffusekit.errors import CheckpointError
from diffusekit.evaluate.quality import feature_stats, frechet_distance

__all__ = ["InceptionV3FID", "load_inception", "fid_from_features", "compute_fid", "FID_WEIGHTS_HINT"]

FID_WEIGHTS_HINT = ("download pt_inception-2015-12-05-6726825d.pth from https://github.com/mseitzer/pytorch-fid/"
                    "releases (tag fid_weights) on a machine with internet, optionally convert it with "
                    "safetensors.torch.save_file(torch.load(p, weights_only=True), 'inception.safetensors'), "
                    "and pass its path")


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, as in torchvision and TensorFlow's Inception."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    """3x3 average pool that ignores padding (TensorFlow's; the FID patch of pytorch-fid)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (pytorch-fid FIDInceptionA): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (torchvision InceptionB, unpatched)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (pytorch-fid FIDInceptionC)."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for i in range(1, 6):
            d7 = getattr(self, f"branch7x7dbl_{i}")(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (torchvision InceptionD, unpatched)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks; ``pool="avg"`` is FIDInceptionE_1 (Mixed_7b),
    ``pool="max"`` is FIDInceptionE_2 (Mixed_7c: TensorFlow's graph max-pools here)."""

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 (pytorch-fid's ``fid_inception_v3``): images -> 2048-d pool3 features.

    Input (N, 1 or 3, H, W) with values in [-1, 1]; resized to 299x299 (bilinear,
    align_corners=False) unless already that size. ``fc`` (2048 -> 1008) is kept only so that the
    original state dict loads strictly; ``logits`` uses it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, C, H, W) in [-1, 1], C in {1, 3} -> pool3 features (N, 2048)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionV3FID expects images (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.to(self.fc.weight.dtype).expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def logits(self, x: Tensor) -> Tensor:
        """The 1008-way ImageNet logits of the original graph (not used by FID)."""
        return self.fc(self(x))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError("not a flat state dict of tensors")
        return state
    raise ValueError(f"unknown suffix {path.suffix!r} (use .safetensors, .pth or .pt)")


def load_inception(path: str | Path) -> InceptionV3FID:
    """An ``InceptionV3FID`` with the weights in ``path`` (.safetensors preferred; .pth/.pt are read
    with ``torch.load(weights_only=True)``), in eval mode without gradients.

    Raises ``CheckpointError`` naming the file when it is missing (saying how to get the weights),
    unreadable, or its keys or shapes do not fit the network (BatchNorm ``num_batches_tracked``
    counters, absent from old files, are not required).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: Inception weights not found; {FID_WEIGHTS_HINT}")
    try:
        state = _read_state_dict(path)
    except Exception as exc:  # safetensors, pickle-safety and format errors all mean: unusable file
        raise CheckpointError(f"{path}: cannot read Inception weights ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    model = InceptionV3FID()
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{path}: not FID Inception-v3 weights: {'; '.join(parts)}")
    for k, v in expected.items():
        if k.endswith("num_batches_tracked"):
            state[k] = v
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def fid_from_features(f1: Tensor | np.ndarray, f2: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D) (FID when
    the features are Inception pool3 features; Heusel et al., 2017)."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def _features(images: Tensor, feature_fn: Callable[[Tensor], Tensor], batch_size: int) -> np.ndarray:
    with torch.no_grad():
        out = [feature_fn(chunk).detach().to("cpu", torch.float64).reshape(chunk.shape[0], -1)
               for chunk in images.split(batch_size)]
    return torch.cat(out).numpy()


def compute_fid(samples: Tensor, reference: Tensor, feature_fn: Callable[[Tensor], Tensor],
                batch_size: int = 64) -> float:
    """FID between two image sets, with features from ``feature_fn`` (images -> (B, D)), computed
    in batches of ``batch_size`` without gradients, e.g. ``compute_fid(x, ref, load_inception(p))``.

    FID is biased upwards for small sets: compare numbers computed on equally many images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return fid_from_features(_features(samples, feature_fn, batch_size), _features(reference, feature_fn, batch_size))
