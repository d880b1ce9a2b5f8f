"""Latent-variable models on the ELBO machinery of the notes: the VAE, the Markov hierarchical VAE
(MHVAE) and the KL-regularised convolutional autoencoder.

One module, ``HierarchicalVAE``, holds all three. With T levels of Gaussian latents (Vidal, "Deep
Generative Models" (Fall 2025), slide "MHVAE Encoder, Decoder, and ELBO"):

    p(x, z_{1:T}) = p(z_T) p(x | z_1) prod_{t=2}^T p(z_{t-1} | z_t),     p(z_T) = N(0, I)
    q(z_{1:T} | x) = q(z_1 | x) prod_{t=2}^T q(z_t | z_{t-1})

and T = 1 is the VAE (Vidal, slide "Recall the Evidence Lower Bound (ELBO)"; Gao, "VAEs and Diffusion
Models" (Stanford CS231n), slides "Variational Autoencoders (VAEs)"). Every
conditional is a diagonal Gaussian whose parameters a network outputs; the decoder p(x | z_1) is
Gaussian (continuous data), Bernoulli (binary data) or a discretized Gaussian over K levels (image
data), see ``DecoderLikelihood``.

The ELBO is evaluated term by term (``HierarchicalVAE.forward``) in the reconstruction + prior
matching + consistency form of Gao's "Variational Diffusion Models" slides (after Luo 2022; Vidal's
"Decomposition of the ELBO for a MHVAE" states the other form, built on q(x_{t-1} | x_t, x_0)):

    -ELBO = -E log p(x | z_1)                                             reconstruction
            + E KL(q(z_T | z_{T-1}) || p(z_T))                            prior matching (z_0 = x)
            + sum_{t=1}^{T-1} E[log q(z_t | z_{t-1}) - log p(z_t | z_{t+1})]   consistency of level t

Why the consistency terms are not KLs. Rearranging log p(x, z)/q(z | x) as above is exact. The
prior-matching term is an analytic KL because z_T appears in no other factor. For t < T, however,
z_{t+1} is drawn from q(. | z_t), so z_t and z_{t+1} are dependent given z_{t-1} and
E[log p(z_t | z_{t+1})] is *not* E_{z_{t-1}, z_{t+1}} E_{z_t ~ q(.|z_{t-1})} log p(z_t | z_{t+1}).
Writing the term as KL(q(z_t | z_{t-1}) || p(z_t | z_{t+1})) at independently sampled z_{t-1},
z_{t+1} (as some tutorials do) changes its expectation: the decomposition would no longer equal the
ELBO (tests/test_vae.py shows the difference). Here the q part is integrated exactly (the negative
entropy of q(z_t | z_{t-1}), which involves z_t alone) and the p part is the single-sample Monte Carlo
estimate -log p(z_t | z_{t+1}) at the sampled chain, an unbiased estimate of the exact term. With a
*fixed linear-Gaussian* encoder (diffusion), q(z_{t-1} | z_t, x) is tractable and the notes' other
decomposition (``diffusekit.likelihood``) turns these terms into analytic KLs.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.gaussian import LOG_2PI, discretized_gaussian_log_likelihood, gaussian_kl, normal_log_prob
from diffusekit.likelihood import sum_flat

__all__ = ["DecoderKind", "DecoderLikelihood", "bernoulli_log_prob", "gaussian_entropy", "reparameterize",
           "split_gaussian", "HierarchicalVAE", "mlp", "ConvEncoder", "ConvDecoder", "build_hierarchical_vae",
           "seeded_normals", "sample"]

DecoderKind = Literal["gaussian", "bernoulli", "discretized"]
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 3.0  # decoder log standard deviation (keeps the density finite)
LOGVAR_MIN, LOGVAR_MAX = -16.0, 8.0  # latent log-variances


# -- small math pieces ------------------------------------------------------------------------------
def reparameterize(mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): the reparameterization trick (Gao, "VAEs and
    Diffusion Models", slides "Variational autoencoders";
    Kingma & Welling 2014, eq. 10), differentiable in (mean, logvar)."""
    return mean + torch.exp(0.5 * logvar) * noise


def gaussian_entropy(logvar: Tensor) -> Tensor:
    """H(N(mean, e^logvar)) = 0.5 (log(2 pi) + 1 + logvar) per element, in nats."""
    return 0.5 * (LOG_2PI + 1.0 + logvar)


def bernoulli_log_prob(x01: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) per element for x in {0, 1}, in nats (stable in logits)."""
    return -F.binary_cross_entropy_with_logits(logits, x01, reduction="none")


def split_gaussian(out: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """A network output (N, 2 * prod(shape)) or (N, 2 C, ...) -> (mean, logvar), each (N, *shape);
    the log-variance is clamped to [-16, 8] so that exp never overflows."""
    params = out.reshape(out.shape[0], 2, *shape)
    return params[:, 0], params[:, 1].clamp(LOGVAR_MIN, LOGVAR_MAX)


class DecoderLikelihood:
    """The decoder p(x | z_1) for data in [-1, 1], from a network output of ``n_params`` per element.

    - ``gaussian``: N(x; mean, e^{2 log_scale}) density (continuous data; nats are densities);
    - ``bernoulli``: data in {-1, 1} read as {0, 1}, p = sigmoid(logit);
    - ``discretized``: N(mean, e^{2 log_scale}) integrated over each of ``levels`` bins in [-1, 1]
      (``gaussian.discretized_gaussian_log_likelihood``, Ho et al. 2020 sec. 3.3): a probability,
      so the ELBO is a bound on -log P(x) of the quantized data, in the same units as diffusion's.
    """

    def __init__(self, kind: DecoderKind, levels: int | None = None):
        if kind not in ("gaussian", "bernoulli", "discretized"):
            raise ValueError(f"unknown decoder {kind!r}; choose gaussian, bernoulli or discretized")
        if kind == "discretized" and (levels is None or levels < 2):
            raise ValueError(f"the discretized decoder needs levels >= 2, got {levels}")
        self.kind, self.levels = kind, levels

    @property
    def n_params(self) -> int:
        return 1 if self.kind == "bernoulli" else 2

    def split(self, out: Tensor, shape: Sequence[int]) -> list[Tensor]:
        params = out.reshape(out.shape[0], self.n_params, *shape)
        if self.kind == "bernoulli":
            return [params[:, 0]]
        return [params[:, 0], params[:, 1].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)]

    def log_prob(self, x: Tensor, params: list[Tensor]) -> Tensor:
        """log p(x | z) per element, in nats."""
        if self.kind == "bernoulli":
            return bernoulli_log_prob((x + 1) / 2, params[0])
        mean, log_scale = params
        if self.kind == "gaussian":
            return normal_log_prob(x, mean, 2 * log_scale)
        return discretized_gaussian_log_likelihood(x, mean, log_scale, self.levels)

    def mean(self, params: list[Tensor]) -> Tensor:
        """E[x | z] (clamped to [-1, 1] for image decoders): the usual picture of a VAE sample."""
        if self.kind == "bernoulli":
            return 2 * torch.sigmoid(params[0]) - 1
        return params[0] if self.kind == "gaussian" else params[0].clamp(-1.0, 1.0)

    def sample(self, params: list[Tensor], noise: Tensor) -> Tensor:
        """A draw x ~ p(x | z) from standard normal ``noise`` of x's shape."""
        if self.kind == "bernoulli":
            u = torch.special.ndtr(noise)  # uniform on (0, 1)
            return torch.where(u < torch.sigmoid(params[0]), 1.0, -1.0).to(noise.dtype)
        mean, log_scale = params
        x = mean + torch.exp(log_scale) * noise
        if self.kind == "gaussian":
            return x
        k = self.levels - 1
        return torch.round((x.clamp(-1.0, 1.0) + 1) * k / 2) / k * 2 - 1


# -- the model --------------------------------------------------------------------------------------
class HierarchicalVAE(nn.Module):
    """VAE (T = 1) and Markov hierarchical VAE (T > 1) with diagonal Gaussian latents of
    ``latent_shape`` at every level.

    ``encoders[0]`` maps x to the parameters of q(z_1 | x), ``encoders[t-1]`` maps z_{t-1} to those of
    q(z_t | z_{t-1}); ``decoders[0]`` maps z_1 to the parameters of p(x | z_1) (``likelihood``) and
    ``decoders[t-1]`` (t >= 2) maps z_t to those of p(z_{t-1} | z_t). Latent parameter outputs are
    (N, 2 * prod(latent_shape)) or (N, 2 C, h, w): [mean, log-variance].
    """

    def __init__(self, encoders: Sequence[nn.Module], decoders: Sequence[nn.Module], likelihood: DecoderLikelihood,
                 data_shape: Sequence[int], latent_shape: Sequence[int]):
        super().__init__()
        if len(encoders) != len(decoders) or not encoders:
            raise ValueError(f"need T >= 1 encoders and as many decoders, got {len(encoders)} and {len(decoders)}")
        self.encoders, self.decoders = nn.ModuleList(encoders), nn.ModuleList(decoders)
        self.likelihood = likelihood
        self.data_shape, self.latent_shape = tuple(data_shape), tuple(latent_shape)

    @property
    def T(self) -> int:
        return len(self.encoders)

    @property
    def data_dims(self) -> int:
        return math.prod(self.data_shape)

    # -- conditionals ----------------------------------------------------------------------------
    def q_params(self, t: int, below: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of q(z_t | z_{t-1}) (t = 1: q(z_1 | x))."""
        return split_gaussian(self.encoders[t - 1](below), self.latent_shape)

    def p_params(self, t: int, above: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of p(z_t | z_{t+1}) for t = 1..T-1."""
        return split_gaussian(self.decoders[t](above), self.latent_shape)

    def decoder_params(self, z1: Tensor) -> list[Tensor]:
        """Parameters of p(x | z_1)."""
        return self.likelihood.split(self.decoders[0](z1), self.data_shape)

    # -- the bound -------------------------------------------------------------------------------
    def forward(self, x: Tensor, generator: torch.Generator | None = None, k: int = 1,
                noise: Tensor | None = None) -> dict[str, Tensor]:
        """The ELBO terms for ``k`` reparameterized chains z_{1:T} ~ q(. | x) per example.

        Noise comes from ``noise`` (T, N k, *latent_shape) if given, else from ``generator`` (drawn on
        the generator's device, then moved to x's). Rows are example-major: row i k + j is chain j of
        example i. Returns per-row values in nats, summed over dimensions:

        - ``reconstruction``: -log p(x | z_1);
        - ``prior``: KL(q(z_T | z_{T-1}) || N(0, I)), analytic;
        - ``consistency``: (N k, T - 1), level t: -H(q(z_t | z_{t-1})) - log p(z_t | z_{t+1});
        - ``neg_elbo``: their sum (a single-chain unbiased estimate of -ELBO);
        - ``log_weight``: log p(x, z_{1:T}) - log q(z_{1:T} | x) at the chain (the direct Monte
          Carlo ELBO integrand; its log-mean-exp over the k chains is the IWAE bound).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > 1:
            x = x.repeat_interleave(k, dim=0)
        n, T = x.shape[0], self.T
        if noise is None:
            noise = torch.randn((T, n) + self.latent_shape, generator=generator,
                                device=generator.device if generator is not None else "cpu")
        noise = noise.to(device=x.device, dtype=x.dtype)
        z, q_stats, log_q = [], [], x.new_zeros(n)
        below = x
        for t in range(1, T + 1):  # bottom-up: q(z_1 | x), q(z_t | z_{t-1})
            mean, logvar = self.q_params(t, below)
            below = reparameterize(mean, logvar, noise[t - 1])
            z.append(below)
            q_stats.append((mean, logvar))
            log_q = log_q + sum_flat(normal_log_prob(below, mean, logvar))
        mean_T, logvar_T = q_stats[-1]
        prior = sum_flat(gaussian_kl(mean_T, logvar_T, torch.zeros_like(mean_T), torch.zeros_like(mean_T)))
        log_p = sum_flat(normal_log_prob(z[-1], torch.zeros_like(z[-1]), torch.zeros_like(z[-1])))
        consistency = []
        for t in range(1, T):  # top-down: p(z_t | z_{t+1})
            p_mean, p_logvar = self.p_params(t, z[t])
            log_p_t = sum_flat(normal_log_prob(z[t - 1], p_mean, p_logvar))
            log_p = log_p + log_p_t
            consistency.append(-sum_flat(gaussian_entropy(q_stats[t - 1][1])) - log_p_t)
        reconstruction = -sum_flat(self.likelihood.log_prob(x, self.decoder_params(z[0])))
        log_p = log_p - reconstruction
        consistency_t = torch.stack(consistency, dim=1) if consistency else x.new_zeros(n, 0)
        return {"reconstruction": reconstruction, "prior": prior, "consistency": consistency_t,
                "neg_elbo": reconstruction + prior + consistency_t.sum(1), "log_weight": log_p - log_q}

    # -- generation and coding -------------------------------------------------------------------
    def generate(self, noise: Tensor, x_noise: Tensor | None = None) -> Tensor:
        """Ancestral samples from p: z_T = noise[T-1], z_{t-1} = mean + std * noise[t-2] down the chain,
        then E[x | z_1] (``x_noise`` None) or a draw of p(x | z_1) from ``x_noise``. ``noise`` is
        (T, N, *latent_shape) standard normal."""
        z = noise[self.T - 1]
        for t in range(self.T - 1, 0, -1):
            mean, logvar = self.p_params(t, z)
            z = reparameterize(mean, logvar, noise[t - 1])
        params = self.decoder_params(z)
        return self.likelihood.mean(params) if x_noise is None else self.likelihood.sample(params, x_noise)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z_1 for x: the mean of q(z_1 | x), or a draw from it with ``generator`` (the latent-diffusion codec)."""
        mean, logvar = self.q_params(1, x)
        if generator is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
        return reparameterize(mean, logvar, eps)

    def decode(self, z1: Tensor) -> Tensor:
        """E[x | z_1] (clamped to [-1, 1] for image decoders)."""
        return self.likelihood.mean(self.decoder_params(z1))

    @torch.no_grad()
    def posterior_means(self, x: Tensor, generator: torch.Generator, n_chains: int = 8) -> list[Tensor]:
        """E[z_t | x] for t = 1..T (the active-units statistic): exact for t = 1 (the encoder mean),
        averaged over ``n_chains`` chains of E[z_t | z_{t-1}] for t >= 2."""
        mean, logvar = self.q_params(1, x)
        out = [mean]
        if self.T == 1:
            return out
        m, lv = mean.repeat_interleave(n_chains, 0), logvar.repeat_interleave(n_chains, 0)
        for t in range(2, self.T + 1):
            eps = torch.randn(m.shape, generator=generator, device=generator.device).to(m)
            m, lv = self.q_params(t, reparameterize(m, lv, eps))
            out.append(m.reshape(x.shape[0], n_chains, *self.latent_shape).mean(1))
        return out


# -- networks ---------------------------------------------------------------------------------------
def mlp(d_in: int, hidden: int, depth: int, d_out: int) -> nn.Sequential:
    """Flatten, then ``depth`` hidden SiLU layers of width ``hidden``, then a linear output."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(d_in, hidden), nn.SiLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)


def _block(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(math.gcd(groups, c_out), c_out), nn.SiLU()]


class ConvEncoder(nn.Sequential):
    """(N, C, H, W) -> (N, 2 latent_channels, H / 4, W / 4): two stride-2 downsamplings
    (28x28 -> 7x7 on MNIST), outputs [mean, log-variance] of the spatial latent."""

    def __init__(self, in_channels: int, latent_channels: int, base: int = 32, groups: int = 8):
        super().__init__(*_block(in_channels, base, groups),
                         nn.Conv2d(base, base, 4, stride=2, padding=1), nn.SiLU(),
                         *_block(base, 2 * base, groups),
                         nn.Conv2d(2 * base, 2 * base, 4, stride=2, padding=1), nn.SiLU(),
                         *_block(2 * base, 2 * base, groups),
                         nn.Conv2d(2 * base, 2 * latent_channels, 1))


class ConvDecoder(nn.Sequential):
    """(N, latent_channels, H / 4, W / 4) -> (N, n_params * C, H, W): the mirror of ``ConvEncoder``."""

    def __init__(self, latent_channels: int, out_channels: int, n_params: int, base: int = 32, groups: int = 8):
        super().__init__(*_block(latent_channels, 2 * base, groups),
                         *_block(2 * base, 2 * base, groups),
                         nn.ConvTranspose2d(2 * base, 2 * base, 4, stride=2, padding=1), nn.SiLU(),
                         *_block(2 * base, base, groups),
                         nn.ConvTranspose2d(base, base, 4, stride=2, padding=1), nn.SiLU(),
                         *_block(base, base, groups),
                         nn.Conv2d(base, n_params * out_channels, 1))


def build_hierarchical_vae(kind: str, data_shape: Sequence[int], likelihood: DecoderLikelihood, *, latent_dim: int,
                           hierarchy: int, hidden: int, depth: int, latent_channels: int = 4, base_channels: int = 32,
                           norm_groups: int = 8) -> HierarchicalVAE:
    """The networks for ``kind``: "vae" (MLP, T = 1), "mhvae" (MLPs, T = ``hierarchy``) or
    "autoencoder" (convolutional, T = 1, spatial latent of ``latent_channels`` x H/4 x W/4)."""
    data_shape = tuple(data_shape)
    d = math.prod(data_shape)
    n_par = likelihood.n_params
    if kind == "autoencoder":
        c, h, w = data_shape
        enc = [ConvEncoder(c, latent_channels, base_channels, norm_groups)]
        dec = [ConvDecoder(latent_channels, c, n_par, base_channels, norm_groups)]
        return HierarchicalVAE(enc, dec, likelihood, data_shape, (latent_channels, h // 4, w // 4))
    T = 1 if kind == "vae" else hierarchy
    enc = [mlp(d if t == 0 else latent_dim, hidden, depth, 2 * latent_dim) for t in range(T)]
    dec = [mlp(latent_dim, hidden, depth, n_par * d if t == 0 else 2 * latent_dim) for t in range(T)]
    return HierarchicalVAE(enc, dec, likelihood, data_shape, (latent_dim,))



# -- seeded sampling --------------------------------------------------------------------------------
def seeded_normals(seeds: Sequence[int], *shapes: Sequence[int]) -> list[Tensor]:
    """For each shape, a (len(seeds), *shape) standard normal tensor whose row i comes from
    ``torch.Generator().manual_seed(seeds[i])`` alone (drawn on the CPU in the order of ``shapes``),
    so sample i depends only on seed i, whatever the batch (EDM's per-image generators, Karras et al.
    2022's ``StackedRandomGenerator``)."""
    rows: list[list[Tensor]] = [[] for _ in shapes]
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        for j, shape in enumerate(shapes):
            rows[j].append(torch.randn(tuple(shape), generator=g))
    return [torch.stack(r) for r in rows]


@torch.no_grad()
def sample(module: HierarchicalVAE, seeds: Sequence[int], decoder_noise: bool = False,
           device: torch.device | str = "cpu", batch_size: int = 500) -> Tensor:
    """Ancestral samples for ``seeds`` (N, *data_shape) on the CPU: E[x | z_1] per seed, or a draw of
    p(x | z_1) when ``decoder_noise``."""
    seeds = [int(s) for s in seeds]
    out = []
    for lo in range(0, len(seeds), batch_size):
        chunk = seeds[lo:lo + batch_size]
        shapes = [(module.T, *module.latent_shape)] + ([module.data_shape] if decoder_noise else [])
        draws = seeded_normals(chunk, *shapes)
        z = draws[0].transpose(0, 1).to(device)
        x_noise = draws[1].to(device) if decoder_noise else None
        out.append(module.generate(z, x_noise).cpu())
    return torch.cat(out)
