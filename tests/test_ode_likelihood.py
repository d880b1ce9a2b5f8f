"""Exact likelihood through the probability-flow ODE, against the oracle's exact log-density, the
exact trace, and the discrete bound of the same model."""

import math

import pytest
import torch

from diffusekit.likelihood import vlb_exact
from diffusekit.likelihood_ode import divergence_exact, divergence_hutchinson, hutchinson_probes, ode_log_prob, ode_nll
from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.sampling.ode import ve_denoise
from diffusekit.schedules import LinearVPSchedule, make_schedule
from diffusekit.sde import VESDE, VPSDE, SubVPSDE, vp_from_schedule

F64 = torch.float64


def _exact_prior(mix, sde):
    a, s = float(sde.mean_coef(sde.t_max)), float(sde.std(sde.t_max))
    return lambda x: mix.log_prob(x, a, s)


@pytest.mark.parametrize("make", [lambda: VPSDE(LinearVPSchedule()), lambda: SubVPSDE(LinearVPSchedule()),
                                  lambda: VESDE(0.01, 50.0)], ids=["vp", "subvp", "ve"])
def test_ode_log_density_equals_the_oracle_density(make):
    """With the exact score and the exact q_1 as prior, the ODE gives log q_{t_min}(x) to solver accuracy."""
    sde, mix = make(), default_mixture(2)
    x = mix.sample(16, torch.Generator().manual_seed(0))
    logp, stats = ode_log_prob(mix.denoiser, sde, x, trace="exact", rtol=1e-7, atol=1e-7,
                               prior_log_prob=_exact_prior(mix, sde))
    exact = mix.log_prob(x, float(sde.mean_coef(sde.t_min)), float(sde.std(sde.t_min)))
    assert torch.allclose(logp, exact, atol=1e-4), (logp - exact).abs().max()
    assert stats.nfe > 10


def test_standard_normal_prior_costs_only_the_prior_mismatch():
    sde, mix = VPSDE(LinearVPSchedule()), default_mixture(2)
    x = mix.sample(16, torch.Generator().manual_seed(1))
    logp, _ = ode_log_prob(mix.denoiser, sde, x, trace="exact", rtol=1e-6, atol=1e-6)
    exact = mix.log_prob(x, float(sde.mean_coef(sde.t_min)), float(sde.std(sde.t_min)))
    assert (logp - exact).abs().max() < 5e-3  # alpha_bar(1) ~ 4e-5 at the end of the linear VP


def test_hutchinson_is_exact_in_one_dimension_with_rademacher_probes():
    sde = VPSDE(LinearVPSchedule())
    mix = default_mixture(1)
    x = mix.sample(8, torch.Generator().manual_seed(2))
    a = ode_log_prob(mix.denoiser, sde, x, trace="exact", rtol=1e-6, atol=1e-6)[0]
    b = ode_log_prob(mix.denoiser, sde, x, trace="hutchinson", probe="rademacher", rtol=1e-6, atol=1e-6)[0]
    assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
    """The mean of z^T J z over many probes is the exact trace (within 4 standard errors)."""
    mix = default_mixture(3)
    y = torch.randn(1, 3, generator=torch.Generator().manual_seed(3), dtype=F64).expand(4000, 3).contiguous()
    velocity = lambda yy: yy - ve_denoise(mix.denoiser, yy, 0.4)  # noqa: E731
    _, exact = divergence_exact(velocity, y[:1])
    z = hutchinson_probes(list(range(4000)), (3,), probe)
    assert (z.abs() == 1).all() if probe == "rademacher" else abs(z.std().item() - 1) < 0.05
    _, est = divergence_hutchinson(velocity, y, z)
    se = est.std().item() / math.sqrt(4000)
    assert abs(est.mean().item() - exact.item()) < 4 * se, (est.mean().item(), exact.item(), se)
    assert est.std().item() > 1e-3  # the estimate really is random (the test could fail)


def test_dequantized_ode_nll_is_below_the_discrete_bound_of_the_same_model():
    """Data on 33 levels in [-1, 1]. The model is the oracle of the (continuous) mixture the data was
    quantized from. The ODE NLL (dequantized, bin width counted) and the discrete bound score the same
    discrete x; the bound must not be below the ODE number, and both must be above the exact discrete
    NLL -log P(bin) computed by quadrature (each is an upper bound on it, up to noise and t_min)."""
    base = default_mixture(2)
    mix = GaussianMixture(base.weights, base.means * 0.4, base.covs * 0.16)
    levels, n = 33, 96
    width = 2.0 / (levels - 1)
    x = mix.sample(n, torch.Generator().manual_seed(4)).clamp(-1, 1)
    x = torch.round((x + 1) / width) * width - 1
    sched = make_schedule("linear", 1000)
    sde = vp_from_schedule(sched)
    ode = ode_nll(mix.denoiser, sde, x, levels, trace="exact", rtol=1e-5, atol=1e-5, seed=0)
    bound = vlb_exact(mix.denoiser, x, sched, levels, seed=0)
    # exact -log P(bin): Gauss-Legendre quadrature of the density over each 2-D bin
    nodes, wts = torch.tensor([-0.8611363116, -0.3399810436, 0.3399810436, 0.8611363116], dtype=F64), \
        torch.tensor([0.3478548451, 0.6521451549, 0.6521451549, 0.3478548451], dtype=F64)
    gx, gy = torch.meshgrid(nodes, nodes, indexing="ij")
    offs = torch.stack([gx.flatten(), gy.flatten()], 1) * width / 2
    w2 = (wts[:, None] * wts[None, :]).flatten() * (width / 2) ** 2
    pts = (x[:, None, :] + offs[None]).reshape(-1, 2)
    mass = (mix.log_prob(pts).exp().reshape(n, -1) * w2).sum(1)
    true_nll = -torch.log(mass)
    se = ode.nll.std().item() / math.sqrt(n)
    assert bound.total.mean().item() >= ode.nll.mean().item() - 3 * se, (bound.total.mean(), ode.nll.mean(), se)
    assert ode.nll.mean().item() >= true_nll.mean().item() - 3 * se, (ode.nll.mean(), true_nll.mean())
    assert ode.levels == levels and ode.nfe > 0 and ode.bits_per_dim == pytest.approx(
        ode.nll.mean().item() / (2 * math.log(2)))


def test_ode_nll_does_not_depend_on_the_batch_size():
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    x = mix.sample(6, torch.Generator().manual_seed(5)).clamp(-1, 1)
    a = ode_nll(mix.denoiser, sde, x, 17, rtol=1e-4, atol=1e-4, batch_size=6).nll
    b = ode_nll(mix.denoiser, sde, x, 17, rtol=1e-4, atol=1e-4, batch_size=4).nll
    assert torch.allclose(a, b, atol=1e-9)
    with pytest.raises(ValueError, match="levels"):
        ode_nll(mix.denoiser, sde, x, 1)
    with pytest.raises(ValueError, match="trace"):
        ode_log_prob(mix.denoiser, sde, x, trace="approx")
