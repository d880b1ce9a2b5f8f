"""Diffusion posterior sampling (sampling/dps.py) against exact answers, and ``diffusekit restore --method dps``.

Operators: the blur is the convolution it claims (dense matrix, constants kept, linear), the saturation
and its pixel-wise inverse undo each other, measurement noise lands only on measured pixels. Sampler:
zeta = 0 is unconditional DDPM number for number; one guided step equals the closed form
2 zeta J^T M^T r / ||r|| on Gaussian data; a sample does not depend on the batch. Statistics (the exact
oracle denoiser, float64): on Gaussian data with a linear A and Gaussian noise the posterior is Gaussian in
closed form (``gaussian_posterior``, checked against the covariance form of conditioning), and DPS's
sample mean and covariance are pinned against it with the measured gap; on a 2-component mixture the
posterior weights are pinned; for the nonlinear saturation, DPS samples fit y to about the noise level and
unconditional samples do not. CLI: every DPS task writes its files, settings.json reproduces a restoration,
bad values are one line naming the flag.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_restore import _correlated_gaussian  # the strongly correlated Gaussian of those tests
from test_restore_cli import FAST, run

from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.runs.restore import RestoreSettings, measurement_noise, noise_seed
from diffusekit.sampling.ddpm import sample_ddpm
from diffusekit.sampling.dps import GaussianBlur, Saturation, gaussian_posterior, noisy_measurement, sample_dps
from diffusekit.sampling.grids import sampling_schedule
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.restore import Inpaint, SuperResolution
from diffusekit.schedules import make_schedule

F64 = torch.float64
SCHEDULE = make_schedule("linear", T=1000)


def dense_matrix(op, shape):
    """The matrix of y = A x on flattened vectors, without all-zero rows (unmeasured pixels of a mask)."""
    D = math.prod(shape)
    M = op.A(torch.eye(D, dtype=F64).reshape(D, *shape)).reshape(D, -1).T
    return M[M.abs().sum(1) > 0]


def _noise(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=g, dtype=F64)


# -- operators ---------------------------------------------------------------------------------
def test_gaussian_blur_is_a_normalised_reflected_convolution():
    blur = GaussianBlur(5, 1.0)
    k = blur.kernel()
    assert k.shape == (5, 5) and abs(k.sum().item() - 1) < 1e-15 and torch.equal(k, k.T) and torch.equal(k, k.flip(0))
    assert k[2, 2] == k.max() and (k[2, 2] / k[2, 3]).item() == pytest.approx(math.exp(0.5))  # width 1 pixel
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    torch.testing.assert_close(blur.A(torch.full_like(x, 0.3)), torch.full_like(x, 0.3))  # constants stay
    torch.testing.assert_close(blur.A(2 * x - x.flip(0)), 2 * blur.A(x) - blur.A(x.flip(0)))  # linear, per example
    # away from the border it is the plain convolution with the kernel
    inner = sum(k[i, j] * x[:, :, i:i + 4, j:j + 4] for i in range(5) for j in range(5))
    torch.testing.assert_close(blur.A(x)[:, :, 2:6, 2:6], inner)
    # reflected border: column -1 is column 1, so an impulse at (0, 1) reaches (0, 0) twice (zero padding: once)
    impulse = torch.zeros(1, 1, 8, 8, dtype=F64)
    impulse[0, 0, 0, 1] = 1.0
    k3 = GaussianBlur(3, 1.0).kernel()
    assert GaussianBlur(3, 1.0).A(impulse)[0, 0, 0, 0].item() == pytest.approx(2 * k3[1, 0].item())
    M = dense_matrix(blur, (1, 8, 8))
    assert M.shape == (64, 64) and not torch.allclose(M @ M, M)  # not a projection
    for bad in [{"size": 4}, {"size": 0}, {"width": 0.0}, {"width": float("nan")}]:
        with pytest.raises(ValueError):
            GaussianBlur(**bad)
    with pytest.raises(ValueError, match="larger"):
        GaussianBlur(9).A(torch.zeros(1, 1, 4, 4))


def test_saturation_and_its_inverse():
    sat = Saturation(3.0)
    x = torch.linspace(-1, 1, 201, dtype=F64).reshape(1, 1, 1, 201)
    y = sat.A(x)
    assert y[..., 0].item() == pytest.approx(-1.0) and y[..., -1].item() == pytest.approx(1.0)
    assert (y.diff() > 0).all()  # monotone
    torch.testing.assert_close(sat.naive_inverse(y), x, rtol=0, atol=1e-9)
    ends = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    (slope,) = torch.autograd.grad(sat.A(ends).sum(), ends)
    assert slope[0].item() == pytest.approx(3 / math.tanh(3)) and slope[1].item() < 0.04  # extremes compressed
    assert sat.naive_inverse(torch.tensor([1.5, -2.0])).tolist() == [1.0, -1.0]  # noise past the range: clamped
    with pytest.raises(ValueError, match="gain"):
        Saturation(0.0)


def test_measurement_noise_only_on_measured_values():
    x = torch.zeros(2, 1, 4, 4, dtype=F64)
    known = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    n = torch.randn(2, 1, 4, 4, dtype=F64)
    y = noisy_measurement(Inpaint(known), x, 0.1, n)
    assert torch.equal(y[~known], torch.zeros_like(y[~known])) and torch.equal(y[known], 0.1 * n[known])
    y2 = noisy_measurement(SuperResolution(2), x, 0.1, n[:, :, :2, :2])
    assert torch.equal(y2, 0.1 * n[:, :, :2, :2])
    assert torch.equal(noisy_measurement(Saturation(), x, 0.0), x)
    with pytest.raises(ValueError, match="noise"):
        noisy_measurement(SuperResolution(2), x, 0.1, n)


def test_gaussian_posterior_equals_the_covariance_form():
    """Information form (module docstring) = the covariance form of conditioning jointly Gaussian (x, y):
    mu + S M^T G^-1 (y - M mu), S - S M^T G^-1 M S with G = M S M^T + sigma_y^2 I."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(5, 5, generator=g, dtype=F64)
    S, mu = B @ B.T / 5 + 0.1 * torch.eye(5, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    M, y = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    mean, cov = gaussian_posterior(mu, S, M, y, 0.3)
    G = M @ S @ M.T + 0.09 * torch.eye(3, dtype=F64)
    gain = S @ M.T @ torch.linalg.inv(G)
    torch.testing.assert_close(mean, mu + gain @ (y - M @ mu))
    torch.testing.assert_close(cov, S - gain @ M @ S)


# -- the sampler: exact reductions -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zeta_zero_is_unconditional_ddpm_exactly(dtype):
    gm = default_mixture(4)
    op = Saturation(2.0)
    y = torch.zeros(3, 1, 2, 2, dtype=dtype)

    def noise():
        return PerSampleNoise([3, 4, 5], (1, 2, 2), dtype=dtype)

    n1, n2, n3 = noise(), noise(), noise()
    ours = sample_dps(gm.denoiser, SCHEDULE, n1(), n1, op, y, zeta=0.0, steps=20)
    ddpm = sample_ddpm(gm.denoiser, SCHEDULE, n2(), n2, steps=20)
    assert torch.equal(ours, ddpm)
    nudged = sample_dps(gm.denoiser, SCHEDULE, n3(), n3, op, y, zeta=1e-4, steps=20)
    assert 0 < (nudged - ddpm).abs().max() < 0.02  # a small zeta: a small, nonzero change


def test_one_guided_step_is_the_closed_form():
    """Gaussian prior: x0_hat(x) = mu + alpha S C^-1 (x - alpha mu), C = alpha^2 S + sigma^2 I, so with
    A = M, grad_x ||y - M x0_hat||^2 = -2 J^T M^T r with J = alpha S C^-1: the step from x_2 to x_1 adds
    +2 zeta J^T M^T r / ||r||, per example."""
    g = torch.Generator().manual_seed(1)
    B = torch.randn(4, 4, generator=g, dtype=F64)
    S, mu = B @ B.T / 4 + 0.1 * torch.eye(4, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    gm = GaussianMixture.gaussian(mu, S)
    op = SuperResolution(2)
    M = dense_matrix(op, (1, 2, 2))
    x_T = torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    y = torch.randn(3, 1, 1, 1, generator=g, dtype=F64)
    z = torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    seen = []
    sample_dps(gm.denoiser, SCHEDULE, x_T, lambda: z, op, y, zeta=0.3, steps=2,
               callback=lambda d: seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in d.items()}))
    tab = sampling_schedule(SCHEDULE, 2, "trailing")
    a, s = tab.alpha[2].item(), tab.sigma[2].item()
    J = a * S @ torch.linalg.inv(a**2 * S + s**2 * torch.eye(4, dtype=F64))
    x2 = x_T.reshape(3, 4)
    x0 = mu + (x2 - a * mu) @ J.T
    torch.testing.assert_close(seen[0]["x0"].reshape(3, 4), x0)
    r = y.reshape(3, 1) - x0 @ M.T
    torch.testing.assert_close(seen[0]["residual"], r.norm(dim=1))
    ancestral = tab.posterior_mean_coef_xt[2].item() * x2 + tab.posterior_mean_coef_x0[2].item() * x0 \
        + tab.posterior_variance[2].sqrt().item() * z.reshape(3, 4)
    want = ancestral + 2 * 0.3 * (r @ M @ J) / r.norm(dim=1, keepdim=True)
    torch.testing.assert_close(seen[1]["x"].reshape(3, 4), want, rtol=0, atol=1e-12)


def test_a_sample_does_not_depend_on_the_batch():
    gm = default_mixture(16)
    op = GaussianBlur(3, 1.0)
    x_true = gm.sample(3, torch.Generator().manual_seed(0)).reshape(3, 1, 4, 4)
    y = noisy_measurement(op, x_true, 0.1, torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1),
                                                        dtype=F64))

    def run(rows):
        noise = PerSampleNoise([10 + r for r in rows], (1, 4, 4), dtype=F64)
        return sample_dps(gm.denoiser, SCHEDULE, noise(), noise, op, y[rows], zeta=0.2, steps=15)

    torch.testing.assert_close(run([0, 1, 2])[1:2], run([1]), rtol=0, atol=1e-10)


def test_bad_arguments():
    gm = default_mixture(4)
    x = torch.zeros(2, 1, 2, 2, dtype=F64)
    for zeta in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="zeta"):
            sample_dps(gm.denoiser, SCHEDULE, x, _noise(x.shape), Saturation(), x, zeta=zeta, steps=3)
    with pytest.raises(ValueError, match="shape"):
        sample_dps(gm.denoiser, SCHEDULE, x, _noise(x.shape), SuperResolution(2), x, zeta=0.1, steps=3)
    with pytest.raises(TypeError, match="A"):
        sample_dps(gm.denoiser, SCHEDULE, x, _noise(x.shape), object(), x, zeta=0.1, steps=3)


# -- the sampler: statistics against the exact posterior ---------------------------------------


N_STAT = 4000  # Monte Carlo standard error ~0.01 on a 4-d mean, ~0.03 on a 16-d one
STEPS = 50  # respaced steps of the linear T = 1000 schedule

# Measured with N_STAT and STEPS: (mean error, covariance error) of DPS's samples against the exact
# posterior (Euclidean / Frobenius norms), beside the prior's distance to the posterior, at the zeta that
# measured best for each case (zeta scanned over 0.03-0.3; the gap grows on either side, e.g. inpaint
# 0.734 / 0.732 at zeta 0.03 and 0.214 / 0.193 at 0.3). Unconditional DDPM on the same 50 steps is off the
# prior by ~0.01 / 0.15 (tests/test_restore.py), so part of the covariance error is the discretisation.
#   inpaint 1 of 4, sigma_y 0.1, zeta 0.1      (prior-posterior 1.19 / 1.21): DPS 0.117 / 0.145
#   superres x2 (4 -> 1), sigma_y 0.05, zeta 0.15 (prior-posterior 0.46 / 1.42): DPS 0.011 / 0.100
#   blur 3x3 of 4x4, sigma_y 0.2, zeta 0.15    (prior-posterior 2.25 / 5.01): DPS 0.176 / 0.164
GAUSSIAN_CASES = {  # operator, per-example shape, sigma_y, zeta, tolerances (mean, covariance)
    "inpaint": (Inpaint(torch.tensor([[[True, False], [False, False]]])), (1, 2, 2), 0.1, 0.1, (0.16, 0.20)),
    "superres": (SuperResolution(2), (1, 2, 2), 0.05, 0.15, (0.04, 0.15)),
    "blur": (GaussianBlur(3, 1.0), (1, 4, 4), 0.2, 0.15, (0.25, 0.25)),
}


def _dps_samples(denoiser, op, y1, shape, zeta, n=N_STAT, steps=STEPS):
    n_shape = (n, *shape)
    x_T = torch.randn(n_shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    y = y1.expand(n, *y1.shape[1:])
    return sample_dps(denoiser, SCHEDULE, x_T, _noise(n_shape), op, y, zeta=zeta, steps=steps)


def gaussian_gap(case: str, zeta: float | None = None, steps: int = STEPS) -> dict:
    """DPS against the exact Gaussian posterior for one of GAUSSIAN_CASES (``zeta`` None: the case's):
    errors of the sample mean / covariance, the prior's distance to the posterior, the mean residual
    ||y - A x|| beside the noise level sigma_y sqrt(m). docs/restoration.md prints these."""
    op, shape, sigma_y, case_zeta, _ = GAUSSIAN_CASES[case]
    D = math.prod(shape)
    gm = _correlated_gaussian(D)
    x_true = gm.sample(1, torch.Generator().manual_seed(11)).reshape(1, *shape)
    y1 = noisy_measurement(op, x_true, sigma_y, torch.randn(op.A(x_true).shape, dtype=F64,
                                                             generator=torch.Generator().manual_seed(12)))
    M = dense_matrix(op, shape)
    y_vec = y1.reshape(-1)[op.A(torch.ones(1, *shape, dtype=F64)).reshape(-1) != 0]  # the measured values
    mean, cov = gaussian_posterior(gm.means[0], gm.covs[0], M, y_vec, sigma_y)
    x = _dps_samples(gm.denoiser, op, y1, shape, case_zeta if zeta is None else zeta, steps=steps).reshape(N_STAT, D)
    return {"error": ((x.mean(0) - mean).norm().item(), (torch.cov(x.T) - cov).norm().item()),
            "prior": ((gm.mean - mean).norm().item(), (gm.covariance - cov).norm().item()),
            "residual": (x @ M.T - y_vec).norm(dim=1).mean().item(), "noise_level": sigma_y * math.sqrt(M.shape[0])}


@pytest.mark.parametrize("case", list(GAUSSIAN_CASES))
def test_gaussian_posterior_mean_and_covariance(case):
    tol = GAUSSIAN_CASES[case][-1]
    gap = gaussian_gap(case)
    err, prior = gap["error"], gap["prior"]
    assert err[0] < tol[0] and err[1] < tol[1], gap
    assert err[0] < 0.15 * prior[0] and err[1] < 0.2 * prior[1], gap  # far closer to the posterior than the prior
    assert gap["residual"] < 2 * gap["noise_level"] + 0.05, gap  # the samples fit y


def test_too_small_a_zeta_stays_near_the_prior():
    """The U shape of the gap in zeta: too small a step leaves the samples near the prior."""
    gap = gaussian_gap("inpaint", zeta=0.02)
    assert gap["error"][0] > 0.6 * gap["prior"][0], gap


# Two components (weights 0.7 / 0.3, means -+0.6 * 1), 2 of 4 coordinates measured with noise 0.1 at
# y = 0.15: the exact posterior weight of component 2, w_2 N(y; M mu_2, M S_2 M^T + sigma_y^2 I) normalised,
# is 0.896. DPS's frequency of component 2 (N_MIX, STEPS): 0.499 (zeta 0.05), 0.672 (0.1), 0.760 (0.15),
# 0.808 (0.2), 0.811 (0.3); unconditional 0.3. (RePaint and DDNM, noiseless y, reach 0.51 - 0.73:
# tests/test_restore.py.) DPS reweights the components through the gradient of the residual, but from
# the point estimate x0_hat it cannot see the spread within a component: it stops short of the posterior.
N_MIX = 2000


def test_mixture_component_weights():
    cov = 0.3**2 * torch.eye(4, dtype=F64) + 0.01
    gm = GaussianMixture(torch.tensor([0.7, 0.3], dtype=F64), torch.tensor([[-0.6] * 4, [0.6] * 4], dtype=F64),
                         torch.stack([cov, cov]))
    op = Inpaint(torch.tensor([[[True, True], [False, False]]]))
    M, y_vec, sigma_y = torch.eye(4, dtype=F64)[[0, 1]], torch.full((2,), 0.15, dtype=F64), 0.1
    G = M @ gm.covs @ M.T + sigma_y**2 * torch.eye(2, dtype=F64)
    w = torch.softmax(gm.weights.log() + torch.distributions.MultivariateNormal(gm.means @ M.T, G).log_prob(y_vec), 0)
    assert abs(w[1].item() - 0.896) < 1e-3
    y1 = op.A(torch.full((1, 1, 2, 2), 0.15, dtype=F64))

    def frequency(zeta):
        x = _dps_samples(gm.denoiser, op, y1, (1, 2, 2), zeta, n=N_MIX).reshape(N_MIX, 4)
        log_comp, *_ = gm._components(x, 1.0, 0.0)
        return (log_comp.argmax(1) == 1).double().mean().item()

    f = frequency(0.2)
    assert 0.76 < f < 0.86, f  # most of the way from the prior's 0.3 to the posterior's 0.896
    assert abs(frequency(0.0) - 0.3) < 0.04


# The saturation on a 16-d mixture (default_mixture(16), 4x4 images), gain 3, sigma_y 0.1 (noise level
# sigma_y sqrt(16) = 0.4): mean ||y - A(x)|| of DPS samples (N_MIX, STEPS) 0.98 (zeta 0.05), 0.51 (0.1),
# 0.69 (0.15), 0.87 (0.2); unconditional samples 3.89; mean distance to the true x 0.53 at zeta 0.1 against
# 2.25 unconditional.
def test_nonlinear_saturation_fits_y_to_the_noise_level():
    gm = default_mixture(16)
    op, sigma_y = Saturation(3.0), 0.1
    x_true = gm.sample(1, torch.Generator().manual_seed(3)).reshape(1, 1, 4, 4)
    y1 = noisy_measurement(op, x_true, sigma_y, torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(4),
                                                             dtype=F64))
    level = sigma_y * 4
    fit = {}
    for zeta in (0.0, 0.1):
        x = _dps_samples(gm.denoiser, op, y1, (1, 4, 4), zeta, n=N_MIX)
        fit[zeta] = ((op.A(x) - y1).flatten(1).norm(dim=1).mean().item(), (x - x_true).flatten(1).norm(dim=1).mean())
    assert 0.8 * level < fit[0.1][0] < 1.6 * level, fit  # about the noise: neither ignored nor over-fitted
    assert fit[0.0][0] > 8 * level and fit[0.0][1] > 3 * fit[0.1][1], fit


# -- the command (on conftest's tiny digits run, with the restore command's own runner) -------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(folder / f"in{i}.png")
        paths.append(str(folder / f"in{i}.png"))
    return paths


def test_dps_blur_writes_everything_and_reproduces(digits_run, images, tmp_path, capsys):
    out = tmp_path / "r1"
    assert run(["--run", digits_run, "--task", "blur", "--method", "dps", "--noise-std", "0.05", "--images", *images,
                "--seeds", "4-5", "--out", out, *FAST]) == 0
    line = capsys.readouterr().out
    assert "blur with dps (zeta=" in line and "the blurred y" in line and "RMS of y - A(x)" in line
    assert {p.name for p in out.iterdir()} == {"restore.png", "restored.npz", "settings.json", "metrics.json"}
    d = np.load(out / "restored.npz")
    assert d["restored"].shape == (2, 2, 1, 8, 8) and d["measurement"].shape == (2, 1, 8, 8)
    assert np.array_equal(d["degraded"], d["measurement"])  # for blur the degraded image is y itself
    original = torch.from_numpy(d["original"])
    noise = torch.stack([measurement_noise(0, k, (1, 8, 8)) for k in range(2)])
    torch.testing.assert_close(torch.from_numpy(d["measurement"]), GaussianBlur(5, 1.0).A(original) + 0.05 * noise)
    assert d["noise_seeds"][1, 0] == noise_seed(4, 1)
    settings = json.loads((out / "settings.json").read_text())
    metrics = settings["extra"]["metrics"]
    assert settings["noise_std"] == 0.05 and settings["zeta"] == metrics["zeta"] == pytest.approx(5 / math.sqrt(5))
    assert metrics["nfe"] == 5 and metrics["residual_rms"] > 0 and settings["measurement_seed"] == 0
    # settings.json alone reproduces the restoration; the batch size changes nothing
    again = tmp_path / "r2"
    assert run(["--run", digits_run, "--settings", out / "settings.json", "--out", again, "--no-progress"]) == 0
    assert np.array_equal(np.load(again / "restored.npz")["restored"], d["restored"])
    small = tmp_path / "r3"
    assert run(["--run", digits_run, "--task", "blur", "--method", "dps", "--noise-std", "0.05", "--images", *images,
                "--seeds", "4-5", "--batch-size", "1", "--out", small, *FAST]) == 0
    # up to float32 rounding, relative: this 3-step model's DPS strays to values near 1e3, where batch 1 and batch 2
    # kernels differ in the 7th digit (seen on one CPU model, not another)
    np.testing.assert_allclose(np.load(small / "restored.npz")["restored"], d["restored"], rtol=1e-5, atol=1e-5)
    # another measurement seed: another y
    other = tmp_path / "r4"
    assert run(["--run", digits_run, "--task", "blur", "--method", "dps", "--noise-std", "0.05", "--images", *images,
                "--seeds", "4", "--measurement-seed", "1", "--out", other, *FAST]) == 0
    assert not np.array_equal(np.load(other / "restored.npz")["measurement"], d["measurement"])


@pytest.mark.parametrize("flags", [["--task", "saturation", "--gain", "2"], ["--task", "inpaint", "--noise-std", "0.1"],
                                   ["--task", "superres", "--zeta", "0.3"], ["--task", "outpaint"],
                                   ["--task", "blur", "--blur-size", "3", "--blur-width", "0.7"]],
                         ids=lambda f: "-".join(f[1::2]))
def test_dps_tasks(digits_run, images, tmp_path, flags):
    out = tmp_path / "out"
    assert run(["--run", digits_run, *flags, "--method", "dps", "--images", *images, "--seeds", "0", "--out", out,
                *FAST]) == 0
    d = np.load(out / "restored.npz")
    metrics = json.loads((out / "metrics.json").read_text())
    assert d["restored"].shape == (2, 1, 1, 8, 8) and np.isfinite(d["restored"]).all()
    original, y = torch.from_numpy(d["original"]), torch.from_numpy(d["measurement"])
    if "saturation" in flags:
        torch.testing.assert_close(y, Saturation(2.0).A(original))  # no noise by default
        torch.testing.assert_close(torch.from_numpy(d["degraded"]), Saturation(2.0).naive_inverse(y))
    if "inpaint" in flags:  # noise on the known pixels only; they are not copied (y is noisy)
        known = torch.from_numpy(d["known"])
        assert torch.equal(y[~known], torch.zeros_like(y[~known])) and not torch.equal(y[known], original[known])
        restored = torch.from_numpy(d["restored"][:, 0])
        assert not torch.equal(restored[known], y[known]) and metrics["noise_std"] == 0.1
    if "superres" in flags:
        assert metrics["zeta"] == 0.3 and y.shape == (2, 1, 4, 4)


@pytest.mark.parametrize("flags,needles", [
    (["--method", "dps", "--noise-std", "-0.1"], ["--noise-std", "-0.1"]),
    (["--method", "dps", "--noise-std", "nan"], ["--noise-std", "nan"]),
    (["--method", "dps", "--noise-std", "5"], ["--noise-std"]),
    (["--method", "dps", "--zeta", "0"], ["--zeta", "0.0"]),
    (["--method", "dps", "--zeta", "-1"], ["--zeta"]),
    (["--method", "dps", "--zeta", "1e6"], ["--zeta", "1000000.0"]),
    (["--method", "dps", "--zeta", "nan"], ["--zeta", "nan"]),
    (["--method", "dps", "--zeta", "inf"], ["--zeta", "inf"]),
    (["--method", "dps", "--measurement-seed", "-3"], ["--measurement-seed"]),
    (["--method", "dps", "--resample", "2"], ["--resample", "--method dps"]),
    (["--method", "repaint", "--noise-std", "0.1"], ["--noise-std", "--method dps", "repaint"]),
    (["--method", "ddnm", "--zeta", "0.5"], ["--zeta", "--method dps", "ddnm"]),
    (["--method", "repaint", "--noise-std", "0"], ["--noise-std", "--method dps"]),
    (["--task", "blur", "--method", "repaint"], ["--task blur", "--method dps"]),
    (["--task", "saturation", "--method", "ddnm"], ["--task saturation", "--method dps"]),
    (["--task", "blur", "--method", "dps", "--blur-size", "4"], ["--blur-size", "odd"]),
    (["--task", "blur", "--method", "dps", "--blur-size", "17"], ["--blur-size 17", "8x8"]),
    (["--task", "blur", "--method", "dps", "--blur-width", "0"], ["--blur-width"]),
    (["--task", "saturation", "--method", "dps", "--gain", "nan"], ["--gain"]),
    (["--task", "blur", "--method", "dps", "--gain", "2"], ["--gain", "saturation"]),
    (["--task", "superres", "--method", "dps", "--blur-size", "3"], ["--blur-size", "blur"]),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_naming_the_flag(digits_run, images, tmp_path, capsys, flags, needles):
    if "--task" not in flags:
        flags = ["--task", "superres", *flags]
    code = run(["--run", digits_run, *flags, "--images", *images, "--out", tmp_path / "out", "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "out").exists()


def test_settings_check_the_method_and_old_settings_still_load():
    with pytest.raises(Exception, match="--task blur needs --method dps"):
        RestoreSettings(task="blur")
    assert RestoreSettings(task="blur", method="dps").zeta is None  # resolved per run: dps_zeta
    old = {"task": "inpaint", "method": "repaint", "seeds": [0]}  # a settings.json from before DPS
    assert RestoreSettings.from_json(json.dumps(old)).noise_std == 0.0
    with pytest.raises(Exception, match="--zeta"):
        RestoreSettings(task="inpaint", method="dps", zeta=float("nan"))
    assert RestoreSettings(task="colorize", method="dps", noise_std=0.1).noise_std == 0.1


def test_jump_with_dps_is_one_line_like_resample(digits_run, images, tmp_path, capsys):
    """--jump is RePaint's j, which dps never reads: refused in one line as --resample is, not ignored."""
    with pytest.raises(Exception, match=r"^--jump applies to repaint and ddnm, not --method dps \(got 5\)$"):
        RestoreSettings(task="superres", method="dps", jump=5)
    assert RestoreSettings(task="superres", method="dps", jump=10).jump == 10  # the default is no setting
    code = run(["--run", digits_run, "--task", "blur", "--method", "dps", "--jump", "3", "--images", *images,
                "--out", tmp_path / "out", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == "diffusekit restore: error: --jump applies to repaint and ddnm, not --method dps (got 3)\n"
    assert not (tmp_path / "out").exists()
