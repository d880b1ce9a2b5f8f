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
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LossHistory", "estimator_variance", "importance_weights", "proposal"]

F64 = torch.float64


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
