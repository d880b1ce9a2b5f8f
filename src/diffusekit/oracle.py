"""An analytic oracle: Gaussian-mixture data whose diffused marginals are known exactly.

If x_0 ~ sum_k w_k N(mu_k, S_k) and x_t = alpha x_0 + sigma eps, then (for any schedule, any t)

    q_t(x)             = sum_k w_k N(x; alpha mu_k, C_k),        C_k = alpha^2 S_k + sigma^2 I
    grad log q_t(x)    = -sum_k r_k(x) C_k^{-1} (x - alpha mu_k)           (r_k: responsibilities)
    E[eps | x_t = x]   = sum_k r_k(x) sigma C_k^{-1} (x - alpha mu_k)       (optimal eps-model)
    E[x_0 | x_t = x]   = sum_k r_k(x) (mu_k + alpha S_k C_k^{-1} (x - alpha mu_k))  (optimal x0-model)

because (x_0, eps, x_t) are jointly Gaussian within each component. These are the exact answers
that samplers, losses and likelihood bounds are tested against (EDM2's toy example idea). All
arithmetic is float64; inputs of other dtypes are cast and outputs cast back.

``default_mixture(D)`` is the one target most tests use; ``mixture_family()`` is a fixed set of harder
ones (1 to 16 dimensions, unequal weights and widths, separated and overlapping modes, a component of
standard deviation 0.02, a 16-d one with widths over two decades) on which samplers are checked for
robustness at small budgets (tests/test_sampler_robustness.py, ``bench/sampler_accuracy.py --family``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusekit.parameterization import Prediction, from_eps_x0
from diffusekit.schedules import alpha_sigma_from_logsnr

__all__ = ["GaussianMixture", "default_mixture", "mixture_family", "linear_posterior"]

F64 = torch.float64


def _per_example(v: Tensor | float, n: int) -> Tensor:
    v = torch.as_tensor(v, dtype=F64)
    return v.expand(n) if v.ndim == 0 else v.reshape(n)


@dataclass
class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in D dimensions (D = 1 included)."""

    weights: Tensor  # (K,)
    means: Tensor  # (K, D)
    covs: Tensor  # (K, D, D)

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=F64)
        self.means = torch.as_tensor(self.means, dtype=F64)
        self.covs = torch.as_tensor(self.covs, dtype=F64)
        K, D = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, D, D):
            raise ValueError("weights (K,), means (K, D) and covs (K, D, D) must agree")
        if not torch.isclose(self.weights.sum(), torch.tensor(1.0, dtype=F64)) or (self.weights < 0).any():
            raise ValueError("mixture weights must be non-negative and sum to 1")
        torch.linalg.cholesky(self.covs)  # raises if a covariance is not positive definite

    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor) -> "GaussianMixture":
        """A single Gaussian N(mean, cov)."""
        mean = torch.as_tensor(mean, dtype=F64).reshape(1, -1)
        cov = torch.as_tensor(cov, dtype=F64).reshape(1, mean.shape[1], mean.shape[1])
        return cls(torch.ones(1, dtype=F64), mean, cov)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        """E[x_0]."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """Cov[x_0] = sum_k w_k (S_k + mu_k mu_k^T) - mean mean^T."""
        second = torch.einsum("k,kij->ij", self.weights, self.covs + torch.einsum("ki,kj->kij", self.means, self.means))
        return second - torch.outer(self.mean, self.mean)

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x_0, float64 (n, D); randomness only from ``generator``."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=F64, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)

    # -- the diffused marginal ---------------------------------------------------------------
    def _components(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float):
        """Per-example, per-component quantities at noise level (alpha, sigma)."""
        x = x.to(F64).reshape(x.shape[0], self.dim)
        n = x.shape[0]
        a = _per_example(alpha, n)[:, None, None, None]  # (n,1,1,1)
        s = _per_example(sigma, n)[:, None, None, None]
        eye = torch.eye(self.dim, dtype=F64)
        diff = x[:, None, :] - a[..., 0] * self.means[None]  # (n,K,D)
        if n > 1 and torch.all(a == a[0]) and torch.all(s == s[0]):  # one noise level: factor once
            L = torch.linalg.cholesky(a[0, 0] ** 2 * self.covs + s[0, 0] ** 2 * eye)  # (K,D,D)
            Cinv_diff = torch.einsum("kij,nkj->nki", torch.cholesky_inverse(L), diff)
        else:
            L = torch.linalg.cholesky(a**2 * self.covs[None] + s**2 * eye)  # (n,K,D,D)
            Cinv_diff = torch.cholesky_solve(diff[..., None], L)[..., 0]  # (n,K,D)
        maha = (diff * Cinv_diff).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (K,) or (n,K)
        log_comp = torch.log(self.weights)[None] - 0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))
        return log_comp, Cinv_diff, a[..., 0], s[..., 0]

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """log q_t(x) (defaults: the data density itself), float64 (n,)."""
        log_comp, *_ = self._components(x, alpha, sigma)
        return torch.logsumexp(log_comp, dim=1)

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """grad_x log q_t(x), shaped like x."""
        log_comp, Cinv_diff, _, _ = self._components(x, alpha, sigma)
        r = torch.softmax(log_comp, dim=1)[..., None]
        return (-(r * Cinv_diff).sum(1)).reshape(x.shape).to(x.dtype)

    def eps(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """E[eps | x_t = x], the minimiser of the eps-prediction loss, shaped like x."""
        log_comp, Cinv_diff, _, s = self._components(x, alpha, sigma)
        r = torch.softmax(log_comp, dim=1)[..., None]
        return (s[:, 0] * (r * Cinv_diff).sum(1)).reshape(x.shape).to(x.dtype)

    def x0_mean(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """E[x_0 | x_t = x] (the posterior mean, the minimiser of the x0 loss), shaped like x."""
        log_comp, Cinv_diff, a, _ = self._components(x, alpha, sigma)
        r = torch.softmax(log_comp, dim=1)[..., None]
        cond_mean = self.means[None] + a * torch.einsum("kij,nkj->nki", self.covs, Cinv_diff)
        return (r * cond_mean).sum(1).reshape(x.shape).to(x.dtype)

    def denoiser(self, x_t: Tensor, logsnr: Tensor, cond: object = None) -> Prediction:
        """The exact denoiser under the project's calling convention (see parameterization.py)."""
        logsnr = torch.as_tensor(logsnr, dtype=F64).expand(x_t.shape[0])
        alpha, sigma = alpha_sigma_from_logsnr(logsnr)
        eps = self.eps(x_t, alpha, sigma)
        x0 = self.x0_mean(x_t, alpha, sigma)
        return Prediction(eps=eps, x0=x0, raw=eps, kind="eps")

    def target(self, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The optimal network output for a prediction ``kind`` (eps, x0, v or score)."""
        n = x_t.shape[0]
        a = _per_example(alpha, n).reshape((n,) + (1,) * (x_t.ndim - 1)).to(x_t.dtype)
        s = _per_example(sigma, n).reshape((n,) + (1,) * (x_t.ndim - 1)).to(x_t.dtype)
        return from_eps_x0(kind, self.eps(x_t, alpha, sigma), self.x0_mean(x_t, alpha, sigma), a, s)


def linear_posterior(mixture: GaussianMixture, M: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact posterior p(x | M x = y) of x ~ ``mixture``: (weights (K,), means (K, D), covs (K, D, D)).

    Conditioning each jointly Gaussian component on the linear measurement M x = y (M: (m, D) of rank
    m, y: (m,)) gives, with G_k = M S_k M^T and gain K_k = S_k M^T G_k^{-1},

        mean_k = mu_k + K_k (y - M mu_k),    cov_k = S_k - K_k M S_k     (the Schur complement),

    and the components are reweighted by the marginal likelihood of y under each:
    w'_k proportional to w_k N(y; M mu_k, G_k). The covariances are singular (rank D - m: the measured
    directions are fixed), so the result is three tensors, not a ``GaussianMixture``. Float64.
    """
    M = torch.as_tensor(M, dtype=F64)
    y = torch.as_tensor(y, dtype=F64).reshape(-1)
    if M.ndim != 2 or M.shape[1] != mixture.dim or y.shape[0] != M.shape[0]:
        raise ValueError(f"M must be (m, {mixture.dim}) and y (m,), got {tuple(M.shape)} and {tuple(y.shape)}")
    S, mu = mixture.covs, mixture.means
    G = M @ S @ M.T  # (K, m, m)
    gain = S @ M.T @ torch.linalg.inv(G)  # (K, D, m)
    resid = y - mu @ M.T  # (K, m)
    means = mu + torch.einsum("kdm,km->kd", gain, resid)
    covs = S - gain @ M @ S
    log_w = torch.log(mixture.weights) + torch.distributions.MultivariateNormal(mu @ M.T, G).log_prob(y)
    return torch.softmax(log_w, 0), means, 0.5 * (covs + covs.transpose(1, 2))


def default_mixture(dim: int = 2) -> GaussianMixture:
    """A fixed, well-separated 3-component mixture used by tests, toys and benchmarks.

    In 1-D: weights (0.3, 0.5, 0.2), means (-1.5, 0.2, 1.6), standard deviations (0.25, 0.4, 0.15).
    In D > 1: the same weights, means on a fixed line plus an orthogonal offset, and correlated
    covariances, all in roughly [-2, 2] so the data is on the scale of images in [-1, 1].
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    weights = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
    if dim == 1:
        return GaussianMixture(weights, torch.tensor([[-1.5], [0.2], [1.6]], dtype=F64),
                               torch.tensor([0.25, 0.4, 0.15], dtype=F64).pow(2).reshape(3, 1, 1))
    g = torch.Generator().manual_seed(1234)
    direction = torch.randn(dim, generator=g, dtype=F64)
    direction /= direction.norm()
    offset = torch.randn(dim, generator=g, dtype=F64)
    offset -= (offset @ direction) * direction
    offset /= offset.norm()
    means = torch.stack([-1.5 * direction + 0.5 * offset, 0.2 * direction - 0.6 * offset, 1.6 * direction + 0.4 * offset])
    covs = []
    for scale in (0.25, 0.4, 0.15):
        A = torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim)
        covs.append(scale**2 * (0.5 * torch.eye(dim, dtype=F64) + 0.5 * A @ A.T / (1 + (A @ A.T).diagonal().mean())))
    return GaussianMixture(weights, means, torch.stack(covs))


def _rotation(dim: int, g: torch.Generator) -> Tensor:
    """A fixed random orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _isotropic(means: Tensor, stds: list[float], weights: list[float]) -> GaussianMixture:
    dim = means.shape[1]
    covs = torch.stack([s**2 * torch.eye(dim, dtype=F64) for s in stds])
    return GaussianMixture(torch.tensor(weights, dtype=F64), means, covs)


def mixture_family() -> dict[str, GaussianMixture]:
    """A fixed family of Gaussian-mixture targets for robustness checks, name -> mixture (float64, the same
    on every call). Every one has unequal weights and widths; all lie within a norm of about 3.

    - ``"1d-separated"``: three well-separated modes, weights (0.2, 0.5, 0.3), means (-2, 0.3, 2.2),
      standard deviations (0.3, 0.15, 0.5).
    - ``"1d-narrow"``: overlapping modes, one of standard deviation 0.02 inside a broad one: weights
      (0.6, 0.25, 0.15), means (0, 0.4, -0.8), standard deviations (0.6, 0.02, 0.2).
    - ``"2d-default"``: ``default_mixture(2)`` (separated, correlated covariances).
    - ``"2d-overlap"``: four overlapping isotropic modes within a radius of 0.7, weights
      (0.4, 0.3, 0.2, 0.1), standard deviations (0.5, 0.3, 0.2, 0.02).
    - ``"8d-separated"``: five modes at distance 2 from the origin in fixed random directions, weights
      (0.35, 0.25, 0.2, 0.15, 0.05), isotropic standard deviations (0.1, 0.3, 0.05, 0.2, 0.02).
    - ``"16d-anisotropic"``: three modes (means of norm 1.5, weights 0.5, 0.3, 0.2), each with its own
      rotated covariance whose standard deviations are spaced geometrically from 0.01 to 1 (a factor of
      10^4 between the largest and smallest variance).
    """
    g = torch.Generator().manual_seed(2024)
    family = {
        "1d-separated": _isotropic(torch.tensor([[-2.0], [0.3], [2.2]], dtype=F64), [0.3, 0.15, 0.5], [0.2, 0.5, 0.3]),
        "1d-narrow": _isotropic(torch.tensor([[0.0], [0.4], [-0.8]], dtype=F64), [0.6, 0.02, 0.2], [0.6, 0.25, 0.15]),
        "2d-default": default_mixture(2),
        "2d-overlap": _isotropic(torch.tensor([[0.0, 0.0], [0.5, 0.3], [-0.4, 0.5], [0.2, -0.6]], dtype=F64),
                                 [0.5, 0.3, 0.2, 0.02], [0.4, 0.3, 0.2, 0.1]),
    }
    directions = torch.randn(5, 8, generator=g, dtype=F64)
    family["8d-separated"] = _isotropic(2.0 * directions / directions.norm(dim=1, keepdim=True),
                                        [0.1, 0.3, 0.05, 0.2, 0.02], [0.35, 0.25, 0.2, 0.15, 0.05])
    widths = torch.logspace(-2, 0, 16, dtype=F64)
    means = torch.randn(3, 16, generator=g, dtype=F64)
    covs = []
    for _ in range(3):
        rot = _rotation(16, g)
        covs.append(rot @ torch.diag(widths**2) @ rot.T)
    covs_t = torch.stack(covs)
    family["16d-anisotropic"] = GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64),
                                                1.5 * means / means.norm(dim=1, keepdim=True),
                                                0.5 * (covs_t + covs_t.transpose(1, 2)))
    return family
