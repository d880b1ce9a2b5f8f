"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast sampling of
diffusion models"): the multistep predictor UniP and the corrector UniC of the probability-flow ODE in
its data-prediction (x0) form, on the VE variables of ``ode.py``.

The exact step. With the half log-SNR l = log(alpha / sigma) = lambda / 2, s = sigma / alpha = e^{-l},
y = x / alpha and m(l) = x0_hat along the solution, the probability-flow ODE dy/ds = (y - m) / s
(``ode.py``) is linear in y; from a base point l_b to l_b + h it integrates to (variation of constants;
Lu et al. 2022, DPM-Solver++, eq. 9, divided by alpha)

    y(l_b + h) = e^{-h} y_b + int_0^h e^{-(h - tau)} m(l_b + tau) dtau.

Taylor-expanding m(l_b + tau) = sum_k tau^k / k! m^(k), each term integrates to h^{k+1} phi_{k+1}(h) m^(k),
with phi_k(h) = int_0^1 e^{-h (1 - u)} u^{k-1} / (k-1)! du = sum_j (-h)^j / (j + k)!
(phi_1(h) = (1 - e^{-h}) / h, phi_{k+1}(h) = (1/k! - phi_k(h)) / h). So

    y(l_b + h) = e^{-h} y_b + (1 - e^{-h}) m_b + sum_{k>=1} h^{k+1} phi_{k+1}(h) m^(k).       (exact)

The UniPC ansatz (Zhao et al., eqs. 8-9 and Theorem 3.1 in their data-prediction form). Given model
values m_j at other points l_j = l_b + r_j h, with differences D_j = m_j - m_b, replace the sum by

    y_t = e^{-h} y_b + (1 - e^{-h}) m_b + B(h) sum_j a_j D_j / r_j,

B(h) = O(h) any fixed function ("bh1": B = h; "bh2": B = 1 - e^{-h} = -expm1(-h), the coefficient of
the first-order term). Since D_j / r_j = sum_{k>=1} r_j^{k-1} h^k / k! m^(k), matching the first K
derivatives gives the K x K Vandermonde system

    sum_j a_j r_j^{k-1} = k! h phi_{k+1}(h) / B(h),    k = 1..K.                              (R a = g / B)

Solved exactly (``coefficients="solve"``), B a = R^{-1} g and B cancels: "bh1" and "bh2" are the same
method. Zhao et al. let a one-point system (K = 1: the order-2 predictor, the corrector after a
first-order step) take a_1 = 1/2, the h -> 0 limit of g_1 / B for either B; the error is
O(h) B D / r = O(h^3) per step, so the order is kept, and only then does B matter
(``coefficients="bh1"`` or ``"bh2"``; with "bh2" the order-2 predictor is exactly DPM-Solver++(2M)).
Larger systems are always solved.

UniP-q (predictor, order q) uses the q - 1 previous points (r_j < 0); its K = q - 1 equations leave
a local error O(h^{q+1}). UniC (corrector) adds the model value at the predicted point itself
(r = 1, D = m(y_pred) - m_b): K = q equations, one order more. The corrected point is not evaluated
again: its model value is the one taken at the predicted point, which the next predictor reuses, so
``steps`` network calls cost ``steps`` steps (Zhao et al., Algorithm 2 and Sec. 3.2).

The first step is first order (no history, DDIM's step); the order then rises by one per step up to
``order``, and falls again near the end (order at most the number of steps left, as DPM-Solver's
"lower order final"); the last step, from the last grid time to clean data (s = 0, h = infinity), is
y = m, the denoising step at the (uncorrected) last point, so the sample ends at sigma exactly 0 with
no residual noise (diffusers PRs #5541, #6477 fixed multistep solvers that did not). With ``corrector`` False this
is UniP alone; ``order`` = q is Zhao et al.'s UniPC-q: UniP-q has order q,
UniC raises it to q + 1 (tested: convergence slopes 2 and 3 for q = 2 on a Gaussian's exact map).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from diffusekit.parameterization import Callback, DenoiserFn
from diffusekit.sampling.catalog import default_grid
from diffusekit.sampling.ode import Grid, _check, finish, model_x0, phi, walk
from diffusekit.sde import SDE

__all__ = ["sample_unipc", "phi", "unipc_coefficients", "Coefficients", "COEFFICIENTS"]  # phi: from sampling.ode

Coefficients = Literal["solve", "bh1", "bh2"]
COEFFICIENTS: tuple[str, ...] = ("solve", "bh1", "bh2")
MAX_ORDER = 3


def _b(h: float, coefficients: str) -> float:
    return h if coefficients == "bh1" else -math.expm1(-h)


def unipc_coefficients(rs: Sequence[float], h: float, coefficients: Coefficients = "solve") -> list[float]:
    """The a_j of the UniPC update for points at relative log-SNR offsets ``rs`` (r_j = (l_j - l_b) / h):
    the solution of sum_j a_j r_j^{k-1} = k! h phi_{k+1}(h) / B(h), k = 1..len(rs), or a_1 = 1/2 for
    one point with ``coefficients`` "bh1"/"bh2" (module docstring)."""
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"unknown UniPC coefficients {coefficients!r}; choose one of {COEFFICIENTS}")
    if not rs:
        return []
    if len(rs) == 1 and coefficients != "solve":
        return [0.5]
    b = _b(h, coefficients)
    rhs = torch.tensor([math.factorial(k) * h * phi(k + 1, h) / b for k in range(1, len(rs) + 1)], dtype=torch.float64)
    mat = torch.tensor([[r ** (k - 1) for r in rs] for k in range(1, len(rs) + 1)], dtype=torch.float64)
    return torch.linalg.solve(mat, rhs).tolist()


def _update(y_b: Tensor, m_b: Tensor, ratio: float, h: float, points: list[tuple[float, Tensor]],
            coefficients: Coefficients) -> Tensor:
    """y_t = e^{-h} y_b + (1 - e^{-h}) m_b + B(h) sum_j a_j (m_j - m_b) / r_j for ``points`` (r_j, m_j)."""
    y = m_b + ratio * (y_b - m_b)
    if points:
        a = unipc_coefficients([r for r, _ in points], h, coefficients)
        b = _b(h, coefficients)
        y = y + sum((b * a_j / r) * (m - m_b) for a_j, (r, m) in zip(a, points))
    return y


@torch.no_grad()
def sample_unipc(denoiser: DenoiserFn, sde: SDE, x_T: Tensor, times: Tensor | None = None, *,
                 steps: int | None = None, order: int = 2,
                 coefficients: Coefficients = "solve", corrector: bool = True, grid: Grid = default_grid("unipc"),
                 cond: Any = None,
                 denoise_final: bool = True, callback: Callback | None = None) -> Tensor:
    """UniPC (UniP-``order`` predictor, UniC corrector; data prediction; ``coefficients`` as in
    ``unipc_coefficients``) from the
    prior draw ``x_T`` of ``sde`` at t_max to clean data, ``steps`` network calls on
    ``times`` (or ``time_grid(sde, steps, grid)``). With ``denoise_final`` False the last step is skipped and x at the
    last grid time returned (x = a(t) y, corrected when ``corrector``)."""
    _check(x_T)
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"unknown UniPC coefficients {coefficients!r}; choose one of {COEFFICIENTS}")
    times, sig, y = walk(sde, x_T, times, steps, grid)
    steps = len(times)
    lams = [-math.log(s) for s in sig[:-1]]  # half log-SNR l = -log s at each grid time
    ms: list[Tensor] = []  # model values m_0..m_i (the last `order` are kept)
    q_prev, y_base = 0, y  # order of the predictor step that led to the current point, and its start
    for i in range(steps):
        m = model_x0(denoiser, y, i, times, sig, cond, callback)
        if corrector and i > 0:  # UniC on the step i-1 -> i, with the model value at the predicted y_i
            h = lams[i] - lams[i - 1]
            points = [((lams[i - 1 - j] - lams[i - 1]) / h, ms[-1 - j]) for j in range(1, q_prev)] + [(1.0, m)]
            y = _update(y_base, ms[-1], sig[i] / sig[i - 1], h, points, coefficients)
        ms = (ms + [m])[-order:]
        if i == steps - 1 and not denoise_final:
            break
        if sig[i + 1] == 0.0:  # to clean data: h = infinity, y = m
            y = m
            break
        q = min(order, i + 1, steps - i)
        h = lams[i + 1] - lams[i]
        points = [((lams[i - j] - lams[i]) / h, ms[-1 - j]) for j in range(1, q)]
        y_base = y  # the corrector of the next point restarts from here
        y = _update(y, m, sig[i + 1] / sig[i], h, points, coefficients)
        q_prev = q
    return finish(sde, y, times, denoise_final)
