"""Diffusion posterior sampling (DPS): restoration from noisy, possibly nonlinear measurements, untrained.

The measurement is y = A(x0) + n, n ~ N(0, sigma_y^2 I), with A any differentiable map. The reverse
process of p(x0 | y) needs the score grad log p_t(x_t | y) = grad log p_t(x_t) + grad log p(y | x_t);
the first term is the unconditional model's, the second is intractable because
p(y | x_t) = int p(y | x0) p(x0 | x_t) dx0. Chung, Kim, McCann, Klasky & Ye (2023, "Diffusion Posterior
Sampling for General Noisy Inverse Problems", ICLR; sec. 3.2, Theorem 1) replace p(x0 | x_t) by a point
mass at its mean x0_hat(x_t) = E[x0 | x_t] (the denoiser's prediction), which gives

    p(y | x_t) ~ N(y; A(x0_hat(x_t)), sigma_y^2 I),
    grad_{x_t} log p(y | x_t) ~ -1 / (2 sigma_y^2) grad_{x_t} ||y - A(x0_hat(x_t))||^2,

a gradient through the denoiser (autograd) and through A. Their Algorithm 1 ("DPS - Gaussian") takes
the unconditional ancestral step x'_{t-1} = mu_q(x_t, x0_hat) + std_t z and then

    x_{t-1} = x'_{t-1} - zeta_t grad_{x_t} ||y - A(x0_hat(x_t))||^2,

and because 1 / sigma_y^2 (the step the derivation gives) is unstable, their experiments (Appendix C)
set zeta_t = zeta / ||y - A(x0_hat(x_t))|| with a constant zeta. ``sample_dps`` does exactly that, per
example (each sample's own residual norm). Since grad ||r||^2 = 2 ||r|| grad ||r||, the step is
x_{t-1} = x'_{t-1} - 2 zeta grad_{x_t} ||r||: a step of fixed length 2 zeta ||J^T r / ||r|| || (J the
Jacobian of A(x0_hat(x_t))), which is the update of the authors' code with its ``scale`` = 2 zeta. Two
consequences: sigma_y does not appear in the update (it only shapes y), and zeta is a length in the
space of x, so the same zeta moves each pixel of a large image less (docs/restoration.md measures the
zeta that suits the digits model). With zeta = 0 the sampler is ``sample_ddpm``, number for number.

DPS is an approximation: the point mass ignores the spread of p(x0 | x_t), which is large at high noise.
tests/test_dps.py measures the gap on Gaussian data, where the posterior is exact: for a prior
N(mu, Sigma), a linear A (a matrix) and Gaussian noise,

    log p(x | y) = -1/2 (x - mu)^T Sigma^-1 (x - mu) - ||y - A x||^2 / (2 sigma_y^2) + const
                 = -1/2 x^T (Sigma^-1 + A^T A / sigma_y^2) x + x^T (Sigma^-1 mu + A^T y / sigma_y^2) + const,

a quadratic in x, so p(x | y) = N(mu_post, Sigma_post) with (completing the square)

    Sigma_post = (Sigma^-1 + A^T A / sigma_y^2)^-1,   mu_post = Sigma_post (Sigma^-1 mu + A^T y / sigma_y^2)

(``gaussian_posterior``).

Measurement operators: anything with a differentiable ``A(x)`` taking a batch (N, ...) to (N, ...).
The linear degradations of ``sampling/restore.py`` (``Inpaint``, ``SuperResolution``,
``Colorization``) qualify, and two more here that RePaint and DDNM cannot use (no pseudo-inverse with
A A^T = c I):

- ``GaussianBlur(size, width)``: convolution of every channel with a normalised size x size Gaussian of
  standard deviation ``width`` pixels, with reflected borders (as in the authors' code); linear, but not a
  projection: it attenuates fine detail instead of deleting coordinates.
- ``Saturation(gain)``: the pixel-wise S-curve A(x) = tanh(gain x) / tanh(gain), a sensor (or film) whose
  response saturates: it maps [-1, 1] onto itself, stretches the mid-tones by gain / tanh(gain) and
  compresses the extremes by gain (1 - tanh(gain)^2) / tanh(gain) (0.15 for gain 2, 0.03 for gain 3),
  so with noise the highlights and shadows are nearly lost and the prior must fill them in. It is
  nonlinear, differentiable and monotone; its pixel-wise inverse (``naive_inverse``) amplifies the
  noise at the extremes, which is what DPS is compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import VARIANCES
from diffusekit.sampling.ddpm import NoiseFn, Variance, _check_common, predict_x0_eps, step_iterator
from diffusekit.sampling.grids import Spacing, sampling_schedule
from diffusekit.sampling.restore import Inpaint
from diffusekit.schedules import DiscreteSchedule

__all__ = ["GaussianBlur", "Measurement", "Saturation", "gaussian_posterior", "noisy_measurement", "sample_dps"]


class Measurement(Protocol):
    """y = A(x): batched (N, ...) -> (N, ...), differentiable in x (autograd)."""

    def A(self, x: Tensor) -> Tensor: ...


def _check_images(x: Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} works on images (N, C, H, W), got shape {tuple(x.shape)}")


@dataclass(frozen=True)
class GaussianBlur:
    """A = convolution of each channel with a ``size`` x ``size`` Gaussian of standard deviation ``width``
    pixels, normalised to sum 1, borders reflected (so ``size // 2`` must be below the image side)."""

    size: int = 5
    width: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1 or self.size % 2 == 0:
            raise ValueError(f"blur kernel size must be a positive odd integer, got {self.size!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not 0 < self.width < math.inf:
            raise ValueError(f"blur width must be a positive number of pixels, got {self.width!r}")

    def kernel(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The (size, size) kernel: outer product of exp(-k^2 / (2 width^2)), k = -size//2 .. size//2, over its sum."""
        k = torch.arange(self.size, dtype=torch.float64) - self.size // 2
        g = torch.exp(-0.5 * (k / float(self.width)) ** 2)
        g = g / g.sum()
        return torch.outer(g, g).to(dtype)

    def A(self, x: Tensor) -> Tensor:
        _check_images(x, "GaussianBlur")
        pad = self.size // 2
        if pad >= min(x.shape[-2:]):
            raise ValueError(f"blur kernel size {self.size} needs images larger than {pad}x{pad}, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        C = x.shape[1]
        weight = self.kernel(x.dtype).to(x.device).expand(C, 1, self.size, self.size)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
        return F.conv2d(padded, weight, groups=C)

    def naive_inverse(self, y: Tensor) -> Tensor:
        """The measurement alone, as an image: the blurred image itself."""
        return y


@dataclass(frozen=True)
class Saturation:
    """A(x) = tanh(gain x) / tanh(gain), pixel by pixel: a saturating response mapping [-1, 1] onto itself."""

    gain: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.gain, bool) or not isinstance(self.gain, (int, float)) or not 0 < self.gain <= 20:
            raise ValueError(f"saturation gain must lie in (0, 20], got {self.gain!r}")

    def A(self, x: Tensor) -> Tensor:
        return torch.tanh(self.gain * x) / math.tanh(self.gain)

    def naive_inverse(self, y: Tensor) -> Tensor:
        """The pixel-wise inverse atanh(y tanh(gain)) / gain, with y tanh(gain) clamped inside (-1, 1) and the
        result to [-1, 1] (noise can push y past the range of A)."""
        u = (y * math.tanh(self.gain)).clamp(-1 + 1e-6, 1 - 1e-6)
        return (torch.atanh(u) / self.gain).clamp(-1, 1)


def noisy_measurement(op: Measurement, x: Tensor, sigma_y: float, noise: Tensor | None = None) -> Tensor:
    """y = A(x) + sigma_y n with n = ``noise`` (standard normal, shaped like A(x)). For ``Inpaint`` the noise
    is kept on the known pixels only: the unknown ones are not measured, and A(x) is 0 there."""
    y = op.A(x)
    if sigma_y == 0:
        return y
    if noise is None or noise.shape != y.shape:
        raise ValueError(f"noise of shape {tuple(y.shape)} is needed for sigma_y > 0, got "
                         f"{None if noise is None else tuple(noise.shape)}")
    noise = noise.to(dtype=y.dtype, device=y.device)
    if isinstance(op, Inpaint):
        noise = op.A(noise)
    return y + sigma_y * noise


def gaussian_posterior(mean: Tensor, cov: Tensor, M: Tensor, y: Tensor, sigma_y: float) -> tuple[Tensor, Tensor]:
    """The exact posterior N(mu_post, Sigma_post) of x ~ N(mean, cov) given y = M x + N(0, sigma_y^2 I):
    Sigma_post = (Sigma^-1 + M^T M / sigma_y^2)^-1, mu_post = Sigma_post (Sigma^-1 mu + M^T y / sigma_y^2)
    (derived in the module docstring). Float64; M is (m, D), y is (m,), sigma_y > 0."""
    f64 = torch.float64
    mean, cov, M, y = (torch.as_tensor(t, dtype=f64) for t in (mean, cov, M, y))
    if not sigma_y > 0:
        raise ValueError(f"sigma_y must be positive, got {sigma_y}")
    prec_prior = torch.linalg.inv(cov)
    cov_post = torch.linalg.inv(prec_prior + M.T @ M / sigma_y**2)
    mean_post = cov_post @ (prec_prior @ mean + M.T @ y.reshape(-1) / sigma_y**2)
    return mean_post, 0.5 * (cov_post + cov_post.T)


def _residual_and_grad(denoiser: DenoiserFn, x: Tensor, logsnr: Tensor, cond: Any, alpha: float, sigma: float,
                       clip_x0: float | None, op: Measurement, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x0_hat, eps_hat, per-example ||y - A(x0_hat(x))||, per-example grad_x ||y - A(x0_hat(x))||^2)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        x0, eps = predict_x0_eps(denoiser, x_in, logsnr, cond, alpha, sigma, clip_x0)
        sq = (y - op.A(x0)).flatten(1).pow(2).sum(1)  # examples are independent: the gradient of the
        (grad,) = torch.autograd.grad(sq.sum(), x_in)  # sum holds each example's own gradient
    return x0.detach(), eps.detach(), sq.detach().sqrt(), grad


@torch.no_grad()
def sample_dps(denoiser: DenoiserFn, schedule: DiscreteSchedule, x_T: Tensor, noise: NoiseFn, op: Measurement,
               y: Tensor, *, zeta: float, steps: int | None = None, spacing: Spacing = "trailing",
               variance: Variance = "beta_tilde", clip_x0: float | None = None, cond: Any = None,
               callback: Callback | None = None, progress: bool = False) -> Tensor:
    """DPS (Chung et al. 2023, Algorithm 1 with the step size of their Appendix C) for y = op.A(x) + noise.

    Each reverse step i -> i-1 (on the table respaced to ``steps`` with ``spacing``, as in ``sample_ddpm``):
    x0_hat(x_i) from the denoiser with autograd on, the ancestral step x' = mu_q(x_i, x0_hat) + std_i z
    (z only for i > 1), then per example

        x_{i-1} = x' - zeta / ||y - A(x0_hat)|| * grad_{x_i} ||y - A(x0_hat(x_i))||^2.

    ``zeta`` >= 0; zeta = 0 skips the gradient and is ``sample_ddpm`` exactly (same noise calls). There is no
    final projection: with noise in y, A(x_0) should differ from y by about the noise. ``noise()`` is called
    once per step with i > 1; ``callback`` receives dict(i, t, x, x0, eps, residual) before each step, with
    ``residual`` the per-example ||y - A(x0_hat)|| (None when zeta = 0). Costs one network call and one
    backward pass through it per step.
    """
    _check_common(x_T, clip_x0)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    if not (isinstance(zeta, (int, float)) and not isinstance(zeta, bool) and 0 <= zeta < math.inf):
        raise ValueError(f"zeta must be a finite number >= 0, got {zeta!r}")
    if not callable(getattr(op, "A", None)):
        raise TypeError(f"op must have a method A(x) (a measurement operator), got {type(op).__name__}")
    y = y.to(device=x_T.device, dtype=x_T.dtype)
    y_shape = op.A(x_T).shape
    if y.shape != y_shape:
        raise ValueError(f"y has shape {tuple(y.shape)} but A(x) has shape {tuple(y_shape)}")
    sched = sampling_schedule(schedule, steps, spacing)
    coef_x0, coef_xt = sched.posterior_mean_coef_x0.tolist(), sched.posterior_mean_coef_xt.tolist()
    std = (sched.betas if variance == "beta" else sched.posterior_variance).sqrt().tolist()
    alpha, sigma = sched.alpha.tolist(), sched.sigma.tolist()
    logsnr = list(sched.logsnr.unbind())
    t_orig = sched.timesteps.tolist()
    tiny = torch.finfo(x_T.dtype).tiny

    x = x_T
    for n, i in enumerate(step_iterator(sched, progress, "dps")):
        if zeta > 0:
            x0, eps, residual, grad = _residual_and_grad(denoiser, x, logsnr[i], cond, alpha[i], sigma[i], clip_x0,
                                                         op, y)
        else:
            x0, eps = predict_x0_eps(denoiser, x, logsnr[i], cond, alpha[i], sigma[i], clip_x0)
            residual = grad = None
        if callback is not None:
            callback({"i": n, "t": t_orig[i], "x": x, "x0": x0, "eps": eps, "residual": residual})
        x_prev = x.mul(coef_xt[i]).add_(x0, alpha=coef_x0[i])  # mu_q(x_i, x0_hat)
        if i > 1:
            x_prev.add_(noise(), alpha=std[i])
        if grad is not None:  # zeta_i = zeta / ||r|| per example; a zero residual has a zero gradient
            step = zeta / residual.clamp_min(tiny)
            x_prev.sub_(grad * step.reshape((-1,) + (1,) * (x.ndim - 1)))
        x = x_prev
    return x
