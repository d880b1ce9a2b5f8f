"""eps/x0/v/score conversions and the Gaussian-mixture oracle against exact answers."""

import math

import pytest
import torch

from diffusekit import parameterization as P
from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.schedules import alpha_sigma_from_logsnr, make_schedule

F64 = torch.float64
KINDS = ["eps", "x0", "v", "score"]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    n = 64
    x0 = torch.rand(n, 2, 4, 4, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(n, 2, 4, 4, generator=g, dtype=F64)
    logsnr = torch.linspace(-12, 12, n, dtype=F64)
    alpha, sigma = P.scales_from_logsnr(logsnr, x0)
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("kind", KINDS)
def test_conversions_round_trip(kind, batch):
    x0, eps, alpha, sigma, xt = batch
    target = P.from_eps_x0(kind, eps, x0, alpha, sigma)
    eps_back, x0_back = P.to_eps_x0(kind, target, xt, alpha, sigma)
    torch.testing.assert_close(eps_back, eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0_back, x0, rtol=1e-6, atol=1e-6)


def test_v_formulas_hold_without_variance_preservation():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(10, generator=g, dtype=F64), torch.randn(10, generator=g, dtype=F64)
    alpha, sigma = torch.tensor(1.0, dtype=F64), torch.tensor(3.0, dtype=F64)  # VE-like scaling
    v = P.v_from_x0_eps(x0, eps, alpha, sigma)
    xt = alpha * x0 + sigma * eps
    torch.testing.assert_close(P.v_to_x0(xt, v, alpha, sigma), x0)
    torch.testing.assert_close(P.v_to_eps(xt, v, alpha, sigma), eps)


def test_unknown_kind_is_an_error():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown prediction kind"):
        P.to_eps_x0("noise", z, z, z, z)
    with pytest.raises(ValueError, match="unknown prediction kind"):
        P.Denoiser(torch.nn.Identity(), "mu")


class _Echo(torch.nn.Module):
    """A 'network' that returns a fixed tensor, to test the wrapper's conversions."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, c_noise, **kw):
        assert c_noise.shape == (x.shape[0],)
        return self.out


@pytest.mark.parametrize("kind", KINDS)
def test_denoiser_wrapper_converts_any_kind(kind, batch):
    x0, eps, alpha, sigma, xt = batch
    logsnr = torch.linspace(-12, 12, x0.shape[0], dtype=F64)
    den = P.Denoiser(_Echo(P.from_eps_x0(kind, eps, x0, alpha, sigma)), kind)
    pred = den(xt, logsnr)
    torch.testing.assert_close(pred.eps, eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pred.x0, x0, rtol=1e-6, atol=1e-6)


# -- the oracle -----------------------------------------------------------------------------
MIXTURES = {"1d": lambda: default_mixture(1), "2d": lambda: default_mixture(2), "5d": lambda: default_mixture(5),
            "gaussian": lambda: GaussianMixture.gaussian(torch.tensor([0.5, -0.2]), torch.tensor([[0.3, 0.1], [0.1, 0.2]]))}


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("logsnr", [-8.0, -1.0, 0.0, 3.0, 9.0])
def test_oracle_score_is_the_gradient_of_its_log_density(name, logsnr):
    gm = MIXTURES[name]()
    alpha, sigma = alpha_sigma_from_logsnr(torch.tensor(logsnr, dtype=F64))
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(32, gm.dim, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, alpha, sigma).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), alpha, sigma), grad, rtol=1e-9, atol=1e-9)
    # optimal eps is -sigma * score, and x0 = Tweedie's posterior mean
    torch.testing.assert_close(gm.eps(x.detach(), alpha, sigma), -sigma * grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gm.x0_mean(x.detach(), alpha, sigma), (x.detach() + sigma**2 * grad) / alpha,
                               rtol=1e-7, atol=1e-7)


def test_oracle_marginal_is_the_data_pushed_through_the_kernel():
    """Sampling x_0, then x_t = alpha x_0 + sigma eps, matches the oracle's q_t in mean and covariance,
    and its density integrates to one (1-D)."""
    gm = default_mixture(2)
    g = torch.Generator().manual_seed(6)
    alpha, sigma = 0.6, 0.8
    x0 = gm.sample(400_000, g)
    xt = alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)
    torch.testing.assert_close(xt.mean(0), alpha * gm.mean, rtol=0, atol=1e-2)
    torch.testing.assert_close(torch.cov(xt.T), alpha**2 * gm.covariance + sigma**2 * torch.eye(2, dtype=F64),
                               rtol=0, atol=1e-2)
    gm1 = default_mixture(1)
    grid = torch.linspace(-10, 10, 200_001, dtype=F64)[:, None]
    for a, s in [(1.0, 0.0), (0.6, 0.8), (0.1, math.sqrt(0.99))]:
        mass = torch.exp(gm1.log_prob(grid, a, s)).sum().item() * (20 / 200_000)
        assert mass == pytest.approx(1.0, abs=1e-6)


def test_oracle_eps_minimises_the_denoising_loss():
    """E||eps - f(x_t)||^2 is smallest at f = oracle eps: perturbing it increases the Monte-Carlo loss
    by exactly the perturbation's mean square (orthogonality of the conditional mean)."""
    gm = default_mixture(2)
    g = torch.Generator().manual_seed(7)
    alpha, sigma = 0.7, math.sqrt(1 - 0.49)
    x0 = gm.sample(200_000, g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    xt = alpha * x0 + sigma * eps
    best = gm.eps(xt, alpha, sigma)
    base = ((eps - best) ** 2).sum(1).mean().item()
    for delta in (0.05, -0.1):
        worse = ((eps - best - delta * torch.tanh(xt)) ** 2).sum(1).mean().item()
        expected = base + delta**2 * (torch.tanh(xt) ** 2).sum(1).mean().item()
        assert worse > base
        assert worse == pytest.approx(expected, rel=2e-3)


def test_oracle_denoiser_convention_and_targets():
    gm = default_mixture(3)
    sch = make_schedule("cosine", 100)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 3, generator=g, dtype=F64)
    t = torch.randint(1, 101, (16,), generator=g)
    pred = gm.denoiser(x, sch.logsnr[t])
    a, s = sch.alpha[t][:, None], sch.sigma[t][:, None]
    torch.testing.assert_close(pred.x0, P.eps_to_x0(x, pred.eps, a, s), rtol=1e-8, atol=1e-8)
    for kind in KINDS:
        tgt = gm.target(kind, x, sch.alpha[t], sch.sigma[t])
        e, x0 = P.to_eps_x0(kind, tgt, x, a, s)
        torch.testing.assert_close(e, pred.eps, rtol=1e-8, atol=1e-8)


def test_oracle_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 1), torch.ones(2, 1, 1))
    with pytest.raises(Exception):
        GaussianMixture(torch.tensor([1.0]), torch.zeros(1, 2), -torch.eye(2)[None])
