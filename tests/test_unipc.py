"""Trailing time grids and UniPC, against exact answers: the phi functions against quadrature, the
UniPC update against the exact step for polynomial x0 paths, convergence orders on the closed-form
probability-flow map of a Gaussian, the exact ODE map (Dormand-Prince) and the exact target of the
oracle mixture; then DPM-Solver++(2M) as a special case and diffusers' UniPC as an independent
implementation; then settings, generate and the CLI."""

import math

import pytest
import torch
from test_sde_samplers import gaussian_pf_map, sw2_exact

from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.sampling.dpm_solver import sample_dpmpp_2m
from diffusekit.sampling.ode import GRIDS, sample_euler, sample_rk45, time_grid
from diffusekit.sampling.unipc import phi, sample_unipc, unipc_coefficients
from diffusekit.schedules import LinearVPSchedule, make_schedule
from diffusekit.sde import VPSDE, vp_from_schedule

F64 = torch.float64


class Counted:
    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, logsnr, cond=None):
        self.calls += 1
        return self.denoiser(x, logsnr, cond)


# -- trailing grids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["time", "logsnr", "karras"])
def test_trailing_grids_drop_t_min_from_one_more_point(base):
    sde = vp_from_schedule(make_schedule("linear", 1000))
    for n in (1, 2, 7, 10):
        t = time_grid(sde, n, f"{base}_trailing")
        assert t.dtype == F64 and t.shape == (n,) and t[0] == sde.t_max
        assert torch.all(torch.diff(t) < 0) and t[-1] > sde.t_min
        assert torch.equal(t, time_grid(sde, n + 1, base)[:-1])
    t = time_grid(sde, 10, "time_trailing")  # uniform spacing, last call one spacing above t_min
    step = (sde.t_max - sde.t_min) / 10
    assert torch.allclose(t, sde.t_max - step * torch.arange(10, dtype=F64), atol=1e-14)
    lam = sde.logsnr(time_grid(sde, 8, "logsnr_trailing"))
    gap = (float(sde.logsnr(sde.t_min)) - float(sde.logsnr(sde.t_max))) / 8
    assert torch.allclose(torch.diff(lam), torch.full((7,), gap, dtype=F64), rtol=1e-8)
    assert set(GRIDS) >= {"time_trailing", "logsnr_trailing", "karras_trailing"}


@pytest.mark.parametrize("grid", ["time_trailing", "logsnr_trailing", "karras_trailing", "logsnr"])
def test_network_calls_equal_steps_on_every_grid(grid):
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for steps in (1, 2, 5):
        for fn in (sample_unipc, sample_dpmpp_2m, sample_euler):
            den = Counted(mix.denoiser)
            out = fn(den, sde, x_T, steps=steps, grid=grid)
            assert den.calls == steps and torch.isfinite(out).all(), (fn.__name__, grid, steps)


# -- the UniPC coefficients ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_phi_matches_its_integral(k):
    from scipy.integrate import quad

    for h in (1e-7, 0.03, 0.5, 0.999, 1.0, 1.001, 3.0, 40.0):
        exact, _ = quad(lambda u: math.exp(-h * (1 - u)) * u ** (k - 1) / math.factorial(k - 1), 0, 1,
                        epsabs=0, epsrel=1e-13)
        assert phi(k, h) == pytest.approx(exact, rel=1e-11, abs=0), (k, h)


@pytest.mark.parametrize("coefficients", ["solve", "bh1", "bh2"])
@pytest.mark.parametrize("rs", [[1.0], [-0.8], [-1.0, -2.1], [-0.7, 1.0], [-1.2, -2.0, 1.0]])
def test_update_is_exact_for_polynomial_paths(rs, coefficients):
    """With m(l) a polynomial of degree len(rs), (1 - e^{-h}) m_b + B sum_j a_j (m_j - m_b) / r_j equals
    the exact int_0^h e^{-(h - tau)} m(l_b + tau) dtau (scipy quad) when the system is solved; with
    the a = 1/2 rule of one-point systems the error is O(h^3) instead."""
    from scipy.integrate import quad

    from diffusekit.sampling.unipc import _b

    coef = [0.3, -1.1, 0.7, 0.4][: len(rs) + 1]
    m = lambda tau: sum(c * tau**n for n, c in enumerate(coef))  # noqa: E731  (l_b = 0)
    for h in (0.05, 0.4, 1.7):
        exact, _ = quad(lambda tau: math.exp(-(h - tau)) * m(tau), 0, h, epsabs=0, epsrel=1e-13)
        a = unipc_coefficients(rs, h, coefficients)
        approx = -math.expm1(-h) * m(0) + _b(h, coefficients) * sum(aj * (m(r * h) - m(0)) / r for aj, r in zip(a, rs))
        if coefficients == "solve" or len(rs) > 1:
            assert approx == pytest.approx(exact, rel=1e-10, abs=1e-13), (rs, h)
        else:
            assert abs(approx - exact) < 2 * h**3, (rs, h, approx - exact)
    if len(rs) > 1:  # B cancels from a solved system: B a is the same for every B
        b_a = {c: [_b(0.3, c) * aj for aj in unipc_coefficients(rs, 0.3, c)] for c in ("solve", "bh1", "bh2")}
        assert b_a["bh1"] == pytest.approx(b_a["bh2"], rel=1e-12) and b_a["solve"] == pytest.approx(b_a["bh2"], rel=1e-12)


# -- convergence on the exact map of a Gaussian ---------------------------------------------------
def _gaussian_errors(steps_list, **kw):
    sde = VPSDE(LinearVPSchedule())
    mu, s0 = 0.7, 0.3
    g = GaussianMixture.gaussian(torch.tensor([mu]), torch.tensor([[s0**2]]))
    x_T = torch.linspace(-3, 3, 61, dtype=F64)[:, None]
    exact = gaussian_pf_map(sde, x_T, mu, s0, sde.t_min)
    return [(sample_unipc(g.denoiser, sde, x_T, steps=n, grid="logsnr", denoise_final=False, **kw) - exact).abs().max().item()
            for n in steps_list]


@pytest.mark.parametrize("order,corrector,slope", [(1, False, 1), (1, True, 2), (2, False, 2), (2, True, 3)])
def test_unipc_converges_with_its_order(order, corrector, slope):
    """UniP-q has order q; the corrector UniC (no extra network call) raises it to q + 1."""
    errs = _gaussian_errors((16, 32, 64, 128), order=order, corrector=corrector)
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(abs(s - slope) < 0.3 for s in slopes), (errs, slopes)


def test_unipc3_is_at_least_third_order_and_beats_unipc2():
    e3 = _gaussian_errors((32, 128), order=3)
    e2 = _gaussian_errors((32, 128), order=2)
    assert math.log2(e3[0] / e3[1]) / 2 > 2.7, e3
    assert e3[0] < e2[0] and e3[1] < e2[1] < 1e-4, (e2, e3)


def test_unipc2_is_more_accurate_than_dpmpp_2m_at_equal_calls():
    """On the Gaussian's closed-form map once both converge (n >= 20; below, at log-SNR steps h ~ 1,
    DPM-Solver++(2M)'s error changes sign and is smaller, e.g. 0.024 vs 0.067 at n = 10) and, on every
    tested budget, on the mixture's exact ODE map (Dormand-Prince, 1e-8) through to clean data."""
    sde = VPSDE(LinearVPSchedule())
    g = GaussianMixture.gaussian(torch.tensor([0.7]), torch.tensor([[0.09]]))
    x_T = torch.linspace(-3, 3, 61, dtype=F64)[:, None]
    exact = gaussian_pf_map(sde, x_T, 0.7, 0.3, sde.t_min)
    for n in (20, 40, 80):
        ours = (sample_unipc(g.denoiser, sde, x_T, steps=n, grid="logsnr", denoise_final=False) - exact).abs().max()
        dpm = (sample_dpmpp_2m(g.denoiser, sde, x_T, steps=n, grid="logsnr", denoise_final=False) - exact).abs().max()
        assert ours < dpm, (n, ours, dpm)
    mix = default_mixture(2)
    x_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact, _ = sample_rk45(mix.denoiser, sde, x_T, rtol=1e-8, atol=1e-8)
    rms = lambda x: (x - exact).pow(2).sum(1).mean().sqrt().item()  # noqa: E731
    for n in (10, 20):
        for grid in ("logsnr", "logsnr_trailing"):
            ours, dpm = rms(sample_unipc(mix.denoiser, sde, x_T, steps=n, grid=grid)), rms(
                sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=n, grid=grid))
            assert ours < 0.8 * dpm, (n, grid, ours, dpm)


def test_unip2_with_bh2_and_no_corrector_is_dpmpp_2m():
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    x_T = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for grid in ("logsnr", "time_trailing"):
        ours = sample_unipc(mix.denoiser, sde, x_T, steps=7, order=2, coefficients="bh2", corrector=False, grid=grid)
        assert torch.allclose(ours, sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=7, grid=grid), atol=1e-12)


# -- the oracle mixture's exact target ----------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2])
def test_unipc_lands_on_the_mixture_at_ten_calls(d):
    mix, sde = default_mixture(d), vp_from_schedule(make_schedule("linear", 1000))
    n = 2000
    floor = max(sw2_exact(mix.sample(n, torch.Generator().manual_seed(s)), mix) for s in range(3))
    x_T = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    few = sw2_exact(sample_unipc(mix.denoiser, sde, x_T, steps=5), mix)
    ten = sw2_exact(sample_unipc(mix.denoiser, sde, x_T, steps=10), mix)
    ten3 = sw2_exact(sample_unipc(mix.denoiser, sde, x_T, steps=10, order=3), mix)
    assert ten < few and max(ten, ten3) < floor + 0.05, (d, few, ten, ten3, floor)


def test_sample_i_depends_only_on_x_T_i():
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    full = sample_unipc(mix.denoiser, sde, x_T, steps=6, order=3)
    assert torch.allclose(full[3:5], sample_unipc(mix.denoiser, sde, x_T[3:5], steps=6, order=3), atol=1e-12)


def test_matches_diffusers_unipc_on_its_grid():
    """diffusers' UniPCMultistepScheduler (bh2, order 2 and 3) on the same T = 1000 table, exact model
    and x_T: its integer timesteps sit within 0.001 of our ``time_trailing`` grid, so the two land within
    a small fraction of their (equal) distance to the exact map."""
    diffusers = pytest.importorskip("diffusers")
    T = 1000
    mix, sch = default_mixture(2), make_schedule("linear", T)
    sde = vp_from_schedule(sch)
    x_T = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact, _ = sample_rk45(mix.denoiser, sde, x_T, rtol=1e-7, atol=1e-7)
    rms = lambda a, b: (a - b).pow(2).sum(1).mean().sqrt().item()  # noqa: E731
    for order in (2, 3):
        sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                                  beta_schedule="linear", solver_order=order, solver_type="bh2")
        sched.set_timesteps(10)
        x = x_T.clone()
        for k in sched.timesteps:
            x = sched.step(mix.denoiser(x, sch.logsnr[int(k) + 1]).eps, k, x).prev_sample
        ours = sample_unipc(mix.denoiser, sde, x_T, steps=10, order=order, coefficients="bh2", grid="time_trailing")
        assert rms(ours, x) < 0.01 * rms(ours, exact) and rms(ours, exact) > 0.05, (order, rms(ours, x))


def test_bad_arguments_raise():
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    x = torch.zeros(3, 2, dtype=F64)
    for kw, match in (({"order": 0}, "order"), ({"order": 4}, "order"), ({"coefficients": "bh3"}, "coefficients"),
                      ({"grid": "trailing"}, "grid"), ({"steps": 0}, "steps")):
        with pytest.raises(ValueError, match=match):
            sample_unipc(mix.denoiser, sde, x, **{"steps": 4, **kw})
    with pytest.raises(ValueError, match="phi"):
        phi(0, 1.0)


# -- settings, generate, CLI ------------------------------------------------------------------------
def test_generate_runs_unipc_with_its_order_and_a_trailing_grid():
    from diffusekit.sampling.generate import generate
    from diffusekit.sampling.settings import SampleSettings

    mix, sched = default_mixture(2), make_schedule("linear", 100)
    outs = {}
    for order in (1, 2, 3):
        settings = SampleSettings(sampler="unipc", steps=6, order=order, grid="logsnr_trailing", seeds=[0, 1, 2],
                                  batch_size=2)
        stats = {}
        outs[order] = generate(mix.denoiser, sched, (2,), settings, progress=False, dtype=F64, stats=stats)
        assert stats["nfe"] == 2 * 6 and torch.isfinite(outs[order]).all()  # two batches of 6 calls
    assert not torch.allclose(outs[2], outs[3])
    stats = {}
    generate(mix.denoiser, sched, (2,), SampleSettings(sampler="dpmpp_2m", steps=5, grid="time_trailing", seeds=[0]),
             progress=False, dtype=F64, stats=stats)
    assert stats["nfe"] == 5
    for bad in ({"order": 4}, {"order": 0}, {"grid": "trailing"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SampleSettings(sampler="unipc", **bad)
    s = SampleSettings(sampler="unipc", order=3, grid="karras_trailing")
    assert SampleSettings.from_json(s.to_json()) == s


def test_cli_and_config_reject_bad_unipc_settings_in_one_line(capsys, tmp_path):
    from test_bad_input import assert_one_line, run_cli

    from diffusekit.config import load_config
    from diffusekit.errors import ConfigError

    for argv, flag in ((["--sampler", "unipc", "--order", "4"], "--order"), (["--grid", "trailing"], "--grid")):
        code, _, err, seconds = run_cli(capsys, "sample", "--run", tmp_path / "none", *argv, "--no-progress")
        assert_one_line(code, err, seconds, flag)
    cfg = load_config(None, ["sample.sampler=unipc", "sample.order=3", "sample.grid=time_trailing"])
    assert (cfg.sample.sampler, cfg.sample.order, cfg.sample.grid) == ("unipc", 3, "time_trailing")
    for bad, key in (("sample.order=0", "sample.order"), ("sample.grid=trailing", "sample.grid")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])
