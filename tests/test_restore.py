"""Restoration (sampling/restore.py) against exact answers.

Operators: A A+ = I, the projections are idempotent and orthogonal, A+ equals the Moore-Penrose
pseudo-inverse of the dense matrix. Samplers: where the measured and the unseen components are
independent under the prior, RePaint and DDNM reduce exactly to unconditional DDPM on the unseen
component; the known pixels of the output equal the measurement bit for bit; a sample does not
depend on the batch. Statistics: Gaussian data with the exact oracle denoiser, whose posterior
p(x | A x = y) is Gaussian in closed form (``oracle.linear_posterior``), and a 2-component mixture,
whose posterior reweights the components by the marginal likelihood of y. Neither method is exact
there; the tests pin the measured gap and that resampling (U > 1) narrows it.
"""

import pytest
import torch

from diffusekit.oracle import GaussianMixture, linear_posterior
from diffusekit.sampling.ddpm import sample_ddpm
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.restore import (
    Colorization,
    Inpaint,
    SuperResolution,
    resample_path,
    sample_ddnm,
    sample_repaint,
)
from diffusekit.schedules import make_schedule

F64 = torch.float64
SAMPLERS = {"repaint": sample_repaint, "ddnm": sample_ddnm}
SCHEDULE = make_schedule("linear", T=1000)


def dense_matrix(op, shape):
    """The matrix of y = A x on flattened vectors, without the all-zero rows (unmeasured pixels)."""
    D = torch.Size(shape).numel()
    M = op.A(torch.eye(D, dtype=F64).reshape(D, *shape)).reshape(D, -1).T
    return M[M.abs().sum(1) > 0]


def operators():
    g = torch.Generator().manual_seed(0)
    return [("inpaint", Inpaint(torch.rand(2, 1, 8, 8, generator=g) < 0.4), (2, 3, 8, 8)),
            ("inpaint-flat", Inpaint(torch.tensor([True, False, True, False, False])), (2, 5)),
            ("superres2", SuperResolution(2), (2, 3, 8, 8)), ("superres4", SuperResolution(4), (2, 1, 8, 8)),
            ("colorize", Colorization(3), (2, 3, 4, 4)), ("colorize-flat", Colorization(3), (2, 3))]


# -- operators -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,op,shape", operators(), ids=[o[0] for o in operators()])
def test_pinv_projections_and_consistency(name, op, shape):
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    y = op.A(x)
    torch.testing.assert_close(op.A(op.A_pinv(y)), y, rtol=0, atol=1e-14)  # A A+ = I on measurements
    P, N = op.project_range, op.project_null
    torch.testing.assert_close(P(P(x)), P(x), rtol=0, atol=1e-14)  # idempotent
    torch.testing.assert_close(N(N(x)), N(x), rtol=0, atol=1e-14)
    torch.testing.assert_close(P(N(x)), torch.zeros_like(x), rtol=0, atol=1e-14)
    assert abs((P(x) * N(x2)).sum()) < 1e-12  # orthogonal: range(A^T) is perpendicular to null(A)
    torch.testing.assert_close(P(x) + N(x), x, rtol=0, atol=1e-14)
    out = op.consistent(x2, y)  # measurement-consistent, and only the null-space part of x2 is kept
    torch.testing.assert_close(op.A(out), y, rtol=0, atol=1e-14)
    torch.testing.assert_close(N(out), N(x2), rtol=0, atol=1e-14)


@pytest.mark.parametrize("op,shape", [(SuperResolution(2), (1, 2, 4, 4)), (Colorization(3), (1, 3, 2, 2)),
                                      (Inpaint(torch.tensor([[True, False], [True, True]])), (1, 1, 2, 2))])
def test_pinv_is_the_moore_penrose_inverse_of_the_dense_matrix(op, shape):
    M = dense_matrix(op, shape[1:])
    torch.testing.assert_close(M @ M.T, (M @ M.T)[0, 0] * torch.eye(M.shape[0], dtype=F64))  # A A^T = c I
    x = torch.randn(shape, dtype=F64)
    want = (torch.linalg.pinv(M) @ (M @ x.reshape(-1))).reshape(shape)
    torch.testing.assert_close(op.project_range(x), want, rtol=0, atol=1e-12)


def test_shapes_and_bad_input():
    x = torch.randn(2, 3, 8, 8)
    assert SuperResolution(4).A(x).shape == (2, 3, 2, 2)
    assert SuperResolution(4).A_pinv(torch.ones(2, 3, 2, 2)).shape == x.shape
    assert Colorization(3).A(x).shape == (2, 1, 8, 8)
    assert Colorization(3).A_pinv(torch.ones(2, 1, 8, 8)).shape == x.shape
    assert torch.equal(SuperResolution(2).A_pinv(torch.tensor([[[[1.0, 2.0]]]])),
                       torch.tensor([[[[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]]]))  # nearest upsampling
    with pytest.raises(ValueError, match="does not divide"):
        SuperResolution(3).A(x)
    with pytest.raises(ValueError, match="3 channels"):
        Colorization(3).A(torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match="bool"):
        Inpaint(torch.ones(8, 8))
    with pytest.raises(ValueError, match="factor"):
        SuperResolution(0)


def test_resample_path():
    assert resample_path(5) == [5, 4, 3, 2, 1, 0]
    # jump points 0 and 2 (k + j <= S): each segment of j = 2 steps is denoised U = 2 times
    assert resample_path(4, resample=2, jump=2) == [4, 3, 2, 4, 3, 2, 1, 0, 2, 1, 0]
    for S, U, j in [(50, 5, 10), (20, 3, 7), (7, 4, 1)]:
        path = resample_path(S, U, j)
        down = sum(b == a - 1 for a, b in zip(path, path[1:]))
        assert path[0] == S and path[-1] == 0 and min(path) == 0 and max(path) == S
        assert down == S + (U - 1) * j * (S // j)
        assert all(b == a - 1 or b == a + j for a, b in zip(path, path[1:]))
    with pytest.raises(ValueError, match="jump"):
        resample_path(5, resample=2, jump=6)


# -- samplers: exact reductions ----------------------------------------------------------------
def _noise(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=g, dtype=F64)


def _split_gaussian(op, shape, seed=0):
    """A Gaussian whose measured component P x and unseen component (I - P) x are independent."""
    D = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(seed)
    M = dense_matrix(op, shape)
    P = torch.linalg.pinv(M) @ M
    B1, B2 = torch.randn(D, D, generator=g, dtype=F64), torch.randn(D, D, generator=g, dtype=F64)
    I = torch.eye(D, dtype=F64)
    cov = P @ (0.2 * B1 @ B1.T / D) @ P + (I - P) @ (0.3 * B2 @ B2.T / D) @ (I - P) + 0.01 * I
    return GaussianMixture.gaussian(0.3 * torch.randn(D, generator=g, dtype=F64), cov)


@pytest.mark.parametrize("method", ["repaint", "ddnm"])
@pytest.mark.parametrize("op,shape", [(Inpaint(torch.tensor([[[True, False], [False, True]]])), (1, 2, 2)),
                                      (SuperResolution(2), (1, 2, 2)), (Colorization(3), (3, 1, 1))],
                         ids=["inpaint", "superres", "colorize"])
def test_independent_components_reduce_to_ddpm(method, op, shape):
    """If P x and (I - P) x are independent, E[(I - P) x0 | x_t] depends on (I - P) x_t alone, so
    the unseen component follows unconditional DDPM exactly: with the same x_T and noise stream, the
    null-space components of the outputs agree to rounding (also through respaced steps)."""
    gm = _split_gaussian(op, shape)
    n = 16
    x_true = gm.sample(n, torch.Generator().manual_seed(5)).reshape(n, *shape)
    y = op.A(x_true)
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(6), dtype=F64)
    ours = SAMPLERS[method](gm.denoiser, SCHEDULE, x_T, _noise((n, *shape)), op, y, steps=30)
    ddpm = sample_ddpm(gm.denoiser, SCHEDULE, x_T, _noise((n, *shape)), steps=30)
    torch.testing.assert_close(op.project_null(ours), op.project_null(ddpm), rtol=0, atol=1e-10)
    torch.testing.assert_close(op.A(ours), y, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["repaint", "ddnm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_pixels_equal_the_measurement_exactly(method, dtype):
    gm = GaussianMixture.gaussian(torch.zeros(16), 0.2 * torch.eye(16) + 0.1)
    known = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    op = Inpaint(known)
    x_true = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype) * 2 - 1
    noise = PerSampleNoise([0, 1, 2], (1, 4, 4), dtype=dtype)
    out = SAMPLERS[method](gm.denoiser, SCHEDULE, noise(), noise, op, op.A(x_true), steps=10, resample=2, jump=3)
    assert out.dtype == dtype
    assert torch.equal(out[known], x_true[known])
    assert (out[~known] != x_true[~known]).all()


@pytest.mark.parametrize("method", ["repaint", "ddnm"])
def test_a_sample_does_not_depend_on_the_batch(method):
    gm = GaussianMixture.gaussian(torch.zeros(4), 0.3 * torch.eye(4) + 0.1)
    op = SuperResolution(2)
    x_true = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = op.A(x_true)

    def run(rows):
        noise = PerSampleNoise([10 + r for r in rows], (1, 2, 2))
        return SAMPLERS[method](gm.denoiser, SCHEDULE, noise(), noise, op, y[rows], steps=12, resample=3, jump=4)

    torch.testing.assert_close(run([0, 1, 2])[1:2], run([1]), rtol=0, atol=1e-6)


def test_callback_sees_every_network_call():
    gm = GaussianMixture.gaussian(torch.zeros(4), torch.eye(4))
    seen = []
    op = Inpaint(torch.tensor([True, False, False, True]))
    sample_repaint(gm.denoiser, SCHEDULE, torch.randn(2, 4, dtype=F64), _noise((2, 4)), op, torch.zeros(2, 4),
                   steps=10, resample=3, jump=5, callback=lambda d: seen.append((d["i"], d["t"])))
    assert [i for i, _ in seen] == list(range(len(seen))) and len(seen) == 10 + 2 * 5 * 2
    assert seen[0][1] == 1000 and seen[-1][1] == 100  # the trailing grid of 10 steps, noisiest first


# -- samplers: statistics against the exact posterior ------------------------------------------
def _correlated_gaussian(D, seed=3):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(D, D, generator=g, dtype=F64)
    common = torch.linspace(1.0, 0.7, D, dtype=F64)[None]
    cov = 0.3 * B @ B.T / D + 0.05 * torch.eye(D, dtype=F64) + 0.4 * common.T @ common
    return GaussianMixture.gaussian(torch.linspace(0.3, -0.3, D, dtype=F64), cov)


N_STAT = 4000  # Monte Carlo standard error: ~0.01 on the mean, ~0.04 on the covariance (Frobenius)
STEPS, JUMP = 50, 5  # respaced steps of the linear T = 1000 schedule; jump length of the resampling

# Measured with N_STAT, STEPS and JUMP: (mean error, covariance error) against the exact posterior
# (Euclidean / Frobenius norms), beside what ignoring y would cost (prior vs posterior). For scale,
# unconditional DDPM on the same 50 steps is off the prior by 0.01 / 0.18 (0.01 / 0.15 in 3-D): the
# covariance errors are mostly the discretisation of 50 ancestral steps, not the restoration.
#   inpaint 1 of 4 pixels (prior-posterior 1.09 / 1.23): RePaint U=1 0.425 / 0.199, U=5 0.166 / 0.116
#                                                        DDNM    U=1 0.424 / 0.239, U=5 0.165 / 0.116
#   superres x2, 4 -> 1   (prior-posterior 0.76 / 1.43): RePaint U=1 0.050 / 0.094, U=5 0.025 / 0.121
#   colorize 3 -> 1       (prior-posterior 0.75 / 1.23): RePaint U=1 0.018 / 0.063, U=5 0.004 / 0.091
# (DDNM gives the same numbers to 0.002 on superres and colorize.) Plain replacement gets the mean
# wrong where y says much about the unseen pixels (inpainting a strongly correlated Gaussian), and
# resampling removes about 60% of that error; on the full chain (1000 steps, U = 10, jump 1) RePaint
# reaches 0.056 / 0.023 on the inpainting case (docs/restoration.md).
GAUSSIAN_CASES = {  # operator, per-example shape, tolerances (mean, covariance) for U = 1 and U = 5
    "inpaint": (Inpaint(torch.tensor([[[True, False], [False, False]]])), (1, 2, 2), (0.50, 0.30), (0.22, 0.20)),
    "superres": (SuperResolution(2), (1, 2, 2), (0.08, 0.17), (0.04, 0.19)),
    "colorize": (Colorization(3), (3, 1, 1), (0.05, 0.13), (0.04, 0.15)),
}


def _restore(method, gm, op, y, shape, resample, n=N_STAT):
    n_shape = (n, *shape)
    x_T = torch.randn(n_shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    x = SAMPLERS[method](gm.denoiser, SCHEDULE, x_T, _noise(n_shape), op, y, steps=STEPS, resample=resample,
                         jump=JUMP)
    return x.reshape(n, -1)


@pytest.mark.parametrize("case,method", [("inpaint", "repaint"), ("inpaint", "ddnm"), ("superres", "repaint"),
                                         ("colorize", "repaint")])
def test_gaussian_posterior_mean_and_covariance(case, method):
    op, shape, tol_1, tol_5 = GAUSSIAN_CASES[case]
    D = torch.Size(shape).numel()
    gm = _correlated_gaussian(D)
    x_true = torch.tensor([1.0, 0.8, -0.5, 0.2], dtype=F64)[:D].reshape(1, *shape)
    M = dense_matrix(op, shape)
    _, means, covs = linear_posterior(gm, M, M @ x_true.reshape(-1))
    y = op.A(x_true).expand(N_STAT, *op.A(x_true).shape[1:])
    errors = {}
    for U in (1, 5):
        x = _restore(method, gm, op, y, shape, U)
        torch.testing.assert_close(x @ M.T, (M @ x_true.reshape(-1)).expand(N_STAT, -1), rtol=0, atol=1e-12)
        errors[U] = ((x.mean(0) - means[0]).norm().item(), (torch.cov(x.T) - covs[0]).norm().item())
    prior_gap = (gm.mean - means[0]).norm().item()
    assert errors[1][0] < tol_1[0] and errors[1][1] < tol_1[1], errors
    assert errors[5][0] < tol_5[0] and errors[5][1] < tol_5[1], errors
    assert errors[5][0] < max(0.6 * errors[1][0], 0.02), errors  # resampling moves the mean to the posterior's
    assert errors[5][0] < 0.25 * prior_gap, (errors, prior_gap)  # far better than ignoring y


# The mixture below, 2 of 4 pixels known and y = 0.15 in both: the exact posterior weight of
# component 2 is 0.919 (prior weight 0.3). Measured frequency of component 2 (N_MIX, STEPS, JUMP):
#   RePaint U=1 0.507, U=5 0.660, U=10 0.731;  DDNM U=1 0.486, U=5 0.653, U=10 0.711.
# Plain replacement commits to a component before it has seen y; resampling reweights toward the
# posterior, slowly. With an uninformative y (0, halfway between the components; posterior weight =
# prior weight 0.3): RePaint U=1 0.298, DDNM U=1 0.336 (with 4000 samples 0.320 and 0.340, and
# unconditional DDPM 0.300: a small bias toward the rarer component, which y = 0 makes plausible).
N_MIX = 2000  # standard error of a frequency ~0.01


def _two_component_mixture():
    cov = 0.3**2 * torch.eye(4, dtype=F64) + 0.01
    return GaussianMixture(torch.tensor([0.7, 0.3], dtype=F64), torch.tensor([[-0.6] * 4, [0.6] * 4], dtype=F64),
                           torch.stack([cov, cov]))


def _component_frequency(method, gm, op, y_value, resample):
    y = op.A(torch.full((N_MIX, 1, 2, 2), y_value, dtype=F64))
    x = _restore(method, gm, op, y, (1, 2, 2), resample, n=N_MIX)
    log_comp, *_ = gm._components(x, 1.0, 0.0)  # which component drew each sample (they barely overlap)
    return (log_comp.argmax(1) == 1).double().mean().item()


@pytest.mark.parametrize("method,resamples", [("repaint", (1, 5, 10)), ("ddnm", (1, 5))])
def test_mixture_component_frequencies(method, resamples):
    gm = _two_component_mixture()
    op = Inpaint(torch.tensor([[[True, True], [False, False]]]))
    M = dense_matrix(op, (1, 2, 2))
    w, _, _ = linear_posterior(gm, M, torch.full((2,), 0.15, dtype=F64))
    assert abs(w[1].item() - 0.919) < 1e-3
    err = {U: w[1].item() - _component_frequency(method, gm, op, 0.15, U) for U in resamples}
    assert 0.35 < err[1] < 0.5, err  # plain replacement: about half the posterior's reweighting
    assert 0.18 < err[5] < 0.32 and err[5] < err[1] - 0.1, err  # resampling reweights toward the posterior
    if 10 in err:
        assert 0.1 < err[10] < 0.24 and err[10] < err[5] - 0.03, err
    # an uninformative y leaves the prior weights
    w0, _, _ = linear_posterior(gm, M, torch.zeros(2, dtype=F64))
    assert abs(w0[1].item() - 0.3) < 1e-12
    assert abs(_component_frequency(method, gm, op, 0.0, 1) - 0.3) < 0.05


def test_linear_posterior_matches_the_schur_complement():
    """For a mask, conditioning on the known coordinates is the textbook Schur complement."""
    gm = _correlated_gaussian(4)
    known, unknown = [0, 2], [1, 3]
    M = torch.eye(4, dtype=F64)[known]
    y = torch.tensor([0.5, -0.4], dtype=F64)
    _, means, covs = linear_posterior(gm, M, y)
    S, mu = gm.covs[0], gm.means[0]
    S_kk, S_uk, S_uu = S[known][:, known], S[unknown][:, known], S[unknown][:, unknown]
    torch.testing.assert_close(means[0, unknown], mu[unknown] + S_uk @ torch.linalg.solve(S_kk, y - mu[known]))
    torch.testing.assert_close(covs[0][unknown][:, unknown], S_uu - S_uk @ torch.linalg.solve(S_kk, S_uk.T))
    torch.testing.assert_close(means[0, known], y)
    assert covs[0][known].abs().max() < 1e-12
