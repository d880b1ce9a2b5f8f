"""Dequantization of the probability-flow-ODE likelihood (``likelihood_ode.ode_nll(dequantization=...)``)
against exact answers.

The model is the oracle of a Gaussian mixture with diagonal covariances, scored with its exact denoiser,
the exact divergence and the exact density at t_max as prior, so the ODE gives log p_{t_min}(u) to
solver accuracy, where p_{t_min} = sum_k w_k N(a mu_k, a^2 S_k + s^2 I) (a, s at t_min). The discrete
model it defines, P(x) = int over the bin of x of p_{t_min}, is then a sum over components of products
of normal CDF differences: -log P(x) is known in closed form, and every dequantization must bound it.

Two data sets on 51 levels (bin width 0.04, the VP SDE's s(t_min) = 0.0105):
- "peaked": four components of std 0.002 sitting on grid points, what a network trained on
  undequantized discrete data learns; inside a bin p_{t_min} is a normal of std c = 0.0107 cut at
  b = 0.02 / c = 1.87 of its std, so the gap of each bound is a closed-form KL divergence;
- "smooth": one wide 1-D Gaussian, nearly flat across a bin.
Monte-Carlo tolerances are stated as multiples of the standard error over examples; the solver adds
about 1e-4 nats.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.likelihood_ode import (
    dequantization_uniforms,
    ode_log_prob,
    ode_nll,
    truncated_normal_icdf,
    truncated_normal_log_prob,
)
from diffusekit.oracle import GaussianMixture
from diffusekit.schedules import LinearVPSchedule
from diffusekit.sde import VPSDE

F64 = torch.float64
LEVELS = 51
WIDTH = 2.0 / (LEVELS - 1)
H = WIDTH / 2
SDE = VPSDE(LinearVPSchedule())
A0, S0 = float(SDE.mean_coef(SDE.t_min)), float(SDE.std(SDE.t_min))
A1, S1 = float(SDE.mean_coef(SDE.t_max)), float(SDE.std(SDE.t_max))
TAU = 0.002  # the peaked components' std
C = math.sqrt(A0**2 * TAU**2 + S0**2)  # their std at t_min


def _grid(k: int) -> float:
    return -1.0 + k * WIDTH


PEAKED = GaussianMixture(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64),
                         torch.tensor([[_grid(15), _grid(30)], [_grid(25), _grid(25)], [_grid(34), _grid(18)],
                                       [_grid(40), _grid(40)]], dtype=F64),
                         TAU**2 * torch.eye(2, dtype=F64).repeat(4, 1, 1))
SMOOTH = GaussianMixture.gaussian(torch.tensor([0.1], dtype=F64), torch.tensor([[0.09]], dtype=F64))


def _peaked_x(n: int) -> torch.Tensor:
    """n examples cycling through the four occupied bins (every draw of PEAKED lands in one of them)."""
    return PEAKED.means[torch.arange(n) % 4].clone()


def _smooth_x(n: int) -> torch.Tensor:
    x = SMOOTH.sample(n, torch.Generator().manual_seed(0)).clamp(-1, 1)
    return torch.round((x + 1) / WIDTH) * WIDTH - 1


def exact_nll(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """-log P(x) = -log sum_k w_k prod_d [Phi((x_d + H - a mu_kd) / c_kd) - Phi((x_d - H - a mu_kd) / c_kd)]."""
    c = torch.sqrt(A0**2 * torch.diagonal(mix.covs, dim1=1, dim2=2) + S0**2)[None]  # (1, K, D)
    m = A0 * mix.means[None]
    mass = torch.special.ndtr((x[:, None] + H - m) / c) - torch.special.ndtr((x[:, None] - H - m) / c)
    return -torch.log((mass.prod(-1) * mix.weights).sum(1))


def _nll(mix, x, tol=1e-6, **kw):
    prior = lambda z: mix.log_prob(z, A1, S1)
    return ode_nll(mix.denoiser, SDE, x, LEVELS, trace="exact", rtol=tol, atol=tol, prior_log_prob=prior, **kw).nll


def _gap(bound, exact):
    """Mean of bound - exact over examples and its standard error."""
    d = bound - exact
    return d.mean().item(), d.std().item() / math.sqrt(d.numel())


def _log_z(sigma: float) -> float:
    return math.log(math.erf(H / (sigma * math.sqrt(2.0))))


def _tn_second_moment(sigma: float) -> float:
    """E e^2 of N(0, sigma^2) cut to [-H, H]: sigma^2 (1 - 2 b phi(b) / (2 Phi(b) - 1)), b = H / sigma."""
    b = H / sigma
    return sigma**2 * (1 - 2 * b * math.exp(-b * b / 2) / math.sqrt(2 * math.pi) / math.erf(b / math.sqrt(2)))


def kl_uniform_to_tn(c: float) -> float:
    """KL(U[-H, H] || N(0, c^2) cut to [-H, H]): the uniform bound's gap per dimension on a peaked bin."""
    return (2 * H) ** 2 / (24 * c * c) - math.log(2 * H / c) + 0.5 * math.log(2 * math.pi) + _log_z(c)


def kl_tn_to_uniform(s: float) -> float:
    """KL(N(0, s^2) cut to [-H, H] || U[-H, H]) = log Delta - entropy: the truncated normal's gap per
    dimension on a flat bin."""
    return -_tn_second_moment(s) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi) - _log_z(s) + math.log(2 * H)


def kl_tn_to_tn(s: float, c: float) -> float:
    """KL(N(0, s^2) cut || N(0, c^2) cut), both on [-H, H]: the truncated-normal bound's gap per dimension."""
    return -_tn_second_moment(s) * (0.5 / s**2 - 0.5 / c**2) - math.log(s / c) - _log_z(s) + _log_z(c)


# -- the truncated normal itself ---------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.002, S0, 0.4], ids=["b=10", "b=1.9", "b=0.05"])
def test_truncated_normal_draws_are_the_exact_inverse_cdf_inside_the_bin(sigma):
    """F(F^-1(v)) = v to 1e-12 (F the truncated normal's CDF, closed form), F^-1 is increasing, every draw
    lies in the bin, and mean, variance and E|e| match their closed forms within 4 standard errors."""
    v = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    e = truncated_normal_icdf(v, sigma, H)
    assert e.dtype == F64 and (e.abs() <= H).all()
    b, tail = H / sigma, torch.special.ndtr(torch.tensor(-H / sigma, dtype=F64))
    cdf = (torch.special.ndtr(e / sigma) - tail) / (1 - 2 * tail)
    assert (cdf - v).abs().max().item() < 1e-12
    order = torch.argsort(v)
    assert (e[order].diff() >= 0).all()
    n = e.numel()
    var, abs_mean = _tn_second_moment(sigma), 2 * sigma * (1 - math.exp(-b * b / 2)) / math.sqrt(2 * math.pi) / \
        math.erf(b / math.sqrt(2))
    assert abs(e.mean().item()) < 4 * math.sqrt(var / n)
    sq = e**2
    assert abs(sq.mean().item() - var) < 4 * sq.std().item() / math.sqrt(n), (sq.mean().item(), var)
    assert abs(e.abs().mean().item() - abs_mean) < 4 * e.abs().std().item() / math.sqrt(n)
    assert abs(truncated_normal_icdf(torch.tensor([0.5], dtype=F64), sigma, H).item()) < 1e-15


@pytest.mark.parametrize("sigma", [0.002, S0, 0.05, 10.0])
def test_truncated_normal_log_density_integrates_to_one_over_the_bin(sigma):
    """Gauss-Legendre quadrature (400 nodes) of exp(log q) over [-H, H] is 1 to 1e-6; outside the bin
    log q is -inf; a very wide sigma gives the uniform density 1 / Delta."""
    nodes, weights = np.polynomial.legendre.leggauss(400)
    e = torch.tensor(nodes * H, dtype=F64)
    integral = (truncated_normal_log_prob(e, sigma, H).exp() * torch.tensor(weights * H, dtype=F64)).sum().item()
    assert abs(integral - 1.0) < 1e-6, integral
    assert truncated_normal_log_prob(torch.tensor([1.0001 * H, -1.5 * H], dtype=F64), sigma, H).isneginf().all()
    wide = truncated_normal_log_prob(torch.tensor([0.0, H], dtype=F64), 1e3, H)
    assert torch.allclose(wide, torch.full_like(wide, -math.log(WIDTH)), atol=1e-6)


# -- the bounds against the exact -log P ----------------------------------------------------------------

def test_uniform_and_truncated_normal_bounds_on_a_peaked_density():
    """512 examples of the peaked 2-D model. Each bound is >= the exact -log P (mean gap > -3 SE), and its
    mean gap is the closed-form KL of its q to p(. | bin) (two dimensions) within 4 SE + 2e-3: 0.240
    nats for uniform noise, 2e-4 for the truncated normal of the default sigma = s(t_min). A sigma 2.5x
    too small or 5x too large still bounds -log P, more loosely than the default."""
    x = _peaked_x(512)
    exact = exact_nll(PEAKED, x)
    gaps = {}
    for name, kw in (("uniform", {}), ("tn", {"dequantization": "truncated_normal"}),
                     ("tn_narrow", {"dequantization": "truncated_normal", "dequant_sigma": 0.004}),
                     ("tn_wide", {"dequantization": "truncated_normal", "dequant_sigma": 0.05})):
        gaps[name] = _gap(_nll(PEAKED, x, **kw), exact)
        assert gaps[name][0] > -3 * gaps[name][1], (name, gaps[name])
    expect_u, expect_tn = 2 * kl_uniform_to_tn(C), 2 * kl_tn_to_tn(S0, C)
    assert 0.23 < expect_u < 0.25 and 0 < expect_tn < 1e-3
    assert abs(gaps["uniform"][0] - expect_u) < 4 * gaps["uniform"][1] + 2e-3, (gaps["uniform"], expect_u)
    assert abs(gaps["tn"][0] - expect_tn) < 4 * gaps["tn"][1] + 2e-3, (gaps["tn"], expect_tn)
    assert gaps["tn"][0] + 4 * gaps["tn"][1] < gaps["uniform"][0] - 4 * gaps["uniform"][1]  # tighter than uniform
    for loose in ("tn_narrow", "tn_wide"):
        assert gaps[loose][0] - 4 * gaps[loose][1] > gaps["tn"][0] + 4 * gaps["tn"][1], (loose, gaps)


def test_importance_weighted_bound_falls_to_the_exact_value_with_k():
    """128 examples of the peaked 2-D model, K = 1, 4, 16 uniform draws (the draws of K = 4 are the first
    four of K = 16). K = 1 is the uniform bound bit for bit; the mean bound decreases with K and stays
    above the exact -log P (> -3 SE); at K = 16 it is within 0.05 nats of it (measured: 0.019 +- 0.015;
    the delta method predicts chi^2 / (2 K) = 0.013 for this q and p; the uniform gap is 0.240). Solver
    tolerance 1e-5 (about 1e-4 nats)."""
    x = _peaked_x(128)
    exact = exact_nll(PEAKED, x)
    uniform = _nll(PEAKED, x, 1e-5)
    bounds = {k: _nll(PEAKED, x, 1e-5, dequantization="importance", dequant_samples=k) for k in (1, 4, 16)}
    assert torch.equal(bounds[1], uniform)
    means = [bounds[k].mean().item() for k in (1, 4, 16)]
    assert means[0] > means[1] > means[2], means
    for k in (1, 4, 16):
        gap, se = _gap(bounds[k], exact)
        assert gap > -3 * se, (k, gap, se)
    gap16, se16 = _gap(bounds[16], exact)
    assert gap16 < 0.05 and se16 < 0.02, (gap16, se16)


def test_on_a_smooth_density_uniform_is_already_tight_and_every_bound_holds():
    """1-D Gaussian of std 0.3 on 51 levels (512 examples): p is nearly flat across a bin, so the uniform
    bound is exact within 4 SE + 2e-3, importance with K = 4 too; the truncated normal of the default
    sigma still bounds -log P but is looser here: its mean gap is KL(q || uniform) = 0.109 nats (closed
    form) within 4 SE + 5e-3 (its q is narrower than p(. | bin), which is flat to within 1e-3)."""
    x = _smooth_x(512)
    exact = exact_nll(SMOOTH, x)
    for kw in ({}, {"dequantization": "importance", "dequant_samples": 4}):
        gap, se = _gap(_nll(SMOOTH, x, **kw), exact)
        assert abs(gap) < 4 * se + 2e-3, (kw, gap, se)
    gap, se = _gap(_nll(SMOOTH, x, dequantization="truncated_normal"), exact)
    expect = kl_tn_to_uniform(S0)
    assert 0.10 < expect < 0.12 and abs(gap - expect) < 4 * se + 5e-3, (gap, se, expect)


# -- seeding and determinism ------------------------------------------------------------------------------

def test_default_uniform_draw_is_the_one_seeded_by_the_example():
    """The default reproduces, bit for bit, u_i = x_i + Delta (U_i - 1/2) with U_i the first draw of the
    generator seeded by seed * 1_000_003 + 2 i + 1 and the probe of seed * 1_000_003 + 2 i."""
    x, seed = _peaked_x(5).to(torch.float32), 7
    u = torch.stack([torch.rand((2,), generator=torch.Generator().manual_seed(seed * 1_000_003 + 2 * i + 1),
                                dtype=F64) for i in range(5)]).to(torch.float32)
    first = torch.rand((2,), generator=torch.Generator().manual_seed(seed * 1_000_003 + 1), dtype=F64)
    assert torch.equal(dequantization_uniforms(seed * 1_000_003 + 1, (2,), 3)[0], first)
    logp, _ = ode_log_prob(PEAKED.denoiser, SDE, x + WIDTH * (u - 0.5), rtol=1e-4, atol=1e-4,
                           seeds=[seed * 1_000_003 + 2 * i for i in range(5)])
    ours = ode_nll(PEAKED.denoiser, SDE, x, LEVELS, seed=seed, rtol=1e-4, atol=1e-4, batch_size=5).nll
    assert torch.equal(ours, -(logp + 2 * math.log(WIDTH)))


@pytest.mark.parametrize("kw", [{}, {"dequantization": "importance", "dequant_samples": 3},
                                {"dequantization": "truncated_normal", "dequant_samples": 2}],
                         ids=["uniform", "importance", "truncated_normal"])
def test_same_seed_same_numbers_and_no_dependence_on_the_batch(kw):
    """Example i's number depends on (seed, i) only: equal for the same seed, within 1e-9 for batches of 1
    and of all examples, different for another seed; importance with K = 1 is uniform bit for bit with
    the Hutchinson trace too."""
    x = _peaked_x(6) + torch.tensor([0.0, WIDTH], dtype=F64)
    run = lambda **more: ode_nll(PEAKED.denoiser, SDE, x, LEVELS, rtol=1e-4, atol=1e-4, **kw, **more).nll
    a = run(seed=3)
    assert torch.equal(a, run(seed=3))
    assert torch.allclose(a, run(seed=3, batch_size=1), atol=1e-9, rtol=0)
    assert torch.allclose(a[2:4], run(seed=3, batch_size=2)[2:4], atol=1e-9, rtol=0)
    assert (a - run(seed=4)).abs().min() > 1e-6
    one = ode_nll(PEAKED.denoiser, SDE, x, LEVELS, rtol=1e-4, atol=1e-4, dequantization="importance")
    assert torch.equal(one.nll, ode_nll(PEAKED.denoiser, SDE, x, LEVELS, rtol=1e-4, atol=1e-4).nll)
    assert one.settings["dequantization"] == "importance" and one.settings["dequant_samples"] == 1


# -- bad input --------------------------------------------------------------------------------------------

def test_bad_dequantization_settings_are_refused_naming_them():
    x = _peaked_x(2)
    call = lambda levels=LEVELS, **kw: ode_nll(PEAKED.denoiser, SDE, x, levels, **kw)
    with pytest.raises(ValueError, match="'gaussian'"):
        call(dequantization="gaussian")
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="dequant_samples"):
            call(dequantization="importance", dequant_samples=k)
    for s in (0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dequant_sigma"):
            call(dequantization="truncated_normal", dequant_sigma=s)
    with pytest.raises(ValueError, match="dequant_sigma"):
        call(dequant_sigma=0.01)  # sigma belongs to the truncated normal
    with pytest.raises(ValueError, match="levels"):
        call(levels=None, dequantization="importance", dequant_samples=4)
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma"):
            truncated_normal_icdf(torch.zeros(1, dtype=F64), sigma, H)


# -- diffusekit evaluate -----------------------------------------------------------------------------------

def test_evaluate_flags_settings_and_the_recorded_metric(capsys, tmp_path):
    """--dequantization / --dequant-samples reach EvaluateSettings; bad values are one-line errors naming
    the flag; the nll_ode metric records the choice (and the truncated normal's sigma = s(t_min))."""
    from test_cli import assert_one_line_error, run_cli

    from diffusekit.cli.evaluate import settings_from_args
    from diffusekit.cli.flags import build_parser
    from diffusekit.evaluate.diffusion import nll_ode
    from diffusekit.families.base import EvaluateSettings
    from diffusekit.schedules import make_schedule
    from diffusekit.sde import vp_from_schedule

    args = build_parser().parse_args(["evaluate", "--run", str(tmp_path), "--dequantization", "importance",
                                      "--dequant-samples", "4"])
    s = settings_from_args(args)
    assert (s.dequantization, s.dequant_samples) == ("importance", 4)
    assert EvaluateSettings().dequantization == "uniform" and EvaluateSettings().dequant_samples == 1
    for kwargs, flag in (({"dequantization": "gauss"}, "--dequantization"),
                         ({"dequant_samples": 0}, "--dequant-samples"), ({"dequant_samples": 1.5}, "--dequant-samples")):
        with pytest.raises(ConfigError, match=flag):
            EvaluateSettings(**kwargs)
    with pytest.raises(SystemExit) as exc:  # argparse: a bad choice, its one line printed
        run_cli(capsys, "evaluate", "--run", tmp_path, "--dequantization", "gauss", "--no-progress")
    assert_one_line_error(exc.value.code, capsys.readouterr().err, "--dequantization", "gauss")
    code, _, err = run_cli(capsys, "evaluate", "--run", tmp_path, "--dequant-samples", "0", "--no-progress")
    assert_one_line_error(code, err, "--dequant-samples")

    schedule = make_schedule("linear", 1000)
    run = SimpleNamespace(schedule=schedule, denoiser=PEAKED.denoiser, levels=LEVELS)
    test = SimpleNamespace(x=_peaked_x(3))
    o = nll_ode(run, test, 3, 0, "exact", 1e-4, 1e-4, False, "truncated_normal", 2)
    sde = vp_from_schedule(schedule)
    assert o["dequantization"] == "truncated_normal" and o["dequant_samples"] == 2
    assert o["dequant_sigma"] == pytest.approx(float(sde.std(sde.t_min))) and math.isfinite(o["bits_per_dim"])
    assert nll_ode(run, test, 3, 0, "exact", 1e-4, 1e-4, False)["dequantization"] == "uniform"
    with pytest.raises(ConfigError, match="--dequantization importance"):
        nll_ode(SimpleNamespace(schedule=schedule, denoiser=PEAKED.denoiser, levels=None), test, 3, 0, "exact", 1e-4,
                1e-4, False, "importance", 4)
