"""Samplers against exact answers: the Gaussian oracle, exact chain moments, diffusers step by step."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusekit.oracle import GaussianMixture, default_mixture
from diffusekit.parameterization import Denoiser, Prediction
from diffusekit.runs.sample import write_samples
from diffusekit.sampling.ddim import ddim_invert, sample_ddim
from diffusekit.sampling.ddpm import sample_ddpm
from diffusekit.sampling.generate import TrajectoryRecorder, generate
from diffusekit.sampling.grids import timestep_grid
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.settings import SampleSettings, parse_seeds
from diffusekit.schedules import DiscreteSchedule, alpha_sigma_from_logsnr, make_schedule, respace

F64 = torch.float64
SPACINGS = ["leading", "linspace", "trailing"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of tiny ops; on a busy 2-core machine OpenMP's spin-waiting makes a
    second thread 30x slower instead of faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers --------------------------------------------------------------------------------------
def gaussian_denoiser(m: float, s: float):
    """The exact eps/x0 model of N(m, s^2) data in closed form (elementwise, so it is fast)."""

    def den(x, logsnr, cond=None):
        a, sg = alpha_sigma_from_logsnr(torch.as_tensor(logsnr, dtype=F64))
        C = a * a * s * s + sg * sg
        r = x - a * m
        return Prediction(eps=sg * r / C, x0=m + a * s * s * r / C, raw=r, kind="eps")

    return den


def exact_chain_moments(abar: list[float], m: float, s: float, kind: str) -> tuple[float, float]:
    """Mean and variance of the discrete sampler's output for N(m, s^2) data, started at N(0, 1).

    With the exact model every step is affine in x_t plus Gaussian noise, so the moments propagate
    exactly; ``abar`` lists alpha_bar at the grid (abar[0] = 1). kind: ddpm-beta, ddpm-beta_tilde,
    ddim (eta = 0). Written from alpha_bar alone, independently of the sampler's tables."""
    mu, V = 0.0, 1.0
    for i in range(len(abar) - 1, 0, -1):
        a, prev = math.sqrt(abar[i]), abar[i - 1]
        k = a * s * s / (a * a * s * s + 1 - abar[i])  # x0_hat = m + k (x - a m)
        beta = 1 - abar[i] / prev
        if kind == "ddim":  # x' = sqrt(prev) x0 + sqrt(1 - prev) (x - a x0) / sigma
            c0 = math.sqrt(prev) - math.sqrt(1 - prev) * a / math.sqrt(1 - abar[i])
            c1, var = math.sqrt(1 - prev) / math.sqrt(1 - abar[i]), 0.0
        else:
            c0 = math.sqrt(prev) * beta / (1 - abar[i])
            c1 = math.sqrt(1 - beta) * (1 - prev) / (1 - abar[i])
            var = 0.0 if i == 1 else (beta if kind == "ddpm-beta" else beta * (1 - prev) / (1 - abar[i]))
        A = c0 * k + c1
        mu, V = A * mu + c0 * (m - k * a * m), A * A * V + var
    return mu, V


def seeded_normal(seed: int, shape, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=gen, dtype=dtype)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 64) -> float:
    """Sliced 2-Wasserstein distance with fixed random projections (equal sample sizes)."""
    dirs = torch.randn(x.shape[1], n_proj, generator=torch.Generator().manual_seed(7), dtype=F64)
    dirs /= dirs.norm(dim=0)
    px, py = (x.to(F64) @ dirs).sort(0).values, (y.to(F64) @ dirs).sort(0).values
    return ((px - py) ** 2).mean().sqrt().item()


class RowwiseMLP(nn.Module):
    """A small real network whose matmuls are broadcast-and-sum, so every row is computed the same
    way whatever the batch (BLAS picks different kernels for batch 1 and batch 8)."""

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(dim + 1, hidden, generator=g) / math.sqrt(dim + 1))
        self.w2 = nn.Parameter(torch.randn(hidden, dim, generator=g) / math.sqrt(hidden))

    def forward(self, x, c_noise):
        flat = x.reshape(x.shape[0], -1)
        h = torch.cat([flat, 0.1 * c_noise[:, None]], dim=1)
        h = torch.tanh((h[:, :, None] * self.w1).sum(1))
        return (h[:, :, None] * self.w2).sum(1).reshape(x.shape)


# -- grids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS)
def test_grid_full_chain_and_odd_steps(spacing):
    T = 1000
    assert torch.equal(timestep_grid(T, T, spacing), torch.arange(T, 0, -1))
    for S in (1, 7, 21, 999):
        g = timestep_grid(T, S, spacing)
        assert g.dtype == torch.int64 and g.numel() == S and len(set(g.tolist())) == S
        assert (g[:-1] > g[1:]).all() and g[-1] >= 1 and g[0] <= T
        if S > 1:
            assert g[0] > T - 2 * T / S  # starts near the noisiest point
    assert timestep_grid(T, 7, "trailing")[0] == T and timestep_grid(T, 7, "leading")[-1] == 1


@pytest.mark.parametrize("spacing", SPACINGS)
def test_grid_equals_diffusers_plus_one(spacing):
    diffusers = pytest.importorskip("diffusers")
    for T in (50, 1000):
        ddpm = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ddim = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        for S in (1, 7, 10, 21, 29, T):
            ddpm.set_timesteps(S)
            ddim.set_timesteps(S)
            ours = timestep_grid(T, S, spacing)
            # diffusers' float arange can add an S+1-th step k = -1 (e.g. T=50, S=29, trailing): ignore it
            assert torch.equal(ours, ddpm.timesteps[:S] + 1), (T, S)
            assert torch.equal(ours, ddim.timesteps[:S] + 1), (T, S)


def test_grid_rejects_bad_steps():
    for bad in (0, -3, 1001, 2.5):
        with pytest.raises(ValueError, match="steps"):
            timestep_grid(1000, bad, "trailing")
    with pytest.raises(ValueError, match="spacing"):
        timestep_grid(1000, 10, "uniform")


# -- seeds and noise ------------------------------------------------------------------------------
def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,9-12") == [1, 5, 9, 10, 11, 12]
    for bad in ("", "a", "3-1", "1,,2", "1,1", "-2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_per_sample_noise_rows_depend_only_on_their_seed():
    a, b = PerSampleNoise([3, 5, 9], (2, 4)), PerSampleNoise([5], (2, 4))
    draws = [a() for _ in range(2 * a.chunk + 3)]  # across refills of the per-generator blocks
    for d in draws:
        assert d.shape == (3, 2, 4) and torch.equal(d[1:2], b())
    assert not torch.equal(draws[0], draws[1])
    big = PerSampleNoise([7], (3, 256, 256))  # large examples: one draw per call, the plain stream
    assert big.chunk == 1 and torch.equal(big(), torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(7)))


# -- 1-D Gaussian data with the exact model -------------------------------------------------------
def test_gaussian_closed_form_equals_oracle():
    m, s = 0.5, 0.8
    oracle = GaussianMixture.gaussian(torch.tensor([m], dtype=F64), torch.tensor([[s * s]], dtype=F64))
    x = torch.linspace(-4, 4, 41, dtype=F64)[:, None]
    for lam in (-12.0, -2.0, 0.0, 3.0, 12.0):
        p, q = gaussian_denoiser(m, s)(x, torch.tensor(lam, dtype=F64)), oracle.denoiser(x, torch.tensor(lam))
        torch.testing.assert_close(p.eps, q.eps, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.x0, q.x0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["ddpm-beta", "ddpm-beta_tilde", "ddim", "ddim-eta1"])
@pytest.mark.parametrize("steps", [None, 13])
def test_sampler_matches_exact_chain_moments_with_oracle(kind, steps):
    """Monte Carlo moments (n = 20000, the oracle's denoiser) equal the exact moments of the same
    discrete chain within 4 standard errors; DDIM eta = 1 follows DDPM beta_tilde's chain."""
    m, s, n, T = 0.5, 0.8, 20000, 100
    oracle = GaussianMixture.gaussian(torch.tensor([m], dtype=F64), torch.tensor([[s * s]], dtype=F64))
    sch = make_schedule("linear", T)
    noise = seeded_normal(1, (n, 1))
    kw = dict(steps=steps, spacing="linspace")
    if kind.startswith("ddpm"):
        x = sample_ddpm(oracle.denoiser, sch, noise(), noise, variance=kind[5:], **kw)
    else:
        x = sample_ddim(oracle.denoiser, sch, noise(), noise, eta=1.0 if kind == "ddim-eta1" else 0.0, **kw)
    grid = range(1, T + 1) if steps is None else sorted(timestep_grid(T, steps, "linspace").tolist())
    abar = [1.0] + [sch.alpha_bar[t].item() for t in grid]
    mu, V = exact_chain_moments(abar, m, s, "ddpm-beta_tilde" if kind == "ddim-eta1" else kind)
    assert abs(x.mean().item() - mu) < 4 * math.sqrt(V / n)
    assert abs(x.var().item() - V) < 4 * V * math.sqrt(2 / n)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_recovers_gaussian_data_full_chain(variance):
    """T = 1000 linear, n = 20000: mean and variance of N(0.5, 0.8^2) within 4 standard errors
    (the beta_tilde chain's own bias is -1.05% of the variance, about 1 standard error)."""
    m, s, n = 0.5, 0.8, 20000
    noise = seeded_normal(2, (n, 1))
    x = sample_ddpm(gaussian_denoiser(m, s), make_schedule("linear", 1000), noise(), noise, variance=variance)
    assert abs(x.mean().item() - m) < 4 * s / math.sqrt(n)
    assert abs(x.var().item() - s * s) < 4 * s * s * math.sqrt(2 / n)


def test_ddim_eta0_maps_noise_to_gaussian_data():
    m, s, n = 0.5, 0.8, 20000
    noise = seeded_normal(3, (n, 1))
    x = sample_ddim(gaussian_denoiser(m, s), make_schedule("linear", 1000), noise())
    assert abs(x.mean().item() - m) < 4 * s / math.sqrt(n)
    assert abs(x.var().item() - s * s) < 4 * s * s * math.sqrt(2 / n)


# -- Gaussian mixture: error falls with the number of steps ---------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_mixture_error_falls_with_steps(sampler):
    mix, n = default_mixture(2), 4000
    ref = mix.sample(n, torch.Generator().manual_seed(11))
    sch = make_schedule("linear", 1000)
    errs = []
    for steps in (10, 50, 200):
        noise = seeded_normal(4, (n, 2))  # same x_T and noise for every step count
        fn = sample_ddpm if sampler == "ddpm" else sample_ddim
        errs.append(sliced_wasserstein(fn(mix.denoiser, sch, noise(), noise, steps=steps), ref))
    floor = sliced_wasserstein(mix.sample(n, torch.Generator().manual_seed(12)), ref)
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 2.5 * floor, (errs, floor)


# -- DDIM eta = 1 is DDPM with beta_tilde; eta = 0 inverts ----------------------------------------
def test_ddim_eta1_equals_ddpm_beta_tilde_step_for_step():
    mix, T = default_mixture(2), 60
    sch = make_schedule("cosine", T)
    trajs = []
    for fn, kw in ((sample_ddpm, dict(variance="beta_tilde")), (sample_ddim, dict(eta=1.0))):
        rec, noise = [], seeded_normal(5, (256, 2))
        out = fn(mix.denoiser, sch, noise(), noise, callback=lambda d: rec.append(d["x"]), **kw)
        trajs.append(torch.stack(rec + [out]))
    assert trajs[0].shape == (T + 1, 256, 2)
    torch.testing.assert_close(trajs[1], trajs[0], rtol=0, atol=1e-10)


def test_ddim_inversion_reconstructs_data():
    """Encode with ddim_invert and decode with sample_ddim (eta = 0, same grid, 200 steps). Mean
    absolute error < 1e-2 with the standard one-evaluation approximation (measured 6.3e-3; points
    between modes are the hardest), < 1e-6 with five fixed-point refinements per step (1.3e-8)."""
    mix, sch = default_mixture(2), make_schedule("linear", 1000)
    x0 = mix.sample(512, torch.Generator().manual_seed(6))
    errs = {}
    for iters in (0, 5):
        xT = ddim_invert(mix.denoiser, sch, x0, steps=200, fixed_point_iters=iters)
        back = sample_ddim(mix.denoiser, sch, xT, steps=200)
        errs[iters] = (back - x0).abs().mean().item()
    assert errs[0] < 1e-2 and errs[5] < 1e-6, errs
    assert abs(xT.std().item() - 1.0) < 0.1  # the code looks like standard normal noise


# -- agreement with diffusers, step by step -------------------------------------------------------
def _diffusers_setup(T=1000):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=T)  # linear 1e-4..0.02
    lab = torch.cat([torch.zeros(1, dtype=F64), ref.alphas_cumprod.double().log()])
    sch = DiscreteSchedule(lab, torch.arange(T + 1))  # the same float32 alpha_bar, in our tables
    mix = default_mixture(16)
    return diffusers, sch, mix


def step_seeded_normal(shape, base: int = 1000):
    """Noise whose j-th draw comes from its own generator (seed base + j), so a foreign sampler can be
    handed the same draw at step j through a generator."""
    count = iter(range(10**9))
    return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(base + next(count)))


@pytest.mark.parametrize("variance,steps,spacing", [
    ("fixed_small", None, "leading"), ("fixed_large", None, "leading"), ("fixed_small", 50, "leading"),
    ("fixed_large", 50, "leading"), ("fixed_small", 21, "trailing"), ("fixed_small", 21, "linspace")])
def test_ddpm_matches_diffusers_step_by_step(variance, steps, spacing):
    """Same model (the oracle, called at the logsnr of t = k + 1), same noise, float32 states: from
    each of our states x_t, DDPMScheduler.step gives our next state within 1e-5 at every step, and
    the two whole loops run side by side end within 1e-5 (measured: 2.4e-7 and 6e-7).

    diffusers' tables are upcast to float64 first, as ours are: with its float32 alphas_cumprod,
    beta_t = 1 - abar_t / abar_{t-1} cancels to ~1e-3 relative error near t = 0 and its steps there
    differ from the float64 ones by up to 1e-4 (diffusers builds its tables in float32). diffusers also adds sqrt(beta) z at a
    trailing grid's last step (k > 0); ours, like Algorithm 2, adds none, so fixed_large is
    compared on grids that end at k = 0."""
    diffusers, sch, mix = _diffusers_setup()
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=False,
                                  timestep_spacing=spacing)
    ref.set_timesteps(steps or 1000)
    ref.alphas_cumprod, ref.one = ref.alphas_cumprod.double(), torch.tensor(1.0, dtype=F64)
    shape = (8, 1, 4, 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = []
    out = sample_ddpm(mix.denoiser, sch, x, step_seeded_normal(shape), steps=steps, spacing=spacing,
                      variance="beta_tilde" if variance == "fixed_small" else "beta",
                      callback=lambda d: ours.append(d["x"]))
    ours.append(out)
    assert len(ours) == len(ref.timesteps) + 1 == (steps or 1000) + 1
    y = x.clone()
    for j, k in enumerate(ref.timesteps):
        gen = torch.Generator().manual_seed(1000 + j)
        step = ref.step(mix.denoiser(ours[j], sch.logsnr[int(k) + 1]).eps, k, ours[j], generator=gen)
        torch.testing.assert_close(step.prev_sample, ours[j + 1], rtol=0, atol=1e-5)
        y = ref.step(mix.denoiser(y, sch.logsnr[int(k) + 1]).eps, k, y,
                     generator=torch.Generator().manual_seed(1000 + j)).prev_sample
    torch.testing.assert_close(y, out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,steps", [("leading", 50), ("leading", 7), ("trailing", 50)])
def test_ddim_matches_diffusers_step_by_step(eta, spacing, steps):
    """DDIMScheduler(set_alpha_to_one=True) reads alpha_bar at k - T // S, which is the previous grid
    point for leading grids and for trailing grids when S divides T (otherwise it is not: the off-by-one of diffusers #2585, #10003)."""
    diffusers, sch, mix = _diffusers_setup()
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=True, clip_sample=False,
                                  timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ref.alphas_cumprod = ref.alphas_cumprod.double()  # float64 tables, as ours (see the DDPM test)
    shape = (8, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours, out = [], None
    out = sample_ddim(mix.denoiser, sch, x, seeded_normal(1, shape, torch.float32), steps=steps, spacing=spacing,
                      eta=eta, callback=lambda d: ours.append(d["x"]))
    draw, theirs, y = seeded_normal(1, shape, torch.float32), [], x.clone()
    for k in ref.timesteps:
        theirs.append(y)
        eps = mix.denoiser(y, sch.logsnr[int(k) + 1]).eps
        y = ref.step(eps, k, y, eta=eta, variance_noise=draw() if eta > 0 else None).prev_sample
    torch.testing.assert_close(torch.stack(ours + [out]), torch.stack(theirs + [y]), rtol=0, atol=1e-5)


# -- per-sample seeding with a real network -------------------------------------------------------
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_sample_depends_only_on_its_seed(sampler, eta):
    den = Denoiser(RowwiseMLP(64)).eval()
    sch = make_schedule("cosine", 40)
    kw = dict(sampler=sampler, eta=eta, steps=20)
    batch = generate(den, sch, (1, 8, 8), SampleSettings(seeds=list(range(8)), batch_size=8, **kw), progress=False)
    alone = generate(den, sch, (1, 8, 8), SampleSettings(seeds=[5], batch_size=1, **kw), progress=False)
    assert torch.equal(alone[0], batch[5])  # bitwise, CPU fp32
    split = generate(den, sch, (1, 8, 8), SampleSettings(seeds=[7, 2, 5], batch_size=2, **kw), progress=False)
    assert torch.equal(split[2], batch[5]) and torch.equal(split[1], batch[2])


def test_seeding_with_the_project_mlp():
    """nn.MLPDenoiser uses BLAS, whose kernels differ between batch sizes: equal to float32 rounding."""
    nn_mod = pytest.importorskip("diffusekit.nn")
    net = nn_mod.MLPDenoiser(dim=2, hidden=32, depth=2)
    torch.nn.init.normal_(net.out.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    den, sch = Denoiser(net).eval(), make_schedule("linear", 50)
    kw = dict(sampler="ddpm", steps=0)
    batch = generate(den, sch, (2,), SampleSettings(seeds=list(range(8)), batch_size=8, **kw), progress=False)
    alone = generate(den, sch, (2,), SampleSettings(seeds=[5], batch_size=1, **kw), progress=False)
    torch.testing.assert_close(alone[0], batch[5], rtol=1e-5, atol=1e-5)


# -- clipping, callbacks, trajectories ------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_uses_the_clipped_prediction(sampler):
    """With clip_x0 = c: x0_hat in [-c, c], eps recomputed from it, and the next state is exactly
    the update written with the clipped x0 (and the recorded noise)."""
    wide = GaussianMixture.gaussian(torch.zeros(2, dtype=F64), 9 * torch.eye(2, dtype=F64))  # x0 far outside [-1, 1]
    sch, n, c = make_schedule("linear", 100), 512, 1.0
    rec, draws, base = [], [], seeded_normal(8, (n, 2))
    noise = lambda: draws.append(base()) or draws[-1]
    fn = sample_ddpm if sampler == "ddpm" else sample_ddim
    out = fn(wide.denoiser, sch, base(), noise, steps=10, clip_x0=c, callback=rec.append,
             **({"eta": 0.5} if sampler == "ddim" else {}))
    sub = respace(sch, timestep_grid(100, 10, "trailing"))
    clipped_any = False
    for j, d in enumerate(rec):
        i = sub.T - j
        a, s = sub.alpha[i].item(), sub.sigma[i].item()
        assert d["x0"].abs().max() <= c
        torch.testing.assert_close(d["eps"], (d["x"] - a * d["x0"]) / s)
        clipped_any |= bool((wide.denoiser(d["x"], sub.logsnr[i]).x0.abs() > c).any())
        z = draws[j] if i > 1 else torch.zeros_like(d["x"])
        if sampler == "ddpm":
            expect = (sub.posterior_mean_coef_x0[i] * d["x0"] + sub.posterior_mean_coef_xt[i] * d["x"]
                      + sub.posterior_variance[i].sqrt() * z)
        else:
            std = 0.5 * sub.posterior_variance[i].sqrt()  # sigma_t(eta) = eta sqrt(beta_tilde)
            expect = sub.alpha[i - 1] * d["x0"] + (sub.sigma[i - 1] ** 2 - std**2).sqrt() * d["eps"] + std * z
        nxt = rec[j + 1]["x"] if j + 1 < len(rec) else out
        torch.testing.assert_close(nxt, expect, rtol=1e-12, atol=1e-12)
    assert len(draws) == 9 and clipped_any and out.abs().max() <= c


def test_clip_is_off_by_default():
    wide = GaussianMixture.gaussian(torch.zeros(1, dtype=F64), 9 * torch.eye(1, dtype=F64))
    noise = seeded_normal(9, (4000, 1))
    x = sample_ddim(wide.denoiser, make_schedule("linear", 100), noise())
    assert x.abs().max() > 3


def test_callback_and_trajectory_shapes():
    mix, sch = default_mixture(2), make_schedule("linear", 200)
    calls, rec = [], TrajectoryRecorder(every=5)
    both = lambda d: (calls.append(d), rec(d))
    noise = seeded_normal(10, (32, 2))
    sample_ddpm(mix.denoiser, sch, noise(), noise, steps=21, spacing="linspace", callback=both)
    ts = [d["t"] for d in calls]
    assert [d["i"] for d in calls] == list(range(21)) and ts == timestep_grid(200, 21, "linspace").tolist()
    assert all(d["x"].shape == d["x0"].shape == d["eps"].shape == (32, 2) for d in calls)
    assert rec.times == ts[::5] and len(rec.frames("x")) == len(rec.frames("x0")) == 5
    assert rec.frames("x0")[0].shape == (32, 2)


def test_bad_arguments_are_errors():
    mix, sch = default_mixture(2), make_schedule("linear", 50)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="variance"):
        sample_ddpm(mix.denoiser, sch, x, lambda: x, variance="large")
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(mix.denoiser, sch, x, eta=1.5)
    with pytest.raises(ValueError, match="steps"):
        sample_ddim(mix.denoiser, sch, x, steps=51)
    with pytest.raises(ValueError, match="clip_x0"):
        sample_ddpm(mix.denoiser, sch, x, lambda: x, clip_x0=0.0)


# -- runs: settings, files, reproduction ----------------------------------------------------------
def test_settings_round_trip_and_validation():
    s = SampleSettings(sampler="ddim", steps=20, eta=0.3, clip_x0=1.0, seeds=[3, 1, 2], batch_size=2)
    assert SampleSettings.from_json(s.to_json(extra={"run": "x"})) == s
    with pytest.raises(ValueError, match="eta"):
        SampleSettings(eta=2.0)
    with pytest.raises(ValueError, match="unknown"):
        SampleSettings.from_json(json.dumps({**s.to_dict(), "stepz": 3}))


@pytest.mark.parametrize("shape", [(1, 8, 8), (2,)])
def test_generate_write_and_reproduce(tmp_path, shape):
    den = Denoiser(RowwiseMLP(int(np.prod(shape)))).eval()
    sch = make_schedule("cosine", 30)
    settings = SampleSettings(sampler="ddpm", steps=10, seeds=[4, 0, 9], batch_size=2, clip_x0=1.0)
    x = generate(den, sch, shape, settings, progress=False)
    assert x.shape == (3, *shape) and x.dtype == torch.float32
    out = write_samples(x, settings.seeds, tmp_path / "s", settings, levels=17, extra={"step": 12})
    names = {p.name for p in out.iterdir()}
    assert {"grid.png", "samples.npz", "settings.json"} <= names
    if len(shape) == 3:
        assert {"sample_4.png", "sample_0.png", "sample_9.png"} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary files left
    data = np.load(out / "samples.npz")
    assert data["seeds"].tolist() == [4, 0, 9] and np.array_equal(data["x"], x.numpy())
    saved = json.loads((out / "settings.json").read_text())
    assert saved["extra"] == {"step": 12}
    again = SampleSettings.from_json((out / "settings.json").read_text())
    assert again == settings
    assert torch.equal(generate(den, sch, shape, again, progress=False), x)
