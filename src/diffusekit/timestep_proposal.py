"""Importance sampling of the discrete timestep t (Nichol & Dhariwal 2021, "Improved denoising diffusion
probabilistic models", sec. 3.3), for ``loss.t_sampling = "importance"``.

The training loss is an average over t, L = (1/T) sum_t L_t = E_{t ~ U{1..T}} L_t. Drawing t from a proposal
p instead and weighting the example by 1 / (T p_t) keeps the estimate unbiased,

    E_{t ~ p} [L_t / (T p_t)] = sum_t p_t L_t / (T p_t) = L,

and its variance over t is

    Var_p = sum_t E[L_t^2] / (T^2 p_t) - L^2,

which p_t proportional to sqrt(E[L_t^2]) minimises (Cauchy-Schwarz under the constraint sum_t p_t = 1).
E[L_t^2] is unknown; Nichol & Dhariwal estimate it from the last 10 values of
the per-example loss seen at each t (``LossHistory``), draw t uniformly until every t has them, and mix a
small share of the uniform distribution into the proposal (0.001 in their code) so no p_t is zero.

``proposal`` and ``estimator_variance`` are the two formulas; ``LossHistory`` is the state they read
(tensors, so it lives in the checkpoint and a resumed run draws the same t as one that never stopped).

Continuous time (``loss.objective = "continuous"``, ``BinnedTimeProposal``). There the per-example loss is
L = C + int_0^1 D(t) dt, with C the prior and reconstruction terms (no t in them) and D(t) the diffusion
integrand 1/2 w(lambda) (-lambda'(t)) ||eps - eps_hat||^2 (``continuous.elbo``), estimated by C + D(t) at
t ~ U(0, 1). Drawing t from a density q on [0, 1] and weighting D by 1 / q(t) keeps it unbiased,

    E_{t ~ q} [C + D(t) / q(t)] = C + int_0^1 q(t) D(t) / q(t) dt = L,

and of the estimate's variance Var C + Var_q(D / q) + 2 Cov(C, D / q) only the middle term depends on q
(E_q[C D(t) / q(t)] = int_0^1 E[C D(t)] dt), with E over t, the noise and the data:

    Var_q(D / q) = int_0^1 E[D(t)^2] / q(t) dt - (int_0^1 E[D(t)] dt)^2,

minimised by q proportional to sqrt(E[D(t)^2]) (Cauchy-Schwarz under int q = 1). Take q piecewise constant
over B equal bins, q(t) = B P_b on bin b = [b / B, (b + 1) / B), b = floor(B t): then the bin's share of
the first integral is (1 / B) m_b / (B P_b) with m_b = B int_bin E[D^2] dt = E[D^2 | t in b] (t uniform in
the bin), so

    Var_q = sum_b m_b / (B^2 P_b) - L_D^2,        weight 1 / q(t) = 1 / (B P_b),

the discrete formulas with T -> B and L_t -> D on bin b. So ``proposal``, ``importance_weights`` and
``estimator_variance`` apply unchanged to the bins, P_b proportional to sqrt(m_b) is the best piecewise-
constant density (above the unrestricted optimum only by the spread of sqrt(E[D^2]) within each bin, which
vanishes as B grows), and ``LossHistory`` over the bins estimates m_b from the last values of D seen in each
(t is uniform within its bin under q, so they are draws of D given the bin). Only D is weighted: weighting C
too stays unbiased (int q = 1), but C / q varies with t where C does not, which for C uncorrelated with D
adds E[C^2] (int_0^1 dt / q(t) - 1) >= 0 to the variance (C is 0.18 bits/dim on digits with lambda_max = 7).
The same warm-up (uniform t, drawn exactly as ``loss.t_sampling = "uniform"`` draws it, until every bin has
its history) and the same uniform share u (q >= u everywhere, so every weight is at most 1 / u) carry over.

A learned schedule (``diffusion.learned_schedule``) is refused with this sampler (``config``): t ~ U(0, 1)
pushed through lambda(t) is the density 1 / |lambda'(t)| of lambda, and Kingma et al. (2021, "Variational
Diffusion Models", sec. 5, learning the noise schedule by minimising the variance) train lambda's interior
(end points fixed) to minimise E[L^2] of exactly this estimator: the learned schedule already is the
importance sampler over lambda. On top of q the schedule's gradient (``continuous.module``: 2 L dL/d eta
with the unweighted L) would no longer be that of the weighted estimator's second moment E_q[D^2 / q^2].
With a fixed schedule (linear or cosine in log-SNR) nothing else adapts the density of lambda, and the
binned q does; under ``LinearLogSNR`` uniform t is already Song et al.'s (2021, "Maximum likelihood training
of score-based diffusion models") fixed proposal p(t) proportional to g(t)^2 / sigma(t)^2 = -lambda'(t),
i.e. lambda uniform, which q then refines by E[D^2].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TIME_BINS", "BinnedTimeProposal", "LossHistory", "bin_density", "draw_binned_times", "estimator_variance",
           "importance_weights", "proposal", "time_bins"]

F64 = torch.float64
TIME_BINS = 100  # B, the bins of the continuous proposal: 100 x loss.importance_history losses fill it


def proposal(second_moment: Tensor, uniform_share: float) -> Tensor:
    """p_t = (1 - u) sqrt(m_t) / sum_s sqrt(m_s) + u / T over t = 1..T (entry i is t = i + 1), from the
    second moments m_t = E[L_t^2] of the per-example loss (Nichol & Dhariwal 2021, sec. 3.3, with the uniform
    share u of their code). Uniform when every m_t is zero."""
    root = second_moment.to(F64).clamp_min(0.0).sqrt()
    T = root.numel()
    total = root.sum()
    q = root / total if total > 0 else torch.full_like(root, 1.0 / T)
    return (1.0 - uniform_share) * q + uniform_share / T


def importance_weights(p: Tensor, t: Tensor) -> Tensor:
    """1 / (T p_t) for timesteps ``t`` in 1..T: the weights that keep E_{t~p} of the weighted loss equal to
    the uniform average over t."""
    return 1.0 / (p.numel() * p.to(F64)[t.cpu() - 1])


def estimator_variance(second_moment: Tensor, mean: Tensor, p: Tensor) -> Tensor:
    """Var_{t~p} [L_t / (T p_t)] = sum_t E[L_t^2] / (T^2 p_t) - (mean_t E[L_t])^2: the variance over t of one
    example's importance-weighted loss (the module docstring; p uniform gives plain uniform sampling's)."""
    T = p.numel()
    return (second_moment.to(F64) / (T * T * p.to(F64))).sum() - mean.to(F64).mean() ** 2


class LossHistory:
    """The last ``per_t`` per-example losses seen at each t = 1..T (row t - 1 of ``values``, oldest first,
    ``counts`` of them filled): Nichol & Dhariwal's estimate of E[L_t^2] for the proposal.

    Until every row is full, ``draw`` draws t exactly as ``loss.t_sampling = "uniform"`` does
    (``torch.randint``) with weight 1; after that from ``proposal`` with weights ``importance_weights``."""

    def __init__(self, T: int, per_t: int, uniform_share: float):
        self.uniform_share = uniform_share
        self.values = torch.zeros(T, per_t, dtype=F64)
        self.counts = torch.zeros(T, dtype=torch.int64)

    @property
    def full(self) -> bool:
        return bool((self.counts == self.values.shape[1]).all())

    def second_moment(self) -> Tensor:
        """mean of L_t^2 over the kept values of each t (zero where none is kept yet)."""
        return (self.values ** 2).sum(1) / self.counts.clamp_min(1).to(F64)

    def proposal(self) -> Tensor:
        """p over t = 1..T: uniform until the history is full, then ``proposal`` of its second moments."""
        T = self.values.shape[0]
        if not self.full:
            return torch.full((T,), 1.0 / T, dtype=F64)
        return proposal(self.second_moment(), self.uniform_share)

    def draw(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t in 1..T, weights 1 / (T p_t)) for ``batch`` examples, both shape (batch,)."""
        T = self.values.shape[0]
        if not self.full:
            return torch.randint(1, T + 1, (batch,), generator=generator), torch.ones(batch, dtype=F64)
        p = self.proposal()
        t = torch.multinomial(p, batch, replacement=True, generator=generator) + 1
        return t, importance_weights(p, t)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each example's loss (unweighted, detached) to the history of its t, in batch order,
        dropping the oldest value of a full row."""
        per_t = self.values.shape[1]
        for step, value in zip(t.cpu().tolist(), losses.detach().to("cpu", F64).tolist()):
            row, n = step - 1, int(self.counts[step - 1])
            if n == per_t:
                self.values[row, :-1] = self.values[row, 1:].clone()
                self.values[row, -1] = value
            else:
                self.values[row, n] = value
                self.counts[row] = n + 1

    def state_tensors(self) -> dict[str, Tensor]:
        return {"values": self.values.clone(), "counts": self.counts.clone()}

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        """Restore ``state_tensors``; a missing or misfitting piece is a one-line ValueError naming ``source``."""
        want = {"values": (tuple(self.values.shape), F64), "counts": (tuple(self.counts.shape), torch.int64)}
        for name, (shape, dtype) in want.items():
            got = tensors.get(name)
            if got is None or tuple(got.shape) != shape or got.dtype != dtype:
                found = "missing" if got is None else f"{tuple(got.shape)} {got.dtype}"
                raise ValueError(f"{source}: t history {name} must be {shape} {dtype}, found {found}")
        counts = tensors["counts"]
        if bool((counts < 0).any() or (counts > self.values.shape[1]).any()):
            raise ValueError(f"{source}: t history counts must lie in 0..{self.values.shape[1]}")
        self.values, self.counts = tensors["values"].clone(), counts.clone()



# -- continuous time: a piecewise-constant density over B equal bins of [0, 1] ----------------------
def time_bins(t: Tensor, bins: int) -> Tensor:
    """b = floor(B t) in 0..B-1 (t = 1 in the last bin), int64, for t in [0, 1]."""
    return torch.floor(t.to(F64) * bins).to(torch.int64).clamp(0, bins - 1)


def bin_density(p: Tensor, t: Tensor) -> Tensor:
    """q(t) = B P_b on bin b (``time_bins``): the density on [0, 1] of ``draw_binned_times`` with bin masses p."""
    return p.numel() * p.to(F64)[time_bins(t.cpu(), p.numel())]


def draw_binned_times(p: Tensor, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(t, b) for ``batch`` examples: a bin b with probability p_b, then t uniform in [b / B, (b + 1) / B)
    (float64 and int64, shape (batch,)); t has the density ``bin_density(p, t)``."""
    B = p.numel()
    b = torch.multinomial(p.to(F64), batch, replacement=True, generator=generator)
    u = torch.rand(batch, generator=generator, dtype=F64)
    return (b.to(F64) + u) / B, b


class BinnedTimeProposal:
    """Importance sampling of continuous t in [0, 1] (module docstring, "Continuous time"): a ``LossHistory``
    over ``bins`` equal bins holds the last ``per_bin`` values of the diffusion term D seen in each; its
    ``proposal`` is the bin masses P_b, and t drawn from it is weighted by 1 / q(t) = 1 / (B P_b)."""

    def __init__(self, per_bin: int, uniform_share: float, bins: int = TIME_BINS):
        self.history = LossHistory(bins, per_bin, uniform_share)

    @property
    def bins(self) -> int:
        return self.history.values.shape[0]

    @property
    def full(self) -> bool:
        return self.history.full

    def proposal(self) -> Tensor:
        """P_b over the bins b = 0..B-1: uniform until every bin has its history."""
        return self.history.proposal()

    def density(self, t: Tensor) -> Tensor:
        """q(t) of the current proposal (1 everywhere during the warm-up)."""
        return bin_density(self.proposal(), t)

    def draw(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(t in [0, 1) float64, bins int64, weights 1 / q(t) float64), each shape (batch,). Until the history
        is full, t = ``torch.rand`` exactly as ``continuous.elbo.sample_times(..., "uniform")`` with weight 1."""
        if not self.full:
            t = torch.rand(batch, generator=generator, dtype=F64)
            return t, time_bins(t, self.bins), torch.ones(batch, dtype=F64)
        p = self.proposal()
        t, b = draw_binned_times(p, batch, generator)
        return t, b, importance_weights(p, b + 1)

    def update(self, bins: Tensor, losses: Tensor) -> None:
        """Append each example's unweighted D to the history of its bin (``LossHistory.update``)."""
        self.history.update(bins.cpu() + 1, losses)

    def state_tensors(self) -> dict[str, Tensor]:
        return self.history.state_tensors()

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        self.history.load_state_tensors(tensors, source)
