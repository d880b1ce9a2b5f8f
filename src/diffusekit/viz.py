"""Pictures: sample grids, 2-D scatters, loss curves and reverse-process strips.

Everything writes PNGs atomically (a temporary file in the same folder, then ``os.replace``), so a
reader never sees half a picture. Images are tensors in [-1, 1] (the data range); ``levels`` is the
number of gray levels of the data (17 for sklearn digits, 256 for 8-bit images), used to quantize
exactly as the data was. matplotlib is imported lazily, with its object API and the Agg canvas
(no pyplot state, no display needed).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from diffusekit.io.atomic import atomic_write_bytes

__all__ = [
    "to_uint8",
    "image_grid",
    "png_bytes",
    "save_image_grid",
    "save_scatter",
    "save_samples_figure",
    "plot_loss_curve",
    "plot_bound_curve",
    "save_trajectory_strip",
]

PAD_GRAY = 128  # grid separators: visible against both black and white backgrounds
MIN_TILE_PX = 32
STRIP_TILE_PX = 48


def _write_png(path: Path | str, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def to_uint8(x: Tensor | np.ndarray, levels: int | None = None) -> np.ndarray:
    """Map data in [-1, 1] to 0..255 (same shape), first snapping to the data's ``levels`` values."""
    u = (np.clip(_numpy(x), -1.0, 1.0) + 1.0) / 2.0
    if levels is not None:
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        u = np.round(u * (levels - 1)) / (levels - 1)
    return np.round(u * 255.0).astype(np.uint8)


def _as_images(x: Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) float array; accepts (N, H, W) and (C, H, W) with C in {1, 3} as a single image."""
    a = _numpy(x)
    if a.ndim == 3:
        a = a[None] if a.shape[0] in (1, 3) else a[:, None]
    if a.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(a.shape)}")
    if a.shape[1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got {a.shape[1]}")
    return a


def image_grid(x: Tensor | np.ndarray, nrow: int | None = None, pad: int = 1, upscale: int | None = None,
               levels: int | None = None) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image, ``nrow`` images per row.

    ``upscale=None`` enlarges small images by an integer factor (nearest neighbour, so pixels stay
    crisp) until a tile is at least 32 px; ``pad`` gray pixels separate the tiles.
    """
    a = to_uint8(_as_images(x), levels)
    n, c, h, w = a.shape
    if upscale is None:
        upscale = max(1, math.ceil(MIN_TILE_PX / max(h, w)))
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    a = a.repeat(upscale, axis=2).repeat(upscale, axis=3)
    h, w = h * upscale, w * upscale
    ncol = nrow or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), PAD_GRAY, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = a[k].transpose(1, 2, 0)
    return Image.fromarray(grid[..., 0] if c == 1 else grid)  # mode L or RGB


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_image_grid(x: Tensor | np.ndarray, path: Path | str, nrow: int | None = None,
                    levels: int | None = None) -> Path:
    """``image_grid`` written to ``path``."""
    return _write_png(path, png_bytes(image_grid(x, nrow=nrow, levels=levels)))


# -- matplotlib figures -------------------------------------------------------------------------
def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib costs ~1 s to import: on use
    from matplotlib.figure import Figure  # matplotlib, imported on use

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save_figure(fig, path: Path | str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _write_png(path, buf.getvalue())


def _limits(*arrays: np.ndarray | None) -> tuple[float, float, float, float]:
    pts = np.concatenate([a for a in arrays if a is not None and len(a)], axis=0)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        return -1.0, 1.0, -1.0, 1.0
    lo, hi = np.quantile(pts, 0.002, axis=0), np.quantile(pts, 0.998, axis=0)
    margin = 0.1 * np.maximum(hi - lo, 1e-3)
    return lo[0] - margin[0], hi[0] + margin[0], lo[1] - margin[1], hi[1] + margin[1]


def _scatter(ax, pts: np.ndarray, reference: np.ndarray | None, lims, title: str | None) -> None:
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=3, c="0.75", alpha=0.6, linewidths=0, label="data")
    ax.scatter(pts[:, 0], pts[:, 1], s=4, c="tab:blue", alpha=0.8, linewidths=0, label="samples")
    ax.set_xlim(lims[0], lims[1])
    ax.set_ylim(lims[2], lims[3])
    ax.set_aspect("equal", adjustable="box")
    if title:
        ax.set_title(title, fontsize=9)


def _points(x: Tensor | np.ndarray | None, name: str) -> np.ndarray | None:
    if x is None:
        return None
    a = _numpy(x)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must be (N, 2) points, got shape {tuple(a.shape)}")
    return a


def save_scatter(x: Tensor | np.ndarray, path: Path | str, reference: Tensor | np.ndarray | None = None,
                 title: str | None = None) -> Path:
    """Scatter of (N, 2) samples, over a (M, 2) reference sample in gray if given."""
    pts, ref = _points(x, "x"), _points(reference, "reference")
    fig, axes = _figure()
    _scatter(axes[0, 0], pts, ref, _limits(pts, ref), title)
    if ref is not None:
        axes[0, 0].legend(loc="upper right", fontsize=7, markerscale=3)
    return _save_figure(fig, path)


def _save_histograms(x: np.ndarray, path: Path | str, reference: np.ndarray | None, dims: int = 4) -> Path:
    d = min(x.shape[1], dims)
    fig, axes = _figure(1, d, size=(3.0 * d, 3.0))
    for k in range(d):
        ax = axes[0, k]
        col = x[:, k][np.isfinite(x[:, k])]
        bins = np.histogram_bin_edges(np.concatenate([col, reference[:, k]]) if reference is not None else col,
                                      bins=40)
        if reference is not None:
            ax.hist(reference[:, k], bins=bins, density=True, color="0.75", label="data")
        ax.hist(col, bins=bins, density=True, histtype="step", color="tab:blue", label="samples")
        ax.set_title(f"dim {k}", fontsize=9)
    if reference is not None:
        axes[0, 0].legend(fontsize=7)
    return _save_figure(fig, path)


def save_samples_figure(x: Tensor | np.ndarray, path: Path | str, levels: int | None = None,
                        reference: Tensor | np.ndarray | None = None, nrow: int | None = None) -> Path:
    """The right picture for the data's shape: (N, C, H, W) or (N, H, W) images -> a grid (``nrow``
    per row; class-conditional samples cycling through K classes use nrow = K, one class per column);
    (N, 2) points -> a scatter over ``reference``; other vectors -> histograms of the first dims."""
    a = _numpy(x)
    if a.ndim in (3, 4):
        return save_image_grid(a, path, nrow=nrow, levels=levels)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"cannot picture samples of shape {tuple(a.shape)}")
    ref = None if reference is None else _numpy(reference).reshape(len(reference), -1)
    if a.shape[1] == 2:
        return save_scatter(a, path, reference=ref)
    return _save_histograms(a, path, ref)


def _smooth(y: np.ndarray, frac: float = 0.05) -> np.ndarray:
    """Debiased exponential moving average with a time constant of ``frac`` of the curve."""
    beta = 1.0 - 1.0 / max(1.0, frac * len(y))
    out, acc = np.empty_like(y), 0.0
    for k, v in enumerate(y):
        acc = beta * acc + (1 - beta) * v
        out[k] = acc / (1 - beta ** (k + 1)) if beta > 0 else v
    return out


def plot_loss_curve(steps: Sequence[float], losses: Sequence[float], path: Path | str,
                    ema_losses: Sequence[float] | None = None, title: str | None = None) -> Path:
    """Training loss against step: raw values faint, a smoothed line bold, log-scale y when all
    values are positive; ``ema_losses`` (e.g. the EMA model's loss) as a second line."""
    s, y = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} steps for {len(y)} losses")
    ok = np.isfinite(s) & np.isfinite(y)
    s, y = s[ok], y[ok]
    fig, axes = _figure(size=(6.0, 4.0))
    ax = axes[0, 0]
    if len(y):
        ax.plot(s, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(s, _smooth(y), color="tab:blue", linewidth=1.8, label="smoothed")
    if ema_losses is not None:
        if len(ema_losses) != len(ok):
            raise ValueError(f"{len(ema_losses)} EMA losses for {len(ok)} steps")
        ax.plot(s, np.asarray(ema_losses, dtype=np.float64)[ok], color="tab:orange", linewidth=1.5,
                label="EMA model")
    if len(y) and (y > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    if len(y):
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or "training loss", fontsize=10)
    return _save_figure(fig, path)


def plot_bound_curve(bounds: Sequence[dict], log: Sequence[dict], path: Path | str, title: str | None = None) -> Path:
    """Two panels along training: the held-out bound in bits/dim with ±2 standard errors (``bounds``: records
    with step, bits_per_dim, stderr_bits_per_dim and cpu_s), on a CPU-seconds axis above the step axis, and
    ``loss_std``, the spread of the per-example losses within a batch (``log``: the records of log.jsonl)."""
    fig, axes = _figure(1, 2, size=(10.0, 3.8))
    ax, ax2 = axes[0, 0], axes[0, 1]
    b = [r for r in bounds if all(isinstance(r.get(k), (int, float)) for k in ("step", "bits_per_dim"))]
    if b:
        steps = np.array([r["step"] for r in b], dtype=np.float64)
        bpd = np.array([r["bits_per_dim"] for r in b], dtype=np.float64)
        se = np.array([r.get("stderr_bits_per_dim") or 0.0 for r in b], dtype=np.float64)
        ax.errorbar(steps, bpd, yerr=2 * se, color="tab:green", marker="o", markersize=3, linewidth=1.5, capsize=2,
                    label=f"held-out bound ({b[-1].get('n_examples', '?')} images)")
        ax.annotate(f"{bpd[-1]:.3f}", (steps[-1], bpd[-1]), textcoords="offset points", xytext=(-10, 6), fontsize=8)
        cpu = [r.get("cpu_s") for r in b]
        if all(isinstance(c, (int, float)) for c in cpu) and len(b) > 1 and steps[-1] > steps[0]:
            rate = (cpu[-1] - cpu[0]) / (steps[-1] - steps[0])  # CPU seconds per step, for the top axis
            offset = cpu[0] - rate * steps[0]
            if rate > 0:
                top = ax.secondary_xaxis("top", functions=(lambda s: offset + rate * s, lambda c: (c - offset) / rate))
                top.set_xlabel("training CPU seconds", fontsize=8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no bound yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "held-out bound (±2 SE)", fontsize=10)
    rows = [r for r in log if isinstance(r.get("loss_std"), (int, float)) and isinstance(r.get("step"), (int, float))]
    if rows:
        y = np.array([r["loss_std"] for r in rows], dtype=np.float64)
        ax2.plot([r["step"] for r in rows], y, color="tab:purple", linewidth=1.2)
        if (y > 0).all():
            ax2.set_yscale("log")
    else:
        ax2.text(0.5, 0.5, "no loss_std logged", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss_std")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.set_title("spread of the per-example losses in a batch", fontsize=10)
    return _save_figure(fig, path)


def save_trajectory_strip(frames: Sequence[Tensor | np.ndarray], path: Path | str,
                          labels: Sequence[str] | None = None,
                          x0_frames: Sequence[Tensor | np.ndarray] | None = None) -> Path:
    """The reverse process as a strip: columns are time (noisiest first), rows are samples.

    ``frames`` are x_t snapshots, each (N, C, H, W) images or (N, 2) points (e.g. from
    ``sampling.TrajectoryRecorder``); ``x0_frames`` (same shapes) adds each sample's predicted x0
    in the row below its x_t. For points every column is one scatter of all N samples.
    """
    if not frames:
        raise ValueError("save_trajectory_strip needs at least one frame")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"{len(labels)} labels for {len(frames)} frames")
    if x0_frames is not None and len(x0_frames) != len(frames):
        raise ValueError(f"{len(x0_frames)} x0 frames for {len(frames)} frames")
    first = _numpy(frames[0])
    if first.ndim == 2:
        return _trajectory_points(frames, path, labels, x0_frames)
    rows = [np.stack([_as_images(f) for f in frames], axis=1)]  # (N, F, C, H, W)
    if x0_frames is not None:
        rows.append(np.stack([_as_images(f) for f in x0_frames], axis=1))
    tiles = np.stack(rows, axis=1)  # (N, R, F, C, H, W), R = 1 or 2
    n, r, f = tiles.shape[:3]
    h, w = tiles.shape[-2:]
    upscale = max(1, math.ceil(STRIP_TILE_PX / max(h, w)))  # room for a label above each column
    grid = image_grid(tiles.reshape(n * r * f, *tiles.shape[3:]), nrow=f, pad=2, upscale=upscale)
    if labels is None:
        return _write_png(path, png_bytes(grid))
    band = 14
    canvas = Image.new(grid.mode, (grid.width, grid.height + band), color=255)
    canvas.paste(grid, (0, band))
    draw, col_w = ImageDraw.Draw(canvas), grid.width / f
    for k, text in enumerate(labels):
        draw.text((int(k * col_w) + 3, 1), str(text), fill=0)
    return _write_png(path, png_bytes(canvas))


def _trajectory_points(frames, path, labels, x0_frames) -> Path:
    rows = [[_points(fr, "frame") for fr in frames]]
    if x0_frames is not None:
        rows.append([_points(fr, "x0 frame") for fr in x0_frames])
    f = len(frames)
    fig, axes = _figure(len(rows), f, size=(2.2 * f, 2.2 * len(rows)))
    lims = _limits(*rows[-1])
    for r, row in enumerate(rows):
        for k, pts in enumerate(row):
            name = "x_t" if r == 0 else "x0_hat"
            title = f"{name} {labels[k]}" if labels is not None else name
            _scatter(axes[r, k], pts, None, _limits(pts) if r == 0 else lims, title)
            axes[r, k].set_xticks([])
            axes[r, k].set_yticks([])
    return _save_figure(fig, path)
