"""Forward process, posterior, KL, decoder likelihood and Tweedie against exact answers."""

import math

import pytest
import torch

from diffusekit import gaussian as G
from diffusekit.oracle import default_mixture
from diffusekit.schedules import make_schedule

F64 = torch.float64


def _t(v, n):
    return torch.full((n,), v, dtype=torch.long)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_markov_chain_matches_closed_form_kernel(name):
    """Running q(x_t|x_{t-1}) step by step from a fixed x_0 gives N(sqrt(abar_t) x_0, 1 - abar_t).

    200k chains, T = 100 steps: sample mean and variance must match within 5 standard errors
    (mean SE = sd / sqrt(n); variance SE = var * sqrt(2 / n))."""
    T, n = 100, 200_000
    sch = make_schedule(name, T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n,), 0.7, dtype=F64)
    x = x0.clone()
    for t in range(1, T + 1):
        x = G.forward_step_sample(x, _t(t, n), sch, torch.randn(n, generator=g, dtype=F64))
        if t in (1, 10, 50, 100):
            mean, std = G.marginal_mean_std(x0[:1], _t(t, 1), sch)
            var = std.item() ** 2
            assert abs(x.mean().item() - mean.item()) < 5 * math.sqrt(var / n)
            assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n)
    # and the closed-form sample agrees in distribution at t = T (two-sample moment check)
    y = G.q_sample(x0, _t(T, n), sch, torch.randn(n, generator=g, dtype=F64))
    assert abs(x.mean().item() - y.mean().item()) < 5 * math.sqrt(2 / n)


def _bayes_posterior_1d(x0: float, xt: float, t: int, sch):
    """Mean and variance of q(x_{t-1}|x_t,x_0) from Bayes' rule by 1-D quadrature:
    q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0)."""
    ab_prev = sch.alpha_bar[t - 1].item()
    beta = sch.betas[t].item()
    prior_mean, prior_sd = math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)
    lik_mode, lik_sd = xt / math.sqrt(1 - beta), math.sqrt(beta / (1 - beta))
    lo = min(prior_mean - 12 * prior_sd, lik_mode - 12 * lik_sd)
    hi = max(prior_mean + 12 * prior_sd, lik_mode + 12 * lik_sd)
    # the posterior is narrower than both factors; this grid resolves it with >= ~100 points per sd
    n = int(min(2_000_001, max(20_001, 200 * (hi - lo) / min(prior_sd, lik_sd))))
    grid = torch.linspace(lo, hi, n, dtype=F64)
    logw = (-0.5 * ((grid - prior_mean) / prior_sd) ** 2
            - 0.5 * ((xt - math.sqrt(1 - beta) * grid) ** 2) / beta)
    w = torch.softmax(logw, 0)
    mean = (w * grid).sum().item()
    var = (w * (grid - mean) ** 2).sum().item()
    return mean, var


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_equals_bayes_rule_by_quadrature(name):
    sch = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(1)
    for t in [2, 3, 10, 50, 200, 500, 900, 1000]:
        x0 = float(torch.rand(1, generator=g) * 2 - 1)
        xt = float(G.q_sample(torch.tensor([x0], dtype=F64), _t(t, 1), sch, torch.randn(1, generator=g, dtype=F64)))
        mean, var, _ = G.posterior_mean_variance(torch.tensor([x0], dtype=F64), torch.tensor([xt], dtype=F64), _t(t, 1), sch)
        q_mean, q_var = _bayes_posterior_1d(x0, xt, t, sch)
        assert mean.item() == pytest.approx(q_mean, rel=1e-6, abs=1e-8), t
        assert var.item() == pytest.approx(q_var, rel=1e-4), t


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_mean_forms_agree(name):
    """mu_q written in x_0 equals mu_q written in eps (the reparameterized form of Vidal's lecture, "Deep Generative Models")."""
    sch = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(2)
    n = 4096
    t = torch.randint(1, 1001, (n,), generator=g)
    x0 = torch.rand(n, 3, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(n, 3, generator=g, dtype=F64)
    xt = G.q_sample(x0, t, sch, eps)
    mean_x0, _, _ = G.posterior_mean_variance(x0, xt, t, sch)
    mean_eps = G.posterior_mean_from_eps(xt, eps, t, sch)
    torch.testing.assert_close(mean_x0, mean_eps, rtol=1e-7, atol=1e-9)


def test_gaussian_kl_closed_form_and_monte_carlo():
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=F64) for v in (0.3, -1.0, -0.5, 0.4))
    kl = G.gaussian_kl(m1, lv1, m2, lv2).item()
    s1, s2 = math.exp(0.5 * lv1), math.exp(0.5 * lv2)
    exact = math.log(s2 / s1) + (s1**2 + (0.3 + 0.5) ** 2) / (2 * s2**2) - 0.5
    assert kl == pytest.approx(exact, rel=1e-12)
    g = torch.Generator().manual_seed(3)
    x = m1 + s1 * torch.randn(1_000_000, generator=g, dtype=F64)
    mc = (G.normal_log_prob(x, m1, lv1) - G.normal_log_prob(x, m2, lv2)).mean().item()
    assert mc == pytest.approx(exact, abs=5e-3)
    assert G.gaussian_kl(m1, lv1, m1, lv1).item() == 0.0


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_gaussian_is_a_distribution_over_the_levels(levels):
    """The probabilities of the K levels sum to one and each equals the Gaussian mass of its bin."""
    values = torch.linspace(-1, 1, levels, dtype=F64)
    for mean, log_scale in [(0.1, -3.0), (-0.9, -1.0), (0.95, -6.0), (3.0, 0.5)]:
        lp = G.discretized_gaussian_log_likelihood(values, torch.tensor(mean, dtype=F64),
                                                   torch.tensor(log_scale, dtype=F64), levels)
        assert torch.exp(lp).sum().item() == pytest.approx(1.0, abs=1e-9)
        s = math.exp(log_scale)
        Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
        if levels == 2:
            continue  # both bins are edge bins, covered by the sum-to-one check
        k = levels // 2
        half = 1 / (levels - 1)
        mass = Phi((values[k].item() + half - mean) / s) - Phi((values[k].item() - half - mean) / s)
        if mass > 1e-300:
            assert lp[k].item() == pytest.approx(math.log(mass), rel=1e-6)


def test_discretized_gaussian_is_finite_for_tiny_scales_and_far_tails():
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=F64)
    lp = G.discretized_gaussian_log_likelihood(x, torch.tensor([-1.0, 0.0, 1.0], dtype=F64),
                                               torch.full((3,), -20.0, dtype=F64), 256)
    assert torch.all(lp <= 0) and torch.all(lp > -1e-6)
    far = G.discretized_gaussian_log_likelihood(torch.tensor([0.0], dtype=F64), torch.tensor([0.9], dtype=F64),
                                                torch.tensor([-8.0], dtype=F64), 256)
    assert torch.isfinite(far).all() and far.item() < -1e3


def test_tweedie_recovers_the_posterior_mean_of_the_oracle():
    """E[x_0 | x_t] = (x_t + sigma^2 score) / alpha, checked against the mixture's direct formula and
    against 1-D quadrature of Bayes' rule."""
    gm = default_mixture(1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 1, generator=g, dtype=F64) * 1.5
    for alpha in (0.99, 0.7, 0.2):
        sigma = math.sqrt(1 - alpha**2)
        tw = G.tweedie_x0(x, gm.score(x, alpha, sigma), alpha, sigma)
        torch.testing.assert_close(tw, gm.x0_mean(x, alpha, sigma), rtol=1e-10, atol=1e-10)
        grid = torch.linspace(-4, 4, 400_001, dtype=F64)[:, None]
        log_prior = gm.log_prob(grid)
        for xi in x[:, 0]:
            logw = log_prior - 0.5 * ((xi - alpha * grid[:, 0]) / sigma) ** 2
            w = torch.softmax(logw, 0)
            assert (w * grid[:, 0]).sum().item() == pytest.approx(gm.x0_mean(xi.view(1, 1), alpha, sigma).item(), abs=1e-6)
