"""Sample-quality metrics: Fréchet distance in a feature space, classifier statistics, and, for
vector data, sliced Wasserstein, MMD and the exact NLL under an oracle density.

- Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau, 1982), as used by
  FID (Heusel et al., 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).
- ``image_quality`` computes it in the feature space of the project's own classifier
  (``features.FeatureNet``) and calibrates it with the same distance between the real train and
  test splits.
- Sliced Wasserstein-2 (Rabin et al., 2011; Bonneel et al., 2015) with exact 1-D transport per
  projection; unbiased MMD^2 with a mixture of RBF kernels (Gretton et al., 2012, JMLR 13, eq. 3).
- KID (Binkowski et al., 2018, sec. 3): the unbiased MMD^2 of the features with the cubic polynomial
  kernel, unbiased at any sample size, with a jackknife standard error; and a bootstrap interval on
  ``fd_ratio``. Rank two samplers or configurations only where these intervals separate
  (``intervals_separate``): FD on a few hundred samples moves by more than most differences.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusekit.evaluate.features import feature_dataset, load_feature_net

__all__ = ["feature_stats", "frechet_distance", "image_quality", "sliced_wasserstein", "wasserstein2_1d",
           "mmd_rbf", "vector_quality", "pixel_quality", "kid", "fd_ratio_interval", "sliced_w2_ratio_interval",
           "intervals_separate"]


# -- Fréchet distance -----------------------------------------------------------------------------
def feature_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues,
    which rounding can produce for near-singular covariances, are clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray,
                     root1: np.ndarray | None = None) -> float:
    """Fréchet (Wasserstein-2 squared) distance between N(mu1, cov1) and N(mu2, cov2), float64:

        d^2 = ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})

    (Dowson & Landau 1982; the FID formula of Heusel et al. 2017). pytorch-fid takes
    ``scipy.linalg.sqrtm(cov1 @ cov2)``, which can return tiny imaginary parts and fails on
    singular covariances (it then retries with cov + eps I). Here tr((cov1 cov2)^{1/2}) is the sum of
    the square roots of the eigenvalues of the symmetric PSD matrix cov1^{1/2} cov2 cov1^{1/2}, which
    has the same spectrum as cov1 cov2: real by construction, and singular covariances (for example
    fewer samples than feature dimensions, or dead ReLU units) need no eps offset. The result is
    clipped at 0 against rounding. ``root1``, when given, is cov1^{1/2} (computed once for many distances
    to one reference).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    d = mu1.shape[0]
    cov1 = np.asarray(cov1, np.float64).reshape(d, d)
    cov2 = np.asarray(cov2, np.float64).reshape(d, d)
    if mu2.shape != (d,):
        raise ValueError(f"means must have the same shape, got {mu1.shape} and {mu2.shape}")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(cov1).all() and np.isfinite(cov2).all()):
        raise ValueError("frechet_distance: statistics contain NaN or infinity")
    root1 = _sqrt_psd(cov1) if root1 is None else root1
    middle = root1 @ cov2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean, 0.0))


# -- KID and intervals -------------------------------------------------------------------------------
def kid(x: Tensor | np.ndarray, y: Tensor | np.ndarray, blocks: int = 10) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, sec. 3) between feature sets x (N, D) and y (M, D):
    the unbiased MMD^2 with the kernel k(a, b) = (a.b / D + 1)^3, on all pairs, and its delete-a-block
    jackknife standard error over ``blocks`` disjoint blocks of x (the spread due to the samples; y is
    the fixed reference). Unbiased at every N, unlike FD, so it can be slightly negative when the two
    distributions match. Returns (kid, stderr)."""
    x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    blocks = max(2, min(blocks, n // 2))
    if n < 4 or m < 2 or y.shape[1] != d:
        raise ValueError(f"kid needs N >= 4 and M >= 2 points of one dimension, got {x.shape} and {y.shape}")
    kxx, kxy, kyy = (x @ x.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3
    np.fill_diagonal(kxx, 0.0)
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    row_xx, row_xy = kxx.sum(1), kxy.sum(1)

    def estimate(keep: np.ndarray) -> float:
        k = int(keep.sum())
        s_xx = row_xx[keep].sum() - kxx[np.ix_(keep, ~keep)].sum()
        return s_xx / (k * (k - 1)) + term_y - 2 * row_xy[keep].sum() / (k * m)

    everything = np.ones(n, dtype=bool)
    full = estimate(everything)
    leave_out = []
    for block in np.array_split(np.arange(n), blocks):
        keep = everything.copy()
        keep[block] = False
        leave_out.append(estimate(keep))
    leave_out = np.array(leave_out)
    stderr = math.sqrt((blocks - 1) / blocks * ((leave_out - leave_out.mean()) ** 2).sum())
    return float(full), float(stderr)


def fd_ratio_interval(f_samples: Tensor, f_train: Tensor, stats_test: tuple[np.ndarray, np.ndarray],
                      reps: int = 200, seed: int = 0, level: float = 0.95,
                      groups: Tensor | None = None) -> tuple[float, float]:
    """A bootstrap interval for fd_ratio = FD(samples, test) / FD(real train images, test), the ``level``
    percentile interval of ``reps`` replicate ratios. Each replicate redraws

    - the N samples with replacement, for the numerator. A redraw repeats about a third of the points,
      which adds to FD on its own (the covariance of fewer distinct points is noisier), so the replicate
      numerators are shifted by their mean excess over the estimate (bias-corrected bootstrap, Efron &
      Tibshirani 1993, Sec. 10.6) and kept >= 0. With ``groups`` (N,), the ids of draws that are not
      independent (e.g. several restorations of one input), whole groups are redrawn instead;
    - min(N, train size) train images *without* replacement, for the calibration, exactly as
      ``image_quality`` draws its calibration subsets (a redraw with replacement would inflate the
      small denominator and shift every poor sampler's interval below its own estimate).

    It says how far fd_ratio moves with the draw of the samples and of the calibration images; when the
    train split is no larger than N, the calibration does not vary and only the samples' draw counts."""
    f_samples = f_samples.detach().cpu().double().numpy()
    f_train = f_train.detach().cpu().double().numpy()
    n, m = f_samples.shape[0], min(f_samples.shape[0], f_train.shape[0])
    rng = np.random.default_rng(seed)
    mu_t, cov_t = stats_test
    root_t = _sqrt_psd(cov_t)

    def fd(f: np.ndarray) -> float:  # the same distance as frechet_distance(*feature_stats(f), *stats_test)
        return frechet_distance(mu_t, cov_t, f.mean(axis=0), np.cov(f, rowvar=False), root1=root_t)

    return _ratio_interval(lambda idx: fd(f_samples[idx]), fd(f_samples), lambda idx: fd(f_train[idx]),
                           n, f_train.shape[0], m, groups, rng, reps, level)


def _ratio_interval(distance: Callable[[np.ndarray], float], estimate: float,
                    calibration: Callable[[np.ndarray], float], n: int, n_train: int, m: int,
                    groups: Tensor | None, rng: np.random.Generator, reps: int, level: float) -> tuple[float, float]:
    """The bootstrap shared by ``fd_ratio_interval`` and ``sliced_w2_ratio_interval``: ``reps`` numerators
    ``distance`` of the n samples at redrawn indices (singly, or whole ``groups``), shifted by their mean
    excess over ``estimate`` and kept >= 0, over ``reps`` denominators ``calibration`` of m of the n_train
    train images drawn without replacement; the ``level`` percentile interval of the ratios."""
    redraw = _redraw(n, groups, rng)
    numerators = np.array([distance(redraw()) for _ in range(reps)])
    numerators = np.maximum(numerators - (numerators.mean() - estimate), 0.0)
    calibrations = np.array([calibration(rng.permutation(n_train)[:m]) for _ in range(reps)])
    ratios = numerators / np.maximum(calibrations, 1e-12)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _redraw(n: int, groups: Tensor | None, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """A function drawing the indices of a bootstrap replicate of n draws: n with replacement, or with ``groups``
    (n ids) as many groups as there are, with replacement, each with all its members."""
    if groups is None:
        return lambda: rng.integers(n, size=n)
    ids = np.asarray(groups).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"groups has {ids.shape[0]} ids for {n} samples")
    members = [np.flatnonzero(ids == g) for g in np.unique(ids)]
    return lambda: np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])


def intervals_separate(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two intervals (lo, hi) do not overlap: only then are two scores called different."""
    return a[1] < b[0] or b[1] < a[0]


# -- images: the project's feature network ----------------------------------------------------------
def _snap_to_levels(x: Tensor, levels: int | None) -> Tensor:
    """Clamp to [-1, 1] and, given ``levels``, round to the data's grid of values."""
    x = x.to(torch.float32).clamp(-1.0, 1.0)
    if levels is None:
        return x
    return torch.round((x + 1) * (levels - 1) / 2) / (levels - 1) * 2 - 1


def _class_entropy_bits(counts: Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def image_quality(samples: Tensor, dataset_name: str, levels: int | None = None,
                  cache_dir: str | Path | None = None, seed: int = 0, n_calibration: int = 8,
                  labels: Tensor | None = None, groups: Tensor | None = None) -> dict[str, Any]:
    """Quality of image samples (N, 1, H, W) in [-1, 1] for ``dataset_name`` ("digits" or "mnist").

    The samples are clamped to [-1, 1] (and rounded to ``levels`` values when given, like the
    data) and scored by the project's feature net (``load_feature_net``, trained and cached on first
    use). Returns:

    - ``fd``: Fréchet distance between the sample features and the features of the whole test split;
    - ``fd_train_test``: the same distance between real train images and the test split, averaged
      over ``n_calibration`` random subsets of min(N, train size) train images (drawn with ``seed``),
      with its spread ``fd_train_test_std``. FD is biased upwards for small N (the covariance of N
      points is noisy) and varies from subset to subset, so the calibration uses as many real images
      as there are samples, averaged: a sampler that matches the data has ``fd_ratio`` =
      fd / fd_train_test near 1 (within about fd_train_test_std / fd_train_test);
    - ``confidence``: mean max softmax probability of the samples (low for unrecognisable samples);
    - ``class_histogram`` (predicted-class counts) and ``class_entropy_bits`` (its entropy; log2(10)
      = 3.32 bits when all classes are equally frequent: low values mean mode collapse);
    - ``classifier_test_accuracy`` (of the feature net on the test split) and ``n_samples``;
    - ``fd_ratio_interval``: a 95% bootstrap interval of ``fd_ratio`` (``fd_ratio_interval``; ``groups``, per
      sample, marks draws that are not independent, e.g. restorations of one input);
    - ``kid`` with ``kid_stderr`` (``kid``) against the test split, and ``kid_train_test``, the same for
      as many real train images: the level a perfect sampler reaches on this test split (not exactly 0:
      the split is one finite draw, and the standard errors are over the samples, the split held
      fixed); ``kid_excess`` = kid - kid_train_test with its standard error, the number to rank by;
    - with ``labels`` (N,), the classes a conditional model was asked for: ``class_accuracy``, the
      fraction of samples the classifier assigns to their requested class (the quality measure of a
      conditional model; compare it with ``classifier_test_accuracy`` on real data).
    """
    net = load_feature_net(dataset_name, cache_dir=cache_dir)
    size = net.config.image_size
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, size, size):
        raise ValueError(f"{dataset_name} samples must be (N, 1, {size}, {size}), got {tuple(samples.shape)}")
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"image_quality needs at least 2 samples, got {n}")
    train, test = feature_dataset(dataset_name, "train"), feature_dataset(dataset_name, "test")
    f_samples, logits = net.features_and_logits(_snap_to_levels(samples.detach().cpu(), levels))
    f_test, test_logits = net.features_and_logits(test.x)
    f_train, _ = net.features_and_logits(train.x)
    stats_test = feature_stats(f_test)
    fd = frechet_distance(*feature_stats(f_samples), *stats_test)
    n_train = min(n, len(train))
    gen = torch.Generator().manual_seed(seed)
    subsets = [torch.randperm(len(train), generator=gen)[:n_train] for _ in range(n_calibration if n_train < len(train) else 1)]
    calibration = np.array([frechet_distance(*feature_stats(f_train[idx]), *stats_test) for idx in subsets])
    fd_train_test = float(calibration.mean())
    probs = torch.softmax(logits.double(), dim=1)
    counts = torch.bincount(probs.argmax(1), minlength=net.config.num_classes)
    extra = {}
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), one per sample, got {tuple(labels.shape)}")
        extra["class_accuracy"] = (probs.argmax(1) == labels).double().mean().item()
    kid_value, kid_stderr = kid(f_samples, f_test)
    kid_real, kid_real_stderr = kid(f_train[subsets[0]], f_test)
    return {**extra, "fd": fd, "fd_train_test": fd_train_test, "fd_train_test_std": float(calibration.std()),
            "fd_ratio": fd / fd_train_test if fd_train_test > 0 else float("inf"),
            "fd_ratio_interval": list(fd_ratio_interval(f_samples, f_train, stats_test, seed=seed, groups=groups)),
            "kid": kid_value, "kid_stderr": kid_stderr, "kid_train_test": kid_real,
            "kid_train_test_stderr": kid_real_stderr, "kid_excess": kid_value - kid_real,
            "kid_excess_stderr": math.sqrt(kid_stderr**2 + kid_real_stderr**2),
            "n_train_for_calibration": n_train, "n_test": len(test),
            "confidence": probs.max(1).values.mean().item(),
            "class_histogram": counts.tolist(), "class_entropy_bits": _class_entropy_bits(counts),
            "classifier_test_accuracy": (test_logits.argmax(1) == test.labels).double().mean().item(),
            "n_samples": n, "feature_net": f"{dataset_name} FeatureNet ({net.config.feature_dim}-d features)"}


# -- vectors -----------------------------------------------------------------------------------------
def wasserstein2_1d(a: Tensor, b: Tensor) -> Tensor:
    """Exact squared W2 between empirical 1-D distributions, batched over rows: a (P, n), b (P, m).

    W2^2 = int_0^1 (F_a^{-1}(u) - F_b^{-1}(u))^2 du, where both quantile functions are step
    functions; the integral is summed exactly over the merged breakpoints {i/n} U {j/m}, so
    unequal sample sizes need no resampling (equal sizes reduce to the mean squared difference of
    the sorted samples).
    """
    return _w2_sorted(a.sort(dim=1).values, b.sort(dim=1).values)


def _w2_sorted(a: Tensor, b: Tensor) -> Tensor:
    """``wasserstein2_1d`` of rows already sorted."""
    n, m = a.shape[1], b.shape[1]
    if n == m:
        return (a - b).pow(2).mean(dim=1)
    ia, ib, width = _quantile_pieces(n, m)
    return ((a[:, ia] - b[:, ib]).pow(2) * width).sum(dim=1)


@functools.lru_cache(maxsize=16)
def _quantile_pieces(n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces on which both empirical quantile functions (n and m points) are constant: the index into
    each sorted sample and the piece's width."""
    u = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
    u = torch.unique(u.clamp(max=1.0))  # sorted right ends of the pieces
    width = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - width / 2
    ia = (mid * n).floor().long().clamp(max=n - 1)
    ib = (mid * m).floor().long().clamp(max=m - 1)
    return ia, ib, width


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance sqrt(E_theta W2^2(theta^T x, theta^T y)) between two samples
    (N, D) and (M, D), with ``n_projections`` random unit directions drawn with ``seed`` (in 1-D the
    directions are +-1 and this is the exact W2). Inputs of any shape (N, ...) are flattened."""
    x = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    y = y.detach().reshape(y.shape[0], -1).to("cpu", torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples have {x.shape[1]} and {y.shape[1]} dimensions")
    theta = _directions(x.shape[1], n_projections, seed)
    return math.sqrt(wasserstein2_1d(theta @ x.T, theta @ y.T).mean().item())


def _directions(dim: int, n_projections: int, seed: int) -> Tensor:
    """``n_projections`` random unit directions (n_projections, dim) in float64, drawn with ``seed``."""
    theta = torch.randn(n_projections, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def sliced_w2_ratio_interval(samples: Tensor, train: Tensor, test: Tensor, groups: Tensor | None = None,
                             reps: int = 200, seed: int = 0, level: float = 0.95,
                             n_projections: int = 256) -> tuple[float, float]:
    """A bootstrap interval for the sliced-W2 ratio SW(samples, test) / SW(real train images, test) of
    ``pixel_quality`` (inputs already on its grid, flattened), built as ``fd_ratio_interval`` builds
    fd_ratio's: the ``level`` percentile interval of ``reps`` replicate ratios, each with

    - the N samples redrawn with replacement for the numerator, shifted by the replicates' mean excess over
      the estimate (bias-corrected bootstrap) and kept >= 0. With ``groups`` (N,), the ids of draws that are
      not independent (e.g. several restorations of one input), whole groups are redrawn instead;
    - min(N, train size) train images drawn without replacement for the calibration, as ``pixel_quality``
      draws its own.

    The directions are ``sliced_wasserstein``'s (seed 0), so a replicate of the full sample is its value."""
    x = samples.reshape(samples.shape[0], -1).to("cpu", torch.float64)
    real = train.reshape(train.shape[0], -1).to("cpu", torch.float64)
    ref = test.reshape(test.shape[0], -1).to("cpu", torch.float64)
    if not x.shape[1] == real.shape[1] == ref.shape[1]:
        raise ValueError(f"samples, train and test have {x.shape[1]}, {real.shape[1]} and {ref.shape[1]} dimensions")
    n, m = x.shape[0], min(x.shape[0], real.shape[0])
    theta = _directions(x.shape[1], n_projections, 0)
    px, preal = theta @ x.T, theta @ real.T  # project once; a redraw picks columns
    pref = (theta @ ref.T).sort(dim=1).values

    def sw(proj: Tensor) -> float:
        return math.sqrt(_w2_sorted(proj.sort(dim=1).values, pref).mean().item())

    return _ratio_interval(lambda idx: sw(px[:, torch.from_numpy(idx)]), sw(px),
                           lambda idx: sw(preal[:, torch.from_numpy(idx)]), n, real.shape[0], m, groups,
                           np.random.default_rng(seed), reps, level)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0.0)


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> float:
    """Unbiased MMD^2 (Gretton et al., 2012, JMLR 13, eq. 3) between samples x (N, D) and the
    reference y (M, D), with the kernel k(a, b) = mean_s exp(-||a - b||^2 / (2 (s h)^2)), where h
    is the median pairwise distance within the reference y (the median heuristic, fixed by the
    reference so that scores of different samplers share one kernel) and s runs over ``bandwidths``.

    Can be slightly negative when the distributions match (it is unbiased); O((N + M)^2) memory.
    """
    x = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    y = y.detach().reshape(y.shape[0], -1).to("cpu", torch.float64)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_rbf needs two samples of >= 2 points in the same dimension, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    dyy = _sq_dists(y, y)
    k = min(m, 1000)  # the median of the first 1000 reference points' distances is plenty
    h2 = dyy[:k, :k][torch.triu_indices(k, k, 1).unbind()].median().clamp_min(1e-12)
    dxx, dxy = _sq_dists(x, x), _sq_dists(x, y)

    def kernel(d2: Tensor) -> Tensor:
        return torch.stack([torch.exp(-d2 / (2 * s * s * h2)) for s in bandwidths]).mean(0)

    kxx, kyy = kernel(dxx), kernel(dyy)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (term_x + term_y - 2 * kernel(dxy).mean()).item()


def vector_quality(samples: Tensor, reference: Tensor, oracle=None) -> dict[str, Any]:
    """Quality of vector samples (N, D) against reference data (M, D).

    Returns ``sliced_wasserstein`` and ``mmd`` (see above) and, when ``oracle`` (a
    ``GaussianMixture``, the true data density) is given, ``oracle_nll``: the mean -log p(sample) in
    nats, and ``oracle_entropy``: the mean -log p(x) of the reference, which must be drawn from the
    oracle (a Monte Carlo estimate of the entropy of the data). A perfect sampler has oracle_nll
    close to oracle_entropy; the two ``*_stderr`` values say how close is close. (A sampler that
    collapses onto the modes can score oracle_nll below the entropy: read it beside the distances.)
    """
    samples = samples.detach().reshape(samples.shape[0], -1).to("cpu", torch.float64)
    reference = reference.detach().reshape(reference.shape[0], -1).to("cpu", torch.float64)
    out: dict[str, Any] = {"sliced_wasserstein": sliced_wasserstein(samples, reference),
                           "mmd": mmd_rbf(samples, reference), "n_samples": samples.shape[0],
                           "n_reference": reference.shape[0]}
    if oracle is not None:
        for key, x in (("oracle_nll", samples), ("oracle_entropy", reference)):
            nll = -oracle.log_prob(x)
            out[key] = nll.mean().item()
            out[f"{key}_stderr"] = (nll.std() / math.sqrt(nll.numel())).item()
    return out


def _on_grid(x: Tensor, levels: int | None) -> Tensor:
    """Images clamped to [-1, 1] and, when ``levels`` is given, rounded to the data's value grid."""
    x = x.detach().to("cpu", torch.float64).clamp(-1, 1)
    if levels is None:
        return x
    return ((x + 1) / 2 * (levels - 1)).round() / (levels - 1) * 2 - 1


def pixel_quality(samples: Tensor, test: Tensor, train: Tensor, levels: int | None = None,
                  seed: int = 0, groups: Tensor | None = None) -> dict[str, Any]:
    """Quality of image samples where no feature network exists (e.g. photo patches): sliced W2 and
    MMD in pixel space to the test split, calibrated like the Fréchet distance by the same distances
    from as many real train images (drawn with ``seed``) to the test split; with fewer train images
    than samples, only the first ``len(train)`` samples are compared (``n_compared``).

    ``sliced_wasserstein_ratio`` = samples' distance / real images' distance: near 1 when the samples
    are as close to the test images as real training images are. MMD gets no ratio: its unbiased
    estimate for real images scatters around 0, so ``mmd_train_test`` is the noise floor to read
    ``mmd`` against. Samples are quantized to ``levels`` as the data is.
    ``sliced_wasserstein_ratio_interval``: its 95% bootstrap interval (``sliced_w2_ratio_interval``; ``groups``,
    per sample, marks draws that are not independent, e.g. restorations of one input).
    """
    n = min(samples.shape[0], train.shape[0])  # both sides of the comparison use n images
    if n < 2 or test.shape[0] < 2:
        raise ValueError(f"pixel_quality needs at least 2 samples, 2 train and 2 test images, got "
                         f"{samples.shape[0]}, {train.shape[0]} and {test.shape[0]}")
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    x, ref = _on_grid(samples[:n], levels).flatten(1), _on_grid(test, levels).flatten(1)
    real = _on_grid(train[pick], levels).flatten(1)
    out: dict[str, Any] = {"feature_space": "pixels", "n_compared": n, "n_reference": ref.shape[0]}
    for name, distance in (("sliced_wasserstein", sliced_wasserstein), ("mmd", mmd_rbf)):
        ours, calibration = distance(x, ref), distance(real, ref)
        out[name], out[f"{name}_train_test"] = ours, calibration
    sw = out["sliced_wasserstein_train_test"]
    out["sliced_wasserstein_ratio"] = out["sliced_wasserstein"] / sw if sw > 0 else float("inf")
    out["sliced_wasserstein_ratio_interval"] = list(sliced_w2_ratio_interval(
        x, _on_grid(train, levels), ref, None if groups is None else groups[:n], seed=seed))
    return out
