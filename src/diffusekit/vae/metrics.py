"""The numbers of a trained latent-variable model (VAE, MHVAE, autoencoder), in the units used for diffusion.

- ``bound``: the negative ELBO on held-out data in bits/dim (a bound on -log P(x) of the quantized
  data, the quantity ``diffusekit evaluate`` reports for diffusion), its terms (reconstruction, prior
  matching, per-level consistency) and the tighter IWAE bound with k samples (``neg_bound_per_example``);
- ``active_units``: posterior-collapse diagnostics: the active units of each level, the coordinates u
  with Cov_x(E[z_u | x]) > 0.01 (Burda et al. 2016, sec. 5.2);
- ``reconstruction_quality``: MSE and PSNR of E[x | z = E[z | x]] (the codec of latent diffusion).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusekit.likelihood import nats_to_bits_per_dim
from diffusekit.vae.models import HierarchicalVAE

__all__ = ["neg_bound_per_example", "bound", "active_units", "reconstruction_quality", "ACTIVE_THRESHOLD"]

ACTIVE_THRESHOLD = 0.01


def neg_bound_per_example(terms: dict[str, Tensor], k: int, kl_weight: float = 1.0) -> Tensor:
    """-ELBO (k = 1; reconstruction + kl_weight * latent terms) or -IWAE_k per example, in nats, from
    the output of ``HierarchicalVAE.forward(x, ..., k)``. IWAE_k = E log (1/k) sum_j w_j with
    log w_j = ``log_weight`` of chain j (Burda et al. 2016, eq. 8)."""
    if k == 1:
        return terms["reconstruction"] + kl_weight * (terms["prior"] + terms["consistency"].sum(1))
    log_w = terms["log_weight"].reshape(-1, k)
    return -(torch.logsumexp(log_w, dim=1) - math.log(k))


def _chunks(n: int, rows_per_example: int, max_rows: int = 1024) -> list[slice]:
    size = max(1, max_rows // rows_per_example)
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


@torch.no_grad()
def bound(module: HierarchicalVAE, x: Tensor, iwae_k: int = 100, seed: int = 0) -> dict[str, Any]:
    """The ELBO and IWAE_k bounds on ``x`` per dimension: nats/dim, and bits/dim (for discrete data
    these bound -log P(x) of the quantized values).

    The ELBO uses one chain per example (analytic prior KL, Monte Carlo elsewhere) with its standard
    error over examples; its terms are averaged over examples. IWAE_k (Burda et al. 2016) uses k
    fresh chains per example and is at least as tight in expectation.
    """
    module.eval()
    g = torch.Generator().manual_seed(seed)
    dims = math.prod(x.shape[1:])
    rec, pri, con, neg, iw = [], [], [], [], []
    for sl in _chunks(x.shape[0], 1):
        t = module(x[sl], g, 1)
        rec.append(t["reconstruction"]), pri.append(t["prior"]), con.append(t["consistency"]), neg.append(t["neg_elbo"])
    for sl in _chunks(x.shape[0], iwae_k):
        iw.append(neg_bound_per_example(module(x[sl], g, iwae_k), iwae_k))
    rec, pri, con, neg, iw = (torch.cat(v).double() for v in (rec, pri, con, neg, iw))
    bpd = lambda nats: float(nats_to_bits_per_dim(nats, dims))
    per_level = [bpd(c) for c in con.mean(0).tolist()] + [bpd(pri.mean().item())]
    return {"bits_per_dim": bpd(neg.mean().item()), "stderr_bits_per_dim": bpd(neg.std().item() / math.sqrt(len(neg))),
            "iwae_bits_per_dim": bpd(iw.mean().item()), "iwae_k": iwae_k,
            "nats_per_dim": neg.mean().item() / dims, "n_examples": x.shape[0],
            "reconstruction_bits_per_dim": bpd(rec.mean().item()),
            "prior_bits_per_dim": per_level[-1],
            "latent_bits_per_dim_per_level": per_level}


@torch.no_grad()
def active_units(module: HierarchicalVAE, x: Tensor, seed: int = 0, threshold: float = ACTIVE_THRESHOLD,
                 n_chains: int = 8) -> dict[str, Any]:
    """Per level t: the number of latent coordinates u with Cov_x(E[z_{t,u} | x]) > ``threshold``
    (inactive units carry no information about x: posterior collapse), out of prod(latent_shape)."""
    module.eval()
    g = torch.Generator().manual_seed(seed)
    means = [[] for _ in range(module.T)]
    for sl in _chunks(x.shape[0], n_chains):
        for level, m in enumerate(module.posterior_means(x[sl], g, n_chains)):
            means[level].append(m.reshape(m.shape[0], -1).double())
    variances = [torch.cat(m).var(0) for m in means]
    return {"active_units": [int((v > threshold).sum()) for v in variances],
            "latent_units": math.prod(module.latent_shape), "threshold": threshold}


@torch.no_grad()
def reconstruction_quality(module: HierarchicalVAE, x: Tensor, batch_size: int = 256) -> dict[str, float]:
    """MSE of x_hat = E[x | z_1 = E[z_1 | x]] (data in [-1, 1]) and PSNR = 10 log10(2^2 / MSE) dB,
    the peak-to-peak range of the data being 2 (the same as 10 log10(1 / MSE) for images in [0, 1])."""
    module.eval()
    err = torch.cat([((module.decode(module.encode(x[lo:lo + batch_size])) - x[lo:lo + batch_size]) ** 2)
                     .reshape(min(batch_size, x.shape[0] - lo), -1).mean(1).double()
                     for lo in range(0, x.shape[0], batch_size)])
    mse = err.mean().item()
    psnr_each = 10 * torch.log10(4.0 / err.clamp_min(1e-12))
    return {"mse": mse, "psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)), "psnr_db_mean_per_image": psnr_each.mean().item()}
