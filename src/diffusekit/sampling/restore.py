"""Training-free restoration with an unconditional model: linear degradations y = A x and two samplers.

Every degradation here has a known pseudo-inverse A+ = A^T (A A^T)^{-1} with A A^T = c I, so
P = A+ A is the orthogonal projection onto the range of A^T (the "measured" component of x) and
I - P the projection onto the null space of A (what the measurement does not see):

- ``Inpaint``: A keeps the known pixels of a mask (y is x with zeros elsewhere; c = 1, P = diag(mask)).
  Outpainting is the same operator with the unknown region at the border.
- ``SuperResolution``: A = average pooling by an integer factor f (c = 1 / f^2); A+ = nearest
  upsampling.
- ``Colorization``: A = mean over the channels (c = 1 / C); A+ replicates y to every channel.

Because P is orthogonal, under the forward process the measured and the unseen components of
x_t = alpha x_0 + sigma eps carry independent noise (P eps and (I - P) eps are independent for
isotropic eps), so given A x_0 = y the measured component of x_t is exactly
P x_t = alpha A+ y + sigma P eps. Both samplers use that:

- ``sample_repaint``: RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion
  Probabilistic Models"; its result: an unconditional DDPM inpaints, untrained, if the known pixels
  of every x_{t-1} are drawn from the forward process). An ancestral DDPM step for the whole image,
  then the measured component of x_{t-1} is replaced by a forward-noised measurement,
  x_{t-1} <- (I - P) x_{t-1} + P (alpha_{t-1} A+ y + sigma_{t-1} z). The paper states it for masks;
  with A A^T = c I the same replacement acts in the range of A^T. Its resampling (U times, jump
  length j) re-noises x by j steps with q(x_{t+j} | x_t) and denoises again, INSIDE the reverse loop
  (Lugmayr et al. 2022, sec. 4.2 and Algorithm 1; lucidrains' denoising-diffusion-pytorch issue #319 is
  a version that got this wrong), so the generated part is harmonised with the measurement.
- ``sample_ddnm``: the null-space projection of DDNM (Wang, Yu & Zhang 2023, "Zero-Shot Image
  Restoration Using Denoising Diffusion Null-Space Model"; its result: keeping the range-space part
  A+ y of the predicted x0 and the model's null-space part restores any linear degradation with a
  known pseudo-inverse, untrained). The predicted clean image is made consistent,
  x0 <- x0 + A+ (y - A x0) = (I - P) x0 + A+ y, then the posterior step q(x_{t-1} | x_t, x0)
  ("Algorithm 2 Sampling" of Vidal, "Deep Generative Models" (Fall 2025), x0 form) is taken; optionally
  with the same resampling ("time
  travel" in the paper).

Both end with ``op.consistent(x, y)``: at the last step (t = 1 -> 0, alpha_0 = 1, sigma_0 = 0) the
measured component is already A+ y, and this final projection makes the measurement exact: for
``Inpaint`` it is ``torch.where(known, y, x)``, so the known pixels equal y bit for bit; for the
other operators A x = A A+ y = y up to one rounding of the pooling or mean.

Neither method samples the exact posterior p(x_0 | A x_0 = y) (the unconditional denoiser only sees
a noisy measurement); tests/test_restore.py measures the gap against the closed-form Gaussian and
mixture posteriors, and how resampling narrows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import VARIANCES
from diffusekit.sampling.ddpm import NoiseFn, Variance, _check_common, predict_x0_eps
from diffusekit.sampling.grids import Spacing, sampling_schedule
from diffusekit.schedules import DiscreteSchedule

if TYPE_CHECKING:  # annotations only: typing.Unpack is Python 3.11+
    from typing import Unpack

__all__ = ["LinearDegradation", "Inpaint", "SuperResolution", "Colorization", "resample_path", "sample_repaint",
           "sample_ddnm"]


# -- degradations ------------------------------------------------------------------------------
class LinearDegradation:
    """y = A x with A A^T = c I; subclasses define ``A`` and ``A_pinv``, the rest follows.

    Tensors are batched: x is (N, *shape), y is (N, *measurement shape).
    """

    def A(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def A_pinv(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def project_range(self, x: Tensor) -> Tensor:
        """P x = A+ A x, the measured component of x (orthogonal projection onto range(A^T))."""
        return self.A_pinv(self.A(x))

    def project_null(self, x: Tensor) -> Tensor:
        """(I - P) x = x - A+ A x, the component of x the measurement does not see."""
        return x - self.project_range(x)

    def merge(self, x: Tensor, x_measured: Tensor) -> Tensor:
        """(I - P) x + P x_measured: x with its measured component taken from ``x_measured``."""
        return x + self.project_range(x_measured - x)

    def consistent(self, x: Tensor, y: Tensor) -> Tensor:
        """x + A+ (y - A x) = (I - P) x + A+ y, the closest point to x with A x = y (DDNM's projection)."""
        return self.merge(x, self.A_pinv(y))


@dataclass(frozen=True)
class Inpaint(LinearDegradation):
    """Keep the pixels where ``known`` is True: A x = x * known (zeros elsewhere), A+ = A, P = A.

    ``known`` is a bool tensor broadcastable against x: (*shape) for one mask, (N, *shape) per
    example, with size-1 dims broadcast (e.g. (N, 1, H, W) for all channels); it also works on flat
    vectors (N, D) with a (D,) mask. Outpainting is the same operator with the unknown region outside.
    """

    known: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.known, Tensor) or self.known.dtype != torch.bool:
            raise TypeError(f"Inpaint needs a bool mask tensor, got {getattr(self.known, 'dtype', type(self.known))}")

    def _mask(self, x: Tensor) -> Tensor:
        if self.known.ndim > x.ndim:
            raise ValueError(f"mask of shape {tuple(self.known.shape)} does not fit x of shape {tuple(x.shape)}")
        return self.known.to(x.device)

    def A(self, x: Tensor) -> Tensor:
        return torch.where(self._mask(x), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def A_pinv(self, y: Tensor) -> Tensor:
        return self.A(y)

    def merge(self, x: Tensor, x_measured: Tensor) -> Tensor:
        """Known pixels from ``x_measured``, the others from x, copied exactly (no arithmetic)."""
        return torch.where(self._mask(x), x_measured, x)


def _check_images(x: Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} works on images (N, C, H, W), got shape {tuple(x.shape)}")


@dataclass(frozen=True)
class SuperResolution(LinearDegradation):
    """A = average pooling by ``factor`` (each output pixel is the mean of a factor x factor block),
    A+ = nearest upsampling: A A^T = I / factor^2, so A+ = factor^2 A^T replicates each value."""

    factor: int

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"super-resolution factor must be a positive integer, got {self.factor!r}")

    def A(self, x: Tensor) -> Tensor:
        _check_images(x, "SuperResolution")
        f = self.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"factor {f} does not divide the image size {x.shape[-2]}x{x.shape[-1]}")
        return F.avg_pool2d(x, f) if f > 1 else x.clone()

    def A_pinv(self, y: Tensor) -> Tensor:
        _check_images(y, "SuperResolution")
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)


@dataclass(frozen=True)
class Colorization(LinearDegradation):
    """A = mean over the ``channels`` (dim 1), A+ replicates the gray value: A A^T = I / channels.
    Works on images (N, C, H, W) and on vectors (N, C)."""

    channels: int = 3

    def _check(self, x: Tensor) -> None:
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"Colorization expects {self.channels} channels in dim 1, got shape {tuple(x.shape)}")

    def A(self, x: Tensor) -> Tensor:
        self._check(x)
        return x.mean(dim=1, keepdim=True)

    def A_pinv(self, y: Tensor) -> Tensor:
        if y.ndim < 2 or y.shape[1] != 1:
            raise ValueError(f"Colorization measurements have one channel in dim 1, got shape {tuple(y.shape)}")
        return y.expand((-1, self.channels) + tuple(y.shape[2:])).contiguous()


# -- the resampling schedule -------------------------------------------------------------------
def resample_path(steps: int, resample: int = 1, jump: int = 1) -> list[int]:
    """The sequence of grid indices S, ..., 0 a restoration sampler visits (RePaint's resampling).

    Moves down by one are reverse steps; a move up by ``jump`` re-noises x with q(x_{i+j} | x_i).
    At each jump point k = 0, j, 2j, ... with k + j <= S the sampler jumps back ``resample - 1``
    times, so every segment of j steps is denoised ``resample`` times in all, and the path ends at 0.
    ``resample = 1`` is the plain reverse chain. Reverse steps: S + (resample - 1) j floor(S / j).
    """
    for name, v in (("steps", steps), ("resample", resample), ("jump", jump)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if resample > 1 and jump > steps:
        raise ValueError(f"jump length {jump} exceeds the {steps} sampling steps: no resampling would happen")
    left = {k: resample - 1 for k in range(0, steps - jump + 1, jump)} if resample > 1 else {}
    path, i = [steps], steps
    while i > 0:
        i -= 1
        path.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            i += jump
            path.append(i)
    return path


# -- the two samplers --------------------------------------------------------------------------
StepFn = Callable[[int, Tensor, Tensor], Tensor]


def _walk(denoiser: DenoiserFn, sched: DiscreteSchedule, x: Tensor, noise: NoiseFn, path: list[int], step: StepFn,
          cond: Any, clip_x0: float | None, callback: Callback | None, progress: bool, desc: str) -> Tensor:
    """Follow ``path``: reverse steps i -> i-1 call ``step(i, x, x0_hat)``; jumps i -> k > i draw
    x_k = sqrt(abar_k / abar_i) x_i + sqrt(1 - abar_k / abar_i) z (q(x_k | x_i) of the table)."""
    lab = sched.log_alpha_bar.tolist()
    alpha, sigma = sched.alpha.tolist(), sched.sigma.tolist()
    logsnr = list(sched.logsnr.unbind())
    t_orig = sched.timesteps.tolist()
    moves = list(zip(path[:-1], path[1:]))
    if progress:
        moves = tqdm(moves, desc=desc, leave=False)
    n = 0
    for i, k in moves:
        if k > i:
            log_ratio = lab[k] - lab[i]
            x = x.mul(math.exp(0.5 * log_ratio)).add_(noise(), alpha=math.sqrt(-math.expm1(log_ratio)))
            continue
        x0, eps = predict_x0_eps(denoiser, x, logsnr[i], cond, alpha[i], sigma[i], clip_x0)
        if callback is not None:
            callback({"i": n, "t": t_orig[i], "x": x, "x0": x0, "eps": eps})
        x = step(i, x, x0)
        n += 1
    return x


def _prepare(x_T: Tensor, op: LinearDegradation, y: Tensor, schedule: DiscreteSchedule, steps: int | None,
             spacing: Spacing, variance: Variance, clip_x0: float | None, resample: int, jump: int):
    _check_common(x_T, clip_x0)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    if not isinstance(op, LinearDegradation):
        raise TypeError(f"op must be a LinearDegradation, got {type(op).__name__}")
    y = y.to(device=x_T.device, dtype=x_T.dtype)
    y_up = op.A_pinv(y)
    if y_up.shape != x_T.shape:
        raise ValueError(f"A+ y has shape {tuple(y_up.shape)} but x_T has shape {tuple(x_T.shape)}")
    sched = sampling_schedule(schedule, steps, spacing)
    std = (sched.betas if variance == "beta" else sched.posterior_variance).sqrt().tolist()
    return y, y_up, sched, std, resample_path(sched.T, resample, jump)


class RestoreOptions(TypedDict, total=False):
    """The keyword options of ``sample_repaint`` and ``sample_ddnm``: ``steps`` (None: the full chain),
    ``spacing`` ("trailing"), ``resample`` (U, 1: none) and ``jump`` (j, 10), ``variance`` ("beta_tilde"),
    ``clip_x0`` (None), ``cond``, ``callback`` and ``progress`` (False), as in ``sample_ddpm``."""

    steps: int | None
    spacing: Spacing
    resample: int
    jump: int
    variance: Variance
    clip_x0: float | None
    cond: Any
    callback: Callback | None
    progress: bool


@torch.no_grad()
def _restore(method: str, denoiser: DenoiserFn, schedule: DiscreteSchedule, x_T: Tensor, noise: NoiseFn,
             op: LinearDegradation, y: Tensor, *, steps: int | None = None, spacing: Spacing = "trailing",
             resample: int = 1, jump: int = 10, variance: Variance = "beta_tilde", clip_x0: float | None = None,
             cond: Any = None, callback: Callback | None = None, progress: bool = False) -> Tensor:
    """The reverse walk shared by the two samplers; ``method`` picks the step (see each sampler)."""
    y, y_up, sched, std, path = _prepare(x_T, op, y, schedule, steps, spacing, variance, clip_x0, resample, jump)
    coef_x0, coef_xt = sched.posterior_mean_coef_x0.tolist(), sched.posterior_mean_coef_xt.tolist()
    alpha, sigma = sched.alpha.tolist(), sched.sigma.tolist()

    def repaint_step(i: int, x: Tensor, x0: Tensor) -> Tensor:
        x_prev = x.mul(coef_xt[i]).add_(x0, alpha=coef_x0[i])  # mu_q(x_i, x0_hat)
        measured = y_up.mul(alpha[i - 1])  # alpha_{i-1} A+ y (+ sigma_{i-1} z below)
        if i > 1:
            z = noise()
            x_prev.add_(z, alpha=std[i])
            measured.add_(z, alpha=sigma[i - 1])
        return op.merge(x_prev, measured)

    def ddnm_step(i: int, x: Tensor, x0: Tensor) -> Tensor:
        x0 = op.merge(x0, y_up)  # (I - P) x0_hat + A+ y
        x_prev = x.mul(coef_xt[i]).add_(x0, alpha=coef_x0[i])
        if i > 1:
            x_prev.add_(noise(), alpha=std[i])
        return x_prev

    step = repaint_step if method == "repaint" else ddnm_step
    x = _walk(denoiser, sched, x_T, noise, path, step, cond, clip_x0, callback, progress, method)
    return op.consistent(x, y)


def sample_repaint(denoiser: DenoiserFn, schedule: DiscreteSchedule, x_T: Tensor, noise: NoiseFn,
                   op: LinearDegradation, y: Tensor, **options: Unpack[RestoreOptions]) -> Tensor:
    """RePaint (Lugmayr et al. 2022) for y = op.A(x), generalised from masks to A A^T = c I.

    Each reverse step i -> i-1 (on the table respaced to ``steps`` with ``spacing``, as in
    ``sample_ddpm``) draws the unconditional ancestral step x' = mu_q(x_i, x0_hat) + std_i z and
    keeps only its unseen component: x_{i-1} = (I - P) x' + P (alpha_{i-1} A+ y + sigma_{i-1} z).
    One z serves both parts: P z and (I - P) z are independent, so this has the law of two draws.
    At i = 1 nothing is added (alpha_0 = 1, sigma_0 = 0), so P x_0 = A+ y. ``resample`` (U) and
    ``jump`` (j) set the resampling path (``resample_path``); U = 1 is plain replacement. ``noise()``
    is called once per reverse step with i > 1 and once per jump; the result ends with
    ``op.consistent(x, y)`` (exact known pixels for ``Inpaint``). ``callback`` receives dict(i, t, x,
    x0, eps) before each reverse step (i counts network calls).
    """
    return _restore("repaint", denoiser, schedule, x_T, noise, op, y, **options)


def sample_ddnm(denoiser: DenoiserFn, schedule: DiscreteSchedule, x_T: Tensor, noise: NoiseFn,
                op: LinearDegradation, y: Tensor, **options: Unpack[RestoreOptions]) -> Tensor:
    """Null-space projection of the predicted x0 (DDNM, Wang et al. 2023), then the posterior step.

    Each reverse step i -> i-1: x0_hat <- x0_hat + A+ (y - A x0_hat) (so A x0_hat = y; with
    ``clip_x0`` the clamp comes first), then x_{i-1} = mu_q(x_i, x0_hat) + std_i z as in
    ``sample_ddpm``. ``resample`` / ``jump`` add the same resampling path as ``sample_repaint``
    (the paper's time travel). At i = 1, x_0 = x0_hat, and the output is ``op.consistent(x, y)``.
    ``callback`` receives dict(i, t, x, x0, eps) with the denoiser's own x0 before the projection.
    """
    return _restore("ddnm", denoiser, schedule, x_T, noise, op, y, **options)
