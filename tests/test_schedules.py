"""Schedules: exact identities, agreement with diffusers, respacing and the continuous view."""

import math

import pytest
import torch

from diffusekit import schedules as S
from diffusekit.likelihood import nats_to_bits_per_dim, prior_kl

F64 = torch.float64


def diffusers_scheduler(beta_schedule: str, T: int = 1000):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule)


@pytest.mark.parametrize("name,theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_tables_match_diffusers(name, theirs):
    """alpha_bar, beta_tilde and both posterior-mean coefficients agree with DDPMScheduler to 1e-6.

    diffusers indexes steps k = 0..T-1; ours are t = k + 1."""
    ref = diffusers_scheduler(theirs)
    ours = S.make_schedule(name, 1000)
    # diffusers stores alpha_bar in float32; 1 - alpha_bar then loses ~4 digits near t = 1
    # (float32, unlike ours), so the derived tables are rebuilt in float64 from its betas by its formulas.
    torch.testing.assert_close(ours.alpha_bar[1:], ref.alphas_cumprod.double(), rtol=0, atol=1e-6)
    ab = torch.cumprod(1 - ref.betas.double(), 0)
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    betas = ref.betas.double()
    torch.testing.assert_close(ours.betas[1:], betas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.alpha_bar[1:], ab, rtol=0, atol=1e-6)
    # diffusers' _get_variance formula for "fixed_small" (before its clamp at 1e-20)
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    torch.testing.assert_close(ours.posterior_variance[1:], beta_tilde, rtol=0, atol=1e-6)
    # coefficients used in DDPMScheduler.step (eq. 7 of Ho et al.)
    coef_x0 = ab_prev.sqrt() * betas / (1 - ab)
    coef_xt = (1 - betas).sqrt() * (1 - ab_prev) / (1 - ab)
    torch.testing.assert_close(ours.posterior_mean_coef_x0[1:], coef_x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.posterior_mean_coef_xt[1:], coef_xt, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid", "logsnr_linear"])
@pytest.mark.parametrize("T", [10, 257, 1000, 4000])
def test_schedule_invariants(name, T):
    sch = S.make_schedule(name, T)
    assert sch.betas.dtype == F64 and sch.alpha_bar.dtype == F64
    assert sch.T == T and sch.betas[0] == 0 and sch.alpha_bar[0] == 1
    assert torch.all(sch.one_minus_alpha_bar[1:] > 0)
    assert torch.all(torch.diff(sch.logsnr[1:]) < 0), "SNR must decrease strictly"
    assert torch.all((sch.betas[1:] > 0) & (sch.betas[1:] <= 0.999))
    assert sch.posterior_variance[1] == 0
    assert torch.all(torch.isfinite(sch.posterior_log_variance_clipped))
    # beta_tilde <= beta (posterior is tighter than the forward step)
    assert torch.all(sch.posterior_variance[1:] <= sch.betas[1:] + 1e-15)


def test_linear_rescales_coherently_with_T():
    """At other T the linear schedule keeps alpha_bar at the same times t / T (closely)."""
    ref = S.make_schedule("linear", 1000).continuous()
    for T in (10, 100, 250, 2000):
        sch = S.make_schedule("linear", T)
        grid = torch.arange(T + 1, dtype=F64) / T
        if T >= 100:
            torch.testing.assert_close(sch.alpha, ref.alpha(grid), rtol=0, atol=0.02)
        # the total log-retention is preserved up to the interpolation of beta between grids
        assert sch.log_alpha_bar[-1].item() == pytest.approx(ref.log_alpha_bar(torch.ones(1, dtype=F64)).item(), rel=1e-2)


def test_cosine_is_capped_and_matches_formula():
    sch = S.make_schedule("cosine", 1000)
    assert sch.betas.max().item() == pytest.approx(0.999)
    t = torch.arange(1, 1000, dtype=F64) / 1000  # before the cap bites at the last step
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(sch.alpha_bar[1:1000], f(t) / f(torch.zeros(1, dtype=F64)), rtol=1e-9, atol=0)


def test_prior_term_of_ddpm_linear_is_about_1e5_bits_per_dim():
    """The DDPM paper: L_T of the linear schedule is ~1e-5 bits/dim for data in [-1, 1]."""
    sch = S.make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 64, generator=g, dtype=F64) * 2 - 1
    bpd = nats_to_bits_per_dim(prior_kl(x0, sch), 64).mean().item()
    assert 3e-6 < bpd < 3e-5, bpd
    # and it has the closed form 0.5 * (abar x0^2 - abar - log(1 - abar)) per dimension
    ab = sch.alpha_bar[-1]
    exact = 0.5 * (ab * x0**2 - ab - torch.log1p(-ab)).sum(1)
    torch.testing.assert_close(prior_kl(x0, sch), exact, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respacing_with_all_steps_is_exact(name):
    sch = S.make_schedule(name, 1000)
    same = S.respace(sch, range(1, 1001))
    for attr in ("betas", "alpha_bar", "logsnr", "posterior_variance", "posterior_mean_coef_x0",
                 "posterior_mean_coef_xt", "posterior_log_variance_clipped"):
        assert torch.equal(getattr(same, attr), getattr(sch, attr)), attr
    assert torch.equal(same.timesteps, sch.timesteps)


@pytest.mark.parametrize("S_steps", [7, 21, 50])
def test_respacing_recomputes_beta_from_alpha_bar(S_steps):
    sch = S.make_schedule("linear", 1000)
    steps = torch.linspace(1, 1000, S_steps).round().long()
    sub = S.respace(sch, steps)
    assert sub.T == S_steps
    torch.testing.assert_close(sub.alpha_bar[1:], sch.alpha_bar[steps], rtol=1e-12, atol=0)
    prev = torch.cat([torch.ones(1, dtype=F64), sch.alpha_bar[steps[:-1]]])
    torch.testing.assert_close(sub.betas[1:], 1 - sch.alpha_bar[steps] / prev, rtol=1e-9, atol=1e-15)
    assert torch.equal(sub.timesteps[1:], steps)
    torch.testing.assert_close(sub.logsnr[1:], sch.logsnr[steps], rtol=1e-12, atol=0)


def test_respacing_rejects_out_of_range():
    sch = S.make_schedule("linear", 10)
    with pytest.raises(ValueError, match="1..10"):
        S.respace(sch, [0, 5])
    with pytest.raises(ValueError):
        S.respace(sch, [11])


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_continuous_view_matches_table_at_grid_points(name):
    sch = S.make_schedule(name, 200)
    cont = sch.continuous()
    grid = torch.arange(1, 201, dtype=F64) / 200
    torch.testing.assert_close(cont.logsnr(grid), sch.logsnr[1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cont.alpha(grid), sch.alpha[1:], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(cont.sigma(grid), sch.sigma[1:], rtol=1e-12, atol=1e-15)
    # in between grid points logsnr is monotone
    fine = torch.linspace(0.001, 1, 5000, dtype=F64)
    assert torch.all(torch.diff(cont.logsnr(fine)) < 0)


def test_continuous_cosine_discretizes_to_the_cosine_table():
    torch.testing.assert_close(S.CosineSchedule().discretize(1000).betas, S.make_schedule("cosine", 1000).betas,
                               rtol=0, atol=1e-15)


def test_linear_vp_sde_is_the_limit_of_ddpm_linear():
    """score_sde's beta(t) = 0.1 + 19.9 t has nearly the same alpha_bar as DDPM's table at T = 1000."""
    sch = S.make_schedule("linear", 1000)
    grid = torch.arange(0, 1001, dtype=F64) / 1000
    vp = S.LinearVPSchedule()
    torch.testing.assert_close(vp.alpha(grid), sch.alpha, rtol=0, atol=2e-3)


def test_alpha_sigma_from_logsnr_is_variance_preserving():
    lam = torch.linspace(-30, 30, 101, dtype=F64)
    a, s = S.alpha_sigma_from_logsnr(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(lam))
    torch.testing.assert_close(torch.log(a**2 / s**2), lam)


@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_logsnr_linear_takes_equal_steps_in_log_snr_between_its_end_points(T):
    lo, hi = -11.07, 6.21
    sch = S.make_schedule("logsnr_linear", T, logsnr_min=lo, logsnr_max=hi)
    lam = sch.logsnr[1:]
    assert lam[-1].item() == pytest.approx(lo, abs=1e-12)
    if T > 1:
        assert lam[0].item() == pytest.approx(hi, abs=1e-12)
        steps = torch.diff(lam)
        torch.testing.assert_close(steps, torch.full_like(steps, (lo - hi) / (T - 1)), rtol=0, atol=1e-9)
    # alpha_bar = sigmoid(lambda) exactly: the first step's noise is sigma_1^2 = sigmoid(-logsnr_max)
    torch.testing.assert_close(sch.alpha_bar[1:], torch.sigmoid(lam), rtol=1e-12, atol=0)
    assert sch.one_minus_alpha_bar[1].item() == pytest.approx(1 / (1 + math.exp(hi if T > 1 else lo)), rel=1e-9)


def test_logsnr_linear_matching_the_linear_betas_end_points_has_the_same_first_and_last_noise():
    """The first step of DDPM's linear betas (beta_1 = 2e-3) is 0.70 wide in log-SNR; at the same end points
    the log-SNR-linear schedule's every step is (lambda_1 - lambda_T) / (T - 1)."""
    lin = S.make_schedule("linear", 1000, beta_start=2e-3, beta_end=0.02)
    ll = S.make_schedule("logsnr_linear", 1000, logsnr_min=float(lin.logsnr[-1]), logsnr_max=float(lin.logsnr[1]))
    torch.testing.assert_close(ll.betas[1], lin.betas[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(ll.alpha_bar[-1], lin.alpha_bar[-1], rtol=1e-12, atol=0)
    assert (lin.logsnr[1] - lin.logsnr[2]).item() == pytest.approx(0.699, abs=1e-3)
    assert (ll.logsnr[1] - ll.logsnr[2]).item() == pytest.approx(17.287 / 999, abs=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [2, 10, 1000])
def test_decoder_variance_is_beta_tilde_2_where_the_betas_grow(name, T):
    sch = S.make_schedule(name, T)
    assert sch.betas[2] >= sch.betas[1]
    assert sch.posterior_log_variance_clipped[1].item() == torch.log(sch.posterior_variance[2]).item()


def test_decoder_variance_is_half_the_first_beta_when_the_first_step_is_the_widest():
    sch = S.make_schedule("logsnr_linear", 1000, logsnr_min=-11.07, logsnr_max=6.21)
    assert sch.betas[2] < sch.betas[1] / 50 and sch.posterior_variance[2] < sch.betas[1] / 50
    assert sch.posterior_log_variance_clipped[1].item() == pytest.approx(math.log(sch.betas[1].item() / 2), abs=1e-12)
    # beta_tilde_2 -> beta_1 / 2 as beta_2 -> beta_1: the two rules meet at equal steps
    flat = S.DiscreteSchedule.from_betas(torch.full((5,), 0.01, dtype=F64))
    assert flat.posterior_variance[2].item() == pytest.approx(0.01 / 2, rel=0.01)


def test_the_config_builds_the_log_snr_linear_schedule_for_both_objectives():
    from diffusekit.config import load_config
    from diffusekit.continuous.logsnr import LinearLogSNR
    from diffusekit.continuous.module import build_logsnr_schedule
    from diffusekit.families.diffusion import build_schedule

    cfg = load_config(None, ["diffusion.schedule=\"logsnr_linear\"", "diffusion.T=50", "diffusion.logsnr_min=-9",
                             "diffusion.logsnr_max=7"])
    sch = build_schedule(cfg.diffusion)
    assert sch.T == 50 and sch.logsnr[1].item() == pytest.approx(7) and sch.logsnr[50].item() == pytest.approx(-9)
    lam = build_logsnr_schedule(cfg.diffusion)
    assert isinstance(lam, LinearLogSNR) and (lam.logsnr_min, lam.logsnr_max) == (-9, 7)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        S.make_schedule("quadratic")
    with pytest.raises(ValueError, match="positive integer"):
        S.make_schedule("linear", 0)
    with pytest.raises(ValueError, match="beta"):
        S.DiscreteSchedule.from_betas([0.1, 1.5])
    for lo, hi in ((2.0, 1.0), (1.0, 1.0), (-math.inf, 1.0), (0.0, math.nan)):
        with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
            S.make_schedule("logsnr_linear", 10, logsnr_min=lo, logsnr_max=hi)
