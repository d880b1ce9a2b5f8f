"""Probability-flow ODE samplers (Song et al. 2021, eq. 13): Euler, Heun and adaptive Dormand-Prince.

The variables. For any linear SDE (``sde.py``) x_t = a(t) x_0 + s(t) eps, the probability-flow ODE
dx/dt = f - 1/2 g^2 grad log q_t depends only on (a, s). In y = x / a and sigma = s / a
(= exp(-lambda / 2), lambda the log-SNR) it becomes

    dy / dsigma = eps_hat(y, sigma) = (y - x0_hat(y, sigma)) / sigma        (Karras et al. 2022, eq. 4)

(derivation for VP: dy/dt = [-1/2 beta x + 1/2 beta eps/s] / a + 1/2 beta x / a = beta eps / (2 a s)
and dsigma/dt = beta / (2 a s), so dy/dsigma = eps). The VP denoiser is queried at
y / sqrt(1 + sigma^2) with log-SNR -2 log sigma. All ODE samplers integrate in (y, sigma), which is
the same for VP, sub-VP and VE; the SDE only fixes the time grid and the scale of x_T.

The grid (``time_grid``) is explicit: ``steps`` times t_0 = t_max > ... > t_{N-1} = t_min, spaced
``"time"`` (uniform in t, Song et al.), ``"logsnr"`` (uniform in lambda, Lu et al. 2022) or
``"karras"`` (sigma_i^(1/rho) uniform, rho = 7; Karras et al. 2022, eq. 5), then one last step from
t_min to clean data (sigma = 0), which is the Euler/DDIM step y_0 = x0_hat (Tweedie's denoising
step). The ``"*_trailing"`` variants place steps + 1 points the same way and drop the last one
(t_min): the last network call is one spacing above t_min (t ~ 1/N for ``"time_trailing"``), and
the last step spans the whole remaining range down to sigma = 0 (diffusers' default placement of N
timesteps out of T, called "trailing" by Lin et al. 2024, "Common diffusion noise schedules and
sample steps are flawed"). So N steps cost N network calls for Euler (and DPM-Solver++, UniPC),
2N - 1 for Heun (the last step is Euler, as in Karras' Algorithm 2).

The exact step. In u = log sigma the ODE is dy/du = y - x0_hat(y, u), linear in y, so between two grid
points (r = sigma_{i+1} / sigma_i = e^{-h}, h > 0 the step in half log-SNR) variation of constants gives

    y_{i+1} = r y_i + int_{u_{i+1}}^{u_i} e^{u_{i+1} - v} x0_hat(v) dv.

For x0_hat = D constant this is y_{i+1} = r y_i + (1 - r) D, the Euler step (which is DDIM's); for
x0_hat linear in u from D (at u_i) to D' (at u_{i+1}) it adds h phi_2(h) (D' - D), with
h phi_2(h) = (h - 1 + e^{-h}) / h (``phi``). ``sample_heun`` takes D' at the Euler prediction when
Karras' trapezoidal step would extrapolate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn, append_dims
from diffusekit.sampling.catalog import GRIDS, default_grid
from diffusekit.sde import SDE

__all__ = ["Grid", "GRIDS", "time_grid", "resolve_times", "inverse_logsnr", "ve_denoise", "phi", "sample_euler",
           "sample_heun", "sample_rk45", "dopri5", "ODEStats"]

F64 = torch.float64
Grid = Literal[GRIDS]  # type: ignore[valid-type]  (the names of sampling/catalog.py)


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------
def inverse_logsnr(sde: SDE, lam: Tensor, iters: int = 80) -> Tensor:
    """t with sde.logsnr(t) = lam, by bisection in float64 on [t_min, t_max] (lambda decreases in t)."""
    lam = torch.as_tensor(lam, dtype=F64)
    lo = torch.full_like(lam, sde.t_min)
    hi = torch.full_like(lam, sde.t_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = sde.logsnr(mid) > lam  # still too little noise: go later
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def time_grid(sde: SDE, steps: int, grid: Grid = "logsnr", *, t_min: float | None = None,
              t_max: float | None = None, rho: float = 7.0) -> Tensor:
    """``steps`` times from t_max down to t_min (float64, descending; see the module docstring).

    A ``"<base>_trailing"`` grid is the first ``steps`` of the ``steps + 1`` times of ``<base>``: it
    starts at t_max and ends one spacing above t_min."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {GRIDS}")
    if grid.endswith("_trailing"):
        base = grid[: -len("_trailing")]
        return time_grid(sde, steps + 1, base, t_min=t_min, t_max=t_max, rho=rho)[:-1].clone()  # type: ignore[arg-type]
    t_lo = sde.t_min if t_min is None else float(t_min)
    t_hi = sde.t_max if t_max is None else float(t_max)
    if not 0 < t_lo <= t_hi <= sde.t_max:
        raise ValueError(f"need 0 < t_min <= t_max <= {sde.t_max}, got {t_lo}, {t_hi}")
    if steps == 1:
        return torch.tensor([t_hi], dtype=F64)
    frac = torch.linspace(0.0, 1.0, steps, dtype=F64)
    if grid == "time":
        t = t_hi + frac * (t_lo - t_hi)
        t[-1] = t_lo
        return t
    lam_hi, lam_lo = float(sde.logsnr(t_lo)), float(sde.logsnr(t_hi))
    if grid == "logsnr":
        lam = lam_lo + frac * (lam_hi - lam_lo)
    elif grid == "karras":
        s_max, s_min = math.exp(-lam_lo / 2) ** (1 / rho), math.exp(-lam_hi / 2) ** (1 / rho)
        lam = -2.0 * rho * torch.log(s_max + frac * (s_min - s_max))
    else:
        raise ValueError(f"unknown grid {grid!r}; choose one of {GRIDS}")
    t = inverse_logsnr(sde, lam)
    t[0], t[-1] = t_hi, t_lo
    return t


def resolve_times(sde: SDE, times: Tensor | None, steps: int | None, grid: Grid) -> Tensor:
    """The times a sampler walks: ``times`` as given (checked: 1-D, strictly decreasing, inside
    (0, sde.t_max]; float64), or else the named ``grid`` of ``steps`` times (``time_grid``). Samplers
    take either, as k-diffusion's take their ``sigmas``."""
    if times is None:
        if steps is None:
            raise ValueError("give the sampler either times or steps (with a grid name)")
        return time_grid(sde, steps, grid)
    t = torch.as_tensor(times, dtype=F64).flatten().cpu()
    if t.numel() < 1 or not bool(torch.isfinite(t).all()) or bool((t[1:] >= t[:-1]).any()):
        raise ValueError("times must be a non-empty, finite, strictly decreasing sequence")
    if not (0 < float(t[-1]) and float(t[0]) <= sde.t_max):
        raise ValueError(f"times must lie in (0, {sde.t_max}], got {float(t[-1])} .. {float(t[0])}")
    return t


def grid_sigmas(sde: SDE, times: Tensor) -> list[float]:
    """sigma_i = s / a at each grid time, plus the final 0 (clean data)."""
    lam = sde.logsnr(times)
    return torch.exp(-0.5 * lam).tolist() + [0.0]


# --------------------------------------------------------------------------------------------
# The denoiser in VE coordinates
# --------------------------------------------------------------------------------------------
def ve_denoise(denoiser: DenoiserFn, y: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
    """x0_hat at y = x_0 + sigma eps: the VP denoiser at y / sqrt(1 + sigma^2), log-SNR -2 log sigma.

    ``sigma`` is a float (one level for the batch) or a (B,) tensor (one per example)."""
    if isinstance(sigma, Tensor) and sigma.numel() > 1:
        s = sigma.to(F64).cpu()
        scale = append_dims(torch.rsqrt(1.0 + s**2).to(y.dtype).to(y.device), y.ndim)
        return denoiser(y * scale, (-2.0 * torch.log(s)).to(y.device), cond).x0.to(y.dtype)
    s = float(sigma)
    lam = torch.tensor(-2.0 * math.log(s), dtype=F64)
    return denoiser(y * (1.0 / math.sqrt(1.0 + s * s)), lam.to(y.device), cond).x0.to(y.dtype)


def _start(sde: SDE, x_T: Tensor, times: Tensor) -> Tensor:
    """y at t_max from the prior draw x_T (x = a y)."""
    return x_T / float(sde.mean_coef(times[0]))


def _check(x_T: Tensor) -> None:
    if not torch.is_floating_point(x_T):
        raise TypeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")


def walk(sde: SDE, x_T: Tensor, times: Tensor | None, steps: int | None, grid: Grid) -> tuple[Tensor, list[float], Tensor]:
    """What a fixed-grid solver of the probability-flow ODE starts from: the grid (``resolve_times``), its
    sigmas with the final 0, and y at t_max."""
    _check(x_T)
    times = resolve_times(sde, times, steps, grid)
    return times, grid_sigmas(sde, times), _start(sde, x_T, times)


def model_x0(denoiser: DenoiserFn, y: Tensor, i: int, times: Tensor, sig: list[float], cond: Any,
             callback: Callback | None) -> Tensor:
    """The model's x0_hat at grid point i, reported to ``callback`` (i, t, x, x0, sigma)."""
    x0 = ve_denoise(denoiser, y, sig[i], cond)
    if callback is not None:
        callback({"i": i, "t": float(times[i]), "x": y, "x0": x0, "sigma": sig[i]})
    return x0


def finish(sde: SDE, y: Tensor, times: Tensor, denoise_final: bool) -> Tensor:
    """The solver's output: clean data y, or x = a(t) y at the last grid time when not ``denoise_final``."""
    return y if denoise_final else y * float(sde.mean_coef(times[-1]))



def phi(k: int, h: float) -> float:
    """phi_k(h) = int_0^1 e^{-h (1 - u)} u^{k-1} / (k-1)! du for k >= 1, h >= 0, the weights of the exact
    step (module docstring; ``sampling.unipc``): the series sum_j (-h)^j / (j + k)! for h < 1 (no
    cancellation), else the recursion phi_1 = (1 - e^{-h}) / h, phi_{k+1} = (1/k! - phi_k) / h."""
    if k < 1 or h < 0:
        raise ValueError(f"phi needs k >= 1 and h >= 0, got k={k}, h={h}")
    if h < 1.0:
        return sum((-h) ** j / math.factorial(j + k) for j in range(30))
    value = -math.expm1(-h) / h
    for n in range(1, k):
        value = (1.0 / math.factorial(n) - value) / h
    return value


# --------------------------------------------------------------------------------------------
# Fixed-step solvers
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, times: Tensor | None = None, *,
                 steps: int | None = None, grid: Grid = default_grid("euler"),
                 cond: Any = None, denoise_final: bool = True, callback: Callback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE in (y, sigma) (Karras et al. 2022, Algorithm 1 with
    their VE variables; the same map as DDIM with eta = 0): y_{i+1} = y_i + (sigma_{i+1} - sigma_i)
    (y_i - x0_hat_i) / sigma_i. ``steps`` network calls. ``x_T`` is the prior draw of ``sde`` at
    t_max. With ``denoise_final`` False the last step (to sigma = 0) is skipped and x at t_min
    returned (x = a(t_min) y)."""
    times, sig, y = walk(sde, x_T, times, steps, grid)
    for i in range(len(times) if denoise_final else len(times) - 1):
        x0 = model_x0(denoiser, y, i, times, sig, cond, callback)
        y = x0 + (sig[i + 1] / sig[i]) * (y - x0)  # = y + (sig[i+1] - sig[i]) (y - x0) / sig[i]
    return finish(sde, y, times, denoise_final)


@torch.no_grad()
def sample_heun(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, times: Tensor | None = None, *,
                steps: int | None = None, grid: Grid = default_grid("heun"),
                cond: Any = None, denoise_final: bool = True, callback: Callback | None = None) -> Tensor:
    """Heun's second-order method on the probability-flow ODE, written as a convex combination so that no
    step size sends samples away. With D = x0_hat(y_i), the Euler (DDIM) prediction y' = D + r (y_i - D),
    D' = x0_hat(y') and r = sigma_{i+1} / sigma_i = e^{-h},

        y_{i+1} = y' + w (D' - D) = r y_i + (1 - r - w) D + w D'.

    Karras et al. 2022, Algorithm 2 (the trapezoidal rule on dy/dsigma = (y - x0_hat) / sigma) is this
    with w = (1 - r) / (2 r); its weights are all >= 0 exactly when r >= 1/2, and there it is kept. For
    r < 1/2 that weight extrapolates without bound (w ~ 1 / (2 r): samples went x10^2-10^4 beyond the
    data at 3-5 calls), and the step is instead the exponential integrator's (module docstring): the
    exact integral for x0_hat linear in log sigma from D to D',

        w = h phi_2(h) = (h - 1 + e^{-h}) / h,   0 <= w <= 1 - r   (e^h >= 1 + h),

    the exponential Runge-Kutta method ETD2RK (Cox & Matthews 2002, "Exponential time differencing for
    stiff systems"; the two-stage method with c_2 = 1 of Hochbruck & Ostermann 2010, "Exponential
    integrators") on the data-prediction form of the ODE (Lu et al. 2022, DPM-Solver++, eq. 9), i.e.
    DPM-Solver++(2S) with its second point at the end of the step and the exact weight in place of
    (1 - r) / 2. Both rules are second order (both w = h / 2 + O(h^2); tested: Karras' by convergence on
    a Gaussian, ETD2RK by its exactness for x0_hat linear in log sigma); Karras' is kept where it is safe
    because its error constant is smaller near the data (there x0_hat follows y one to one, so
    D' inherits the Euler prediction's error, while the noise prediction Karras averages does not):
    on the mixture family at 35-100 calls it was up to 4 times closer to the exact ODE map. Grids fine
    enough that every ratio is >= 1/2 give exactly Karras' Algorithm 2. The last step to sigma = 0 is the
    Euler step y = x0_hat, as in Algorithm 2. 2 steps - 1 network calls."""
    times, sig, y = walk(sde, x_T, times, steps, grid)
    for i in range(len(times) if denoise_final else len(times) - 1):
        x0 = model_x0(denoiser, y, i, times, sig, cond, callback)
        r = sig[i + 1] / sig[i]
        y_next = x0 + r * (y - x0)  # Euler = DDIM: exact for a constant x0_hat
        if r > 0:
            h = -math.log(r)
            w = (1.0 - r) / (2.0 * r) if r >= 0.5 else h * phi(2, h)
            y_next = y_next + w * (ve_denoise(denoiser, y_next, sig[i + 1], cond) - x0)
        y = y_next
    return finish(sde, y, times, denoise_final)


# --------------------------------------------------------------------------------------------
# Adaptive Dormand-Prince 5(4), one step size per sample
# --------------------------------------------------------------------------------------------
_F = Fraction
_A = [[], [_F(1, 5)], [_F(3, 40), _F(9, 40)], [_F(44, 45), _F(-56, 15), _F(32, 9)],
      [_F(19372, 6561), _F(-25360, 2187), _F(64448, 6561), _F(-212, 729)],
      [_F(9017, 3168), _F(-355, 33), _F(46732, 5247), _F(49, 176), _F(-5103, 18656)],
      [_F(35, 384), _F(0), _F(500, 1113), _F(125, 192), _F(-2187, 6784), _F(11, 84)]]
_C = [_F(0), _F(1, 5), _F(3, 10), _F(4, 5), _F(8, 9), _F(1), _F(1)]
_B5 = _A[6] + [_F(0)]
_B4 = [_F(5179, 57600), _F(0), _F(7571, 16695), _F(393, 640), _F(-92097, 339200), _F(187, 2100), _F(1, 40)]
_E = [float(b5 - b4) for b5, b4 in zip(_B5, _B4)]  # error estimate y5 - y4
_Af = [[float(a) for a in row] for row in _A]
_Cf = [float(c) for c in _C]


@dataclass
class ODEStats:
    """Work done by an adaptive solve: ``nfe`` batched function calls (the cost of the batch),
    and per sample its accepted and rejected steps (``nfe_per_sample`` = 6 per step + 2 to start)."""

    nfe: int
    accepted: Tensor  # (B,) int64
    rejected: Tensor  # (B,) int64

    @property
    def nfe_per_sample(self) -> Tensor:
        return 6 * (self.accepted + self.rejected) + 2


def _rms(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt()


def dopri5(fn: Callable[[Tensor, Tensor, Tensor], Tensor], y0: Tensor, u0: float, u1: float, *, rtol: float = 1e-5,
           atol: float = 1e-5, max_steps: int = 10_000) -> tuple[Tensor, ODEStats]:
    """Solve dy/du = fn(y, u, rows) from u0 to u1 for a batch of independent problems (rows of y0).

    Dormand & Prince (1980) 5(4) with FSAL and local extrapolation (the 5th-order solution is kept);
    each row has its own step size, accepted when the RMS of err / (atol + rtol max(|y|, |y_new|))
    over the row is <= 1 (Hairer, Norsett & Wanner, "Solving ODEs I", II.4), with the initial step
    of their algorithm (p. 169) and the factor 0.9 err^(-1/5) clipped to [0.2, 10]. ``fn`` is
    called with the active rows' states, a (b,) float64 tensor of their u and their indices in y0
    (int64), so per-row data such as conditioning can follow them.
    """
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
    B = y0.shape[0]
    direction = 1.0 if u1 >= u0 else -1.0
    y = y0.clone()
    u = torch.full((B,), float(u0), dtype=F64)
    accepted = torch.zeros(B, dtype=torch.int64)
    rejected = torch.zeros(B, dtype=torch.int64)
    done = torch.zeros(B, dtype=torch.bool) if u0 != u1 else torch.ones(B, dtype=torch.bool)
    nfe = 0

    def call(rows: Tensor, yy: Tensor, uu: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return fn(yy, uu, rows)

    def scale(a: Tensor, b: Tensor) -> Tensor:
        return atol + rtol * torch.maximum(a.abs(), b.abs())

    every = torch.arange(B)
    k1 = call(every, y, u)
    # initial step (Hairer et al. p. 169), per row
    d0, d1 = _rms(y / scale(y, y)).to(F64).cpu(), _rms(k1 / scale(y, y)).to(F64).cpu()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    h0 = torch.minimum(h0, torch.full_like(h0, abs(u1 - u0)))
    y_probe = y + append_dims((direction * h0).to(y.dtype).to(y.device), y.ndim) * k1
    d2 = _rms((call(every, y_probe, u + direction * h0) - k1) / scale(y, y)).to(F64).cpu() / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / dmax.clamp_min(1e-300)) ** 0.2)
    h = torch.minimum(100 * h0, h1)  # magnitude

    for _ in range(max_steps):
        if bool(done.all()):
            break
        rows = (~done).nonzero().flatten()
        ya, ua = y[rows], u[rows]
        remaining = (u1 - ua).abs()
        ha = torch.minimum(h[rows], remaining)
        hs = append_dims((direction * ha).to(y.dtype).to(y.device), y.ndim)
        ks = [k1[rows]]
        for i in range(1, 7):
            yi = ya + hs * sum(_Af[i][j] * ks[j] for j in range(i) if _Af[i][j] != 0.0)
            ks.append(call(rows, yi, ua + direction * _Cf[i] * ha))
        y_new = yi  # stage 7 is evaluated at the 5th-order solution (FSAL)
        err = hs * sum(_E[j] * ks[j] for j in range(7) if _E[j] != 0.0)
        err_norm = _rms(err / scale(ya, y_new)).to(F64).cpu()
        ok = err_norm <= 1.0
        factor = torch.where(err_norm == 0, torch.full_like(err_norm, 10.0),
                             (0.9 * err_norm.clamp_min(1e-300) ** -0.2).clamp(0.2, 10.0))
        factor = torch.where(ok, factor, factor.clamp(max=1.0))
        acc_rows = rows[ok]
        y[acc_rows] = y_new[ok]
        k1[acc_rows] = ks[6][ok]
        reached = ok & (ha >= remaining)
        u[acc_rows] = torch.where(reached[ok], torch.full_like(ua[ok], float(u1)), ua[ok] + direction * ha[ok])
        done[rows[reached]] = True
        accepted[acc_rows] += 1
        rejected[rows[~ok]] += 1
        h[rows] = ha * factor
    else:
        raise RuntimeError(f"dopri5: {int((~done).sum())} rows not finished after {max_steps} steps")
    return y, ODEStats(nfe=nfe, accepted=accepted, rejected=rejected)


def _slice_cond(cond: Any, rows: Tensor) -> Any:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[rows.to(cond.device)]
    if isinstance(cond, dict):
        return {k: _slice_cond(v, rows) for k, v in cond.items()}
    return cond


@torch.no_grad()
def sample_rk45(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, *, rtol: float = 1e-4, atol: float = 1e-4,
                cond: Any = None, denoise_final: bool = True, max_steps: int = 10_000) -> tuple[Tensor, ODEStats]:
    """The probability-flow ODE with adaptive Dormand-Prince 5(4) (``dopri5``) from t_max to t_min,
    in u = log sigma: dy/du = y - x0_hat(y, sigma = e^u). Then one denoising step to clean data
    (``denoise_final``; one more network call). Returns the samples and the solver's ``ODEStats``
    (``nfe`` counts the batched network calls, the last step included)."""
    _check(x_T)
    times = torch.tensor([sde.t_max, sde.t_min], dtype=F64)
    sig = grid_sigmas(sde, times)
    y = _start(sde, x_T, times)

    def velocity(yy: Tensor, uu: Tensor, rows: Tensor) -> Tensor:
        return yy - ve_denoise(denoiser, yy, torch.exp(uu), _slice_cond(cond, rows))

    y, stats = dopri5(velocity, y, math.log(sig[0]), math.log(sig[1]), rtol=rtol, atol=atol, max_steps=max_steps)
    if denoise_final:
        y = ve_denoise(denoiser, y, sig[1], cond)
        stats.nfe += 1
        return y, stats
    return y * float(sde.mean_coef(times[-1])), stats
