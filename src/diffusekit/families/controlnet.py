"""The ControlNet family (``model.kind = "controlnet"``): hints, loss, loading, sampling, evaluation.

A trainable copy of the encoder of a frozen U-Net, joined to it through zero-initialised 1x1
convolutions (``nn.controlnet``; Zhang et al. 2023), learns to make samples follow a control image.
The frozen base is the EMA network of ``controlnet.base_run``, either

- a discrete-time ``model.kind = "unet"`` run (sampled with its null label, i.e. unconditionally), or
- a text-conditioned run on ``data.name = "scenes"``, in pixel space (``model.kind = "text_unet"``) or in
  an autoencoder's latent space (``model.kind = "latent_unet"``, Stable Diffusion's setting). The copy then
  includes the base's cross-attention, so the control branch reads the caption tokens as the locked
  model does (Zhang et al. 2023, sec. 3.2, Fig. 3). Over a latent base the hint stays an image-sized
  map computed from the image, and the hint encoder reaches the latents' resolution with log2 f stride-2
  convolutions (f = image size / latent size, a power of 2), as Zhang et al. encode 512x512
  hints for 64x64 latents (sec. 3.2). The training set's latents and hints are computed once when
  training starts (``encode_data``), and samples are decoded by the base's frozen autoencoder.

Its schedule and prediction kind are used as they were trained (the run's own ``[diffusion]`` and
``model.prediction`` are ignored, ``[model]``'s architecture keys too: the ControlNet copies the base).

Hints (``controlnet.hint``). The control image of an example is computed from the example itself, so
training needs no extra data; every hint is a deterministic function of the image, (B, C, H, W) ->
(B, 1, H, W), of its channel mean; ink = (x + 1) / 2 in [0, 1]:

- ``edges``: sqrt(G_x^2 + G_y^2) / 4, G = Sobel filters (borders replicated): a unit step reads 1.
  It pins down every stroke, so the prompt can change little but the texture.
- ``edges_lowres``: the same Sobel magnitude of the image average-pooled by ``controlnet.lowres_factor``
  (2 or 4), upsampled by nearest neighbour: the outline of the strokes at a coarse scale, so the stroke
  shape within each coarse cell is left to the model.
- ``skeleton``: scikit-image's ``skeletonize`` (Zhang and Suen 1984 thinning) of ink > 0.5: the 1-pixel
  centre line of the strokes. Stroke thickness, which the scene captions state, is left free.
- ``layout``: one filled square per blob of ink, at its frame: the ink pixels (ink > ``scenes.INK``) are
  split into 8-connected components, components with fewer than ``LAYOUT_MIN_PIXELS`` pixels are dropped
  (specks, stray fragments), and each remaining one becomes the square of side
  round(1.4 e) centred on its ink box, e = the ink box's longer side (MNIST scaled every digit's longer
  side to 20 of its 28 pixels, so the frame of a digit whose ink spans e pixels is 28 / 20 e), moved to
  lie inside the canvas as ``data.scenes`` places frames. On a scene this is one box per digit at its
  position and size (``scene_layout`` draws the true frames from the scene table: the test checks the two
  agree), and it says nothing of which digit, its thickness or slant: those come from the caption. On the
  first 1000 test scenes 94% get one box per digit; 5% get one box over two digits that touch (then the
  box spans both), 1% an extra box over a broken stroke. The same function reads a control image given at
  sample time, so training and sampling see one hint, with no table lookup.

The training loss is the base family's per-example denoising loss of ``ControlledUNet`` with control =
hint(x0) (Zhang et al. 2023, eq. 5); over a text base the caption features of each example come from the
text family's ``SceneCaptions`` with caption dropout ``train.class_dropout`` (Zhang et al. replace 50% of
the prompts by "" so the ControlNet learns to read the hint alone, sec. 3.3), drawn from the run's noise
generator in the text family's order (caption, then t, then noise), so at initialisation the loss is the
text base's loss exactly.

Sampling over a text base is prompted (sample i gets prompt i % P) and guided over the caption,
eps = eps(x, "", c) + s (eps(x, y, c) - eps(x, "", c)), with the control c in both branches, as the
released ControlNet code does by default: guidance then contrasts captions under one layout. (Zhang et
al. 2023, sec. 3.4, note that with an empty prompt this cancels the guidance and propose adding c to the
conditional branch only, with per-resolution weights; not done here.)

Measures (pure functions of tensors): ``hint_adherence`` scores samples against requested hints
(edges: correlation of the samples' hint with the request; skeleton: chamfer-like precision, recall and
F1 within ``SKELETON_TOLERANCE`` pixels; layout: the share of ink inside the boxes and of boxes holding a
located digit) and ``pairwise_diversity`` the spread of one request's samples over seeds. ``evaluate`` on a
text base reports them with the prompt adherence of ``data.scenes.adherence``, for the base alone (scale 0)
and with the control (scale 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from diffusekit import text as text_module
from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.images import read_image
from diffusekit.data.registry import load_dataset
from diffusekit.data.scenes import INK, adherence, locate_digits
from diffusekit.errors import ConfigError
from diffusekit.evaluate.features import load_feature_net
from diffusekit.families import diffusion, text_latent
from diffusekit.families.base import EvaluateSettings, Evaluation, Model, SampleRequest, Samples, load_run_dependency
from diffusekit.io.checkpoint import load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.latent.sampling import check_prompts, text_condition, text_guidance
from diffusekit.losses import diffusion_loss, sample_timesteps
from diffusekit.nn.controlnet import ControlledUNet, ControlNet
from diffusekit.parameterization import Denoiser
from diffusekit.sampling.generate import generate
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule
from diffusekit.viz import save_image_grid

__all__ = ["HINTS", "KIND", "ControlNetModel", "ControlObjective", "build_objective", "control_images",
           "controlled_samples", "edge_agreement", "edge_correlation", "evaluate", "evaluate_text", "hint_adherence",
           "hint_boxes", "hint_downsample", "ink_frames", "layout_adherence", "layout_map", "load", "lowres_edges", "make_hint",
           "pairwise_diversity", "sample", "scene_layout", "skeleton_agreement", "skeleton_map", "sobel_edges"]

KIND = "controlnet"
HINTS = ("edges", "edges_lowres", "skeleton", "layout")
LAYOUT_MIN_PIXELS = 8  # ink pixels a blob needs to get a box (fewer: a speck or a stray fragment)
SKELETON_TOLERANCE = 1  # pixels (Chebyshev) within which two skeleton pixels agree
SEEDS_PER_PROMPT = 4  # evaluate: samples of each (prompt, hint), for the diversity
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


# -- hints ----------------------------------------------------------------------------------------
def sobel_edges(x: Tensor) -> Tensor:
    """(B, C, H, W) images -> (B, 1, H, W) Sobel gradient magnitude of their channel mean, / 4
    (a unit step then reads 1 per unit of intensity change; borders are replicated)."""
    if x.ndim != 4:
        raise ValueError(f"sobel_edges expects images (B, C, H, W), got {tuple(x.shape)}")
    gray = F.pad(x.mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor(_SOBEL_X, dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(gray, kernels)
    return g.square().sum(dim=1, keepdim=True).sqrt() / 4


def lowres_edges(x: Tensor, factor: int = 4) -> Tensor:
    """``sobel_edges`` of ``x`` average-pooled by ``factor``, each value repeated over its factor x factor
    cell (nearest upsampling): (B, C, H, W) -> (B, 1, H, W); H and W must be multiples of ``factor``."""
    if x.ndim != 4:
        raise ValueError(f"lowres_edges expects images (B, C, H, W), got {tuple(x.shape)}")
    if factor < 1 or x.shape[2] % factor or x.shape[3] % factor:
        raise ConfigError(f"controlnet.lowres_factor = {factor} must divide the image size "
                          f"{x.shape[2]}x{x.shape[3]}")
    small = sobel_edges(F.avg_pool2d(x, factor))
    return small.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def _ink(x: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W) float64 ink in [0, 1] of the channel mean."""
    return ((x.detach().double().mean(dim=1) + 1) / 2).clamp(0, 1)


def skeleton_map(x: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 1, H, W): 1 on the skeleton (``skimage.morphology.skeletonize``) of
    ink > 0.5, a 1-pixel-wide centre line of every stroke, else 0."""
    if x.ndim != 4:
        raise ValueError(f"skeleton_map expects images (B, C, H, W), got {tuple(x.shape)}")
    try:
        from skimage.morphology import skeletonize  # optional (the photos extra)
    except ImportError:
        raise ConfigError("controlnet.hint = 'skeleton' thins strokes with scikit-image: "
                          "pip install 'diffusekit[photos]'") from None
    ink = _ink(x).cpu().numpy()
    out = np.stack([skeletonize(image > 0.5) for image in ink]).astype(np.float32)
    return torch.from_numpy(out)[:, None].to(x.device, x.dtype)


def ink_frames(ink: Tensor | np.ndarray, min_pixels: int = LAYOUT_MIN_PIXELS) -> list[tuple[int, int, int, int]]:
    """The frames of the blobs of ink of one image ``ink`` (H, W) in [0, 1], as (top, left, bottom, right)
    with bottom and right exclusive, in the order of their first pixel (see the module docstring)."""
    from scipy import ndimage  # heavy; scikit-learn's dependency

    ink = np.asarray(ink.detach().cpu().numpy() if isinstance(ink, Tensor) else ink, dtype=np.float64)
    if ink.ndim != 2:
        raise ValueError(f"ink_frames expects one image (H, W), got shape {ink.shape}")
    on = ink > INK
    if not on.any():
        return []
    labels, n = ndimage.label(on, structure=np.ones((3, 3), dtype=bool))
    H, W = ink.shape
    frames = []
    for k in range(1, n + 1):
        member = labels == k
        if member.sum() < min_pixels:
            continue
        rows, cols = np.flatnonzero(member.any(1)), np.flatnonzero(member.any(0))
        side = min(max(1, round(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * 28 / 20)), H, W)
        cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
        top = min(max(round(cy - side / 2), 0), H - side)
        left = min(max(round(cx - side / 2), 0), W - side)
        frames.append((int(top), int(left), int(top + side), int(left + side)))
    return frames


def _fill(boxes_per_image: Sequence[Sequence[tuple[int, int, int, int]]], H: int, W: int) -> Tensor:
    out = torch.zeros(len(boxes_per_image), 1, H, W)
    for i, boxes in enumerate(boxes_per_image):
        for top, left, bottom, right in boxes:
            out[i, 0, top:bottom, left:right] = 1.0
    return out


def layout_map(x: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 1, H, W): 1 inside the frame of every blob of ink (``ink_frames``)."""
    if x.ndim != 4:
        raise ValueError(f"layout_map expects images (B, C, H, W), got {tuple(x.shape)}")
    ink = _ink(x).cpu()
    return _fill([ink_frames(image) for image in ink], *x.shape[2:]).to(x.device, x.dtype)


def scene_layout(scenes: Sequence[Any], canvas: int) -> Tensor:
    """(N, 1, S, S): 1 inside the true frame of every digit of ``scenes`` (``data.scenes.Scene``), placed
    as ``data.scenes`` draws it (its centre and side, moved to lie inside the canvas)."""
    boxes = []
    for scene in scenes:
        mine = []
        for d in scene.digits:
            left = min(max(round(d.centre[0] - d.side / 2), 0), canvas - d.side)
            top = min(max(round(d.centre[1] - d.side / 2), 0), canvas - d.side)
            mine.append((top, left, top + d.side, left + d.side))
        boxes.append(mine)
    return _fill(boxes, canvas, canvas)


def hint_boxes(hint: Tensor) -> list[tuple[int, int, int, int]]:
    """The boxes of one layout map (H, W) (or (1, H, W)): the bounding boxes of the 8-connected components of
    hint > 0.5, as (top, left, bottom, right), bottom and right exclusive (overlapping boxes read as one)."""
    from scipy import ndimage  # heavy; scikit-learn's dependency

    h = hint.detach().cpu().numpy().squeeze(0) if hint.ndim == 3 else hint.detach().cpu().numpy()
    labels, _ = ndimage.label(h > 0.5, structure=np.ones((3, 3), dtype=bool))
    return [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labels) if s is not None]


def make_hint(kind: str, x: Tensor, lowres_factor: int = 4) -> Tensor:
    """The control image ``controlnet.hint`` derives from images ``x`` (B, C, H, W) in [-1, 1]: (B, 1, H, W)."""
    if kind == "edges":
        return sobel_edges(x)
    if kind == "edges_lowres":
        return lowres_edges(x, lowres_factor)
    if kind == "skeleton":
        return skeleton_map(x)
    if kind == "layout":
        return layout_map(x)
    raise ConfigError(f"controlnet.hint = {kind!r} is unknown; known: {', '.join(repr(h) for h in HINTS)}")


# -- measures -------------------------------------------------------------------------------------
def edge_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-example Pearson correlation of two stacks of maps (B, ...) -> (B,); 0 where one is constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def _check_pair(samples: Tensor, hint: Tensor, what: str) -> None:
    if samples.ndim != 4 or hint.ndim != 4 or hint.shape[1] != 1 or samples.shape[0] != hint.shape[0] \
            or samples.shape[2:] != hint.shape[2:]:
        raise ValueError(f"{what}: samples (B, C, H, W) and hints (B, 1, H, W) of the same B, H, W expected, got "
                         f"{tuple(samples.shape)} and {tuple(hint.shape)}")


def layout_adherence(samples: Tensor, hint: Tensor, min_pixels: int = LAYOUT_MIN_PIXELS) -> dict[str, Tensor]:
    """How samples (B, C, H, W) in [-1, 1] follow layout maps (B, 1, H, W), per example (B,) float64:

    - ``ink_inside``: the share of the samples' ink (intensity of the pixels with ink > ``scenes.INK``)
      that lies inside the boxes (hint > 0.5); 0 for a sample without ink;
    - ``boxes_filled``: the share of the boxes (``hint_boxes``) that hold a located digit: the sample's ink
      is split among the boxes by ``scenes.locate_digits`` started at their centres, and box j holds its
      digit when its part has at least ``min_pixels`` ink pixels and its ink-mass centre lies in the box
      (1 when the hint has no box)."""
    _check_pair(samples, hint, "layout_adherence")
    ink = _ink(samples).cpu()
    weight = torch.where(ink > INK, ink, torch.zeros_like(ink))
    inside = hint[:, 0].detach().cpu() > 0.5
    total = weight.sum(dim=(1, 2))
    ink_inside = torch.where(total > 0, (weight * inside).sum(dim=(1, 2)) / total.clamp_min(1e-300),
                             torch.zeros_like(total))
    H, W = ink.shape[1:]
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    filled = torch.ones(ink.shape[0], dtype=torch.float64)
    for i in range(ink.shape[0]):
        boxes = hint_boxes(hint[i])
        if not boxes:
            continue
        anchors = [((left + right - 1) / 2, (top + bottom - 1) / 2) for top, left, bottom, right in boxes]
        parts = locate_digits(ink[i], anchors)
        hits = 0
        for j, (top, left, bottom, right) in enumerate(boxes):
            part = torch.where(parts == j, weight[i], torch.zeros_like(weight[i]))
            mass = float(part.sum())
            if int((part > 0).sum()) < min_pixels or mass <= 0:
                continue
            cy, cx = float((part * yy).sum()) / mass, float((part * xx).sum()) / mass
            hits += int(top - 0.5 <= cy <= bottom - 0.5 and left - 0.5 <= cx <= right - 0.5)
        filled[i] = hits / len(boxes)
    return {"ink_inside": ink_inside, "boxes_filled": filled}


def skeleton_agreement(samples: Tensor, hint: Tensor, tolerance: int = SKELETON_TOLERANCE) -> dict[str, Tensor]:
    """Chamfer-like agreement of the samples' skeletons (``skeleton_map``) with skeleton hints (B, 1, H, W),
    per example (B,) float64: ``precision`` = the share of the sample's skeleton pixels within ``tolerance``
    pixels (Chebyshev) of the hint's, ``recall`` the converse, ``f1`` their harmonic mean. Two empty skeletons
    agree (1); one empty against one that is not scores 0."""
    _check_pair(samples, hint, "skeleton_agreement")
    mine = skeleton_map(samples)[:, 0].detach().cpu() > 0.5
    wanted = hint[:, 0].detach().cpu() > 0.5
    k = 2 * tolerance + 1

    def near(m: Tensor) -> Tensor:
        return F.max_pool2d(m.double()[:, None], k, stride=1, padding=tolerance)[:, 0] > 0

    def share(a: Tensor, b: Tensor) -> Tensor:  # the share of a's pixels near b's; empty a: 1 iff b is empty too
        n = a.sum(dim=(1, 2)).double()
        hit = (a & near(b)).sum(dim=(1, 2)).double()
        empty_b = ~b.flatten(1).any(1)
        return torch.where(n > 0, hit / n.clamp_min(1), empty_b.double())

    precision, recall = share(mine, wanted), share(wanted, mine)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300),
                     torch.zeros_like(precision))
    return {"f1": f1, "precision": precision, "recall": recall}


def hint_adherence(kind: str, samples: Tensor, hint: Tensor, lowres_factor: int = 4) -> dict[str, Tensor]:
    """How samples (B, C, H, W) follow hints of ``kind`` (B, 1, H, W): per-example scores (B,) by name
    (edges, edges_lowres: ``correlation`` of the samples' own hint with the request; skeleton:
    ``skeleton_agreement``; layout: ``layout_adherence``)."""
    if kind == "skeleton":
        return skeleton_agreement(samples, hint)
    if kind == "layout":
        return layout_adherence(samples, hint)
    _check_pair(samples, hint, "hint_adherence")
    mine = make_hint(kind, samples, lowres_factor)
    return {"correlation": edge_correlation(mine.cpu(), hint.cpu())}


def pairwise_diversity(groups: Tensor) -> Tensor:
    """(G, K, ...) samples, K >= 2 per group (one request under K seeds) -> (G,) float64: the mean L2 distance
    ||a - b|| over the K (K - 1) / 2 pairs of each group (0: the seed changes nothing)."""
    if groups.ndim < 2 or groups.shape[1] < 2:
        raise ValueError(f"pairwise_diversity needs groups (G, K, ...) with K >= 2, got {tuple(groups.shape)}")
    flat = groups.flatten(2).double()
    dist = torch.cdist(flat, flat)
    k = flat.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)
    return dist[:, upper].mean(dim=1)


def _mean_scores(scores: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v.double().mean()) for k, v in scores.items()}


# -- the base and the objective ---------------------------------------------------------------------
def _base_kind(rc: RunCheckpoint) -> bool:
    return (rc.kind == "unet" and rc.cfg.loss.objective == "discrete") or rc.kind in text_latent.KINDS


def _load_any(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> Model:
    loader = text_latent.load if rc.kind in text_latent.KINDS else diffusion.load
    return loader(rc, use_ema=use_ema, device=device)


def _load_base(cfg: Config, data_shape: tuple[int, ...] | None) -> Model:
    """The frozen base: the EMA weights of ``controlnet.base_run``, a discrete-time unet run or a text-conditioned
    (text_unet or latent_unet) run."""
    where = f"controlnet.base_run = {cfg.controlnet.base_run!r}"
    return load_run_dependency(cfg.controlnet.base_run, where,
                               "a discrete-time model.kind = 'unet' run or a model.kind = 'text_unet' or "
                               "'latent_unet' run", _base_kind, _load_any, data_shape, "the base models")


def hint_downsample(data_shape: tuple[int, ...], latent_shape: tuple[int, ...], where: str) -> int:
    """f = image size / latent size, the factor the hint encoder downsamples by (1 over a pixel base), or a
    one-line ``ConfigError`` naming ``where`` when the latents are not the images shrunk by a power of 2."""
    (h, w), (lh, lw) = tuple(data_shape[-2:]), tuple(latent_shape[-2:])
    f = h // lh if lh else 0
    if f < 1 or f & (f - 1) or (h, w) != (f * lh, f * lw):
        raise ConfigError(f"{where}: the base diffuses {lh}x{lw} latents of {h}x{w} images; a ControlNet's hint "
                          "encoder needs the images to be the latents enlarged by a power of 2")
    return f


class ControlObjective(diffusion.DiffusionObjective):
    """The denoising loss of the frozen base's family, for ``ControlledUNet`` with the hint of each example
    (and, over a text base, the caption features of its scene)."""

    heldout_bound = None  # a conditional model: no unconditional bound on the test split (train.bound_every)

    def __init__(self, cfg: Config, data_shape: tuple[int, ...]):
        if cfg.loss.objective != "discrete":
            raise ConfigError(f"model.kind = {KIND!r} trains the discrete-time loss; set loss.objective = 'discrete'")
        self.cfg, self.data_shape = cfg, tuple(data_shape)
        with torch.random.fork_rng(devices=[]):  # loading the base leaves the caller's RNG alone
            base = _load_base(cfg, self.data_shape)
        self.base_cfg, self.schedule, self.kind = base.cfg, base.schedule, base.cfg.model.prediction
        base_kind = base.cfg.model.kind
        self.text_base = base_kind in text_latent.KINDS
        self.latent = base_kind == text_latent.KIND
        net = base.denoiser.net.unet if self.text_base else base.denoiser.net
        where = f"controlnet.base_run = {cfg.controlnet.base_run!r}"
        if self.text_base:
            if base.cfg.data.name != "scenes":
                raise ConfigError(f"{where}: a {base_kind} base is supported on data.name = 'scenes' only, this one "
                                  f"was trained on {base.cfg.data.name!r}")
            if cfg.data.name != "scenes":
                raise ConfigError(f"data.name = {cfg.data.name!r}: the {base_kind} base of {where} was trained on "
                                  "scenes; set data.name = 'scenes'")
        self.codec = base.codec if self.latent else text_latent.PixelCodec(self.data_shape)
        self.latent_shape = tuple(self.codec.latent_shape)
        factor = hint_downsample(self.data_shape, self.latent_shape, where)
        self.module = ControlledUNet(net, ControlNet(net, hint_channels=1, hint_downsample=factor))
        self._captions = None

    @property
    def captions(self):
        """The training captions of the scenes (``text_latent.SceneCaptions``), encoded on first use."""
        if self._captions is None:
            with torch.random.fork_rng(devices=[]):
                self._captions = text_latent.SceneCaptions(self.cfg)
        return self._captions

    def hint(self, x: Tensor) -> Tensor:
        return make_hint(self.cfg.controlnet.hint, x, self.cfg.controlnet.lowres_factor)

    @property
    def encode_data(self):
        """Over a latent base: the trainer's ``encode_data`` (``encode_latents``); else None (the trainer hands
        ``loss`` the images, whose hints are made per batch)."""
        return self.encode_latents if self.latent else None

    @torch.no_grad()
    def encode_latents(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """Images (N, C, H, W) -> rows (N, D_z + H W): the frozen codec's scaled latents, flattened, then the hint
        of each image, flattened: computed once when training starts (``split_rows`` undoes it)."""
        rows = [torch.cat([self.codec.encode(xb).flatten(1), self.hint(xb).flatten(1)], dim=1)
                for xb in x.split(batch_size)]
        return torch.cat(rows)

    def split_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of ``encode_latents`` -> (latents (B, *latent_shape), hints (B, 1, H, W))."""
        d = math.prod(self.latent_shape)
        h, w = self.data_shape[-2:]
        if rows.ndim != 2 or rows.shape[1] != d + h * w:
            raise ValueError(f"a ControlNet over a latent base trains on rows of {d} latent and {h * w} hint values, "
                             f"got {tuple(rows.shape)}")
        return rows[:, :d].reshape(-1, *self.latent_shape), rows[:, d:].reshape(-1, 1, h, w)

    @torch.no_grad()
    def decode(self, z: Tensor, device: str | torch.device = "cpu") -> Tensor:
        """What the denoiser made -> images: the codec's decoding on the CPU over a latent base, ``z`` itself
        over a pixel one."""
        if not self.latent:
            return z
        codec = self.codec.to(device)
        return torch.cat([codec.decode(zb.to(device)).cpu() for zb in z.split(500)])

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """Per-example losses of a batch of images (of ``encode_latents`` rows over a latent base)."""
        if not self.text_base:
            return super().loss(module, x0, labels, generator, extra_cond={"control": self.hint(x0)})
        if labels is None:
            raise ValueError("a ControlNet over a text base needs the labels (scene indices) of the batch")
        z0, control = self.split_rows(x0) if self.latent else (x0, self.hint(x0))
        text = self.captions.features.lookup(self.captions.rows(labels, generator).to(z0.device))
        lc = self.cfg.loss
        t = sample_timesteps(z0.shape[0], self.schedule.T, generator, lc.t_sampling)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        return diffusion_loss(self.denoiser(module), z0, t, self.schedule, noise, lc.weighting,
                              cond={**text.as_cond(), "control": control}, gamma=lc.min_snr_gamma)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n samples (DDPM, <= 100 steps) asked for the hints of the first n test images (over a text base:
        prompted with their captions, guided with ``sample.guidance``)."""
        settings = diffusion.preview_settings(n, self.schedule.T)
        denoiser = self.denoiser(module).eval()
        if not self.text_base:
            with torch.random.fork_rng(devices=[]):
                x = load_dataset(self.cfg.data, "test").x[:n]
            return generate(denoiser, self.schedule, self.data_shape, settings, device=device, progress=False,
                            cond={"control": self.hint(x).to(device)})
        prompts, _, x, _ = text_latent.scene_prompts(self.cfg.data, n)
        z = _guided(denoiser, self.schedule, self.latent_shape, settings.replace(guidance=self.cfg.sample.guidance),
                    prompts, self.hint(x), None, device, False)
        return self.decode(z, device).to(device)


def build_objective(cfg: Config, data: ArrayDataset) -> ControlObjective:
    """The trainer's objective: a ControlNet over the base of ``controlnet.base_run`` for ``data``."""
    diffusion.check_class_labels(cfg, data)
    return ControlObjective(cfg, data.shape)


@dataclass
class ControlNetModel(Model):
    """A trained ControlNet over its frozen base: the controlled denoiser, the base's schedule, the module
    (whose ``scale`` multiplies the residuals) and the objective that rebuilds hints."""

    objective: ControlObjective | None = None
    denoiser: Denoiser | None = None
    schedule: DiscreteSchedule | None = None

    @property
    def text_base(self) -> bool:
        """Whether the base is text-conditioned (prompted, guided over the caption)."""
        return self.objective.text_base

    def hint(self, x: Tensor) -> Tensor:
        return self.objective.hint(x)

    def sample_dir_name(self, settings: SampleSettings) -> str:
        return f"samples-{settings.sampler}-{settings.steps or self.schedule.T}-control"


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> ControlNetModel:
    """A trained ControlNet run: the objective rebuilt from the recorded config (its base run must still
    exist), the weights from the newest checkpoint."""
    objective = ControlObjective(rc.cfg, rc.data_shape)
    load_module_state(objective.module, *rc.weights(use_ema))
    objective.module.to(device).eval()
    return ControlNetModel(rc.run_dir, rc.cfg, rc.data_shape, rc.levels, rc.step, rc.path,
                           objective=objective, denoiser=objective.denoiser(objective.module), schedule=objective.schedule)


# -- sampling -------------------------------------------------------------------------------------
def control_images(paths: list[Path], data_shape: tuple[int, ...]) -> Tensor:
    """Image files -> (n, C, H, W) in [-1, 1] at the run's size and channels, to take hints from. A file must
    be square and at least the run's size: a centre crop would cut boxes or strokes off the hint, and
    upsampling would blur a 1-pixel skeleton (larger images, such as drawings, are downsampled). A bad file
    is a one-line ``DataError`` naming it (``data.images.read_image``), a file of the wrong size a
    ``ConfigError`` naming it."""
    c, h, w = data_shape
    if h != w:
        raise ConfigError(f"--control-images needs a run on square images, this one has {h}x{w}")
    arrays = []
    for p in paths:
        arrays.append(read_image(p, h, c))  # checks the file first
        with Image.open(p) as img:
            width, height = img.size
        if width != height or width < w:
            raise ConfigError(f"--control-images: {p} is {width}x{height} pixels; a hint image must be square and at "
                              f"least this run's {w}x{h}")
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255 * 2 - 1)


def _guided(denoiser, schedule: DiscreteSchedule, shape: tuple[int, ...], settings: SampleSettings,
            prompts: Sequence[str], control: Tensor | None, encoder, device, progress: bool) -> Tensor:
    """Samples for ``settings.seeds`` (sample i: ``prompts[i % P]``, ``control[i]``), guided over the caption
    with scale ``settings.guidance``: the null branch gets "" and the same control (None: no control key)."""
    text, null = text_condition(encoder or text_module.load_text_encoder(), list(prompts), len(settings.seeds))
    cond = {**text.to(device).as_cond(), **({"control": control.to(device)} if control is not None else {})}
    guided = text_guidance(denoiser, settings.guidance, text, null)
    return generate(guided, schedule, shape, settings.replace(guidance=1.0, classes=None), device=device, cond=cond,
                    progress=progress)


def controlled_samples(model: ControlNetModel, prompts: Sequence[str], control: Tensor, settings: SampleSettings,
                       scale: float = 1.0, encoder=None, device: str | torch.device = "cpu",
                       progress: bool = False) -> Tensor:
    """Samples (len(seeds), *data_shape) of a ControlNet over a text base (decoded over a latent one, on the CPU):
    sample i is prompted with
    ``prompts[i % P]``, asked for ``control[i]`` (one hint per seed) and guided with ``settings.guidance``;
    ``scale`` multiplies the residuals, and scale 0 samples the base alone (without running the ControlNet:
    the same samples bit for bit). A sample depends on its seed, prompt and hint only."""
    if not model.text_base:
        raise ValueError(f"{model.source}: controlled_samples needs a ControlNet over a text-conditioned base")
    if isinstance(prompts, str) or not list(prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    n = len(settings.seeds)
    if control.shape[0] != n:
        raise ValueError(f"{control.shape[0]} control images for {n} seeds")
    prompts, objective = list(prompts), model.objective
    module, shape = objective.module, objective.latent_shape
    if scale == 0:
        denoiser = Denoiser(module.base, objective.kind)
        z = _guided(denoiser, model.schedule, shape, settings, prompts, None, encoder, device, progress)
        return objective.decode(z, device)
    before = module.scale
    module.scale = float(scale)
    try:
        z = _guided(model.denoiser, model.schedule, shape, settings, prompts, control, encoder, device, progress)
    finally:
        module.scale = before
    return objective.decode(z, device)


def _control_source(model: ControlNetModel, request: SampleRequest) -> tuple[Any, Tensor]:
    if request.control_images and request.control_from is not None:
        raise ConfigError("--control-images and --control-from are alternatives; give one")
    if request.control_images:
        return [str(p) for p in request.control_images], control_images(request.control_images, model.data_shape)
    source = request.control_from or "test"
    if source not in ("train", "test"):
        raise ConfigError(f"--control-from must be 'train' or 'test', got {source!r}")
    return source, load_dataset(model.cfg.data, source).x


def sample(model: ControlNetModel, settings: SampleSettings, request: SampleRequest,
           device: str | torch.device = "cpu", progress: bool = True) -> Samples:
    """Sample i asks for the hint of example seed_i (mod the split's size) of ``request.control_from``
    (default test), or of image i % n of ``request.control_images``; ``control_scale`` multiplies the
    residuals (0 = the base model). Over a text base sample i is prompted with ``request.prompts[i % P]``
    and guided with ``settings.guidance`` (the control in both branches). Notes how well the samples
    follow their hints (``hint_adherence``)."""
    scale = 1.0 if request.control_scale is None else request.control_scale
    if not (math.isfinite(scale) and 0 <= scale <= 100):
        raise ConfigError(f"--control-scale must be a finite number in [0, 100], got {scale}")
    if model.text_base and not request.prompts:
        raise ConfigError(f"--prompt: {model.source} is a ControlNet over a text-conditioned base; give at least one "
                          "--prompt (e.g. --prompt \"a large 3 on the left\"; --prompt \"\" samples without a caption)")
    if not model.text_base:
        if request.prompts:
            raise ConfigError(f"--prompt: {model.source} is a ControlNet over a model.kind = 'unet' base, which "
                              "takes no prompts")
        if settings.guidance != 1.0:
            raise ConfigError(f"--guidance: {model.source} is a ControlNet over a model.kind = 'unet' base (sampled "
                              "with its null label); guidance needs a text-conditioned base")
    source, data = _control_source(model, request)
    kind = model.cfg.controlnet.hint
    wanted = model.hint(data[torch.tensor(settings.seeds) % data.shape[0]])
    where = source if isinstance(source, str) else f"{len(source)} images"
    extra = {"control_from": source, "hint": kind, "control_scale": scale}
    if not model.text_base:
        model.objective.module.scale = float(scale)
        x = generate(model.denoiser, model.schedule, model.data_shape, settings, device=device, progress=progress,
                     cond={"control": wanted})
        corr = float(edge_correlation(model.hint(x), wanted).mean())
        note = f"mean correlation of their {kind} with the requested ones (from {where}): {corr:.3f}"
        return Samples(x, extra=extra, note=note)
    prompts = list(request.prompts)
    check_prompts(prompts)
    x = controlled_samples(model, prompts, wanted, settings, scale, device=device, progress=progress)
    scores = _mean_scores(hint_adherence(kind, x, wanted, model.cfg.controlnet.lowres_factor))
    note = (f"{len(prompts)} prompt{'s' * (len(prompts) > 1)}, guidance {settings.guidance:g}; {kind} adherence to "
            f"the requested hints (from {where}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return Samples(x, extra={"prompts": prompts, **extra}, nrow=diffusion.grid_columns(len(prompts)), note=note)


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def edge_agreement(model: ControlNetModel, settings: SampleSettings, n: int = 200,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Ask the ControlNet (over a unet base) for the hints of the first ``n`` test images; return the mean
    correlation between the hint of each sample and the requested hint ("controlnet"), the same for the base
    alone on the same seeds ("base"), and between the requested hints and those of the test images shifted
    by one ("chance": unrelated digits)."""
    x = load_dataset(model.cfg.data, "test").x[:n]
    wanted = model.hint(x)
    settings = settings.replace(seeds=list(range(x.shape[0])))
    model.objective.module.scale = 1.0
    ours = generate(model.denoiser, model.schedule, model.data_shape, settings, device=device, progress=False,
                    cond={"control": wanted.to(device)})
    base = generate(Denoiser(model.objective.module.base, model.objective.kind), model.schedule, model.data_shape,
                    settings, device=device, progress=False)
    def score(s: Tensor) -> float:
        return float(edge_correlation(model.hint(s), wanted).mean())

    return {"n": float(x.shape[0]), "controlnet": score(ours), "base": score(base),
            "chance": float(edge_correlation(wanted.roll(1, 0), wanted).mean())}


@torch.no_grad()
def evaluate_text(model: ControlNetModel, settings: SampleSettings, n_prompts: int = 50,
                  seeds_per_prompt: int = SEEDS_PER_PROMPT, encoder=None, device: str | torch.device = "cpu",
                  progress: bool = False, scales: Sequence[float] = (0.0, 1.0)) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A ControlNet over a text base on the first ``n_prompts`` test scenes: each is asked with its caption
    (every attribute stated, training wording) and the hint of its image, ``seeds_per_prompt`` times (sample
    j n + i: prompt i, seed j n + i), at each control scale of ``scales``: "base" is scale 0 (the base alone),
    "controlnet" scale 1, any other "scale <s>" (the same seeds at every scale: a --control-scale sweep). For each:
    prompt adherence (``data.scenes.adherence`` with the scenes' digit classifier), hint adherence (the means of
    ``hint_adherence``) and diversity (the mean over prompts of ``pairwise_diversity`` of its samples). The real
    test images are the reference ("real": their own hints, the ceiling; "chance": the hint of the next scene).
    Returns (results, {"base", "controlnet", "real", "hints"} tensors for pictures)."""
    if not model.text_base:
        raise ValueError(f"{model.source}: evaluate_text needs a ControlNet over a text-conditioned base")
    if n_prompts < 1 or seeds_per_prompt < 2:
        raise ValueError(f"n_prompts must be >= 1 and seeds_per_prompt >= 2, got {n_prompts} and {seeds_per_prompt}")
    kind, factor = model.cfg.controlnet.hint, model.cfg.controlnet.lowres_factor
    prompts, scenes, real, thresholds = text_latent.scene_prompts(model.cfg.data, n_prompts)
    n = len(prompts)
    hints = model.hint(real)
    classifier = load_feature_net("scenes")
    k = seeds_per_prompt
    plan = settings.replace(seeds=list(range(n * k)))
    asked_scenes, asked_hints = scenes * k, hints.repeat(k, 1, 1, 1)
    out: dict[str, Any] = {"run": str(model.source), "step": model.step, "hint": kind, "sampler": settings.sampler,
                           "steps": settings.steps or model.schedule.T, "guidance": settings.guidance, "prompts": n,
                           "seeds_per_prompt": k, "scene_classifier_test_accuracy": classifier.test_accuracy,
                           "examples": prompts[:8]}
    pictures = {"real": real, "hints": hints}
    for scale in scales:
        name = {0.0: "base", 1.0: "controlnet"}.get(float(scale), f"scale {float(scale):g}")
        x = controlled_samples(model, prompts, asked_hints, plan, scale, encoder, device, progress)
        pictures[name] = x
        out[name] = {"control_scale": float(scale),
                     "prompt_adherence": adherence(x, asked_scenes, thresholds, classifier),
                     "hint_adherence": _mean_scores(hint_adherence(kind, x, asked_hints, factor)),
                     "diversity": float(pairwise_diversity(x.reshape(k, n, *x.shape[1:]).transpose(0, 1)).mean())}
    out["real"] = {"prompt_adherence": adherence(real, scenes, thresholds, classifier),
                   "hint_adherence": _mean_scores(hint_adherence(kind, real, hints, factor))}
    out["chance"] = {"hint_adherence": _mean_scores(hint_adherence(kind, real, hints.roll(1, 0), factor))}
    return out, pictures


def _text_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, what in (("base", "base alone (scale 0)"), ("controlnet", "ControlNet (scale 1)"),
                       ("real", "real test scenes")):
        r = result[name]
        a = r["prompt_adherence"]
        rows.append((f"{what}: digit / position / size / thickness / slant",
                     " / ".join(f"{a[k]:.2f}" if a[k] is not None else "-"
                                for k in ("digit", "position", "size", "thickness", "slant"))))
        rows.append((f"{what}: all attributes right", f"{a['all_right']:.3f}"))
        rows.append((f"{what}: {result['hint']} adherence",
                     ", ".join(f"{k} {v:.3f}" for k, v in r["hint_adherence"].items())))
        if "diversity" in r:
            rows.append((f"{what}: diversity (mean pairwise L2, {result['seeds_per_prompt']} seeds)",
                         f"{r['diversity']:.3f}"))
    rows.append((f"unrelated hints (chance): {result['hint']} adherence",
                 ", ".join(f"{k} {v:.3f}" for k, v in result["chance"]["hint_adherence"].items())))
    return rows


def _hint_picture(pictures: dict[str, Tensor], n: int, k: int, rows: int, path: Path, levels: int | None) -> Path:
    """Rows of: the real test scene, its hint (white = 1), k samples of the base alone, k with the control."""
    shown = []
    for i in range(min(rows, n)):
        hint = (pictures["hints"][i].clamp(0, 1) * 2 - 1).expand_as(pictures["real"][i])
        shown += [pictures["real"][i], hint, *(pictures[name][j * n + i] for name in ("base", "controlnet")
                                                for j in range(k))]
    return save_image_grid(torch.stack(shown), path, nrow=2 + 2 * k, levels=levels)


def evaluate(model: ControlNetModel, settings: EvaluateSettings, out_dir: Path, progress: bool = True) -> Evaluation:
    """Over a unet base: how well samples follow requested hints (``edge_agreement``) on ``n_samples``
    (default 200) test images, with ``sampler`` (default ddim), ``steps`` (default 100) and ``grid``.
    Over a text base: ``evaluate_text`` on ``n_samples`` (default 50) test scenes, ``SEEDS_PER_PROMPT`` seeds
    each, with the run's ``[sample]`` settings (``--sampler``, ``--steps``, ``--guidance`` override them);
    writes a picture of the first six scenes."""
    if model.text_base:
        n = 50 if settings.n_samples is None else settings.n_samples
        sampling = SampleSettings.from_config(model.cfg.sample, key=settings.key, batch_size=250,
                                              **settings.sample_overrides())
        sampling.check(settings.key, T=model.schedule.T)
        result, pictures = evaluate_text(model, sampling, n_prompts=n, progress=progress)
        picture = _hint_picture(pictures, result["prompts"], SEEDS_PER_PROMPT, 6, out_dir / "controlnet.png",
                                model.levels)
        rows = [("run", str(model.source)), ("checkpoint step", str(model.step)),
                ("sampler", f"{result['sampler']}, {result['steps']} steps, guidance {result['guidance']:g}"),
                ("hint", result["hint"]),
                ("test scenes (prompt + hint)", f"{result['prompts']} x {SEEDS_PER_PROMPT} seeds"),
                ("scene digit classifier on real test digits", f"{result['scene_classifier_test_accuracy']:.3f}")]
        caption = (f"One row per test scene: the scene, its {result['hint']} hint, {SEEDS_PER_PROMPT} samples of the "
                   f"base alone, {SEEDS_PER_PROMPT} with the ControlNet; prompts: "
                   + "; ".join(repr(p) for p in result["examples"][:6]))
        return Evaluation(result, rows + _text_rows(result), {"hints": (picture.name, caption)})
    if settings.guidance is not None:
        raise ConfigError(f"--guidance: {model.source} is a ControlNet run (its base samples with the null label)")
    sampling = SampleSettings(sampler=settings.sampler or "ddim", steps=100 if settings.steps is None else settings.steps,
                              batch_size=200, **({"grid": settings.grid} if settings.grid is not None else {}))
    sampling.check(lambda f: f"--{f}", T=model.schedule.T)
    result = edge_agreement(model, sampling, n=settings.n_samples or 200)
    rows = [("run", str(model.source)), ("checkpoint step", str(model.step)),
            ("sampler", f"{sampling.sampler}, {sampling.steps} steps"), ("test images", f"{result['n']:.0f}"),
            ("edge correlation, ControlNet", f"{result['controlnet']:.4f}"),
            ("edge correlation, base alone", f"{result['base']:.4f}"),
            ("edge correlation, unrelated images (chance)", f"{result['chance']:.4f}")]
    return Evaluation({"run": str(model.source), "step": model.step, **result}, rows)
