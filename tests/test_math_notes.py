"""The math the docstrings and docs/math.md state, checked against exact answers: the standard error
of the exact bound, the named continuous weightings (Kingma & Gao's convention), what the discrete
"elbo" weighting estimates, and the corrected forms of the lectures' typos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusekit import gaussian as G
from diffusekit.continuous import CosineLogSNR, diffusion_term, log_kg_weight
from diffusekit.continuous.elbo import MONOTONE_WEIGHTINGS
from diffusekit.likelihood import vlb_exact, vlb_term
from diffusekit.losses import diffusion_loss, log_kind_factor, log_weight
from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.parameterization import Denoiser, eps_to_score, v_from_x0_eps
from diffusekit.sampling.stochastic import langevin_step
from diffusekit.schedules import make_schedule

F64 = torch.float64


def legendre(lo: float, hi: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return (torch.tensor(0.5 * (hi - lo) * nodes + 0.5 * (hi + lo), dtype=F64),
            torch.tensor(0.5 * (hi - lo) * weights, dtype=F64))


def cosine_constant(sched: CosineLogSNR) -> float:
    """u1 - u0 of the truncated cosine schedule: L_w = (u1 - u0) x the t-uniform named loss."""
    return math.atan(math.exp(-sched.logsnr_min / 2)) - math.atan(math.exp(-sched.logsnr_max / 2))


class OracleNet(torch.nn.Module):
    """A raw 'network' that outputs the oracle's optimal target of a given kind."""

    def __init__(self, gm: GaussianMixture, kind: str):
        super().__init__()
        self.gm, self.kind = gm, kind

    def forward(self, x, c_noise):
        lam = c_noise.to(F64)
        return self.gm.target(self.kind, x, torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt())


# -- likelihood.vlb_exact: the standard error over examples -------------------------------------------
def test_vlb_exact_reports_the_standard_error_over_examples():
    gm = GaussianMixture.gaussian(torch.tensor([0.1]), torch.tensor([[0.09]]))
    sch = make_schedule("linear", 20)
    x = gm.sample(4000, torch.Generator().manual_seed(0)).clamp(-1, 1)
    small = vlb_exact(gm.denoiser, x[:2000], sch, 64, seed=1)
    large = vlb_exact(gm.denoiser, x, sch, 64, seed=1)
    for bound, n in ((small, 2000), (large, 4000)):
        assert bound.stderr_nats > 0
        assert bound.stderr_nats == pytest.approx(bound.total.std().item() / math.sqrt(n), rel=1e-12)
        assert bound.stderr_bits_per_dim == pytest.approx(bound.stderr_nats / math.log(2), rel=1e-12)
    assert small.stderr_nats / large.stderr_nats == pytest.approx(math.sqrt(2), rel=0.1)
    assert vlb_exact(gm.denoiser, x[:1], sch, 64).stderr_nats == 0.0  # one example has no spread


# -- continuous.log_kg_weight: x0, v, min_snr, truncated_snr are the named losses --------------------
def named_error(name: str, x0, eps, pred, lam, gamma: float = 5.0):
    """The named discrete-style loss of one draw, summed over dimensions, from the denoiser's x0 and
    eps, written out in its own space (not through the eps-MSE weights it is compared with)."""
    alpha, sigma = torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]
    if name == "v":
        v, v_hat = v_from_x0_eps(x0, eps, alpha, sigma), v_from_x0_eps(pred.x0, pred.eps, alpha, sigma)
        return ((v - v_hat) ** 2).sum(1)
    x0_err = ((x0 - pred.x0) ** 2).sum(1)
    snr = torch.exp(lam)
    factor = {"x0": torch.ones_like(snr), "min_snr": snr.clamp(max=gamma), "truncated_snr": snr.clamp(min=1.0)}[name]
    return factor * x0_err


@pytest.mark.parametrize("name", ["v", "x0", "min_snr", "truncated_snr"])
def test_named_weighting_is_the_t_uniform_named_loss_under_the_cosine_schedule(name):
    """L_w = 1/2 int_0^1 w(lambda_t)(-lambda'_t) E||eps - eps_hat||^2 dt and the named loss
    int_0^1 E[named error] dt of the same (exact) denoiser, both by Gauss-Legendre quadrature in t over
    fixed draws of the 2-D mixture: L_w = (u1 - u0) x named loss."""
    gm = default_mixture(2)
    g = torch.Generator().manual_seed(3)
    x0 = gm.sample(200, g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    sched = CosineLogSNR(-10.0, 10.0)
    lw, named = 0.0, 0.0
    for t, wq in zip(*legendre(0.0, 1.0, 48)):
        lam, dlam = sched(t.expand(x0.shape[0]))
        lw += wq * diffusion_term(gm.denoiser, x0, lam, dlam, noise, name).mean()
        alpha, sigma = torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]
        pred = gm.denoiser(alpha * x0 + sigma * noise, lam)
        named += wq * named_error(name, x0, noise, pred, lam).mean()
    assert lw.item() == pytest.approx(cosine_constant(sched) * named.item(), rel=1e-9)


def test_v_and_x0_weightings_in_closed_form_on_gaussian_data():
    """For N(m, s^2) data everything is a Gaussian conditional: E||eps - E[eps|z]||^2 = a2 s2 / c,
    E||x0 - E[x0|z]||^2 = s2 sigma^2 / c and E||v - E[v|z]||^2 = Var(v) - Cov(v, z)^2 / c with
    c = a2 s2 + sigma^2, v = alpha eps - sigma x0 (no sample, no network). By quadrature in t under the
    cosine schedule, L_w(v) and L_w(x0) are (u1 - u0) times the t-uniform v-MSE and x0-MSE; with wide
    end points the constant is pi / 2, and v's weight is K&G's e^{-lambda/2} exactly."""
    s2, dim = 0.25, 3
    for lo, hi in ((-10.0, 10.0), (-60.0, 60.0)):
        sched = CosineLogSNR(lo, hi)
        ts, wq = legendre(0.0, 1.0, 400)
        lam, dlam = sched(ts)
        a2, sg2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        c = a2 * s2 + sg2
        eps_mse = dim * a2 * s2 / c
        x0_mse = dim * s2 * sg2 / c
        v_mse = dim * (a2 + sg2 * s2 - (a2.sqrt() * sg2.sqrt() * (1 - s2)) ** 2 / c)
        for name, mse in (("v", v_mse), ("x0", x0_mse)):
            lw = (wq * 0.5 * torch.exp(log_kg_weight(name, lam)) * (-dlam) * eps_mse).sum().item()
            assert lw == pytest.approx(cosine_constant(sched) * (wq * mse).sum().item(), rel=1e-10), (name, lo)
    assert cosine_constant(CosineLogSNR(-60.0, 60.0)) == pytest.approx(math.pi / 2, rel=1e-12)
    grid = torch.linspace(-20, 20, 81, dtype=F64)
    torch.testing.assert_close(log_kg_weight("v", grid), -grid / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_kg_weight("x0", grid), -grid / 2 + torch.nn.functional.logsigmoid(-grid),
                               rtol=0, atol=1e-12)


def test_which_named_weightings_are_monotone():
    """v, x0 and truncated_snr are non-increasing in lambda (ELBOs of noisy data, Kingma & Gao 2023);
    min_snr is 1 / (2 cosh(lambda / 2)) below log gamma, which rises for lambda < 0."""
    lam = torch.linspace(-15, 15, 3001, dtype=F64)
    for name in ("x0", "v", "truncated_snr"):
        assert name in MONOTONE_WEIGHTINGS
        assert torch.all(torch.diff(log_kg_weight(name, lam)) <= 1e-12), name
    assert "min_snr" not in MONOTONE_WEIGHTINGS
    w = log_kg_weight("min_snr", lam, gamma=5.0)
    assert torch.any(torch.diff(w) > 0) and torch.any(torch.diff(w) < 0)
    low = lam < 0
    torch.testing.assert_close(w[low], -torch.log(2 * torch.cosh(lam[low] / 2)), rtol=0, atol=1e-12)


# -- losses: what the "elbo" weighting estimates ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["eps", "x0"])
def test_elbo_weighting_is_the_bound_terms_with_a_gaussian_stand_in_at_t1(kind):
    """T x the per-dimension loss is L_{t-1} of ``vlb_term`` exactly for t >= 2, and at t = 1 the
    Gaussian stand-in ||x0 - x0_hat||^2 / (2 beta_tilde_2), not the discretized L_0; L_T is not in it."""
    gm = default_mixture(2)
    sch = make_schedule("linear", 20)
    den = Denoiser(OracleNet(gm, kind), kind)
    g = torch.Generator().manual_seed(4)
    x0 = gm.sample(64, g).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    dims = x0.shape[1]
    for step in range(1, sch.T + 1):
        t = torch.full((x0.shape[0],), step, dtype=torch.long)
        loss = diffusion_loss(den, x0, t, sch, noise, "elbo") * dims / sch.T
        if step >= 2:
            torch.testing.assert_close(loss, vlb_term(den, x0, t, sch, noise, 256), rtol=1e-9, atol=1e-12)
        else:
            x_1 = G.q_sample(x0, t, sch, noise)
            x0_hat = den(x_1, sch.logsnr[t]).x0
            stand_in = ((x0 - x0_hat) ** 2).sum(1) / (2 * sch.posterior_variance[2])
            torch.testing.assert_close(loss, stand_in, rtol=1e-9, atol=1e-12)
            assert not torch.allclose(loss, vlb_term(den, x0, t, sch, noise, 256))


# -- the lectures' typos: the forms the code uses ----------------------------------------------------
def test_posterior_mean_is_the_product_of_the_two_gaussians():
    """q(x_{t-1}|x_t,x_0) is proportional to N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1};
    sqrt(alpha_bar_{t-1}) x_0, 1 - alpha_bar_{t-1}); its mean, by precision weighting, is what
    ``gaussian.posterior_mean_variance`` returns. The Vidal slide's form (alpha_bar_{t-1} without the
    square root) and the Bereyhi chapter's x_t coefficient (sqrt(alpha_{t-1}) (1 - alpha_bar_t) /
    (1 - alpha_bar_t)) are not it."""
    sch = make_schedule("cosine", 50)
    g = torch.Generator().manual_seed(5)
    t = torch.arange(2, 51)
    x0, xt = torch.randn(49, 3, generator=g, dtype=F64), torch.randn(49, 3, generator=g, dtype=F64)
    a_t, ab_prev, ab_t = sch.alphas[t][:, None], sch.alpha_bar[t - 1][:, None], sch.alpha_bar[t][:, None]
    beta = 1 - a_t
    precision = a_t / beta + 1 / (1 - ab_prev)
    mean = (a_t.sqrt() * xt / beta + ab_prev.sqrt() * x0 / (1 - ab_prev)) / precision
    ours, var, _ = G.posterior_mean_variance(x0, xt, t, sch)
    torch.testing.assert_close(ours, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, (1 / precision).expand_as(var), rtol=1e-10, atol=1e-14)
    vidal_slide = (a_t.sqrt() * (1 - ab_prev) * xt + ab_prev * beta * x0) / (1 - ab_t)
    bereyhi = ab_prev.sqrt() * beta / (1 - ab_t) * x0 + sch.alphas[t - 1][:, None].sqrt() * xt
    assert (vidal_slide - mean).abs().max() > 1e-3 and (bereyhi - mean).abs().max() > 1e-3


def test_denoising_score_matching_weight_divides_by_sigma_squared():
    """With s_theta = -eps_theta / sigma and the DSM target -eps / sigma (Gao's slide "Denoising Score
    Matching: Epsilon-prediction parametrization"), ||s_theta - target||^2 = ||eps_theta - eps||^2 /
    sigma^2, so w_hat = w_tilde / sigma^2 (the slide prints w_tilde / sigma); ``losses.log_kind_factor``
    converts score-MSE to eps-MSE with sigma^2."""
    g = torch.Generator().manual_seed(6)
    lam = torch.linspace(-6, 6, 13, dtype=F64)
    sigma = torch.sigmoid(-lam).sqrt()[:, None]
    eps, eps_hat = torch.randn(13, 4, generator=g, dtype=F64), torch.randn(13, 4, generator=g, dtype=F64)
    score_err = ((eps_to_score(eps_hat, sigma) - eps_to_score(eps, sigma)) ** 2).sum(1)
    eps_err = ((eps_hat - eps) ** 2).sum(1)
    torch.testing.assert_close(score_err, eps_err / sigma[:, 0] ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.exp(log_kind_factor("score", lam)) * score_err, eps_err, rtol=1e-12, atol=0)


def test_langevin_noise_is_sqrt_2c_times_a_standard_normal():
    """Gao's eq. 94 prints sqrt(2 c eps) eps; the step is x + c grad log p + sqrt(2c) z. On N(0, s^2)
    that chain's stationary variance is s^2 / (1 - c / (2 s^2)) (exact for the unadjusted step), which
    ``langevin_step`` reaches."""
    s, snr = 1.5, 0.5
    c = 2 * (snr * s) ** 2  # c / s^2 = 0.5: stationary variance 4 s^2 / 3, far from s^2
    g = torch.Generator().manual_seed(7)
    x = torch.zeros(20000, 1, dtype=F64)
    for _ in range(200):
        x = langevin_step(x, -x / s**2, torch.randn(x.shape, generator=g, dtype=F64), snr, std=s)
    assert x.var().item() == pytest.approx(s**2 / (1 - c / (2 * s**2)), rel=0.04)


# -- schedules.linear_betas: what rescaling to another T keeps --------------------------------------
def test_linear_rescaling_keeps_log_alpha_bar_T_only_approximately():
    """The docstring's numbers: log alpha_bar_T is off by 3.7e-4 (relative) at T = 10 and 3.0e-5 at
    T = 100 against the T = 1000 table, not preserved exactly; T = 1 keeps only beta_start."""
    ref = make_schedule("linear", 1000).log_alpha_bar[-1].item()
    rel = {T: abs(make_schedule("linear", T).log_alpha_bar[-1].item() / ref - 1) for T in (10, 100)}
    assert rel[10] == pytest.approx(3.66e-4, rel=0.01) and rel[100] == pytest.approx(3.03e-5, rel=0.01)
    assert make_schedule("linear", 1).log_alpha_bar[-1].item() == pytest.approx(1000 * math.log1p(-1e-4))
