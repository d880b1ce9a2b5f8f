"""Classifier-free guidance (sampling/guidance.py) against exact answers.

The Gaussian-mixture oracle with the class as the mixture component gives the exact conditional
denoiser (component k's own Gaussian denoiser) and the exact unconditional one (the whole mixture).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusekit.nn import MLPDenoiser
from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.parameterization import Denoiser, Prediction
from diffusekit.sampling.generate import generate
from diffusekit.sampling.guidance import ClassifierFreeGuidance, class_labels_for, guided_eps, null_class_labels
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import alpha_sigma_from_logsnr, make_schedule

F64 = torch.float64
MIX = default_mixture(2)
K = MIX.weights.numel()
COMPONENTS = [GaussianMixture.gaussian(MIX.means[k], MIX.covs[k]) for k in range(K)]


class ClassOracle:
    """The exact class-conditional denoiser: label k < K -> component k, label K (null) -> the mixture.
    Records the batch size of every call."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x_t, logsnr, cond=None) -> Prediction:
        n = x_t.shape[0]
        self.batches.append(n)
        y = torch.full((n,), K) if cond is None else cond["class_labels"]
        logsnr = torch.as_tensor(logsnr, dtype=F64).expand(n)
        eps, x0 = torch.empty_like(x_t), torch.empty_like(x_t)
        for k, model in enumerate(COMPONENTS + [MIX]):
            rows = y == k
            if rows.any():
                pred = model.denoiser(x_t[rows], logsnr[rows])
                eps[rows], x0[rows] = pred.eps, pred.x0
        return Prediction(eps=eps, x0=x0, raw=eps, kind="eps")


def _points(n: int, seed: int) -> torch.Tensor:
    return 1.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("logsnr", [-6.0, -1.0, 0.5, 4.0])
def test_guided_prediction_is_the_formula(scale, logsnr):
    x = _points(12, 0)
    y = torch.arange(12) % K
    lam = torch.tensor(logsnr, dtype=F64)
    pred = ClassifierFreeGuidance(ClassOracle(), scale, null_class_labels(K))(x, lam, {"class_labels": y})
    uncond = MIX.denoiser(x, lam)
    cond_eps = torch.cat([COMPONENTS[int(k)].denoiser(x[i:i + 1], lam).eps for i, k in enumerate(y)])
    cond_x0 = torch.cat([COMPONENTS[int(k)].denoiser(x[i:i + 1], lam).x0 for i, k in enumerate(y)])
    want = uncond.eps + scale * (cond_eps - uncond.eps)
    torch.testing.assert_close(pred.eps, want, rtol=1e-12, atol=1e-12)
    if scale == 1.0:
        torch.testing.assert_close(pred.eps, cond_eps, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pred.x0, cond_x0, rtol=1e-12, atol=1e-12)
    if scale == 0.0:
        torch.testing.assert_close(pred.eps, uncond.eps, rtol=0, atol=0)
    # the Prediction stays consistent: x_t = alpha x0 + sigma eps, i.e. x0 is the x0 of the guided eps
    alpha, sigma = (float(v) for v in alpha_sigma_from_logsnr(lam))
    torch.testing.assert_close(alpha * pred.x0 + sigma * pred.eps, x, rtol=1e-10, atol=1e-10)
    if logsnr > -2:  # where dividing by alpha is well conditioned, the explicit recomputation agrees
        torch.testing.assert_close(pred.x0, (x - sigma * pred.eps) / alpha, rtol=1e-9, atol=1e-9)
    assert pred.kind == "eps"


def test_one_batched_call_and_the_caller_cond_untouched():
    oracle = ClassOracle()
    y = torch.tensor([2, 0, 1, 1, 0])
    cond = {"class_labels": y, "other": torch.zeros(5)}
    guided = ClassifierFreeGuidance(oracle, 2.5, null_class_labels(K))
    guided(_points(5, 1), torch.tensor(0.3), cond)
    assert oracle.batches == [10]  # cond and null in ONE network call
    assert cond["class_labels"] is y and torch.equal(y, torch.tensor([2, 0, 1, 1, 0])) and set(cond) == {"class_labels", "other"}
    for scale in (0.0, 1.0):  # the plain unconditional / conditional model: one half, B rows
        oracle.batches.clear()
        ClassifierFreeGuidance(oracle, scale, null_class_labels(K))(_points(5, 1), torch.tensor(0.3), cond)
        assert oracle.batches == [5]


def test_generate_counts_guided_calls_and_ignores_batch_size():
    sch = make_schedule("linear", 200)
    settings = SampleSettings(sampler="ddim", steps=8, seeds=list(range(7)), batch_size=3, guidance=3.0)
    oracle, stats = ClassOracle(), {}
    x = generate(oracle, sch, (2,), settings, progress=False, dtype=F64, stats=stats, num_classes=K)
    assert stats["nfe"] == 8 * 3 == len(oracle.batches)  # 8 steps x 3 batches: one network call each
    assert oracle.batches == [6] * 8 + [6] * 8 + [2] * 8  # batches of 3, 3, 1 seeds: 2B rows per call
    assert stats["rows_per_example"] == 2 and stats["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    one_batch = SampleSettings(**{**settings.to_dict(), "batch_size": 64})
    torch.testing.assert_close(generate(oracle, sch, (2,), one_batch, progress=False, dtype=F64, num_classes=K), x,
                               rtol=1e-12, atol=1e-12)


def _moments_and_w2(x: torch.Tensor, target: GaussianMixture, seed: int) -> tuple[float, float, float, float]:
    """(mean error, covariance error, sliced W2 to exact draws, the same between two exact draws)."""
    from diffusekit.evaluate.quality import sliced_wasserstein

    ref = target.sample(x.shape[0], torch.Generator().manual_seed(seed))
    floor = sliced_wasserstein(target.sample(x.shape[0], torch.Generator().manual_seed(seed + 1)), ref)
    mean_err = (x.mean(0) - target.mean).norm().item()
    cov_err = (torch.cov(x.T) - target.covariance).norm().item()
    return mean_err, cov_err, sliced_wasserstein(x, ref), floor


N = 2000


@pytest.mark.parametrize("scale, target", [(1.0, k) for k in range(K)] + [(0.0, None)])
def test_guided_sampling_runs_the_exact_conditional_or_unconditional_chain(scale, target):
    """Exact answer: at s = 1 the guided sampler follows, step for step, the chain of component k's own
    denoiser; at s = 0 the chain of the mixture's (same seeds, same noise)."""
    sch = make_schedule("linear", 1000)
    classes = None if target is None else [target]
    settings = SampleSettings(sampler="ddpm", steps=20, seeds=list(range(64)), batch_size=64, classes=classes,
                              guidance=scale)
    x = generate(ClassOracle(), sch, (2,), settings, progress=False, dtype=F64, num_classes=K)
    plain = SampleSettings(**{**settings.to_dict(), "classes": None, "guidance": 1.0})
    model = MIX if target is None else COMPONENTS[target]
    torch.testing.assert_close(x, generate(model.denoiser, sch, (2,), plain, progress=False, dtype=F64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", range(K))
def test_scale_one_samples_land_on_the_component(k):
    """UniPC, 20 calls (tests/test_unipc.py): moments and sliced W2 of class-k samples at s = 1 match
    component k; measured W2 is within 1.2x the distance between two exact draws of N points."""
    sch = make_schedule("linear", 1000)
    settings = SampleSettings(sampler="unipc", steps=20, seeds=list(range(N)), batch_size=N, classes=[k])
    x = generate(ClassOracle(), sch, (2,), settings, progress=False, dtype=F64, num_classes=K)
    mean_err, cov_err, w2, floor = _moments_and_w2(x, COMPONENTS[k], seed=20 + k)
    var = COMPONENTS[k].covariance.trace().item()  # component variance, 0.03..0.25
    assert mean_err < 4 * math.sqrt(var / N), (mean_err, var)
    assert cov_err < 0.05 * var, (cov_err, var)  # sampling error of the covariance alone is ~3%
    assert w2 < 1.5 * floor, (w2, floor)
    assert (x.mean(0) - MIX.mean).norm() > 0.5  # and not the mixture


def test_scale_zero_samples_land_on_the_mixture():
    sch = make_schedule("linear", 1000)
    settings = SampleSettings(sampler="unipc", steps=20, seeds=list(range(N)), batch_size=N, guidance=0.0)
    x = generate(ClassOracle(), sch, (2,), settings, progress=False, dtype=F64, num_classes=K)
    mean_err, cov_err, w2, floor = _moments_and_w2(x, MIX, seed=30)
    var = MIX.covariance.trace().item()
    assert mean_err < 4 * math.sqrt(var / N), mean_err
    assert cov_err < 0.05 * var, (cov_err, var)
    assert w2 < 1.5 * floor, (w2, floor)
    labels = torch.arange(N) % K  # every class label, all drawing from the whole mixture at s = 0
    for k in range(K):
        assert (x[labels == k].mean(0) - MIX.mean).norm() < 0.15


def test_guidance_sharpens_toward_the_class():
    """s > 1 pushes class-k samples toward what separates component k from the mixture: their mean
    moves past the component mean, away from the mixture mean (a consequence of the formula, not an
    exact answer: the guided distribution is no longer a diffusion of any data)."""
    sch = make_schedule("linear", 1000)
    k = 0
    means = []
    for s in (1.0, 3.0):
        settings = SampleSettings(sampler="ddpm", steps=50, seeds=list(range(500)), batch_size=500,
                                  classes=[k], guidance=s)
        means.append(generate(ClassOracle(), sch, (2,), settings, progress=False, dtype=F64,
                              num_classes=K).mean(0))
    away = (COMPONENTS[k].mean - MIX.mean) / (COMPONENTS[k].mean - MIX.mean).norm()
    assert ((means[1] - means[0]) @ away).item() > 0.02


def test_real_network_guided_equals_two_separate_calls():
    torch.manual_seed(0)
    den = Denoiser(MLPDenoiser(dim=2, hidden=32, depth=2, num_classes=K), "v").double().eval()
    x, y = _points(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    guided = ClassifierFreeGuidance(den, 2.0, null_class_labels(K))
    for lam in (torch.tensor(0.7, dtype=F64), torch.linspace(-3, 3, 6, dtype=F64)):  # one level / per example
        with torch.no_grad():
            pred = guided(x, lam, {"class_labels": y})
            c, u = den(x, lam, {"class_labels": y}), den(x, lam, None)  # None = all null labels
        torch.testing.assert_close(pred.eps, guided_eps(u.eps, c.eps, 2.0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pred.x0, guided_eps(u.x0, c.x0, 2.0), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pred.raw, guided_eps(u.raw, c.raw, 2.0), rtol=1e-10, atol=1e-10)


def test_class_labels_and_settings_validation():
    assert class_labels_for(7, None, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert class_labels_for(5, [4], 10).tolist() == [4] * 5
    assert class_labels_for(5, [0, 2], 3).tolist() == [0, 2, 0, 2, 0]
    with pytest.raises(ValueError, match="class 3 is out of range"):
        class_labels_for(4, [1, 3], 3)
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="guidance") as info:
            SampleSettings(guidance=bad)
        assert "\n" not in str(info.value)
    for bad in ([], [-1], [1.5], "3"):
        with pytest.raises(ValueError, match="classes"):
            SampleSettings(classes=bad)
    with pytest.raises(ValueError, match="guidance scale"):
        ClassifierFreeGuidance(ClassOracle(), float("nan"), null_class_labels(K))
    s = SampleSettings(guidance=2, classes=[3, 1])
    assert s.guidance == 2.0 and SampleSettings.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["classes"] == [3, 1]
    sch = make_schedule("linear", 50)
    with pytest.raises(ValueError, match="class-conditional"):  # guidance on an unconditional model
        generate(MIX.denoiser, sch, (2,), SampleSettings(steps=2, seeds=[0], guidance=2.0), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        generate(ClassOracle(), sch, (2,), SampleSettings(steps=2, seeds=[0], classes=[5]), progress=False,
                 num_classes=K)
