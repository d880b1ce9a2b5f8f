"""bench/photo_split.py: the colour statistics of each photo split and the nearest-neighbour colorizer against gray."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusekit.config import DataConfig
from diffusekit.data import load_dataset
from diffusekit.runs.restore import psnr

pytest.importorskip("skimage")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    yield importlib.import_module("photo_split")
    for name in ("photo_split", "restoration"):
        sys.modules.pop(name, None)


def test_rms_chroma_is_zero_for_gray_and_the_colour_distance_otherwise(bench):
    gray = torch.rand(3, 1, 4, 4).expand(3, 3, 4, 4)
    assert bench.rms_chroma(gray).abs().max() < 1e-6  # float32 rounding of the channel mean
    x = torch.zeros(1, 3, 2, 2)
    x[:, 0] = 0.3  # channel mean 0.1: deviations 0.2, -0.1, -0.1 at every pixel
    assert bench.rms_chroma(x).item() == pytest.approx(np.sqrt((0.04 + 0.01 + 0.01) / 3))


def test_rows_score_the_config_patches_as_restore_scores_them(bench, tmp_path):
    out = tmp_path / "r.json"
    result = bench.main(["--n-train", "60", "--n-test", "14", "--k", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["layout"] for r in result["layouts"]] == ["columns", "tiles"]
    for row in result["layouts"]:
        cfg = DataConfig(name="photos", n_train=60, n_test=14, photo_split=row["layout"])
        test = load_dataset(cfg, "test").x
        p_gray = psnr(test.mean(1, keepdim=True).expand_as(test), test)
        assert row["psnr_gray"][0] == pytest.approx(p_gray.mean().item(), abs=1e-9)
        assert row["psnr_gray"][1] == pytest.approx(p_gray.std().item() / np.sqrt(14), abs=1e-9)
        mse = (test.mean(1, keepdim=True) - test).pow(2).mean().item()
        assert row["pooled_gray"] == pytest.approx(10 * np.log10(4 / mse), abs=1e-6)
        assert row["gain_knn"][0] == pytest.approx(row["psnr_knn"][0] - row["psnr_gray"][0], abs=1e-9)
        c = bench.rms_chroma(test)
        assert row["rms_chroma_test"] == pytest.approx(c.mean().item())
        assert row["nearly_gray_test"] == pytest.approx((c < bench.NEARLY_GRAY).double().mean().item())
    assert "| tiles |" in bench.markdown(result)


def test_a_neighbour_that_is_the_patch_itself_restores_it(bench, monkeypatch):
    """With the test patches among the training patches, the nearest neighbour (distance 0) is the patch."""
    real = load_dataset

    def same_patches(cfg, split):
        return real(cfg, "test")

    monkeypatch.setattr(bench, "load_dataset", same_patches)
    row = bench.layout_row("tiles", 10, 10, 1)
    assert row["psnr_knn"][0] > 150 and row["gain_knn"][0] > 100  # exact up to float rounding


def test_bad_flags_are_one_line(bench):
    for argv, needle in ((["--k", "0"], "--k must be in 1..1000000; got 0"),
                         (["--layouts", "rows"], "--layouts: 'rows' is not a photo split")):
        with pytest.raises(SystemExit) as exc:
            bench.run_bench(lambda argv=argv: bench.main(argv), "bench/photo_split.py")
        assert str(exc.value).startswith(f"bench/photo_split.py: error: {needle}")
