"""Losses: every weighting and parameterization against exact identities."""


import pytest
import torch

from diffusekit import gaussian as G
from diffusekit.losses import WEIGHTINGS, diffusion_loss, log_kind_factor, log_weight, sample_timesteps
from diffusekit.oracle import default_mixture
from diffusekit.parameterization import Denoiser, eps_to_x0, v_from_x0_eps
from diffusekit.schedules import make_schedule

F64 = torch.float64
KINDS = ["eps", "x0", "v", "score"]


class OracleNet(torch.nn.Module):
    """A 'network' that outputs the oracle's optimal target of a given kind."""

    def __init__(self, gm, kind):
        super().__init__()
        self.gm, self.kind = gm, kind

    def forward(self, x, c_noise):
        a, s = torch.sigmoid(c_noise.double()).sqrt(), torch.sigmoid(-c_noise.double()).sqrt()
        return self.gm.target(self.kind, x, a, s)


def _setup(n=512, name="cosine", seed=0):
    gm = default_mixture(2)
    sch = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, g)
    t = sample_timesteps(n, sch.T, g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    return gm, sch, x0, t, noise


@pytest.mark.parametrize("kind", KINDS)
def test_any_kind_gives_the_same_eps_mse(kind):
    """With the optimal network of each kind, the 'simple' loss equals the eps-MSE of the oracle's
    eps pointwise: the conversion factor c_kind is exact."""
    gm, sch, x0, t, noise = _setup()
    loss = diffusion_loss(Denoiser(OracleNet(gm, kind), kind), x0, t, sch, noise, "simple")
    xt = G.q_sample(x0, t, sch, noise)
    a, s = sch.alpha[t], sch.sigma[t]
    expected = ((noise - gm.eps(xt, a, s)) ** 2).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)


def test_weightings_are_the_named_mse():
    gm, sch, x0, t, noise = _setup(name="linear")
    den = Denoiser(OracleNet(gm, "eps"), "eps")
    xt = G.q_sample(x0, t, sch, noise)
    a, s = sch.alpha[t][:, None], sch.sigma[t][:, None]
    eps_hat = gm.eps(xt, a[:, 0], s[:, 0])
    x0_hat = eps_to_x0(xt, eps_hat, a, s)
    mse = lambda u, v: ((u - v) ** 2).mean(1)
    torch.testing.assert_close(diffusion_loss(den, x0, t, sch, noise, "x0"), mse(x0, x0_hat), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(diffusion_loss(den, x0, t, sch, noise, "v"),
                               mse(v_from_x0_eps(x0, noise, a, s), v_from_x0_eps(x0_hat, eps_hat, a, s)), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(diffusion_loss(den, x0, t, sch, noise, "snr"), diffusion_loss(den, x0, t, sch, noise, "simple"))
    snr = sch.snr[t]
    torch.testing.assert_close(diffusion_loss(den, x0, t, sch, noise, "min_snr", gamma=5.0),
                               torch.minimum(snr, torch.tensor(5.0, dtype=F64)) * mse(x0, x0_hat), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(diffusion_loss(den, x0, t, sch, noise, "truncated_snr"),
                               torch.maximum(snr, torch.tensor(1.0, dtype=F64)) * mse(x0, x0_hat), rtol=1e-6, atol=1e-10)


def test_elbo_weight_is_the_kl_of_the_bound():
    """T * w_elbo * eps-MSE equals T times the per-dimension KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    with p's mean in eps form and p's variance beta_tilde (t >= 2)."""
    gm, sch, x0, t, noise = _setup(name="linear", seed=3)
    t = t.clamp(min=2)
    den = Denoiser(OracleNet(gm, "eps"), "eps")
    loss = diffusion_loss(den, x0, t, sch, noise, "elbo")
    xt = G.q_sample(x0, t, sch, noise)
    mu_q, var, _ = G.posterior_mean_variance(x0, xt, t, sch)
    mu_p = G.posterior_mean_from_eps(xt, gm.eps(xt, sch.alpha[t], sch.sigma[t]), t, sch)
    kl = G.gaussian_kl(mu_q, var.log(), mu_p, var.log()).mean(1)
    torch.testing.assert_close(loss, sch.T * kl, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_finite_at_both_ends(name, weighting, kind):
    sch = make_schedule(name, 1000)
    t = torch.tensor([1, 2, 500, 999, 1000])
    lam = sch.logsnr[t]
    lw = log_weight(weighting, lam, schedule=sch, t=t) + log_kind_factor(kind, lam)
    assert torch.all(torch.isfinite(lw)) and torch.all(torch.isfinite(torch.exp(lw)))


def test_stratified_timesteps_cover_every_stratum():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(100, 1000, g, "stratified")
    assert t.min() >= 1 and t.max() <= 1000
    assert sorted(((t - 1) // 10).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps(4, 10, g, "sobol")


def test_unknown_weighting_is_an_error():
    with pytest.raises(ValueError, match="unknown loss weighting"):
        log_weight("p2", torch.zeros(1, dtype=F64))
