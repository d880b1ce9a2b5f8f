"""The continuous-time objective against exact answers: Gaussian data with the exact (oracle) denoiser,
closed-form expectations, quadrature in log-SNR, and the project's discrete bound as T grows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusekit.config import load_config
from diffusekit.continuous import (
    ContinuousDiffusion,
    CosineLogSNR,
    LinearLogSNR,
    MonotoneLogSNR,
    continuous_bound,
    diffusion_term,
    eps_sq_error,
    importance_weighted_loss,
    log_kg_weight,
    prior_kl_at,
    reconstruction_nll,
    sample_times,
)
from diffusekit.continuous.elbo import MONOTONE_WEIGHTINGS
from diffusekit.errors import ConfigError
from diffusekit.likelihood import vlb_exact
from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.parameterization import Denoiser

F64 = torch.float64
M, S = 0.3, 0.5  # Gaussian data N(M, S^2 I)


def gaussian(dim: int) -> GaussianMixture:
    return GaussianMixture.gaussian(torch.full((dim,), M, dtype=F64), S**2 * torch.eye(dim, dtype=F64))


def expected_sq_error(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """E_eps ||eps - E[eps|z]||^2 at fixed x for N(M, S^2) data, in closed form (per example).
    With c = alpha^2 S^2 + sigma^2: eps - eps_hat = (alpha^2 S^2 / c) eps - sigma alpha (x - M) / c."""
    a2, s2 = torch.sigmoid(lam), torch.sigmoid(-lam)
    c = a2 * S**2 + s2
    return ((a2 * S**2 / c) ** 2 + s2 * a2 * (x - M) ** 2 / c**2).sum(-1)


def legendre(lo: float, hi: float, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return (torch.tensor(0.5 * (hi - lo) * nodes + 0.5 * (hi + lo), dtype=F64),
            torch.tensor(0.5 * (hi - lo) * weights, dtype=F64))


def diffusion_by_quadrature(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """1/2 int_{lo}^{hi} E||eps - eps_hat||^2 dlambda per example (the exact L_inf)."""
    lams, ws = legendre(lo, hi)
    return sum(w * 0.5 * expected_sq_error(x, lam) for lam, w in zip(lams, ws))


def random_monotone(seed: int, lo: float = -10.0, hi: float = 10.0, hidden: int = 8) -> MonotoneLogSNR:
    torch.manual_seed(seed)
    sched = MonotoneLogSNR(lo, hi, hidden)
    with torch.no_grad():
        for p in sched.parameters():
            p.add_(torch.randn_like(p) * 1.5)
    return sched


SCHEDULES = {"linear": lambda: LinearLogSNR(-10.0, 10.0), "cosine": lambda: CosineLogSNR(-10.0, 10.0),
             "learned": lambda: random_monotone(0)}


# -- schedules ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [*SCHEDULES.values(), lambda: random_monotone(1), lambda: random_monotone(2)])
def test_schedule_end_points_monotone_and_exact_derivative(make):
    sched = make()
    lam, dlam = sched(torch.tensor([0.0, 1.0], dtype=F64))
    assert lam[0].item() == pytest.approx(10.0, abs=1e-12) and lam[1].item() == pytest.approx(-10.0, abs=1e-12)
    t = torch.linspace(0, 1, 501, dtype=F64, requires_grad=True)
    lam, dlam = sched(t)
    assert torch.all(torch.diff(lam) < 0) and torch.all(dlam < 0)
    (autograd,) = torch.autograd.grad(lam.sum(), t)
    torch.testing.assert_close(dlam.detach(), autograd, rtol=1e-10, atol=1e-10)


def test_discrete_and_continuous_views_agree_at_grid_points():
    sched = random_monotone(3)
    T = 50
    table = sched.discretize(T)
    lam = sched.logsnr(torch.arange(T, dtype=F64) / (T - 1))
    assert table.T == T and math.isinf(table.logsnr[0].item())
    torch.testing.assert_close(table.logsnr[1:], lam.detach(), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="T >= 2"):
        sched.discretize(1)


def test_antithetic_times_cover_the_interval():
    g = torch.Generator().manual_seed(0)
    t = sample_times(64, g, "antithetic")
    assert t.dtype == F64 and torch.all((t >= 0) & (t < 1))
    torch.testing.assert_close(torch.sort(t).values.diff(), torch.full((63,), 1 / 64, dtype=F64))
    assert abs(sample_times(20000, g, "uniform").mean().item() - 0.5) < 0.01


# -- the bound on Gaussian data ---------------------------------------------------------------------
def test_eps_error_of_the_oracle_matches_its_closed_form():
    orc = gaussian(2)
    x = orc.sample(2000, torch.Generator().manual_seed(0))
    for lam in (-4.0, 0.0, 3.0):
        lam_t = torch.tensor(lam, dtype=F64)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        mc = eps_sq_error(orc.denoiser, x, lam_t, noise).mean()
        exact = expected_sq_error(x, lam_t).mean()
        assert abs(mc - exact) < 0.04 * exact + 1e-3


def test_elbo_of_the_exact_denoiser_bounds_and_matches_the_gaussian_nll():
    """With the exact denoiser the continuous bound is tight up to the end points: for lambda in [-12, 12]
    it is within 5e-4 nats of -log N(x; M, S^2) for every x, and above it on average over the data
    (the bound holds for the model's own density, which is not exactly the data's)."""
    dim, lo, hi = 3, -12.0, 12.0
    orc = gaussian(dim)
    x = orc.sample(300, torch.Generator().manual_seed(2))
    recon = dim * (0.5 * math.log(2 * math.pi) - 0.5 * hi + 0.5)  # E_eps of the density decoder's -log p(x|z_0)
    noise = torch.randn((4000,) + x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    mc_recon = torch.stack([reconstruction_nll(x, hi, e, None) for e in noise[:200]]).mean()
    assert abs(mc_recon - recon) < 0.05
    bound = prior_kl_at(x, lo) + recon + diffusion_by_quadrature(x, lo, hi)
    nll = -orc.log_prob(x)
    gap = bound - nll
    assert gap.abs().max() < 5e-4 and 0 < gap.mean() < 1e-4
    # the same in expectation over the data, exactly: E (x - M)^2 = S^2, differential entropy of N(M, S^2)
    mean_bound = prior_kl_at(torch.full((1, dim), M, dtype=F64), lo) + 0.5 * dim * math.exp(lo) * S**2 / (1 + math.exp(lo))
    mean_bound = mean_bound + recon + diffusion_by_quadrature(torch.full((1, dim), M + S, dtype=F64), lo, hi)
    entropy = 0.5 * dim * math.log(2 * math.pi * math.e * S**2)
    assert 0 < mean_bound.item() - entropy < 1e-4


def test_monte_carlo_bound_is_unbiased_and_schedule_invariant():
    """continuous_bound's mean over draws of t and eps matches the quadrature of the integral, for three
    schedules with the same end points (VDM's invariance), the learned one at random parameters."""
    orc = gaussian(2)
    x = orc.sample(400, torch.Generator().manual_seed(4))
    exact = diffusion_by_quadrature(x, -10.0, 10.0).mean().item()
    for name, make in SCHEDULES.items():
        b = continuous_bound(orc.denoiser, make(), x, None, n_draws=16, seed=5)
        assert abs(b.diffusion.mean().item() - exact) < 4 * b.stderr_nats, name
        assert b.stderr_nats < 0.05 * exact


def test_schedule_invariance_is_exact_for_fixed_noise():
    """For fixed (x, eps) the integrand depends on t only through lambda, so the t-integral of
    diffusion_term is the same for every schedule with these end points (quadrature in t vs in lambda)."""
    orc = default_mixture(2)
    x = orc.sample(64, torch.Generator().manual_seed(6))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    lams, ws = legendre(-6.0, 6.0, 400)
    in_lambda = sum(w * 0.5 * eps_sq_error(orc.denoiser, x, lam, noise) for lam, w in zip(lams, ws))
    ts, wt = legendre(0.0, 1.0, 400)
    for sched in (LinearLogSNR(-6.0, 6.0), CosineLogSNR(-6.0, 6.0), random_monotone(8, -6.0, 6.0)):
        lam, dlam = sched(ts)
        lam, dlam = lam.detach(), dlam.detach()
        in_t = sum(wt[i] * diffusion_term(orc.denoiser, x, lam[i], dlam[i], noise) for i in range(len(ts)))
        torch.testing.assert_close(in_t, in_lambda, rtol=2e-4, atol=1e-6)


def test_discrete_bound_converges_to_the_continuous_one():
    """Discretizing lambda(t) on T steps, the project's discrete bound (prior + sum_{t>=2} L_{t-1}) with the
    exact denoiser approaches the continuous bound from above with an O(1/T) gap (Richardson check)."""
    orc = gaussian(1)
    x = orc.sample(1000, torch.Generator().manual_seed(9))
    lo, hi = -10.0, 10.0
    cont = (prior_kl_at(x, lo) + diffusion_by_quadrature(x, lo, hi)).mean().item()
    sched = LinearLogSNR(lo, hi)
    totals = {}
    for T in (200, 400):
        r = vlb_exact(orc.denoiser, x, sched.discretize(T), levels=256, batch_size=1000)
        totals[T] = (r.prior + r.terms[:, 1:].sum(1)).mean().item()
    gap200, gap400 = totals[200] - cont, totals[400] - cont
    assert gap200 > gap400 > 0
    assert 1.5 < gap200 / gap400 < 2.6  # first order in 1/T
    assert abs(2 * totals[400] - totals[200] - cont) < 0.02 * cont


# -- the learned schedule's gradient ---------------------------------------------------------------
class ScaledOracleNet(nn.Module):
    """theta * the exact eps of N(M, S^2) data, under the raw-network contract (x, c_noise = logsnr)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(0.9, dtype=F64))

    def forward(self, x, c_noise):
        lam = c_noise.to(F64)[:, None]
        a2, s2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        return self.theta * s2.sqrt() * (x - a2.sqrt() * M) / (a2 * S**2 + s2)


def test_learned_schedule_gets_the_variance_gradient_and_the_network_the_elbo_gradient():
    torch.manual_seed(0)
    sched = random_monotone(10, hidden=4)
    module = ContinuousDiffusion(ScaledOracleNet(), sched, "eps", levels=None)
    x = gaussian(2).sample(32, torch.Generator().manual_seed(11))
    t = sample_times(32, torch.Generator().manual_seed(12))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(13), dtype=F64)
    module(x, t, noise).mean().backward()

    # the same per-example diffusion loss written out independently, in bits/dim
    theta = module.net.theta.detach().clone().requires_grad_()
    lam, dlam = sched(t)
    a, s = torch.sigmoid(lam)[:, None].sqrt(), torch.sigmoid(-lam)[:, None].sqrt()
    z = a * x + s * noise
    eps_hat = theta * s * (z - a * M) / (a**2 * S**2 + s**2)
    loss = 0.5 * (-dlam) * ((noise - eps_hat) ** 2).sum(1) / (2 * math.log(2))
    params = list(sched.parameters())
    variance_grad = torch.autograd.grad((loss**2).mean(), params, retain_graph=True)
    (elbo_grad,) = torch.autograd.grad(loss.mean(), [theta])
    for p, g in zip(params, variance_grad):
        torch.testing.assert_close(p.grad, g.to(p.dtype), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(module.net.theta.grad, elbo_grad, rtol=1e-9, atol=1e-12)
    assert any(g.abs().max() > 1e-3 for g in variance_grad)  # the check is not vacuous


# -- weighted objectives (Kingma & Gao 2023) --------------------------------------------------------
def test_weighted_loss_is_a_positive_mixture_of_elbos_of_noisy_data():
    """L_w = int w l dlambda = w(lambda_max) L(lambda_max) + int -w'(lambda) L(lambda) dlambda, where
    L(lambda) = int_{lambda_min}^{lambda} l is the diffusion part of the ELBO of z_lambda, and -w' >= 0
    for the monotone weightings. l(lambda) = 1/2 E||eps - eps_hat||^2 from the 2-D mixture oracle."""
    orc = default_mixture(2)
    x = orc.sample(256, torch.Generator().manual_seed(14))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(15), dtype=F64)
    lo, hi, n = -8.0, 8.0, 801
    grid = torch.linspace(lo, hi, n, dtype=F64)
    ell = torch.stack([0.5 * eps_sq_error(orc.denoiser, x, lam, noise).mean() for lam in grid])
    trap = lambda f: torch.trapezoid(f, grid)
    tail = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(ell, grid)])  # L(lambda)
    for name in MONOTONE_WEIGHTINGS:
        g = grid.clone().requires_grad_()
        w = torch.exp(log_kg_weight(name, g, sigmoid_bias=1.0)) + 0 * g  # (elbo: a constant)
        (dw,) = torch.autograd.grad(w.sum(), g)
        w = w.detach()
        assert torch.all(dw <= 1e-12), name
        direct = trap(w * ell)
        mixture = w[-1] * tail[-1] + trap(-dw * tail)
        assert abs(direct - mixture) < 2e-3 * direct, name


def test_elbo_tail_bounds_the_nll_of_noise_perturbed_gaussian_data():
    """prior + L(lambda) is the ELBO of z_lambda given x; with the exact denoiser it equals
    E[-log q_lambda(z_lambda)] - H(q(z_lambda|x)) = D/2 log(1 + SNR S^2) for N(M, S^2) data."""
    dim = 2
    orc = gaussian(dim)
    x = orc.sample(4000, torch.Generator().manual_seed(16))
    lo = -12.0
    for lam in (-2.0, 1.0, 4.0):
        x_mean = torch.full((1, dim), M + S, dtype=F64)  # (x - M)^2 = S^2: the exact mean over the data
        tail = (prior_kl_at(x_mean, lo) + diffusion_by_quadrature(x_mean, lo, lam)).item()
        a, s = math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))
        z = a * x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(17), dtype=F64)
        nll_noisy = -orc.log_prob(z, a, s).mean().item() - dim * 0.5 * math.log(2 * math.pi * math.e * s**2)
        assert tail == pytest.approx(0.5 * dim * math.log1p(math.exp(lam) * S**2), abs=1e-4)
        assert abs(nll_noisy - tail) < 0.05


def test_importance_sampled_and_time_forms_estimate_the_same_weighted_loss():
    orc = gaussian(2)
    x = orc.sample(4000, torch.Generator().manual_seed(18))
    lo, hi = -10.0, 10.0
    lams, ws = legendre(lo, hi)
    w = lambda lam: torch.exp(log_kg_weight("sigmoid", lam, sigmoid_bias=1.0))
    exact = sum(wi * w(lam) * 0.5 * expected_sq_error(x, lam) for lam, wi in zip(lams, ws)).mean().item()
    g = torch.Generator().manual_seed(19)
    noise = torch.randn(x.shape, generator=g, dtype=F64)
    # lambda uniform on [lo, hi]: p = 1 / (hi - lo)
    lam_u = lo + (hi - lo) * torch.rand(x.shape[0], generator=g, dtype=F64)
    imp = importance_weighted_loss(orc.denoiser, x, lam_u, torch.full_like(lam_u, -math.log(hi - lo)), noise,
                                   "sigmoid", sigmoid_bias=1.0)
    lam_t, dlam_t = CosineLogSNR(lo, hi)(sample_times(x.shape[0], g))
    tform = diffusion_term(orc.denoiser, x, lam_t, dlam_t, noise, "sigmoid", sigmoid_bias=1.0)
    for est in (imp, tform):
        assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(len(est))


def test_edm_weighting_is_not_monotone():
    lam = torch.linspace(-10, 10, 201, dtype=F64)
    w = torch.exp(log_kg_weight("edm", lam))
    assert torch.any(torch.diff(w) > 0) and torch.any(torch.diff(w) < 0)


def test_denoising_score_matching_optimum_is_the_oracle_score():
    """Least squares on the DSM target -eps/sigma with a score net linear in z (the right family for
    Gaussian data) recovers grad log q_lambda(z) of the oracle; and for a score-parameterized Denoiser the
    loss is the eps-MSE (the factor sigma^2 converts)."""
    orc = gaussian(1)
    lam = torch.tensor(0.5, dtype=F64)
    a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    g = torch.Generator().manual_seed(20)
    x = orc.sample(200000, g)
    eps = torch.randn(x.shape, generator=g, dtype=F64)
    z = a * x + s * eps
    design = torch.cat([z, torch.ones_like(z)], 1)
    coef = torch.linalg.lstsq(design, -eps / s).solution.flatten()
    grid = torch.linspace(-2, 2, 9, dtype=F64)[:, None]
    fitted = coef[0] * grid + coef[1]
    torch.testing.assert_close(fitted, orc.score(grid, a, s), rtol=0, atol=0.02)

    class ScoreNet(nn.Module):  # the oracle's score under the raw-network contract
        def forward(self, x, c_noise):
            al, sg = torch.sigmoid(c_noise.to(F64)).sqrt(), torch.sigmoid(-c_noise.to(F64)).sqrt()
            return orc.score(x, al, sg) + 0.1

    den = Denoiser(ScoreNet(), "score")
    xs, es = x[:500], eps[:500]
    via_kind = eps_sq_error(den, xs, lam, es)
    zs = a * xs + s * es
    eps_hat = -s * (orc.score(zs, a, s) + 0.1)
    torch.testing.assert_close(via_kind, ((es - eps_hat) ** 2).sum(1), rtol=1e-10, atol=1e-12)


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["diffusion.learned_schedule=true"], "loss.objective"),
    (["loss.weighting=\"sigmoid\""], "loss.objective"),
    (["loss.objective=\"continuous\""], "loss.weighting"),
    (["loss.objective=\"continuous\"", "loss.weighting=\"elbo\"", "diffusion.logsnr_min=5",
      "diffusion.logsnr_max=4"], "diffusion.logsnr_max"),
    (["loss.objective=\"continuous\"", "loss.weighting=\"elbo\"", "diffusion.schedule=\"sigmoid\""],
     "diffusion.schedule"),
    (["diffusion.schedule=\"logsnr_linear\"", "diffusion.logsnr_max=31"], "diffusion.logsnr_max"),
    (["diffusion.logsnr_min=-1e9"], "diffusion.logsnr_min"),
    (["diffusion.schedule=\"logsnr_linear\"", "diffusion.logsnr_min=3", "diffusion.logsnr_max=3"],
     "diffusion.logsnr_max"),
    (["loss.objective=\"continuous\"", "loss.weighting=\"elbo\"", "loss.t_sampling=\"importance\"",
      "diffusion.learned_schedule=true"],
     "loss.t_sampling"),
])
def test_bad_continuous_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


# -- training, resuming, loading, evaluating ---------------------------------------------------------
TINY_TOY = ["data.name=moons", "data.n_train=256", "data.n_test=64", "model.kind=mlp", "model.hidden=32",
            "model.depth=2", "diffusion.T=40", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=4", "train.warmup_steps=2", "train.n_sample=8", "train.lr=1e-2",
            "loss.objective=\"continuous\"", "loss.weighting=\"elbo\"", "loss.t_sampling=\"stratified\"",
            "diffusion.learned_schedule=true", "diffusion.logsnr_min=-8", "diffusion.logsnr_max=8"]


def test_continuous_run_resumes_exactly_and_loads_as_a_discrete_schedule(tmp_path):
    from diffusekit.families import open_run as load_run
    from diffusekit.io.checkpoint import load_checkpoint
    from diffusekit.sampling.generate import generate
    from diffusekit.sampling.settings import SampleSettings
    from diffusekit.train.trainer import train

    full, part = load_config(None, TINY_TOY + ["train.steps=6"]), load_config(None, TINY_TOY + ["train.steps=4"])
    train(full, tmp_path / "a", progress=False)
    train(part, tmp_path / "b", progress=False)
    train(full, tmp_path / "b", resume=True, progress=False)
    ta, _ = load_checkpoint(tmp_path / "a")
    tb, _ = load_checkpoint(tmp_path / "b")
    assert "model.schedule.raw_a" in ta and "ema.schedule.center" in ta  # the schedule is a trained weight
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["model.schedule.raw_w"], MonotoneLogSNR(-8.0, 8.0).raw_w)

    run = load_run(tmp_path / "a")
    T = full.diffusion.T
    lam = run.logsnr_schedule.logsnr(torch.arange(T, dtype=F64) / (T - 1))
    torch.testing.assert_close(run.schedule.logsnr[1:], lam.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(run.logsnr_schedule.raw_w.detach(), ta["ema.schedule.raw_w"])
    x = torch.randn(5, 2)
    with torch.no_grad():  # the discrete view at step k is the continuous model at t_k
        k = 17
        a = run.denoiser(x, run.schedule.logsnr[k].float()).eps
        b = run.denoiser(x, lam[k - 1].detach().float()).eps
    torch.testing.assert_close(a, b)
    samples = generate(run.denoiser, run.schedule, (2,), SampleSettings(steps=10, seeds=[0, 1, 2]), progress=False)
    assert samples.shape == (3, 2) and torch.isfinite(samples).all()


def test_evaluate_reports_the_continuous_bound(tmp_path):
    from diffusekit.families.base import EvaluateSettings
    from diffusekit.runs.evaluate import evaluate_run, format_table
    from diffusekit.train.trainer import train

    train(load_config(None, TINY_TOY + ["train.steps=3"]), tmp_path, progress=False)
    evaluation = evaluate_run(tmp_path, EvaluateSettings(metrics=("bpd",)), progress=False)[0]
    result = evaluation.result
    c = result["bpd"]["continuous"]
    parts = c["prior_bits_per_dim"] + c["reconstruction_bits_per_dim"] + c["diffusion_bits_per_dim"]
    assert c["bits_per_dim"] == pytest.approx(parts) and c["levels"] is None and c["stderr_bits_per_dim"] > 0
    assert "continuous bound" in format_table(evaluation.rows)


def test_elbo_objective_loss_is_the_bound_in_bits_per_dim():
    """The module's loss with weighting elbo is prior + reconstruction + diffusion / (D log 2) per example."""
    orc = gaussian(2)
    x = orc.sample(8, torch.Generator().manual_seed(21))
    t = sample_times(8, torch.Generator().manual_seed(22))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(23), dtype=F64)
    sched = CosineLogSNR(-8.0, 8.0)
    module = ContinuousDiffusion(ScaledOracleNet(), sched, levels=17)
    lam, dlam = sched(t)
    nats = prior_kl_at(x, -8.0) + reconstruction_nll(x, 8.0, noise, 17) + diffusion_term(module.denoiser, x, lam, dlam,
                                                                                     noise)
    torch.testing.assert_close(module(x, t, noise).detach(), nats.detach() / (2 * math.log(2)))


class OracleTargetNet(nn.Module):
    """The exact output of a network of ``kind`` for mixture data, under the raw-network contract."""

    def __init__(self, oracle: GaussianMixture, kind: str):
        super().__init__()
        self.oracle, self.kind = oracle, kind

    def forward(self, x, c_noise):
        lam = c_noise.to(F64)
        return self.oracle.target(self.kind, x, torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt())


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "score"])
def test_every_prediction_kind_gives_the_same_eps_error(kind):
    orc = default_mixture(2)
    x = orc.sample(64, torch.Generator().manual_seed(24))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(25), dtype=F64)
    lam = torch.linspace(-6, 6, 64, dtype=F64)
    via_kind = eps_sq_error(Denoiser(OracleTargetNet(orc, kind), kind), x, lam, noise)
    torch.testing.assert_close(via_kind, eps_sq_error(orc.denoiser, x, lam, noise), rtol=1e-6, atol=1e-9)


def test_weighted_objective_module_returns_the_weighted_loss_alone():
    orc = gaussian(2)
    x = orc.sample(8, torch.Generator().manual_seed(26))
    t = sample_times(8, torch.Generator().manual_seed(27))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(28), dtype=F64)
    sched = CosineLogSNR(-8.0, 8.0)
    module = ContinuousDiffusion(ScaledOracleNet(), sched, levels=17, weighting="sigmoid", sigmoid_bias=1.5)
    lam, dlam = sched(t)
    expected = diffusion_term(module.denoiser, x, lam, dlam, noise, "sigmoid", sigmoid_bias=1.5) / (2 * math.log(2))
    torch.testing.assert_close(module(x, t, noise).detach(), expected.detach())
    elbo = ContinuousDiffusion(module.net, sched, levels=17)(x, t, noise).detach()
    assert torch.all(module(x, t, noise).detach() < elbo)  # sigmoid weights < 1 and no prior/decoder terms
