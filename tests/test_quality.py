"""Sample-quality metrics: exact answers first (Fréchet distance of Gaussians, W2 of shifts, oracle
entropy), then the project's feature network, its cache, and the FID machinery."""

import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from diffusekit.errors import CheckpointError
from diffusekit.evaluate import features
from diffusekit.evaluate.features import FeatureNet, cache_paths, feature_dataset, load_feature_net, train_feature_net
from diffusekit.evaluate.fid import InceptionV3FID, compute_fid, fid_from_features, load_inception
from diffusekit.evaluate.quality import (
    feature_stats,
    frechet_distance,
    image_quality,
    mmd_rbf,
    sliced_wasserstein,
    vector_quality,
    wasserstein2_1d,
)
from diffusekit.oracle import default_mixture


# -- Fréchet distance: closed forms ----------------------------------------------------------------
def test_frechet_distance_1d_closed_form():
    m1, s1, m2, s2 = 0.3, 1.7, -1.1, 0.4
    expected = (m1 - m2) ** 2 + s1**2 + s2**2 - 2 * s1 * s2
    assert frechet_distance([m1], [[s1**2]], [m2], [[s2**2]]) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_diagonal_and_identical():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-10)
    a = rng.normal(size=(5, 5))
    cov = a @ a.T
    assert frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_sqrtm_and_survives_singular_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) + 0.5
    (mu1, c1), (mu2, c2) = feature_stats(f1), feature_stats(f2)
    covmean = linalg.sqrtm(c1 @ c2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(reference, rel=1e-8)
    few = rng.normal(size=(4, 8))  # 4 points in 8 dimensions: rank-3 covariance
    d = frechet_distance(*feature_stats(few), *feature_stats(few + 1.0))
    assert math.isfinite(d) and d == pytest.approx(8.0, rel=1e-6)  # a pure shift by 1 in 8 dims


# -- vectors -----------------------------------------------------------------------------------------
def test_wasserstein_1d_exact_for_shifts_and_unequal_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 500, generator=g, dtype=torch.float64)
    assert wasserstein2_1d(x, x + 0.7).sqrt().item() == pytest.approx(0.7, rel=1e-12)
    assert wasserstein2_1d(x, x.repeat(1, 3)).item() == pytest.approx(0.0, abs=1e-15)  # same distribution
    a, b = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g, dtype=torch.float64)
    u = (torch.arange(12, dtype=torch.float64) + 0.5) / 12  # lcm(6, 4): both quantile functions are constant per cell
    qa, qb = a.sort().values[0, (u * 6).long()], b.sort().values[0, (u * 4).long()]
    assert wasserstein2_1d(a, b).item() == pytest.approx(((qa - qb) ** 2).mean().item(), rel=1e-12)


def test_sliced_wasserstein_of_gaussians():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 1, generator=g), torch.randn(3000, 1, generator=g) + 1.5
    assert sliced_wasserstein(x, y, n_projections=8) == pytest.approx(1.5, abs=0.08)  # W2(N(0,1), N(d,1)) = d
    x2 = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0], dtype=torch.float64)
    # E_theta (theta . d)^2 = |d|^2 / D for directions uniform on the circle
    assert sliced_wasserstein(x2, x2 + shift) == pytest.approx(math.sqrt(5 / 2), rel=0.1)
    assert sliced_wasserstein(x2, x2) == 0.0


def test_mmd_matches_gaussian_closed_form_and_vanishes_for_same_distribution():
    # For X ~ N(m, I_d), Y ~ N(0, I_d) and k(a, b) = exp(-|a - b|^2 / (2 l^2)):
    # E k(X, X') = E k(Y, Y') = c = (l^2 / (l^2 + 2))^(d/2), E k(X, Y) = c exp(-|m|^2 / (2 (l^2 + 2))),
    # so MMD^2 = 2 c (1 - exp(-|m|^2 / (2 (l^2 + 2)))), averaged over the bandwidth multipliers.
    from diffusekit.evaluate.quality import _sq_dists

    g = torch.Generator().manual_seed(0)
    n, shift = 2000, torch.tensor([0.5, 0.0], dtype=torch.float64)
    x, y, z = (torch.randn(n, 2, generator=g, dtype=torch.float64) for _ in range(3))
    k = 1000  # mmd_rbf takes the median over the first 1000 reference points
    h2 = _sq_dists(y[:k], y[:k])[torch.triu_indices(k, k, 1).unbind()].median().item()
    expected = np.mean([2 * (l2 / (l2 + 2)) * (1 - math.exp(-0.25 / (2 * (l2 + 2))))
                        for l2 in (s * s * h2 for s in (0.25, 0.5, 1.0, 2.0, 4.0))])
    shifted, same = mmd_rbf(z + shift, y), mmd_rbf(x, y)
    assert shifted == pytest.approx(expected, rel=0.25)
    assert abs(same) < 0.1 * expected


def test_oracle_nll_of_exact_samples_matches_oracle_entropy():
    oracle = default_mixture(2)
    samples = oracle.sample(4000, generator=torch.Generator().manual_seed(1))
    reference = oracle.sample(4000, generator=torch.Generator().manual_seed(2))
    q = vector_quality(samples, reference, oracle=oracle)
    tolerance = 4 * math.hypot(q["oracle_nll_stderr"], q["oracle_entropy_stderr"])
    assert abs(q["oracle_nll"] - q["oracle_entropy"]) < tolerance
    assert q["sliced_wasserstein"] < 0.05 and abs(q["mmd"]) < 0.01
    too_wide = vector_quality(samples * 1.5, reference, oracle=oracle)
    assert too_wide["oracle_nll"] > q["oracle_entropy"] + 0.3 and too_wide["sliced_wasserstein"] > 0.2


# -- the feature network and its cache ------------------------------------------------------------
def test_digits_feature_net_reaches_accuracy_target(digits_cache):
    net = load_feature_net("digits", cache_dir=digits_cache)
    test = feature_dataset("digits", "test")
    assert features.evaluate_accuracy(net, test.x, test.labels) >= 0.97
    assert net.features(test.x[:5]).shape == (5, 64) and net(test.x[:5]).shape == (5, 10)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = (train_feature_net("digits", seed=3, epochs=1) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    c = train_feature_net("digits", seed=4, epochs=1)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_cache_round_trip_gives_identical_weights(digits_cache):
    a, b = load_feature_net("digits", cache_dir=digits_cache), load_feature_net("digits", cache_dir=digits_cache)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("damage", ["weights", "record", "version"])
def test_damaged_cache_is_retrained_not_crashed_on(digits_cache, tmp_path, monkeypatch, damage):
    folder = tmp_path / "cache"
    shutil.copytree(digits_cache, folder)
    st_path, json_path = cache_paths("digits", folder)
    if damage == "weights":
        st_path.write_bytes(st_path.read_bytes()[:100] + b"\x00" * 50)
    elif damage == "record":
        json_path.write_text("{not json")
    else:
        json_path.write_text(json_path.read_text().replace('"version": 1', '"version": 999'))
    quick = features._Recipe(epochs=1, batch_size=64, lr=3e-3, max_shift=1)
    monkeypatch.setitem(features._RECIPES, "digits", quick)  # keep the retraining short
    with pytest.warns(UserWarning, match="retraining"):
        net = load_feature_net("digits", cache_dir=folder)
    assert isinstance(net, FeatureNet)
    again = load_feature_net("digits", cache_dir=folder)  # the retrained net was cached and verifies
    assert torch.equal(again.head.weight, net.head.weight)


def test_image_quality_real_images_near_one_and_noise_far(digits_cache):
    train = feature_dataset("digits", "train")
    real = train.x[torch.randperm(len(train), generator=torch.Generator().manual_seed(123))[:360]]
    q = image_quality(real, "digits", levels=17, cache_dir=digits_cache)
    assert 0.3 < q["fd_ratio"] < 3 and q["n_samples"] == 360 and q["n_train_for_calibration"] == 360
    assert q["confidence"] > 0.9 and q["class_entropy_bits"] > 3.2 and sum(q["class_histogram"]) == 360
    assert q["classifier_test_accuracy"] >= 0.97
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = image_quality(noise, "digits", levels=17, cache_dir=digits_cache)
    assert bad["fd"] > 20 * q["fd"] and bad["fd_ratio"] > 10
    assert bad["fd_train_test"] == q["fd_train_test"]  # the calibration depends on N only
    with pytest.raises(ValueError, match="samples must be"):
        image_quality(torch.zeros(4, 1, 28, 28), "digits", cache_dir=digits_cache)


# -- FID ----------------------------------------------------------------------------------------------
def test_load_inception_missing_file_names_the_path(tmp_path):
    path = tmp_path / "pt_inception.safetensors"
    with pytest.raises(CheckpointError, match="pt_inception.safetensors.*not found.*pytorch-fid"):
        load_inception(path)


def test_inception_architecture_and_weight_files(tmp_path):
    from safetensors.torch import save_file

    model = InceptionV3FID()
    # torchvision's inception_v3 has 27,161,264 parameters; minus its auxiliary head (3,326,696)
    # plus 8 more classes (1008 instead of 1000: 8 * 2049) gives the FID network of pytorch-fid.
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert state["fc.weight"].shape == (1008, 2048) and state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = load_inception(tmp_path / name)
        assert torch.equal(loaded.Mixed_6e.branch7x7dbl_5.conv.weight, model.Mixed_6e.branch7x7dbl_5.conv.weight)
    with torch.no_grad():
        out = loaded(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    del state["Mixed_5b.branch1x1.conv.weight"]
    state["extra"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors.*missing 1.*unexpected 1"):
        load_inception(tmp_path / "bad.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_inception(tmp_path / "junk.pth")


def _small_feature_fn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return net.eval()


def test_fid_machinery_on_a_small_network():
    linalg = pytest.importorskip("scipy.linalg")
    feature_fn = _small_feature_fn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 1, 8, 8, generator=g) * 2 - 1, torch.rand(200, 1, 8, 8, generator=g) * 2 - 1
    assert compute_fid(x, x, feature_fn, batch_size=7) == pytest.approx(0.0, abs=1e-8)
    assert compute_fid(x, y, feature_fn) == pytest.approx(compute_fid(y, x, feature_fn), rel=1e-9)
    shifts = [compute_fid(x + s, x, feature_fn) for s in (0.1, 0.3, 0.6)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    with torch.no_grad():
        fx, fy = feature_fn(x).double().numpy(), feature_fn(y).double().numpy()
    mu1, mu2 = fx.mean(0), fy.mean(0)
    c1, c2 = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    by_hand = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert compute_fid(x, y, feature_fn) == pytest.approx(by_hand, rel=1e-6)
    assert fid_from_features(fx, fy) == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.slow
def test_mnist_feature_net_reaches_accuracy_target(tmp_path):
    net = train_feature_net("mnist", seed=0)
    assert net.test_accuracy >= 0.95


def test_pixel_quality_is_calibrated_by_real_images():
    from diffusekit.evaluate.quality import pixel_quality

    g = torch.Generator().manual_seed(0)
    # a structured image distribution: random mixtures of two fixed 3x6x6 patterns plus noise
    patterns = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1

    def draw(n):
        w = torch.rand(n, 1, 1, 1, generator=g)
        return (w * patterns[0] + (1 - w) * patterns[1] + 0.1 * torch.randn(n, 3, 6, 6, generator=g)).clamp(-1, 1)

    train, test = draw(400), draw(300)
    real = pixel_quality(draw(200), test, train, levels=256)
    noise = pixel_quality(torch.rand(200, 3, 6, 6, generator=g) * 2 - 1, test, train, levels=256)
    assert real["feature_space"] == "pixels" and real["n_compared"] == 200
    for key in ("sliced_wasserstein", "mmd"):  # the same calibration draw for both
        assert real[f"{key}_train_test"] == noise[f"{key}_train_test"]
    assert real["sliced_wasserstein_ratio"] < 1.5 and noise["sliced_wasserstein_ratio"] > 5, (real, noise)
    floor = abs(real["mmd_train_test"])
    assert abs(real["mmd"]) < 10 * floor + 1e-3 and noise["mmd"] > 20 * (floor + abs(real["mmd"])), (real, noise)
    assert "mmd_ratio" not in real
    lo, hi = real["sliced_wasserstein_ratio_interval"]
    assert lo < real["sliced_wasserstein_ratio"] < hi and noise["sliced_wasserstein_ratio_interval"][0] > hi
    few = pixel_quality(draw(200), test, train[:50])  # a small folder: both sides use 50 images
    assert few["n_compared"] == 50 and few["sliced_wasserstein_ratio"] < 2
    with pytest.raises(ValueError, match="at least 2 samples, 2 train and 2 test images"):
        pixel_quality(draw(200), test, train[:1])


# -- KID and the bootstrap interval: the score to rank by -------------------------------------------------
def _kid_by_definition(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3, term by term with Python loops."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel_and_its_jackknife():
    from diffusekit.evaluate.quality import kid

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.5
    value, stderr = kid(x, y, blocks=4)
    assert value == pytest.approx(_kid_by_definition(x, y), rel=1e-12)
    blocks = np.array_split(np.arange(12), 4)  # the jackknife by hand: leave each block out
    loo = np.array([_kid_by_definition(np.delete(x, b, axis=0), y) for b in blocks])
    assert stderr == pytest.approx(np.sqrt(3 / 4 * ((loo - loo.mean()) ** 2).sum()), rel=1e-10)


def test_kid_is_unbiased_and_its_standard_error_matches_its_spread():
    """Same distribution: KID averages to 0 (FD would be biased upwards at this size); shifted: the
    spread of KID over independent draws is what its standard error says, within a factor."""
    from diffusekit.evaluate.quality import kid

    rng = np.random.default_rng(1)
    y = rng.normal(size=(300, 8))
    same = np.array([kid(rng.normal(size=(40, 8)), y)[0] for _ in range(300)])
    assert abs(same.mean()) < 3 * same.std() / np.sqrt(len(same))
    draws = [kid(rng.normal(size=(200, 8)) + 0.2, y) for _ in range(60)]
    spread, reported = np.std([v for v, _ in draws]), np.mean([se for _, se in draws])
    assert 0.6 < reported / spread < 1.6


def test_fd_ratio_interval_covers_one_for_real_data_and_separates_a_bad_sampler():
    from diffusekit.evaluate.quality import fd_ratio_interval, feature_stats, intervals_separate

    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(2000, 16, generator=gen), torch.randn(400, 16, generator=gen)
    stats = feature_stats(test)
    real = fd_ratio_interval(torch.randn(1000, 16, generator=gen), train, stats, reps=100)
    bad = fd_ratio_interval(torch.randn(1000, 16, generator=gen) * 1.3, train, stats, reps=100)
    assert real[0] < 1.0 < real[1] and bad[0] > 1.5
    assert intervals_separate(real, bad) and not intervals_separate(real, (real[1] - 1e-9, 10.0))


def test_sliced_w2_ratio_interval_covers_one_separates_a_bad_sampler_and_redraws_groups_whole():
    from diffusekit.evaluate.quality import intervals_separate, sliced_w2_ratio_interval, sliced_wasserstein

    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(3000, 12, generator=gen), torch.randn(1000, 12, generator=gen)
    real = sliced_w2_ratio_interval(torch.randn(1000, 12, generator=gen), train, test, reps=100)
    bad = sliced_w2_ratio_interval(torch.randn(1000, 12, generator=gen) * 1.3, train, test, reps=100)
    assert real[0] < 1.0 < real[1] and bad[0] > 1.5 and intervals_separate(real, bad), (real, bad)
    # 64 draws, each repeated 16 times (16 restorations of one input that agree): repeating every point leaves
    # the empirical distribution as it was, so redrawn by group the interval is exactly that of the 64 draws
    # (with 64 calibration images on both sides); redrawn singly, the repeats pass for 1024 independent draws
    few, calibration = torch.randn(64, 12, generator=gen), train[:64]
    ids = torch.arange(64).repeat_interleave(16)
    grouped = sliced_w2_ratio_interval(few[ids], calibration, test, groups=ids, reps=100)
    alone = sliced_w2_ratio_interval(few, calibration, test, reps=100)
    singly = sliced_w2_ratio_interval(few[ids], calibration, test, reps=100)
    assert grouped == pytest.approx(alone, abs=1e-9)
    assert singly[1] - singly[0] < 0.5 * (grouped[1] - grouped[0]), (singly, grouped)
    # one id per draw is the ungrouped redraw, bit for bit
    x = torch.randn(300, 12, generator=gen)
    assert sliced_w2_ratio_interval(x, train, test, groups=torch.arange(300), reps=20) == \
        sliced_w2_ratio_interval(x, train, test, reps=20)
    # the full sample's numerator is sliced_wasserstein's own value: a redraw that is the identity reproduces it
    point = sliced_wasserstein(x, test) / sliced_wasserstein(train[:300], test)
    assert abs(sliced_w2_ratio_interval(x, train[:300], test, groups=torch.zeros(300), reps=3)[0] - point) < 1e-9
    with pytest.raises(ValueError, match="groups has 5 ids for 300 samples"):
        sliced_w2_ratio_interval(x, train, test, groups=torch.zeros(5), reps=3)


def test_fd_ratio_interval_redraws_groups_whole():
    """64 inputs, each restored 16 times alike: redrawn by input, the interval is that of the 64 inputs (with
    64 calibration images on both sides; the same random draws, and covariances that differ only by the
    factor 1023/1024 * 64/63 of the repeats); redrawn singly, the repeats pass for 1024 independent draws and
    the interval is far too narrow. One id per draw is the ungrouped redraw, bit for bit."""
    from diffusekit.evaluate.quality import fd_ratio_interval, feature_stats

    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(3000, 8, generator=gen), torch.randn(1000, 8, generator=gen)
    stats = feature_stats(test)
    inputs, calibration = torch.randn(64, 8, generator=gen), train[:64]
    ids = torch.arange(64).repeat_interleave(16)
    grouped = fd_ratio_interval(inputs[ids], calibration, stats, reps=100, groups=ids)
    alone = fd_ratio_interval(inputs, calibration, stats, reps=100)
    singly = fd_ratio_interval(inputs[ids], calibration, stats, reps=100)
    assert grouped == pytest.approx(alone, rel=0.02), (grouped, alone)
    assert singly[1] - singly[0] < 0.5 * (grouped[1] - grouped[0]), (singly, grouped)
    x = torch.randn(200, 8, generator=gen)
    assert fd_ratio_interval(x, train, stats, reps=20, groups=torch.arange(200)) == fd_ratio_interval(x, train, stats,
                                                                                                      reps=20)
    with pytest.raises(ValueError, match="groups has 3 ids for 200 samples"):
        fd_ratio_interval(x, train, stats, reps=2, groups=torch.zeros(3))


def test_fd_ratio_interval_is_centred_on_the_estimate_for_a_poor_sampler():
    """The point estimate (fd / fd_train_test on subsets drawn without replacement, as ``image_quality``
    computes it) must sit well inside its interval, not at the top: redrawing with replacement repeats
    points, which adds to every FD, and would shift a poor sampler's ratio down."""
    from diffusekit.evaluate.quality import fd_ratio_interval, feature_stats, frechet_distance

    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(1500, 16, generator=gen), torch.randn(400, 16, generator=gen)
    stats = feature_stats(test)
    poor = torch.randn(1000, 16, generator=gen) * 1.5 + 0.5
    fd = frechet_distance(*feature_stats(poor), *stats)
    calibration = np.mean([frechet_distance(*feature_stats(train[torch.randperm(1500, generator=gen)[:1000]]), *stats)
                           for _ in range(8)])
    point = fd / calibration
    lo, hi = fd_ratio_interval(poor, train, stats, reps=200)
    assert lo < point < hi and 0.2 < (point - lo) / (hi - lo) < 0.8, (lo, point, hi)
