"""The discrete variational bound against exact answers on Gaussian data."""

import math

import pytest
import torch

from diffusekit.likelihood import nats_to_bits_per_dim, vlb_estimate, vlb_exact, vlb_term
from diffusekit.oracle import GaussianMixture
from diffusekit.schedules import make_schedule

F64 = torch.float64
LEVELS = 64
MEAN, STD = 0.1, 0.3


def discretized_gaussian_data(n, seed=0):
    """Data on LEVELS values in [-1, 1] drawn from N(MEAN, STD^2) binned (end bins open), with its
    exact entropy in nats: the smallest possible expected negative log-likelihood of any model."""
    grid = torch.linspace(-1, 1, LEVELS, dtype=F64)
    half = 1 / (LEVELS - 1)
    normal = torch.distributions.Normal(torch.tensor(MEAN, dtype=F64), torch.tensor(STD, dtype=F64))
    upper = torch.where(grid >= 1, torch.tensor(1.0, dtype=F64), normal.cdf(grid + half))
    lower = torch.where(grid <= -1, torch.tensor(0.0, dtype=F64), normal.cdf(grid - half))
    probs = upper - lower
    g = torch.Generator().manual_seed(seed)
    x = grid[torch.multinomial(probs, n, replacement=True, generator=g)][:, None]
    entropy = -(probs * torch.log(probs)).sum().item()
    return x, entropy


def oracle():
    return GaussianMixture.gaussian(torch.tensor([MEAN]), torch.tensor([[STD**2]]))


def test_bound_is_above_the_entropy_and_the_gap_shrinks_with_T():
    x, entropy = discretized_gaussian_data(3000)
    gaps = []
    for T in (20, 100, 1000):
        bound = vlb_exact(oracle().denoiser, x, make_schedule("linear", T), LEVELS, seed=1, batch_size=3000)
        se = bound.total.std().item() / math.sqrt(x.shape[0])
        gap = bound.total.mean().item() - entropy
        assert gap > -3 * se, (T, gap, se)
        gaps.append(gap)
    assert gaps[0] > gaps[1] > gaps[2], gaps


def test_log_snr_linear_bound_is_above_the_entropy_and_tightens_on_nested_grids():
    """T = 11, 101, 1001 put 10, 100, 1000 equal log-SNR steps between the same end points, each grid a
    refinement of the last, so the bound can only tighten (Kingma et al. 2021, sec. 4-5)."""
    x, entropy = discretized_gaussian_data(3000)
    gaps = []
    for T in (11, 101, 1001):
        sch = make_schedule("logsnr_linear", T, logsnr_min=-10.12, logsnr_max=9.21)
        bound = vlb_exact(oracle().denoiser, x, sch, LEVELS, seed=1, batch_size=3000)
        se = bound.total.std().item() / math.sqrt(x.shape[0])
        gap = bound.total.mean().item() - entropy
        assert gap > -3 * se, (T, gap, se)
        gaps.append(gap)
    # measured: 5.68, 0.378, 0.077 nats
    assert gaps[0] > gaps[1] > gaps[2], gaps


@pytest.mark.parametrize("T", [20, 100, 1000])
def test_at_equal_end_points_equal_log_snr_steps_are_tighter_than_linear_betas(T):
    """The same exact denoiser, the same T and the same first and last noise levels: DDPM's linear betas
    take their widest log-SNR steps at the clean end (0.70 for the first at T = 1000), where the
    data's fine values are decided; equal steps in log-SNR lose less there. Measured gaps to the exact
    entropy, linear against log-SNR linear: 2.58 / 0.61 (T = 20), 1.18 / 0.29 (100), 0.53 / 0.077 (1000)
    nats, with standard errors of 0.02 to 0.1."""
    x, entropy = discretized_gaussian_data(3000)
    linear = make_schedule("linear", T)
    even = make_schedule("logsnr_linear", T, logsnr_min=float(linear.logsnr[-1]), logsnr_max=float(linear.logsnr[1]))
    gaps, ses = [], []
    for sch in (linear, even):
        bound = vlb_exact(oracle().denoiser, x, sch, LEVELS, seed=1, batch_size=3000)
        gaps.append(bound.total.mean().item() - entropy)
        ses.append(bound.total.std().item() / math.sqrt(x.shape[0]))
        assert gaps[-1] > -3 * ses[-1]
    assert gaps[1] < gaps[0] / 3, gaps
    assert gaps[0] - gaps[1] > 3 * math.hypot(*ses), (gaps, ses)


def test_terms_sum_to_the_total_and_bits_per_dim_is_consistent():
    x, _ = discretized_gaussian_data(200)
    bound = vlb_exact(oracle().denoiser, x, make_schedule("cosine", 50), LEVELS, seed=0)
    assert bound.terms.shape == (200, 50)
    torch.testing.assert_close(bound.total, bound.prior + bound.terms.sum(1))
    assert bound.bits_per_dim == pytest.approx(nats_to_bits_per_dim(bound.total.mean().item(), 1))
    assert bound.term_bits_per_dim().sum().item() + nats_to_bits_per_dim(bound.prior.mean().item(), 1) == \
        pytest.approx(bound.bits_per_dim, rel=1e-9)
    assert torch.all(bound.terms[:, 1:] >= 0)  # KL terms are non-negative


def test_bound_is_deterministic_under_a_seed_and_independent_of_batch_size():
    x, _ = discretized_gaussian_data(100)
    sch = make_schedule("linear", 30)
    a = vlb_exact(oracle().denoiser, x, sch, LEVELS, seed=5, batch_size=100)
    b = vlb_exact(oracle().denoiser, x, sch, LEVELS, seed=5, batch_size=7)
    c = vlb_exact(oracle().denoiser, x, sch, LEVELS, seed=6, batch_size=100)
    torch.testing.assert_close(a.terms, b.terms, rtol=1e-12, atol=1e-12)
    assert not torch.equal(a.terms, c.terms)
    e1 = vlb_estimate(oracle().denoiser, x, sch, LEVELS, seed=2, n_strata=5, batch_size=100)
    e2 = vlb_estimate(oracle().denoiser, x, sch, LEVELS, seed=2, n_strata=5, batch_size=9)
    torch.testing.assert_close(e1.total, e2.total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_stratified_estimate_agrees_with_the_exact_bound(variance):
    x, _ = discretized_gaussian_data(2000, seed=3)
    sch = make_schedule("linear", 200)
    exact = vlb_exact(oracle().denoiser, x, sch, LEVELS, seed=0, batch_size=2000, variance=variance)
    est = vlb_estimate(oracle().denoiser, x, sch, LEVELS, seed=1, n_strata=10, batch_size=2000, variance=variance)
    assert est.stderr_nats > 0
    assert abs(est.total.mean().item() - exact.total.mean().item()) < 3 * est.stderr_nats + 3e-3


def test_kl_term_with_the_true_posterior_mean_is_zero():
    """If the model's x0 is the true x0, p's mean is q's mean and (with beta_tilde) the KL vanishes."""
    x = torch.linspace(-1, 1, LEVELS, dtype=F64)[::6, None]  # values on the data grid

    class Cheat:
        def __call__(self, x_t, logsnr, cond=None):
            from diffusekit.parameterization import Prediction

            return Prediction(eps=torch.zeros_like(x_t), x0=x, raw=x, kind="x0")

    sch = make_schedule("linear", 100)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    for t in (2, 50, 100):
        assert vlb_term(Cheat(), x, torch.tensor(t), sch, noise, LEVELS).abs().max().item() < 1e-9
    # and the decoder's NLL is the Gaussian mass of the bin around x0, with variance beta_tilde_2
    s = sch.posterior_variance[2].sqrt().item()
    h = 1 / (LEVELS - 1)
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    edge = (x[:, 0].abs() >= 1)
    expected = torch.where(edge, torch.tensor(-math.log(Phi(h / s)), dtype=F64),
                           torch.tensor(-math.log(Phi(h / s) - Phi(-h / s)), dtype=F64))
    torch.testing.assert_close(vlb_term(Cheat(), x, torch.tensor(1), sch, noise, LEVELS), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("T,n", [(1000, 50), (10, 10), (100, 7), (5, 1)])
def test_stratum_edges_partition_1_to_T(T, n):
    from diffusekit.likelihood import stratum_edges

    e = stratum_edges(T, n)
    assert e[0] == 0 and e[-1] == T and len(e) == n + 1
    assert torch.all(torch.diff(e) >= 1)
    if n < T:
        assert e[1] - e[0] <= e[-1] - e[-2]  # narrow strata at small t


class _ShrunkDenoiser:
    """The oracle's denoiser with its x0 estimate pulled towards 0: a deliberately imperfect model."""

    def __init__(self, shrink):
        self.base, self.shrink = oracle().denoiser, shrink

    def __call__(self, x_t, logsnr, cond=None):
        from diffusekit.parameterization import Prediction

        p = self.base(x_t, logsnr, cond)
        return Prediction(eps=p.eps, x0=p.x0 * self.shrink, raw=p.raw, kind="x0")


def test_fitted_variances_minimise_each_term_and_lower_the_bound_of_an_imperfect_model():
    from diffusekit.likelihood import fit_reverse_log_variances

    schedule = make_schedule("linear", 30)
    train, _ = discretized_gaussian_data(400, seed=3)
    test, _ = discretized_gaussian_data(400, seed=4)
    model = _ShrunkDenoiser(0.8)
    table = fit_reverse_log_variances(model, train, schedule, LEVELS, seed=5, batch_size=128)
    assert table.shape == (31,) and torch.all(table[2:] >= schedule.posterior_log_variance_clipped[2:])
    # on the very draws it was fitted to (the fit uses seed + 7919), each KL term is at its minimum
    fit_draws = vlb_exact(model, train, schedule, LEVELS, seed=5 + 7919, variance=table).terms.mean(0)
    for delta in (-0.05, 0.05):
        moved = vlb_exact(model, train, schedule, LEVELS, seed=5 + 7919, variance=table + delta).terms.mean(0)
        assert torch.all(moved[1:] > fit_draws[1:]), delta
        assert moved[0] >= fit_draws[0] - 1e-9  # the decoder scale: best of a refined grid
    # held-out data: the fitted bound beats the fixed-variance bound of the same (imperfect) means
    fitted = vlb_exact(model, test, schedule, LEVELS, seed=6, variance=table).bits_per_dim
    fixed = vlb_exact(model, test, schedule, LEVELS, seed=6).bits_per_dim
    assert fitted < fixed - 0.1, (fitted, fixed)
    # for the exact model on Gaussian data, the fit recovers the true reverse conditional's extra
    # variance: q(x_{t-1}|x_t) = E_{x0|x_t} q(x_{t-1}|x_t, x0) has variance beta_tilde_t + c_t^2 Var(x0|x_t),
    # with c_t the posterior's x0 coefficient and Var(x0|x_t) = s^2 sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2)
    gauss = MEAN + STD * torch.randn(2000, 1, generator=torch.Generator().manual_seed(7), dtype=F64)
    exact_table = fit_reverse_log_variances(oracle().denoiser, gauss, schedule, LEVELS, seed=5, batch_size=2000)
    a2, s2 = schedule.alpha_bar[2:], schedule.one_minus_alpha_bar[2:]
    expected = schedule.posterior_mean_coef_x0[2:] ** 2 * STD**2 * s2 / (a2 * STD**2 + s2)
    measured = exact_table[2:].exp() - schedule.posterior_variance[2:]
    torch.testing.assert_close(measured, expected, rtol=0.15, atol=0.0)


def test_estimate_with_a_comparison_variance_equals_two_separate_estimates():
    schedule = make_schedule("linear", 40)
    x, _ = discretized_gaussian_data(150, seed=2)
    model = _ShrunkDenoiser(0.9)
    both = vlb_estimate(model, x, schedule, LEVELS, n_strata=6, seed=3, variance="beta", compare_variance="beta_tilde")
    alone = [vlb_estimate(model, x, schedule, LEVELS, n_strata=6, seed=3, variance=v) for v in ("beta", "beta_tilde")]
    assert both.bits_per_dim == pytest.approx(alone[0].bits_per_dim, rel=1e-12)
    assert both.comparison.bits_per_dim == pytest.approx(alone[1].bits_per_dim, rel=1e-12)
    assert both.comparison.stderr_bits_per_dim == pytest.approx(alone[1].stderr_bits_per_dim, rel=1e-9)
    assert both.bits_per_dim != both.comparison.bits_per_dim
