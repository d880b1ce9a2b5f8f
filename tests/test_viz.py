"""Each picture function writes a readable PNG of a sensible size, atomically."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import viz


def _png(path):
    assert path.exists() and path.stat().st_size > 100
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        size = img.size
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
    return size


def test_to_uint8_maps_range_and_levels():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.49, 1.0, 3.0])
    assert viz.to_uint8(x).tolist() == [0, 0, 128, 190, 255, 255]
    # 3 levels: -1, 0, 1 -> 0, 128, 255; 0.49 snaps to the middle level
    assert viz.to_uint8(x, levels=3).tolist() == [0, 0, 128, 128, 255, 255]
    q = viz.to_uint8(torch.rand(100) * 2 - 1, levels=17)
    assert len(np.unique(q)) <= 17


def test_image_grid_layout_and_upscale():
    x = torch.rand(10, 1, 8, 8) * 2 - 1
    img = viz.image_grid(x)  # 4 per row, 8x8 tiles upscaled 4x to 32 px, 1 px padding
    assert img.mode == "L" and img.size == (4 * 33 + 1, 3 * 33 + 1)
    rgb = viz.image_grid(torch.zeros(3, 3, 28, 28), nrow=3, pad=2)
    assert rgb.mode == "RGB" and rgb.size == (3 * (56 + 2) + 2, 56 + 4)
    one = np.asarray(viz.image_grid(x[:1], pad=0, upscale=1))
    assert np.array_equal(one, viz.to_uint8(x[0, 0]))
    with pytest.raises(ValueError, match="channels"):
        viz.image_grid(torch.zeros(2, 2, 8, 8))


def test_save_image_grid_and_samples_figure(tmp_path):
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    w, h = _png(viz.save_image_grid(x, tmp_path / "grid.png", levels=17))
    assert w >= 4 * 32 and h >= 4 * 32
    assert _png(viz.save_samples_figure(x, tmp_path / "fig.png", levels=17)) == (w, h)
    pts, ref = torch.randn(200, 2), torch.randn(500, 2)
    w, h = _png(viz.save_samples_figure(pts, tmp_path / "pts.png", reference=ref))
    assert w >= 300 and h >= 300
    w, h = _png(viz.save_samples_figure(torch.randn(300, 5), tmp_path / "hist.png", reference=torch.randn(300, 5)))
    assert w > h >= 200


def test_save_scatter(tmp_path):
    w, h = _png(viz.save_scatter(torch.randn(100, 2), tmp_path / "s.png", reference=torch.randn(300, 2), title="x"))
    assert 300 <= w <= 1200 and 300 <= h <= 1200
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        viz.save_scatter(torch.randn(10, 3), tmp_path / "bad.png")


def test_plot_loss_curve(tmp_path):
    steps = list(range(0, 2000, 10))
    losses = [1.0 / (1 + s / 100) + 0.01 * np.sin(s) for s in steps]
    w, h = _png(viz.plot_loss_curve(steps, losses, tmp_path / "loss.png", ema_losses=[l * 0.9 for l in losses],
                                    title="digits"))
    assert w >= 400 and h >= 300
    _png(viz.plot_loss_curve([], [], tmp_path / "empty.png"))  # before the first log line
    _png(viz.plot_loss_curve([1, 2, 3], [0.5, float("nan"), -0.1], tmp_path / "neg.png"))


def test_save_trajectory_strip(tmp_path):
    frames = [torch.rand(3, 1, 8, 8) * 2 - 1 for _ in range(5)]
    w, h = _png(viz.save_trajectory_strip(frames, tmp_path / "traj.png", labels=[f"t={t}" for t in range(5)],
                                          x0_frames=frames))
    assert w >= 5 * 32 and h >= 6 * 32  # 5 columns of time, 3 samples x (x_t, x0) rows
    pts = [torch.randn(50, 2) * (1 - k / 5) for k in range(4)]
    w, h = _png(viz.save_trajectory_strip(pts, tmp_path / "traj2d.png", x0_frames=pts))
    assert w > h >= 200
    with pytest.raises(ValueError, match="labels"):
        viz.save_trajectory_strip(frames, tmp_path / "bad.png", labels=["a"])
