"""Forward SDEs and the score-based samplers, against exact answers: simulated marginals vs closed
forms, the oracle's exact score, the closed-form probability-flow map of a Gaussian (convergence
orders), an independent ODE solver (scipy), and the exact target distribution of the mixture."""

import math

import numpy as np
import pytest
import torch

from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.sampling.dpm_solver import sample_dpmpp_2m
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.ode import dopri5, inverse_logsnr, sample_euler, sample_heun, sample_rk45, time_grid
from diffusekit.sampling.stochastic import sample_annealed_langevin, sample_euler_maruyama, sample_pc
from diffusekit.schedules import CosineSchedule, LinearVPSchedule, make_schedule
from diffusekit.sde import VESDE, VPSDE, SubVPSDE, predict, vp_from_schedule

F64 = torch.float64
SDES = {"vp": lambda: VPSDE(LinearVPSchedule()), "subvp": lambda: SubVPSDE(LinearVPSchedule()),
        "ve": lambda: VESDE(0.01, 50.0)}


def _exact_quantiles(mix, n, th, grid=4001):
    """Quantiles (i + 1/2) / n of the projections th^T x of the mixture: CDF on a fine grid, inverted
    by linear interpolation (each projection is a 1-D Gaussian mixture)."""
    m = th @ mix.means.T  # (P, K)
    s = torch.einsum("pi,kij,pj->pk", th, mix.covs, th).sqrt()
    lo, hi = (m - 8 * s).min(1).values, (m + 8 * s).max(1).values
    xs = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, grid, dtype=F64)
    cdf = (mix.weights * torch.special.ndtr((xs[..., None] - m[:, None]) / s[:, None])).sum(-1)
    q = ((torch.arange(n, dtype=F64) + 0.5) / n).expand(th.shape[0], n).contiguous()
    j = torch.searchsorted(cdf, q).clamp(1, grid - 1)
    c0, c1 = cdf.gather(1, j - 1), cdf.gather(1, j)
    x0, x1 = xs.gather(1, j - 1), xs.gather(1, j)
    return x0 + (x1 - x0) * (q - c0) / (c1 - c0).clamp_min(1e-300)


def sw2_exact(x, mix, n_proj=32, seed=0):
    """Sliced W2 between a sample and the exact mixture: per direction, the sorted projections
    against the exact quantiles (i + 1/2) / n of the projected 1-D mixture (no reference sample)."""
    x = x.to(F64).reshape(x.shape[0], -1)
    th = torch.randn(n_proj, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=F64)
    th = th / th.norm(dim=1, keepdim=True)
    return ((x @ th.T).T.sort(1).values - _exact_quantiles(mix, x.shape[0], th)).pow(2).mean().sqrt().item()


# -- forward SDEs -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SDES))
def test_simulated_forward_sde_matches_closed_form_marginals(name):
    sde = SDES[name]()
    n, steps = 20_000, 1000
    g = torch.Generator().manual_seed(0)
    x0 = 1.5
    x = torch.full((n,), x0, dtype=F64)
    dt = 1.0 / steps
    checks = {}
    for k in range(steps):
        t = k * dt
        x = x + sde.drift(x, t) * dt + float(sde.diffusion(t)) * math.sqrt(dt) * torch.randn(n, generator=g, dtype=F64)
        if k + 1 in (300, 1000):
            checks[(k + 1) * dt] = x.clone()
    for t, xt in checks.items():
        a, s = float(sde.mean_coef(t)), float(sde.std(t))
        se = s / math.sqrt(n)
        assert abs(xt.mean().item() - a * x0) < 5 * se + 2e-3 * abs(a * x0), (t, xt.mean().item(), a * x0)
        assert xt.std().item() == pytest.approx(s, rel=0.02), (t, xt.std().item(), s)


def test_vp_of_a_discrete_schedule_matches_the_table_at_grid_points():
    sched = make_schedule("linear", 50)
    sde = vp_from_schedule(sched)
    t = torch.arange(1, 51, dtype=F64) / 50
    assert sde.t_min == pytest.approx(1 / 50)
    assert torch.allclose(sde.mean_coef(t), sched.alpha[1:], rtol=1e-12, atol=0)
    assert torch.allclose(sde.std(t), sched.sigma[1:], rtol=1e-12, atol=0)
    assert torch.allclose(sde.logsnr(t), sched.logsnr[1:], rtol=1e-12, atol=1e-12)
    # beta(t) is piecewise constant: T (-log(1 - beta_k)) on ((k-1)/T, k/T)
    mid = (torch.arange(50, dtype=F64) + 0.5) / 50
    assert torch.allclose(sde.beta(mid), -50 * torch.log1p(-sched.betas[1:]), rtol=1e-10)


def test_beta_of_continuous_schedules_is_the_derivative():
    lin = VPSDE(LinearVPSchedule(0.1, 20.0))
    t = torch.linspace(0, 1, 11, dtype=F64)
    assert torch.allclose(lin.beta(t), 0.1 + t * 19.9, rtol=1e-12)
    cos = VPSDE(CosineSchedule())
    h = 1e-6
    tt = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    numeric = -(CosineSchedule().log_alpha_bar(tt + h) - CosineSchedule().log_alpha_bar(tt - h)) / (2 * h)
    assert torch.allclose(cos.beta(tt), numeric, rtol=1e-6)


def test_variance_is_the_integral_of_the_transported_diffusion():
    """s(t)^2 = int_0^t (a(t)/a(u))^2 g(u)^2 du for every SDE (numeric quadrature)."""
    from scipy.integrate import quad

    for name, make in SDES.items():
        sde = make()
        t = 0.6
        a_t = float(sde.mean_coef(t))
        val, _ = quad(lambda u: (a_t / float(sde.mean_coef(u))) ** 2 * float(sde.diffusion_sq(torch.tensor(u, dtype=F64))),
                      0, t, epsabs=1e-12, epsrel=1e-10)
        assert val == pytest.approx(float(sde.std(t)) ** 2, rel=1e-6), name
    assert float(SubVPSDE(LinearVPSchedule()).std(0.3)) < float(VPSDE(LinearVPSchedule()).std(0.3))


@pytest.mark.parametrize("name", list(SDES))
def test_predict_gives_the_exact_score_of_each_sde(name):
    """The VP oracle queried through ``predict`` returns grad log q_t of this SDE's own marginal."""
    sde, mix = SDES[name](), default_mixture(2)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    for t in (0.05, 0.5):
        x_t = x * float(sde.std(t))
        pred = predict(mix.denoiser, sde, x_t, t)
        exact = mix.score(x_t, float(sde.mean_coef(t)), float(sde.std(t)))
        assert torch.allclose(pred.score, exact, rtol=1e-8, atol=1e-10)
        assert torch.allclose(pred.x0, mix.x0_mean(x_t, float(sde.mean_coef(t)), float(sde.std(t))), atol=1e-10)


def test_grids_are_explicit_and_monotone():
    sde = VPSDE(LinearVPSchedule())
    for grid in ("time", "logsnr", "karras"):
        t = time_grid(sde, 7, grid)
        assert t[0] == 1.0 and t[-1] == sde.t_min and torch.all(torch.diff(t) < 0)
    lam = sde.logsnr(time_grid(sde, 9, "logsnr"))
    assert torch.allclose(torch.diff(lam), torch.full((8,), (lam[-1] - lam[0]).item() / 8, dtype=F64), rtol=1e-9)
    lam0 = torch.tensor([-5.0, 0.0, 6.0], dtype=F64)
    assert torch.allclose(sde.logsnr(inverse_logsnr(sde, lam0)), lam0, atol=1e-9)
    with pytest.raises(ValueError, match="grid"):
        time_grid(sde, 5, "cosine")
    with pytest.raises(ValueError, match="steps"):
        time_grid(sde, 0)


# -- ODE solvers: exact map of a Gaussian, convergence orders --------------------------------------
def gaussian_pf_map(sde, x_T, mu, s0, t_end):
    """The PF-ODE map of N(mu, s0^2) data in closed form: with y = x / a and sigma = s / a,
    dy/dsigma = sigma (y - mu) / (s0^2 + sigma^2), so y - mu scales as sqrt(s0^2 + sigma^2)."""
    sig = lambda t: math.exp(-0.5 * float(sde.logsnr(t)))  # noqa: E731
    y_T = x_T / float(sde.mean_coef(sde.t_max))
    y = mu + (y_T - mu) * math.sqrt((s0**2 + sig(t_end) ** 2) / (s0**2 + sig(sde.t_max) ** 2))
    return y * float(sde.mean_coef(t_end))


@pytest.mark.parametrize("solver,order", [(sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2)])
def test_ode_solvers_converge_to_the_exact_gaussian_map_with_their_order(solver, order):
    sde = VPSDE(LinearVPSchedule())
    mu, s0 = 0.7, 0.3
    g = GaussianMixture.gaussian(torch.tensor([mu]), torch.tensor([[s0**2]]))
    x_T = torch.linspace(-3, 3, 61, dtype=F64)[:, None]
    exact = gaussian_pf_map(sde, x_T, mu, s0, sde.t_min)
    errs = [(solver(g.denoiser, sde, x_T, steps=n, grid="logsnr", denoise_final=False) - exact).abs().max().item()
            for n in (16, 32, 64, 128)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(abs(s - order) < 0.3 for s in slopes[1:]), (errs, slopes)
    assert errs[-1] < (0.05 if order == 1 else 2e-3)


def test_rk45_reaches_the_exact_gaussian_map_within_tolerance_and_counts_calls():
    sde = VPSDE(LinearVPSchedule())
    g = GaussianMixture.gaussian(torch.tensor([0.7]), torch.tensor([[0.09]]))
    x_T = torch.linspace(-3, 3, 31, dtype=F64)[:, None]
    exact = gaussian_pf_map(sde, x_T, 0.7, 0.3, sde.t_min)
    errs, nfes = [], []
    for tol in (1e-3, 1e-6):
        out, stats = sample_rk45(g.denoiser, sde, x_T, rtol=tol, atol=tol, denoise_final=False)
        errs.append((out - exact).abs().max().item())
        nfes.append(stats.nfe)
        assert stats.nfe >= int(stats.nfe_per_sample.max()) and stats.rejected.sum() >= 0
    assert errs[1] < 1e-5 and errs[1] < errs[0] and nfes[1] > nfes[0]


def test_dopri5_matches_closed_form_and_each_row_is_independent():
    lam = torch.tensor([0.5, 1.0, 3.0, -1.0], dtype=F64)
    y0 = torch.tensor([[1.0, -2.0]] * 4, dtype=F64)
    f = lambda y, u, rows: -lam[rows, None] * y * torch.cos(u)[:, None]  # noqa: E731
    y, stats = dopri5(f, y0, 0.0, 2.0, rtol=1e-9, atol=1e-12)
    exact = y0 * torch.exp(-lam * math.sin(2.0))[:, None]
    assert torch.allclose(y, exact, rtol=1e-7)
    # row 2 alone takes the same steps and lands on the same value
    y2, st2 = dopri5(lambda yy, u, rows: f(yy, u, rows + 2), y0[2:3], 0.0, 2.0, rtol=1e-9, atol=1e-12)
    assert torch.equal(y2[0], y[2]) and st2.accepted[0] == stats.accepted[2]


def test_rk45_on_the_mixture_agrees_with_scipy():
    """Our per-sample Dormand-Prince against scipy's solve_ivp (DOP853) on the same ODE."""
    from scipy.integrate import solve_ivp

    sde, mix = VPSDE(LinearVPSchedule()), default_mixture(2)
    x_T = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours, _ = sample_rk45(mix.denoiser, sde, x_T, rtol=1e-8, atol=1e-8, denoise_final=False)
    from diffusekit.sampling.ode import ve_denoise

    def rhs(u, yflat):
        y = torch.from_numpy(yflat).reshape(20, 2)
        return (y - ve_denoise(mix.denoiser, y, math.exp(u))).reshape(-1).numpy()

    u0, u1 = -0.5 * float(sde.logsnr(1.0)), -0.5 * float(sde.logsnr(sde.t_min))
    sol = solve_ivp(rhs, (u0, u1), (x_T / float(sde.mean_coef(1.0))).reshape(-1).numpy(), method="DOP853",
                    rtol=1e-10, atol=1e-10)
    theirs = torch.from_numpy(sol.y[:, -1]).reshape(20, 2) * float(sde.mean_coef(sde.t_min))
    assert torch.allclose(ours, theirs, atol=1e-6)


# -- every sampler against the exact target -------------------------------------------------------
N_SAMPLES = 2000


def _noise(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(n, d, generator=g, dtype=F64)


def _samplers(mix, sde, d):
    def stochastic(fn, **kw):
        def run(steps):
            nz = _noise(N_SAMPLES, d, seed=1)
            return fn(mix.denoiser, sde, sde.prior_sample(nz()), nz, **kw, **({"levels": steps} if fn is
                      sample_annealed_langevin else {"steps": steps}))
        return run

    def deterministic(fn, **kw):
        x_T = sde.prior_sample(_noise(N_SAMPLES, d, seed=1)())
        return lambda steps: fn(mix.denoiser, sde, x_T, steps=steps, **kw)

    return {"euler": (deterministic(sample_euler), 3, 40), "heun": (deterministic(sample_heun), 2, 20),
            "dpmpp_2m": (deterministic(sample_dpmpp_2m), 3, 20),
            "sde": (stochastic(sample_euler_maruyama), 5, 100), "pc": (stochastic(sample_pc), 5, 100),
            "langevin": (stochastic(sample_annealed_langevin, steps_each=3, step_size=1.0), 3, 60)}


@pytest.mark.parametrize("d", [1, 2])
def test_every_sampler_lands_on_the_target_and_improves_with_steps(d):
    mix = default_mixture(d)
    sde = VPSDE(LinearVPSchedule())
    floor = max(sw2_exact(mix.sample(N_SAMPLES, torch.Generator().manual_seed(s)), mix) for s in range(3))
    for name, (run, few, many) in _samplers(mix, sde, d).items():
        coarse, fine = sw2_exact(run(few), mix), sw2_exact(run(many), mix)
        assert fine < floor + 0.05, (name, d, fine, floor)
        assert fine < coarse, (name, d, coarse, fine)
    out, stats = sample_rk45(mix.denoiser, sde, sde.prior_sample(_noise(N_SAMPLES, d, 1)()), rtol=1e-4, atol=1e-4)
    assert sw2_exact(out, mix) < floor + 0.05 and stats.nfe < 400


def test_samplers_work_on_ve_and_subvp_views():
    mix = default_mixture(2)
    floor = max(sw2_exact(mix.sample(N_SAMPLES, torch.Generator().manual_seed(s)), mix) for s in range(3))
    for sde in (VESDE(0.01, 50.0), SubVPSDE(LinearVPSchedule())):
        x_T = sde.prior_sample(_noise(N_SAMPLES, 2, 1)())
        assert sw2_exact(sample_dpmpp_2m(mix.denoiser, sde, x_T, steps=20), mix) < floor + 0.05
        nz = _noise(N_SAMPLES, 2, 2)
        assert sw2_exact(sample_euler_maruyama(mix.denoiser, sde, x_T, nz, steps=300), mix) < floor + 0.05


def test_pc_norm_rule_is_biased_in_low_dimension_fixed_rule_is_not():
    """Song et al.'s step from norm ratios depends on z and ||score(x)||: fine in high D, biased in 2-D."""
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    nz = _noise(N_SAMPLES, 2, 3)
    x_T = nz()
    fixed = sw2_exact(sample_pc(mix.denoiser, sde, x_T, nz, steps=100, step_rule="fixed"), mix)
    norm = sw2_exact(sample_pc(mix.denoiser, sde, x_T, nz, steps=100, step_rule="norm"), mix)
    assert fixed < 0.1 < norm


def test_sample_depends_only_on_its_seed():
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    seeds = [3, 11, 5, 8]

    def run(fn, ss, **kw):
        noise = PerSampleNoise(ss, (2,), dtype=F64)
        return fn(mix.denoiser, sde, noise(), noise, steps=12, **kw)

    for fn in (sample_euler_maruyama, sample_pc):
        full = run(fn, seeds)
        alone = run(fn, seeds[2:3])
        assert torch.allclose(full[2], alone[0], atol=1e-12)
    x_T = PerSampleNoise(seeds, (2,), dtype=F64)()
    full, _ = sample_rk45(mix.denoiser, sde, x_T, rtol=1e-5, atol=1e-5)
    alone, _ = sample_rk45(mix.denoiser, sde, x_T[1:2], rtol=1e-5, atol=1e-5)
    assert torch.allclose(full[1], alone[0], atol=1e-10)


def test_bad_arguments_raise():
    mix, sde = default_mixture(2), VPSDE(LinearVPSchedule())
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="snr"):
        sample_pc(mix.denoiser, sde, x, _noise(3, 2), steps=3, snr=0.0)
    with pytest.raises(ValueError, match="step_rule"):
        sample_pc(mix.denoiser, sde, x, _noise(3, 2), steps=3, step_rule="mean")
    with pytest.raises(ValueError, match="step_size"):
        sample_annealed_langevin(mix.denoiser, sde, x, _noise(3, 2), levels=3, step_size=-1.0)
    with pytest.raises(TypeError):
        sample_euler(mix.denoiser, sde, torch.zeros(3, 2, dtype=torch.long), steps=3)
    with pytest.raises(ValueError, match="t_min"):
        VPSDE(LinearVPSchedule(), t_min=0.0)
    with pytest.raises(ValueError, match="rtol"):
        sample_rk45(mix.denoiser, sde, x, rtol=0.0)


# -- integration: settings, generate, CLI ------------------------------------------------------------
def test_generate_dispatches_the_continuous_samplers_and_counts_calls():
    from diffusekit.sampling.generate import generate
    from diffusekit.sampling.settings import SampleSettings

    mix, sched = default_mixture(2), make_schedule("linear", 100)
    expected_nfe = {"euler": 6, "heun": 11, "dpmpp_2m": 6, "sde": 6, "pc": 12, "langevin": 6 * 2 + 1}
    for name, nfe in expected_nfe.items():
        settings = SampleSettings(sampler=name, steps=6, seeds=[0, 1, 2], batch_size=3, langevin_steps=2)
        stats = {}
        x = generate(mix.denoiser, sched, (2,), settings, progress=False, dtype=F64, stats=stats)
        assert x.shape == (3, 2) and torch.isfinite(x).all() and stats["nfe"] == nfe, (name, stats)
        one = generate(mix.denoiser, sched, (2,), SampleSettings(sampler=name, steps=6, seeds=[1], batch_size=1,
                                                                 langevin_steps=2), progress=False, dtype=F64)
        assert torch.allclose(one[0], x[1], atol=1e-10), name
    stats = {}
    generate(mix.denoiser, sched, (2,), SampleSettings(sampler="rk45", seeds=[0, 1]), progress=False, dtype=F64,
             stats=stats)
    assert stats["nfe"] > 10
    for bad in ({"sampler": "heun", "clip_x0": 1.0}, {"snr": 0.0}, {"grid": "cosine"}, {"rtol": -1.0},
                {"sampler": "dpm"}):
        with pytest.raises(ValueError):
            SampleSettings(**bad)


@pytest.mark.slow
def test_cli_samples_with_new_samplers_and_evaluates_nll_ode(capsys, tmp_path):
    import json

    from test_cli import TINY, assert_one_line_error, run_cli

    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--out", run, "--no-progress")[0] == 0
    for sampler in ("dpmpp_2m", "pc", "rk45"):
        code, _, err = run_cli(capsys, "sample", "--run", run, "--seeds", "0-2", "--sampler", sampler, "--steps", "4",
                               "--rtol", "1e-3", "--atol", "1e-3", "--out", tmp_path / sampler, "--no-progress")
        assert code == 0, err
        data = np.load(tmp_path / sampler / "samples.npz")
        assert data["x"].shape == (3, 1, 8, 8) and np.isfinite(data["x"]).all()
        settings = json.loads((tmp_path / sampler / "settings.json").read_text())
        assert settings["sampler"] == sampler and settings["rtol"] == 1e-3
    code, _, err = run_cli(capsys, "sample", "--run", run, "--settings", tmp_path / "pc" / "settings.json",
                           "--out", tmp_path / "pc2", "--no-progress")
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "pc2" / "samples.npz")["x"], np.load(tmp_path / "pc" / "samples.npz")["x"])
    for argv, flag in ((["--sampler", "pc", "--snr", "-1"], "--snr"), (["--sampler", "heun", "--clip-x0", "1"],
                       "--clip-x0"), (["--sampler", "rk45", "--rtol", "nan"], "--rtol")):
        code, _, err = run_cli(capsys, "sample", "--run", run, *argv, "--no-progress")
        assert_one_line_error(code, err, flag)
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "bpd,nll_ode", "--strata", "2",
                             "--ode-examples", "3", "--ode-rtol", "1e-3", "--ode-atol", "1e-3", "--json",
                             "--no-progress")
    assert code == 0, err
    o = json.loads(out)["nll_ode"]
    assert o["n_examples"] == 3 and o["levels"] == 17 and o["nfe"] > 0 and math.isfinite(o["bits_per_dim"])
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "nll_ode", "--ode-examples", "0",
                           "--no-progress")
    assert_one_line_error(code, err, "--ode-examples")


def test_samplers_take_the_grid_as_an_argument():
    """Every grid-walking sampler gives the same samples for ``times = time_grid(...)`` as for the named
    grid, and refuses a grid that is not strictly decreasing inside (0, t_max]."""
    from diffusekit.sampling.unipc import sample_unipc

    mix, sde = default_mixture(2), vp_from_schedule(make_schedule("cosine", 100))
    for fn, grid in ((sample_euler, "karras"), (sample_heun, "logsnr"), (sample_dpmpp_2m, "time"),
                     (sample_unipc, "logsnr_trailing")):
        x_T = PerSampleNoise(range(8), (2,), dtype=torch.float64)()
        named = fn(mix.denoiser, sde, x_T, steps=6, grid=grid)
        given = fn(mix.denoiser, sde, x_T, time_grid(sde, 6, grid))
        assert torch.equal(named, given), fn.__name__
        with pytest.raises(ValueError, match="strictly decreasing"):
            fn(mix.denoiser, sde, x_T, torch.tensor([0.5, 0.7]))
        with pytest.raises(ValueError, match="either times or steps"):
            fn(mix.denoiser, sde, x_T)
    for fn in (sample_euler_maruyama, sample_pc):
        noise = PerSampleNoise(range(8), (2,), dtype=torch.float64)
        a = fn(mix.denoiser, sde, noise(), noise, steps=5, grid="time")
        noise = PerSampleNoise(range(8), (2,), dtype=torch.float64)
        b = fn(mix.denoiser, sde, noise(), noise, time_grid(sde, 5, "time"))
        assert torch.equal(a, b), fn.__name__
