"""VAE, MHVAE and KL autoencoder: every bound against an exact answer.

- KL and decoder likelihoods against closed forms and numeric integration;
- the ELBO of a linear-Gaussian VAE against its exact marginal likelihood (equal with the exact
  posterior as encoder, below by exactly KL(q || posterior) otherwise); the IWAE bound rises with k
  towards log p(x);
- the MHVAE decomposition (reconstruction + prior matching + consistency terms) equals the direct
  Monte Carlo ELBO in expectation, and the tempting "KL at independently sampled neighbours"
  version does not.
"""

import math

import numpy as np
import pytest
import torch
from conftest import fake_data
from torch import nn

from diffusekit.gaussian import gaussian_kl
from diffusekit.vae.metrics import neg_bound_per_example
from diffusekit.vae.models import (
    DecoderLikelihood,
    HierarchicalVAE,
    bernoulli_log_prob,
    gaussian_entropy,
    reparameterize,
    sample,
    seeded_normals,
)

scipy_integrate = pytest.importorskip("scipy.integrate")
scipy_stats = pytest.importorskip("scipy.stats")


# -- KL and decoder likelihoods ---------------------------------------------------------------------
def test_kl_to_standard_normal_closed_form_and_quadrature():
    mean = torch.tensor([0.0, 1.3, -2.0, 0.4], dtype=torch.float64)
    logvar = torch.tensor([0.0, -1.0, 0.7, -3.0], dtype=torch.float64)
    kl = gaussian_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))
    closed = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
    torch.testing.assert_close(kl, closed, rtol=1e-12, atol=1e-12)
    for m, lv, k in zip(mean.tolist(), logvar.tolist(), kl.tolist()):
        q, p = scipy_stats.norm(m, math.exp(lv / 2)), scipy_stats.norm(0, 1)
        val, _ = scipy_integrate.quad(lambda z: q.pdf(z) * (q.logpdf(z) - p.logpdf(z)), -30, 30, points=[m],
                                      limit=200)
        assert k == pytest.approx(val, rel=1e-7, abs=1e-10)
    assert kl[0] == 0.0


def test_gaussian_entropy_and_reparameterization():
    logvar = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    for lv, h in zip(logvar.tolist(), gaussian_entropy(logvar).tolist()):
        assert h == pytest.approx(scipy_stats.norm(0, math.exp(lv / 2)).entropy(), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(200_000, generator=g, dtype=torch.float64)
    z = reparameterize(torch.tensor(1.5, dtype=torch.float64), torch.tensor(math.log(0.25), dtype=torch.float64), eps)
    assert z.mean().item() == pytest.approx(1.5, abs=4 * 0.5 / math.sqrt(len(z)))
    assert z.std().item() == pytest.approx(0.5, rel=0.01)


def test_decoder_likelihoods_against_scipy():
    x = torch.tensor([-0.9, 0.0, 0.35, 1.7], dtype=torch.float64)
    mean = torch.tensor([-1.0, 0.2, 0.3, 1.0], dtype=torch.float64)
    log_scale = torch.tensor([0.0, -1.0, -2.0, 0.5], dtype=torch.float64)
    got = DecoderLikelihood("gaussian").log_prob(x, [mean, log_scale])
    want = scipy_stats.norm(mean.numpy(), np.exp(log_scale.numpy())).logpdf(x.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # Bernoulli: x in {-1, 1} read as {0, 1}
    logits = torch.tensor([-3.0, 0.0, 2.0, 40.0], dtype=torch.float64)
    xb = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    p = torch.sigmoid(logits)
    want_b = torch.where(xb > 0, p.log(), (1 - p).log())
    torch.testing.assert_close(DecoderLikelihood("bernoulli").log_prob(xb, [logits]), want_b, rtol=1e-10, atol=1e-12)
    assert bernoulli_log_prob(torch.tensor(1.0), torch.tensor(-200.0)).item() == pytest.approx(-200.0)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_decoder_is_a_distribution_over_the_levels(levels):
    """Probabilities over the K values sum to 1; interior bins equal the integral of the density."""
    lik = DecoderLikelihood("discretized", levels)
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    for m, ls in ((0.1, -1.0), (-0.8, -3.5), (0.9, 0.3)):
        mean, log_scale = torch.full_like(grid, m), torch.full_like(grid, ls)
        logp = lik.log_prob(grid, [mean, log_scale])
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        half = 1.0 / (levels - 1)
        dens = scipy_stats.norm(m, math.exp(ls))
        assert logp[-1].exp().item() == pytest.approx(dens.sf(1 - half), rel=1e-9)  # the top bin reaches +inf
        if levels > 2:
            i = levels // 2
            val, _ = scipy_integrate.quad(dens.pdf, grid[i].item() - half, grid[i].item() + half)
            assert logp[i].exp().item() == pytest.approx(val, rel=1e-7, abs=1e-14)


def test_decoder_samples_and_means():
    g = torch.Generator().manual_seed(1)
    lik = DecoderLikelihood("discretized", 17)
    mean, log_scale = torch.full((20000,), 0.3), torch.full((20000,), -2.0)
    x = lik.sample([mean, log_scale], torch.randn(20000, generator=g))
    assert set(np.unique(np.round((x.numpy() + 1) * 8, 6))).issubset(set(range(17)))
    assert x.mean().item() == pytest.approx(0.3, abs=0.01)
    logits = torch.full((20000,), 1.0)
    xb = DecoderLikelihood("bernoulli").sample([logits], torch.randn(20000, generator=g))
    assert ((xb + 1) / 2).mean().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.015)
    assert DecoderLikelihood("bernoulli").mean([torch.zeros(1)]).item() == 0.0
    with pytest.raises(ValueError):
        DecoderLikelihood("discretized")


# -- the linear-Gaussian VAE: exact log p(x) --------------------------------------------------------
D, L, SIGMA = 5, 2, 0.4


def _linear_gaussian():
    """x = W z + b + sigma eps with orthogonal columns of W, so the exact posterior is diagonal:
    p(z | x) = N(M^{-1} W^T (x - b), sigma^2 M^{-1}), M = W^T W + sigma^2 I (diagonal)."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(D, L, generator=g, dtype=torch.float64))
    W = q * torch.tensor([1.5, 0.7], dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64) * 0.3
    M = torch.diag(W.T @ W) + SIGMA**2
    return W, b, M


def _linear_vae(W, b, A, c, post_logvar):
    """Encoder mean A x + c and constant log-variance; decoder N(W z + b, sigma^2 I)."""
    enc = nn.Linear(D, 2 * L, dtype=torch.float64)
    dec = nn.Linear(L, 2 * D, dtype=torch.float64)
    with torch.no_grad():
        enc.weight.zero_(), enc.bias.zero_(), dec.weight.zero_(), dec.bias.zero_()
        enc.weight[:L], enc.bias[:L], enc.bias[L:] = A, c, post_logvar
        dec.weight[:D], dec.bias[:D], dec.bias[D:] = W, b, math.log(SIGMA)
    return HierarchicalVAE([enc], [dec], DecoderLikelihood("gaussian"), (D,), (L,))


def _exact_log_px(x, W, b):
    cov = W @ W.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def _data(n, seed=4):
    W, b, _ = _linear_gaussian()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, L, generator=g, dtype=torch.float64)
    return z @ W.T + b + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)


def test_elbo_with_exact_posterior_equals_log_px_for_every_draw():
    W, b, M = _linear_gaussian()
    vae = _linear_vae(W, b, (W / M).T, -(W / M).T @ b, torch.log(SIGMA**2 / M))
    x = _data(64)
    terms = vae(x, torch.Generator().manual_seed(0), k=3)
    log_px = _exact_log_px(x, W, b).repeat_interleave(3)
    torch.testing.assert_close(terms["log_weight"], log_px, rtol=0, atol=1e-10)  # zero-variance importance weights
    # the analytic-KL estimator is unbiased for the same number
    terms = vae(x, torch.Generator().manual_seed(1), k=2000)
    elbo = -terms["neg_elbo"].reshape(64, 2000).mean(1)
    se = terms["neg_elbo"].reshape(64, 2000).std(1) / math.sqrt(2000)
    assert ((elbo - _exact_log_px(x, W, b)).abs() < 5 * se + 1e-12).all()


def test_elbo_is_log_px_minus_kl_to_the_true_posterior():
    """With a wrong encoder the expected ELBO is log p(x) - KL(q(z|x) || p(z|x)), in closed form."""
    W, b, M = _linear_gaussian()
    A, c = 0.8 * (W / M).T, torch.tensor([0.2, -0.1], dtype=torch.float64)
    logvar_q = torch.log(SIGMA**2 / M) + torch.tensor([0.9, -0.6], dtype=torch.float64)
    vae = _linear_vae(W, b, A, c, logvar_q)
    x = _data(32)
    post_mean, post_logvar = (x - b) @ (W / M), torch.log(SIGMA**2 / M).expand(32, L)
    q_mean = x @ A.T + c
    gap = gaussian_kl(q_mean, logvar_q.expand(32, L), post_mean, post_logvar).sum(1)
    want = _exact_log_px(x, W, b) - gap
    k = 4000
    terms = vae(x, torch.Generator().manual_seed(2), k=k)
    for key in ("neg_elbo", "log_weight"):
        v = terms[key].reshape(32, k) * (1 if key == "log_weight" else -1)
        est, se = v.mean(1), v.std(1) / math.sqrt(k)
        assert ((est - want).abs() < 5 * se).all(), key
    assert (gap > 0.05).all() and (want < _exact_log_px(x, W, b)).all()


@pytest.mark.parametrize("scale,offset,ks,final_gap", [
    (0.7, 0.8, (1, 2, 4, 8, 512), 0.01),  # a wide encoder: the bound reaches log p(x) by k ~ 100
    (0.5, -1.0, (1, 4, 32, 256), None),  # a narrow one: rising, but slowly (importance sampling is hard)
])
def test_iwae_bound_rises_with_k_towards_log_px(scale, offset, ks, final_gap):
    W, b, M = _linear_gaussian()
    vae = _linear_vae(W, b, scale * (W / M).T, torch.zeros(L, dtype=torch.float64), torch.log(SIGMA**2 / M) + offset)
    x = _data(200, seed=5)
    log_px = _exact_log_px(x, W, b).mean().item()
    values = []
    for k in ks:
        terms = vae(x, torch.Generator().manual_seed(k), k=k)
        values.append(-neg_bound_per_example(terms, k).mean().item())
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] < log_px
    gaps = [log_px - v for v in values]
    assert gaps[0] > 1.0, gaps
    if final_gap is not None:
        assert gaps[-1] < final_gap, gaps


# -- the Markov hierarchical VAE: the decomposition -------------------------------------------------
def _linear_mhvae(T=3, d=2, seed=0):
    """A small MHVAE with linear maps (strong enough to make consecutive levels depend on each other)."""
    g = torch.Generator().manual_seed(seed)

    def lin(i, o, scale):
        layer = nn.Linear(i, o, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(o, i, generator=g, dtype=torch.float64) * scale)
            layer.bias.copy_(torch.randn(o, generator=g, dtype=torch.float64) * 0.3)
        return layer

    enc = [lin(D if t == 0 else d, 2 * d, 0.8) for t in range(T)]
    dec = [lin(d, 2 * D if t == 0 else 2 * d, 0.8) for t in range(T)]
    return HierarchicalVAE(enc, dec, DecoderLikelihood("gaussian"), (D,), (d,))


def test_mhvae_decomposition_equals_the_direct_monte_carlo_elbo():
    model = _linear_mhvae()
    x = _data(4)
    k = 50_000
    terms = model(x, torch.Generator().manual_seed(0), k=k)
    total = terms["reconstruction"] + terms["prior"] + terms["consistency"].sum(1)
    torch.testing.assert_close(terms["neg_elbo"], total)
    assert terms["consistency"].shape == (4 * k, 2)
    diff = (terms["neg_elbo"] + terms["log_weight"]).reshape(4, k)  # decomposition - direct, per chain
    se = diff.std(1) / math.sqrt(k)
    assert (diff.mean(1).abs() < 4 * se).all(), (diff.mean(1), se)


def test_kl_between_neighbours_is_not_the_consistency_term():
    """KL(q(z_t|z_{t-1}) || p(z_t|z_{t+1})) at the sampled z_{t-1}, z_{t+1} has a different expectation:
    z_{t+1} depends on z_t. The direct-ELBO test above would catch that form."""
    model = _linear_mhvae()
    x = _data(1)
    k = 50_000
    noise = torch.randn((model.T, k, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    terms = model(x, k=k, noise=noise)
    xs = x.expand(k, D)
    m1, lv1 = model.q_params(1, xs)
    z1 = reparameterize(m1, lv1, noise[0])
    m2, lv2 = model.q_params(2, z1)
    z2 = reparameterize(m2, lv2, noise[1])
    m3, lv3 = model.q_params(3, z2)
    z3 = reparameterize(m3, lv3, noise[2])
    pm, plv = model.p_params(2, z3)
    naive = gaussian_kl(m2, lv2, pm, plv).sum(1)
    exact = terms["consistency"][:, 1]
    diff = naive - exact
    assert abs(diff.mean().item()) > 8 * diff.std().item() / math.sqrt(k)


# -- sampling --------------------------------------------------------------------------------------
def test_samples_depend_only_on_their_seed():
    model = _linear_mhvae().float()
    a = sample(model, [3, 7, 11], decoder_noise=True)
    b = sample(model, [11, 5, 3], decoder_noise=True, batch_size=2)
    torch.testing.assert_close(a[0], b[2])
    torch.testing.assert_close(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    (z,) = seeded_normals([4], (2,))
    torch.testing.assert_close(z[0], torch.randn(2, generator=torch.Generator().manual_seed(4)))


# -- evaluation -------------------------------------------------------------------------------------
def test_bound_in_bits_per_dim_and_active_units_on_the_exact_model():
    from diffusekit.vae.metrics import active_units, bound

    W, b, M = _linear_gaussian()
    A = (W / M).T.clone()
    vae = _linear_vae(W, b, A, -A @ b, torch.log(SIGMA**2 / M))
    x = _data(300, seed=7)
    exact_bpd = -_exact_log_px(x, W, b).mean().item() / (D * math.log(2))
    out = bound(vae, x, iwae_k=3)
    assert out["iwae_bits_per_dim"] == pytest.approx(exact_bpd, abs=1e-9)
    assert abs(out["bits_per_dim"] - exact_bpd) < 4 * out["stderr_bits_per_dim"]
    assert out["latent_bits_per_dim_per_level"][-1] == out["prior_bits_per_dim"] > 0
    assert active_units(vae, x)["active_units"] == [2]
    with torch.no_grad():  # the second latent coordinate ignores x: a collapsed unit
        vae.encoders[0].weight[1] = 0.0
    assert active_units(vae, x)["active_units"] == [1]


def test_reconstruction_quality_is_mse_and_psnr_of_the_mean_code():
    from diffusekit.vae.metrics import reconstruction_quality

    W, b, M = _linear_gaussian()
    A = (W / M).T.clone()
    vae = _linear_vae(W, b, A, -A @ b, torch.log(SIGMA**2 / M))
    x = _data(50)
    x_hat = ((x - b) @ A.T) @ W.T + b
    mse = ((x_hat - x) ** 2).mean().item()
    out = reconstruction_quality(vae, x, batch_size=16)
    assert out["mse"] == pytest.approx(mse, rel=1e-10)
    assert out["psnr_db"] == pytest.approx(10 * math.log10(4 / mse), rel=1e-10)


def test_objective_loss_is_the_bound_per_dimension_and_trains(tmp_path):
    """The trainer's loss is -ELBO / dims through one forward call; a few steps of the real trainer
    lower it, and the MHVAE reports one latent cost per level."""
    from diffusekit.config import load_config
    from diffusekit.train.trainer import build_objective

    cfg = load_config(None, ["model.kind=mhvae", "vae.hierarchy=2", "model.hidden=32", "model.depth=1",
                             "vae.latent_dim=4"])
    obj = build_objective(cfg, fake_data((1, 8, 8)))
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    loss = obj.loss(obj.module, x, None, torch.Generator().manual_seed(0))
    terms = obj.module(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, terms["neg_elbo"] / 64)
    assert terms["consistency"].shape == (6, 1)
    cfg = load_config(None, ["model.kind=vae", "vae.iwae_k=4", "model.hidden=32", "model.depth=1"])
    obj = build_objective(cfg, fake_data((1, 8, 8)))
    assert obj.loss(obj.module, x, None, torch.Generator().manual_seed(0)).shape == (6,)


@pytest.mark.parametrize("overrides,needle", [
    (["model.kind=vae", "data.name=moons", "vae.decoder=discretized"], "vae.decoder"),
    (["model.kind=vae", "vae.decoder=bernoulli"], "vae.decoder"),
    (["model.kind=vae", "model.num_classes=10"], "model.num_classes"),
    (["model.kind=vae", "vae.iwae_k=5", "vae.kl_weight=0.5"], "vae.kl_weight"),
])
def test_config_errors_name_the_key(overrides, needle):
    from diffusekit.config import load_config
    from diffusekit.errors import ConfigError
    from diffusekit.train.trainer import build_objective

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        data = fake_data((1, 8, 8)) if "moons" not in overrides[1] else fake_data((2,), levels=None)
        build_objective(load_config(None, overrides), data)


def test_autoencoder_codec_shapes_and_shape_errors():
    from diffusekit.config import load_config
    from diffusekit.errors import ConfigError
    from diffusekit.families.vae import build_vae

    cfg = load_config(None, ["model.kind=autoencoder", "data.name=mnist", "model.base_channels=8",
                             "model.norm_groups=4"])
    ae = build_vae(cfg, (1, 28, 28), 256)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 4, 7, 7)
    assert ae.decode(z).shape == (3, 1, 28, 28) and ae.decode(z).abs().max() <= 1
    z2 = ae.encode(x, torch.Generator().manual_seed(0))
    assert z2.shape == z.shape and not torch.equal(z, z2)
    with pytest.raises(ConfigError, match="autoencoder"):
        build_vae(cfg, (1, 30, 30), 256)


# -- the command line -------------------------------------------------------------------------------
TINY_VAE = ["--set", "data.name=digits", "--set", "model.hidden=16", "--set", "model.depth=1",
            "--set", "vae.latent_dim=4", "--set", "train.steps=3", "--set", "train.batch_size=8",
            "--set", "train.sample_every=0", "--set", "train.n_sample=4", "--set", "train.log_every=1"]


@pytest.mark.parametrize("kind", ["vae", "mhvae", "autoencoder"])
def test_cli_train_sample_evaluate(capsys, tmp_path, kind):
    import json

    from diffusekit.cli import main

    def cli(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    run = tmp_path / "run"
    extra = ["--set", f"model.kind={kind}", "--set", "vae.hierarchy=2", "--set", "model.base_channels=8",
             "--set", "model.norm_groups=4"]
    code, _, err = cli("train", *TINY_VAE, *extra, "--out", run, "--no-progress")
    assert code == 0, err
    code, _, err = cli("sample", "--run", run, "--seeds", "0-5", "--out", tmp_path / "s1", "--no-progress")
    assert code == 0, err
    data = np.load(tmp_path / "s1" / "samples.npz")
    assert data["x"].shape == (6, 1, 8, 8) and list(data["seeds"]) == list(range(6))
    assert (tmp_path / "s1" / "grid.png").is_file() and (tmp_path / "s1" / "sample_5.png").is_file()
    code, _, err = cli("sample", "--run", run, "--settings", tmp_path / "s1" / "settings.json", "--out",
                       tmp_path / "s2", "--no-progress")
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "s2" / "samples.npz")["x"], data["x"])
    code, _, err = cli("sample", "--run", run, "--sampler", "ddim", "--no-progress")
    assert code == 2 and "--sampler" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("evaluate", "--run", run, "--metrics", "bpd", "--iwae-k", "4", "--json", "--no-progress")
    assert code == 0, err
    b = json.loads(out)["bpd"]
    assert b["levels"] == 17 and b["iwae_k"] == 4 and b["bits_per_dim"] > 0
    assert len(b["latent_bits_per_dim_per_level"]) == (2 if kind == "mhvae" else 1)
    assert (run / "eval" / "report.md").is_file() and (run / "eval" / "reconstructions.png").is_file()
    code, out, err = cli("evaluate", "--run", run, "--metrics", "bpd", "--iwae-k", "2", "--no-progress")
    assert code == 0 and "IWAE bound (k = 2)" in out and "active units" in out


def test_cli_evaluate_quality(capsys, tmp_path, monkeypatch, digits_cache):
    import json

    from diffusekit.cli import main

    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))
    run = tmp_path / "run"
    assert main(["train", *TINY_VAE, "--set", "model.kind=vae", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--metrics", "fd", "--n-samples", "40", "--json", "--no-progress"]) == 0
    q = json.loads(capsys.readouterr().out)["quality"]
    assert q["n_samples"] == 40 and q["fd"] > 0 and q["fd_ratio"] == pytest.approx(q["fd"] / q["fd_train_test"])
    assert (run / "eval" / "samples.png").is_file()


# -- diffusion is an MHVAE with a fixed linear-Gaussian encoder (Vidal, "Deep Generative Models") --------------------------
def test_diffusion_as_an_mhvae_both_decompositions_agree():
    """Encoder q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I) fixed; any Gaussian decoder.
    The MHVAE decomposition of this module and the notes' diffusion decomposition (reconstruction,
    prior matching KL(q(x_T|x_0) || N(0, I)), denoising KLs against q(x_{t-1} | x_t, x_0), computed with
    ``diffusekit.gaussian``) give the same bound."""
    from diffusekit.gaussian import marginal_mean_std, posterior_mean_variance, q_sample
    from diffusekit.schedules import DiscreteSchedule

    T, d = 4, 2
    sch = DiscreteSchedule.from_betas(torch.tensor([0.1, 0.2, 0.3, 0.5], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    enc, dec = [], []
    for t in range(1, T + 1):
        layer = nn.Linear(d, 2 * d, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.zero_(), layer.bias.zero_()
            layer.weight[:d] = torch.eye(d, dtype=torch.float64) * (1 - sch.betas[t]).sqrt()
            layer.bias[d:] = sch.betas[t].log()
        enc.append(layer)
        layer = nn.Linear(d, 2 * d, dtype=torch.float64)  # an arbitrary (untrained) reverse step
        with torch.no_grad():
            layer.weight.copy_(torch.randn(2 * d, d, generator=g, dtype=torch.float64) * 0.5)
            layer.bias.copy_(torch.randn(2 * d, generator=g, dtype=torch.float64) * 0.3 - torch.tensor([0, 0, 1, 1]))
        dec.append(layer)
    model = HierarchicalVAE(enc, dec, DecoderLikelihood("gaussian"), (d,), (d,))
    x0 = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    k = 40_000
    ours = model(x0, torch.Generator().manual_seed(1), k=k)["neg_elbo"]
    # the notes' decomposition, Monte Carlo over x_t ~ q(x_t | x_0), analytic KLs
    xs = x0.expand(k, d)
    gq = torch.Generator().manual_seed(2)
    mean_T, std_T = marginal_mean_std(xs, torch.full((k,), T), sch)
    total = gaussian_kl(mean_T, 2 * std_T.log(), torch.zeros_like(xs), torch.zeros_like(xs)).sum(1)
    x1 = q_sample(xs, torch.ones(k, dtype=torch.long), sch, torch.randn(k, d, generator=gq, dtype=torch.float64))
    total = total - model.likelihood.log_prob(xs, model.decoder_params(x1)).sum(1)
    for t in range(2, T + 1):
        tt = torch.full((k,), t)
        xt = q_sample(xs, tt, sch, torch.randn(k, d, generator=gq, dtype=torch.float64))
        mq, vq, _ = posterior_mean_variance(xs, xt, tt, sch)
        mp, lvp = model.p_params(t - 1, xt)
        total = total + gaussian_kl(mq, vq.log(), mp, lvp).sum(1)
    se = math.sqrt(ours.var().item() / k + total.var().item() / k)
    assert abs(ours.mean().item() - total.mean().item()) < 4 * se, (ours.mean(), total.mean(), se)
    assert total.std() < ours.std()  # analytic KLs: the lower-variance estimator of the same bound
