"""Compositional scenes of MNIST-5k digits with captions (``data.name = "scenes"``).

A scene is a square canvas (``data.image_size``, 32 by default) holding one or two MNIST-5k digits. Each
digit has attributes that are known by construction or measured:

- **digit**: the MNIST label of the source image;
- **position**: one of nine anchors (``POSITIONS``: the centre, the four sides, the four corners), the
  centre of the digit's 28x28 frame after scaling, jittered by at most one pixel;
- **size**: the frame scaled to ``SIZES`` of the canvas side (small 13/32, large 19/32; at 10/32 a small
  digit keeps too little stroke detail to be read reliably when scaled back up);
- **thickness** and **slant**, measured on the placed digit (``measure_digit``): its ink cut out of the
  canvas and renormalized the way MNIST was made (ink box scaled to 20 pixels, centred by mass in 28x28);
  thickness = ink mass / skeleton length (the mean stroke width in pixels of the 28x28 frame), slant =
  -mu11 / mu02 of the ink's second moments (the horizontal shift per row; positive leans right). A
  digit is called thin or thick when its thickness lies in the lowest or highest third of the training
  digits, upright or slanted when |slant| lies in the lowest third or slant in the highest third; in
  between the attribute is not stated (``Thresholds``).

Two-digit scenes use the eight non-overlapping position pairs of ``PAIRS``. The training split never holds
a digit in its held-out (position, size) combination (``HELDOUT_COMBOS``: one per digit), so prompts asking
for one test whether the text encoder composes attributes it saw only apart.

Captions come from a grammar (``caption``) with synonyms and word orders, in two disjoint wordings:
"train" (what training draws from) and "heldout" (other synonyms and sentence frames, used only at test
time). Training states each attribute with probability 0.8 (so partial prompts are understood);
evaluation prompts state every attribute the scene has.

The label of a scene is its index in its split (``ArrayDataset.labels``, ``num_classes`` = the number of
scenes): the text family looks the scene's attributes up by it (``scene_table``). The same functions that
label the data score samples (``locate_digits``, ``adherence``), so real test scenes are the reference row.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.images import load_mnist
from diffusekit.errors import ConfigError

__all__ = [
    "ATTRIBUTES",
    "HELDOUT_COMBOS",
    "PAIRS",
    "POSITIONS",
    "SCENE_SIZES",
    "SIZES",
    "Digit",
    "Scene",
    "SceneTable",
    "Thresholds",
    "adherence",
    "caption",
    "load_scenes",
    "locate_digits",
    "make_scenes",
    "measure_digit",
    "normalize_crop",
    "scene_table",
]

Split = Literal["train", "test"]
Wording = Literal["train", "heldout"]

# (x, y) of each anchor as a fraction of the canvas side; y grows downwards
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "centre": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
POSITION_NAMES = tuple(POSITIONS)
SIZES: dict[str, float] = {"small": 13 / 32, "large": 19 / 32}  # side of the scaled 28x28 frame / canvas side
PAIRS = (("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left"),
         ("top left", "top right"), ("bottom left", "bottom right"), ("top left", "bottom left"),
         ("top right", "bottom right"))
# digit d is never shown at this (position, size) in training
HELDOUT_COMBOS: dict[int, tuple[str, str]] = {
    d: (POSITION_NAMES[(4 * d) % 9], "large" if d % 2 == 0 else "small") for d in range(10)}
ATTRIBUTES = ("digit", "position", "size", "thickness", "slant")
SCENE_SIZES = (32, 48)  # data.image_size of scenes (0 means 32)
P_ONE_DIGIT = 1 / 3  # the rest are two-digit scenes
INK = 0.3  # a pixel is ink when its intensity in [0, 1] exceeds this

# the grammar: word choices per wording; {a} is a digit phrase, {p} its position phrase
_WORDS: dict[Wording, dict[str, tuple[str, ...]]] = {
    "train": {"small": ("small", "little"), "large": ("large", "big"), "thin": ("thin",), "thick": ("thick", "bold"),
              "upright": ("upright", "straight"), "slanted": ("slanted", "tilted")},
    "heldout": {"small": ("tiny",), "large": ("huge",), "thin": ("skinny",), "thick": ("heavy",),
                "upright": ("vertical",), "slanted": ("leaning",)},
}
_PLACES: dict[Wording, dict[str, tuple[str, ...]]] = {
    "train": {"top left": ("in the top left", "at the top left"), "top": ("at the top", "in the top"),
              "top right": ("in the top right", "at the top right"), "left": ("on the left", "at the left"),
              "centre": ("in the centre", "in the center"), "right": ("on the right", "at the right"),
              "bottom left": ("in the bottom left", "at the bottom left"),
              "bottom": ("at the bottom", "in the bottom"),
              "bottom right": ("in the bottom right", "at the bottom right")},
    "heldout": {"top left": ("in the upper left corner",), "top": ("near the upper edge",),
                "top right": ("in the upper right corner",), "left": ("on the left side",),
                "centre": ("in the middle",), "right": ("on the right side",),
                "bottom left": ("in the lower left corner",), "bottom": ("near the lower edge",),
                "bottom right": ("in the lower right corner",)},
}
_FRAMES: dict[Wording, dict[int, tuple[str, ...]]] = {
    "train": {1: ("{a0} {p0}", "{p0}, {a0}"),
              2: ("{a0} {p0} and {a1} {p1}", "{a0} {p0}, {a1} {p1}", "{p0} {a0} and {p1} {a1}")},
    "heldout": {1: ("there is {a0} {p0}",), 2: ("there is {a0} {p0} as well as {a1} {p1}",)},
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Digit:
    """One placed digit: label, anchor name, size name, measured thickness and slant, and the pixel
    centre (x, y) and frame side it was drawn with."""

    label: int
    position: str
    size: str
    thickness: float
    slant: float
    centre: tuple[float, float] = (0.0, 0.0)
    side: int = 0


@dataclass(frozen=True)
class Scene:
    digits: tuple[Digit, ...]


@dataclass(frozen=True)
class Thresholds:
    """Terciles of the training digits' thickness and |slant| / slant, and the midpoints that score a sample."""

    thin: float  # thickness below: thin
    thick: float  # thickness above: thick
    upright: float  # |slant| below: upright
    slanted: float  # slant above: slanted

    def thickness_word(self, value: float) -> str | None:
        return "thin" if value < self.thin else "thick" if value > self.thick else None

    def slant_word(self, value: float) -> str | None:
        return "upright" if abs(value) < self.upright else "slanted" if value > self.slanted else None

    @property
    def thickness_mid(self) -> float:
        return (self.thin + self.thick) / 2

    @property
    def slant_mid(self) -> float:
        return (self.upright + self.slanted) / 2


@dataclass
class SceneTable:
    """The scenes of one split, their images and the thresholds of the training digits."""

    scenes: list[Scene]
    x: Tensor  # (N, 1, S, S) in [-1, 1], 8-bit levels
    thresholds: Thresholds
    size: int


# -- drawing --------------------------------------------------------------------------------------
def _frame_side(size: str, canvas: int) -> int:
    return max(4, round(SIZES[size] * canvas))


def _place(canvas: Tensor, ink28: Tensor, centre: tuple[float, float], side: int) -> None:
    """Max-composite the 28x28 ink image scaled to side x side, centred at ``centre`` (pixels), into ``canvas``."""
    small = F.interpolate(ink28[None, None].double(), size=(side, side), mode="bilinear", antialias=True,
                          align_corners=False)[0, 0].clamp(0, 1)
    S = canvas.shape[-1]
    left = min(max(round(centre[0] - side / 2), 0), S - side)
    top = min(max(round(centre[1] - side / 2), 0), S - side)
    region = canvas[top:top + side, left:left + side]
    torch.maximum(region, small.to(canvas.dtype), out=region)


def normalize_crop(ink: Tensor, mask: Tensor | None = None) -> Tensor:
    """The ink of ``ink`` (H, W) in [0, 1] (where ``mask`` is True) renormalized as MNIST was made: the box
    of its ink pixels scaled so its longer side is 20, centred by mass in a 28x28 frame. All zeros when
    there is no ink."""
    ink = ink.double()
    if mask is not None:
        ink = torch.where(mask, ink, torch.zeros_like(ink))
    on = ink > INK
    out = torch.zeros(28, 28, dtype=torch.float64)
    if not bool(on.any()):
        return out
    rows, cols = on.any(1).nonzero()[:, 0], on.any(0).nonzero()[:, 0]
    crop = ink[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(crop[None, None], size=(nh, nw), mode="bilinear", antialias=True,
                            align_corners=False)[0, 0].clamp(0, 1)
    mass = resized.sum()
    if not mass > 0:
        return out
    yy, xx = torch.meshgrid(torch.arange(nh, dtype=torch.float64), torch.arange(nw, dtype=torch.float64),
                            indexing="ij")
    cy, cx = float((resized * yy).sum() / mass), float((resized * xx).sum() / mass)
    top, left = round(13.5 - cy), round(13.5 - cx)
    top, left = min(max(top, 0), 28 - nh), min(max(left, 0), 28 - nw)
    out[top:top + nh, left:left + nw] = resized
    return out


def measure_digit(ink28: Tensor) -> tuple[float, float]:
    """(thickness, slant) of a renormalized 28x28 ink image: ink mass / skeleton length, and -mu11 / mu02."""
    try:
        from skimage.morphology import skeletonize  # optional (the photos extra)
    except ImportError:
        raise ConfigError("data.name = 'scenes' measures stroke thickness with scikit-image: "
                          "pip install 'diffusekit[photos]'") from None
    ink28 = ink28.double()
    mass = float(ink28.sum())
    if mass <= 0:
        return 0.0, 0.0
    skeleton = int(skeletonize((ink28 > 0.5).numpy()).sum())
    thickness = mass / max(skeleton, 1)
    yy, xx = torch.meshgrid(torch.arange(28, dtype=torch.float64), torch.arange(28, dtype=torch.float64),
                            indexing="ij")
    cy, cx = float((ink28 * yy).sum() / mass), float((ink28 * xx).sum() / mass)
    mu11 = float((ink28 * (xx - cx) * (yy - cy)).sum())
    mu02 = float((ink28 * (yy - cy) ** 2).sum())
    return thickness, (-mu11 / mu02 if mu02 > 0 else 0.0)


def _draw_scene(picks: Sequence[tuple[int, str, str, tuple[int, int]]], source: Tensor, labels: Tensor,
                canvas: int) -> tuple[Tensor, tuple[Digit, ...]]:
    """The canvas (S, S) ink and its digits, for (source index, position, size, jitter) picks."""
    ink = torch.zeros(canvas, canvas, dtype=torch.float64)
    digits = []
    for index, position, size, (jx, jy) in picks:
        side = _frame_side(size, canvas)
        fx, fy = POSITIONS[position]
        centre = (fx * canvas + jx, fy * canvas + jy)
        alone = torch.zeros_like(ink)
        ink28 = (source[index, 0].double() + 1) / 2
        _place(alone, ink28, centre, side)
        _place(ink, ink28, centre, side)
        thickness, slant = measure_digit(normalize_crop(alone))
        digits.append(Digit(int(labels[index]), position, size, thickness, slant, centre, side))
    return ink, tuple(digits)


def _quantize(ink: Tensor) -> Tensor:
    return (torch.round(ink.clamp(0, 1) * 255) / 255 * 2 - 1).to(torch.float32)


def make_scenes(source: ArrayDataset, n: int, seed: int, canvas: int = 32, exclude_heldout: bool = True,
                force_heldout: bool = False) -> tuple[Tensor, list[Scene]]:
    """``n`` scenes drawn from the digits of ``source`` (MNIST, 28x28) with numpy's generator seeded by
    ``seed``: images (n, 1, S, S) in [-1, 1] on 256 levels, and their digits. ``exclude_heldout`` redraws a
    digit that would land in its held-out (position, size); ``force_heldout`` puts the first digit of every
    scene there instead (the prompts of the held-out-combination test)."""
    if n < 1:
        raise ValueError(f"number of scenes must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    labels = source.labels
    by_label = [np.flatnonzero(labels.numpy() == d) for d in range(10)]
    images, scenes = [], []
    for _ in range(n):
        k = 1 if rng.random() < P_ONE_DIGIT else 2
        if k == 1:
            positions = [POSITION_NAMES[rng.integers(9)]]
        else:
            positions = list(PAIRS[rng.integers(len(PAIRS))])
            if rng.random() < 0.5:
                positions.reverse()
        picks = []
        for j, position in enumerate(positions):
            size = ("small", "large")[rng.integers(2)]
            index = int(rng.integers(len(labels)))
            if force_heldout and j == 0:
                d = int(rng.integers(10))
                position, size = HELDOUT_COMBOS[d]
                if k == 2:  # keep the pair non-overlapping: the partner sits opposite
                    positions[1] = _partner(position, rng)
                index = int(by_label[d][rng.integers(len(by_label[d]))])
            elif exclude_heldout:
                while HELDOUT_COMBOS[int(labels[index])] == (position, size):
                    index = int(rng.integers(len(labels)))
            jitter = (int(rng.integers(-1, 2)), int(rng.integers(-1, 2)))
            picks.append((index, position, size, jitter))
        ink, digits = _draw_scene(picks, source.x, labels, canvas)
        images.append(_quantize(ink))
        scenes.append(Scene(digits))
    return torch.stack(images)[:, None], scenes


def _partner(position: str, rng: np.random.Generator) -> str:
    options = [b if a == position else a for a, b in PAIRS if position in (a, b)]
    return options[rng.integers(len(options))] if options else ("right" if position != "right" else "left")


# -- captions -------------------------------------------------------------------------------------
def _digit_phrase(digit: Digit, wording: Wording, thresholds: Thresholds, rng: np.random.Generator,
                  p_state: float) -> str:
    words = _WORDS[wording]
    adjectives = []
    for attribute in ("size", "thickness", "slant"):
        value = (digit.size if attribute == "size" else thresholds.thickness_word(digit.thickness)
                 if attribute == "thickness" else thresholds.slant_word(digit.slant))
        if value is not None and rng.random() < p_state:
            choices = words[value]
            adjectives.append(choices[rng.integers(len(choices))])
    name = str(digit.label) if rng.random() < 0.5 else _NUMBER_WORDS[digit.label]
    return " ".join(["a", *adjectives, name])


def caption(scene: Scene, thresholds: Thresholds, wording: Wording = "train",
            rng: np.random.Generator | None = None, p_state: float = 1.0) -> str:
    """A caption of ``scene`` in ``wording`` ("train" or "heldout"), each of size, thickness and slant stated
    with probability ``p_state`` (when the digit has a stated value); choices drawn from ``rng`` (None:
    the first choice of each, deterministic)."""
    if wording not in _WORDS:
        raise ValueError(f"wording must be 'train' or 'heldout', got {wording!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    k = len(scene.digits)
    frames = _FRAMES[wording][k]
    parts = {}
    for j, digit in enumerate(scene.digits):
        parts[f"a{j}"] = _digit_phrase(digit, wording, thresholds, rng, p_state)
        places = _PLACES[wording][digit.position]
        parts[f"p{j}"] = places[rng.integers(len(places))]
    return frames[rng.integers(len(frames))].format(**parts)


# -- the splits -----------------------------------------------------------------------------------
def _split_seed(seed: int, split: str, what: int = 0) -> int:
    return int(np.random.SeedSequence([seed, {"train": 0, "test": 1}[split], what]).generate_state(1)[0])


def _thresholds(scenes: Sequence[Scene]) -> Thresholds:
    thickness = np.array([d.thickness for s in scenes for d in s.digits])
    slant = np.array([d.slant for s in scenes for d in s.digits])
    t = np.quantile(thickness, [1 / 3, 2 / 3])
    return Thresholds(float(t[0]), float(t[1]), float(np.quantile(np.abs(slant), 1 / 3)),
                      float(np.quantile(slant, 2 / 3)))


@functools.lru_cache(maxsize=4)
def scene_table(split: Split, n: int, seed: int = 0, canvas: int = 32) -> SceneTable:
    """The ``split`` scenes (``n`` of them) drawn from that split of MNIST-5k, with the thresholds of the
    training split's digits (the train split with ``n_train`` = 4000 scenes and the same seed and canvas)."""
    if canvas not in SCENE_SIZES:
        raise ConfigError(f"data.image_size = {canvas} is not a scene canvas; choose one of "
                          f"{', '.join(map(str, SCENE_SIZES))} (0 means 32)")
    x, scenes = make_scenes(load_mnist(split), n, _split_seed(seed, split), canvas)
    reference = scenes if split == "train" and n == THRESHOLD_SCENES else scene_table(
        "train", THRESHOLD_SCENES, seed, canvas).scenes
    return SceneTable(scenes, x, _thresholds(reference), canvas)


THRESHOLD_SCENES = 4000  # the training scenes whose digits set the thickness and slant terciles


def load_scenes(split: Split, n: int, seed: int = 0, canvas: int = 32) -> ArrayDataset:
    """The ``split`` scenes as a dataset; the label of a scene is its index (``scene_table`` has its digits)."""
    table = scene_table(split, n, seed, canvas)
    return ArrayDataset(table.x, torch.arange(n, dtype=torch.int64), levels=256, num_classes=n,
                        name=f"scenes{canvas}-{split}")


def scene_crops(split: Split, seed: int = 0, canvas: int = 32) -> ArrayDataset:
    """The digits of the ``split`` scenes (4000 train, 1000 test) cut out as ``adherence`` cuts samples
    (``locate_digits`` at the true anchors, ``normalize_crop``): (M, 1, 28, 28) in [-1, 1] with their digit
    labels, what the scenes' digit classifier (``evaluate.features``, dataset "scenes") learns and is tested on."""
    table = scene_table(split, THRESHOLD_SCENES if split == "train" else 1000, seed, canvas)
    ink = ((table.x[:, 0].double() + 1) / 2).clamp(0, 1)
    crops, labels = [], []
    for i, scene in enumerate(table.scenes):
        anchors = [(POSITIONS[d.position][0] * canvas, POSITIONS[d.position][1] * canvas) for d in scene.digits]
        parts = locate_digits(ink[i], anchors)
        for j, digit in enumerate(scene.digits):
            crops.append(normalize_crop(torch.where(parts == j, ink[i], torch.zeros_like(ink[i]))))
            labels.append(digit.label)
    x = (torch.stack(crops)[:, None] * 2 - 1).to(torch.float32)
    return ArrayDataset(x, torch.tensor(labels, dtype=torch.int64), levels=None, num_classes=10,
                        name=f"scene-digits-{split}")


def heldout_combo_scenes(n: int, seed: int = 0, canvas: int = 32) -> tuple[Tensor, list[Scene]]:
    """``n`` test scenes whose first digit sits in its held-out (position, size)."""
    return make_scenes(load_mnist("test"), n, _split_seed(seed, "test", 1), canvas, exclude_heldout=False,
                       force_heldout=True)


# -- scoring samples ------------------------------------------------------------------------------
def locate_digits(ink: Tensor, anchors: Sequence[tuple[float, float]], iterations: int = 10) -> Tensor:
    """Which digit each pixel of ``ink`` (H, W) in [0, 1] belongs to: ink-weighted k-means of the ink
    pixels' coordinates, k = len(anchors), started at the anchors (pixels), and each cluster matched to the
    anchor it ends nearest (all assignments of k <= 3 tried). Returns (H, W) int64: cluster j (the digit
    asked at anchor j) or -1 (no ink)."""
    H, W = ink.shape
    on = ink > INK
    labels = torch.full((H, W), -1, dtype=torch.int64)
    if not bool(on.any()):
        return labels
    ys, xs = on.nonzero(as_tuple=True)
    points = torch.stack([xs, ys], 1).double()
    weight = ink[ys, xs].double()
    centres = torch.tensor(anchors, dtype=torch.float64)
    assign = torch.zeros(len(points), dtype=torch.int64)
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        for j in range(len(centres)):
            w = weight * (assign == j)
            if w.sum() > 0:
                centres[j] = (points * w[:, None]).sum(0) / w.sum()
    k = len(anchors)
    target = torch.tensor(anchors, dtype=torch.float64)
    best = min(itertools.permutations(range(k)),
               key=lambda perm: sum(float((centres[perm[j]] - target[j]).norm()) for j in range(k)))
    remap = torch.empty(k, dtype=torch.int64)
    for j, cluster in enumerate(best):
        remap[cluster] = j
    labels[ys, xs] = remap[assign]
    return labels


def _nearest_position(centre: tuple[float, float], canvas: int, allowed: Sequence[str] = POSITION_NAMES) -> str:
    return min(allowed, key=lambda p: (POSITIONS[p][0] * canvas - centre[0]) ** 2
               + (POSITIONS[p][1] * canvas - centre[1]) ** 2)


def _size_threshold(canvas: int) -> float:
    """Ink extent (the longer side of the ink box) between a small and a large digit: the midpoint of their
    frames' 20/28 ink boxes (MNIST scaled each digit's longer side to 20 of 28 pixels)."""
    return (_frame_side("small", canvas) + _frame_side("large", canvas)) / 2 * 20 / 28


def adherence(images: Tensor, scenes: Sequence[Scene], thresholds: Thresholds, classifier) -> dict[str, Any]:
    """Score images (N, 1, S, S) in [-1, 1] against the scenes they were prompted with.

    Each image's ink is split among the prompt's digits (``locate_digits``, started at the asked
    anchors); each part is measured as the data was: its ink-mass centre's nearest anchor (position), its
    ink extent against the small/large midpoint (size), the class ``classifier`` (an MNIST classifier
    on 28x28 in [-1, 1]) gives its renormalized crop (digit), and its thickness and slant against the
    midpoints of the stated categories. Only attributes the prompt states are scored. Returns the rate of
    each attribute, ``all_right`` (every stated attribute of every digit right), and the same per number of
    digits in the scene (``by_digits``)."""
    if images.shape[0] != len(scenes):
        raise ValueError(f"{images.shape[0]} images for {len(scenes)} scenes")
    canvas = images.shape[-1]
    size_cut = _size_threshold(canvas)
    ink = ((images[:, 0].double() + 1) / 2).clamp(0, 1)
    crops, owners = [], []
    checks: list[dict[str, bool]] = []
    for i, scene in enumerate(scenes):
        anchors = [(POSITIONS[d.position][0] * canvas, POSITIONS[d.position][1] * canvas) for d in scene.digits]
        parts = locate_digits(ink[i], anchors)
        for j, digit in enumerate(scene.digits):
            mask = parts == j
            part = torch.where(mask, ink[i], torch.zeros_like(ink[i]))
            check: dict[str, bool] = {}
            mass = float(part.sum())
            if mass > 0 and bool((part > INK).any()):
                yy, xx = torch.meshgrid(torch.arange(canvas, dtype=torch.float64),
                                        torch.arange(canvas, dtype=torch.float64), indexing="ij")
                centre = (float((part * xx).sum() / mass), float((part * yy).sum() / mass))
                check["position"] = _nearest_position(centre, canvas) == digit.position
                on = part > INK
                rows, cols = on.any(1).nonzero()[:, 0], on.any(0).nonzero()[:, 0]
                extent = max(int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))
                check["size"] = (extent > size_cut) == (digit.size == "large")
                crop = normalize_crop(part)
                thickness, slant = measure_digit(crop)
            else:
                check["position"] = check["size"] = False
                crop, thickness, slant = torch.zeros(28, 28, dtype=torch.float64), 0.0, 0.0
            stated_thickness = thresholds.thickness_word(digit.thickness)
            if stated_thickness is not None:
                check["thickness"] = (thickness > thresholds.thickness_mid) == (stated_thickness == "thick")
            stated_slant = thresholds.slant_word(digit.slant)
            if stated_slant is not None:
                check["slant"] = (slant > thresholds.slant_mid) == (stated_slant == "slanted")
            crops.append(crop)
            owners.append((i, j))
            checks.append(check)
    with torch.no_grad():
        x28 = torch.stack(crops).float()[:, None] * 2 - 1
        predicted = classifier(x28).argmax(1)
    for (i, j), check, p in zip(owners, checks, predicted.tolist()):
        check["digit"] = p == scenes[i].digits[j].label
    return _rates(scenes, owners, checks)


def _rates(scenes: Sequence[Scene], owners, checks) -> dict[str, Any]:
    def summary(select) -> dict[str, Any]:
        chosen = [c for (i, _), c in zip(owners, checks) if select(i)]
        out: dict[str, Any] = {}
        for a in ATTRIBUTES:
            values = [c[a] for c in chosen if a in c]
            out[a] = float(np.mean(values)) if values else None
            out[f"{a}_n"] = len(values)
        per_scene: dict[int, bool] = {}
        for (i, _), c in zip(owners, checks):
            if select(i):
                per_scene[i] = per_scene.get(i, True) and all(c.values())
        out["all_right"] = float(np.mean(list(per_scene.values()))) if per_scene else None
        out["n_scenes"] = len(per_scene)
        return out

    result = summary(lambda i: True)
    result["by_digits"] = {str(k): summary(lambda i, k=k: len(scenes[i].digits) == k) for k in (1, 2)}
    return result
