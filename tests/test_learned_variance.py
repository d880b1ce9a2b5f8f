"""Learned reverse variances and the hybrid loss (Nichol & Dhariwal 2021, sec. 3.1) against exact answers."""

import math

import pytest
import torch
from conftest import fake_data
from torch import nn

from diffusekit.cli import main
from diffusekit.config import config_from_dict, load_config
from diffusekit.data.registry import load_dataset
from diffusekit.errors import ConfigError
from diffusekit.families import open_run
from diffusekit.families.base import EvaluateSettings
from diffusekit.families.diffusion import DiffusionObjective
from diffusekit.gaussian import q_sample
from diffusekit.likelihood import _term_noise, nats_to_bits_per_dim, prior_kl, vlb_exact
from diffusekit.losses import diffusion_loss, hybrid_loss, vlb_loss_term
from diffusekit.parameterization import Denoiser
from diffusekit.runs.evaluate import evaluate_run
from diffusekit.schedules import make_schedule

F64 = torch.float64
LEVELS = 17


class Toy(nn.Module):
    """eps_hat = tanh(a x + b c), v = 0.5 + 0.4 sin(d x + e c), c = c_noise: closed forms to redo by hand."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.7, dtype=F64)), nn.Parameter(torch.tensor(0.05, dtype=F64))
        self.d, self.e = nn.Parameter(torch.tensor(1.3, dtype=F64)), nn.Parameter(torch.tensor(-0.2, dtype=F64))

    def forward(self, x, c_noise):
        c = c_noise.reshape(-1, *[1] * (x.ndim - 1))
        return torch.cat([torch.tanh(self.a * x + self.b * c), 0.5 + 0.4 * torch.sin(self.d * x + self.e * c)], 1)


class FixedV(nn.Module):
    """``net``'s output with a constant v beside it."""

    def __init__(self, net, v):
        super().__init__()
        self.net, self.v = net, v

    def forward(self, x, c_noise):
        out = self.net(x, c_noise)
        return torch.cat([out, torch.full_like(out, self.v)], 1)


class Eps(nn.Module):
    def forward(self, x, c_noise):
        return torch.tanh(0.7 * x + 0.05 * c_noise.reshape(-1, *[1] * (x.ndim - 1)))


class Eps2(nn.Module):
    """The eps half of a ``Toy`` (sharing its parameters)."""

    def __init__(self, toy):
        super().__init__()
        self.toy = toy

    def forward(self, x, c_noise):
        return self.toy(x, c_noise)[:, : x.shape[1]]


def _digits_like(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, LEVELS, (n, 1, 2, 2), generator=g).to(F64) / (LEVELS - 1)) * 2 - 1


def test_hybrid_loss_equals_a_hand_computation():
    schedule = make_schedule("linear", 10)
    x0 = _digits_like(4)
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # both open end bins of the decoder
    t = torch.tensor([1, 2, 5, 10])
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    lam = 0.001
    loss = hybrid_loss(Denoiser(Toy(), "eps", learned_variance=True), x0, t, schedule, noise, LEVELS, vlb_weight=lam)

    beta, ab = schedule.betas, schedule.alpha_bar
    expected = []
    for i, ti in enumerate(t.tolist()):
        x, e = x0[i], noise[i]
        xt = math.sqrt(ab[ti]) * x + math.sqrt(1 - ab[ti]) * e
        c = math.log(ab[ti] / (1 - ab[ti]))
        eps_hat = torch.tanh(0.7 * xt + 0.05 * c)
        v = 0.5 + 0.4 * torch.sin(1.3 * xt - 0.2 * c)
        simple = ((eps_hat - e) ** 2).mean()
        x0_hat = (xt - math.sqrt(1 - ab[ti]) * eps_hat) / math.sqrt(ab[ti])

        def posterior_mean(x_start, ti=ti, xt=xt):
            return (math.sqrt(ab[ti - 1]) * beta[ti] * x_start
                    + math.sqrt(1 - beta[ti]) * (1 - ab[ti - 1]) * xt) / (1 - ab[ti])

        tilde_2 = beta[2] * (1 - ab[1]) / (1 - ab[2])
        low = math.log(tilde_2) if ti == 1 else math.log(beta[ti] * (1 - ab[ti - 1]) / (1 - ab[ti]))
        high = math.log(tilde_2) if ti == 1 else math.log(beta[ti])
        logvar = v * high + (1 - v) * low
        if ti == 1:  # -log of the N(x0_hat, e^logvar) mass of x's bin (end bins open)
            s, h = torch.exp(0.5 * logvar), 1 / (LEVELS - 1)
            upper = torch.where(x >= 1, torch.tensor(1.0, dtype=F64), torch.special.ndtr((x + h - x0_hat) / s))
            lower = torch.where(x <= -1, torch.tensor(0.0, dtype=F64), torch.special.ndtr((x - h - x0_hat) / s))
            term = -torch.log(upper - lower).sum()
        else:  # KL(N(mu_q, beta_tilde) || N(mu_p, e^logvar))
            var_q = beta[ti] * (1 - ab[ti - 1]) / (1 - ab[ti])
            diff = posterior_mean(x) - posterior_mean(x0_hat)
            term = 0.5 * (logvar - math.log(var_q) + var_q / torch.exp(logvar) + diff**2 / torch.exp(logvar) - 1).sum()
        expected.append(simple + lam * 10 * term / (4 * math.log(2)))
    torch.testing.assert_close(loss, torch.stack(expected), rtol=1e-10, atol=0)


def test_the_vlb_term_trains_v_only_the_mean_sees_l_simple_alone():
    """The stop-gradient of Nichol & Dhariwal: the mean's parameters get exactly L_simple's gradient."""
    schedule = make_schedule("linear", 10)
    x0 = _digits_like(8, seed=1)
    t = torch.tensor([1, 2, 3, 4, 5, 6, 9, 10])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    toy = Toy()
    hybrid_loss(Denoiser(toy, "eps", learned_variance=True), x0, t, schedule, noise, LEVELS).sum().backward()
    hybrid_grads = [p.grad.clone() for p in (toy.a, toy.b, toy.d, toy.e)]
    plain = Toy()
    diffusion_loss(Denoiser(Eps2(plain), "eps"), x0, t, schedule, noise).sum().backward()
    assert torch.equal(hybrid_grads[0], plain.a.grad) and torch.equal(hybrid_grads[1], plain.b.grad)
    assert hybrid_grads[2].abs() > 0 and hybrid_grads[3].abs() > 0


@pytest.mark.parametrize("v,fixed", [(0.0, "beta_tilde"), (1.0, "beta")])
def test_v_fixed_to_0_or_1_gives_exactly_the_fixed_variance_bounds(v, fixed):
    schedule = make_schedule("linear", 12, beta_start=2e-3, beta_end=0.02)
    x0 = _digits_like(6).float()
    learned = vlb_exact(Denoiser(FixedV(Eps(), v), "eps", learned_variance=True), x0, schedule, LEVELS,
                        variance="learned")
    reference = vlb_exact(Denoiser(Eps(), "eps"), x0, schedule, LEVELS, variance=fixed)
    assert torch.equal(learned.terms, reference.terms) and learned.bits_per_dim == reference.bits_per_dim


def test_learned_variance_bound_needs_the_networks_v():
    with pytest.raises(ValueError, match="model.learned_variance = true"):
        vlb_exact(Denoiser(Eps(), "eps"), _digits_like(2).float(), make_schedule("linear", 5), LEVELS,
                  variance="learned")


TINY_LEARNED = ["--set", "data.name=digits", "--set", "model.base_channels=8", "--set", "model.norm_groups=4",
                "--set", "diffusion.T=20", "--set", "train.steps=4", "--set", "train.batch_size=8",
                "--set", "train.sample_every=0", "--set", "train.n_sample=4", "--set", "train.log_every=1",
                "--set", "model.learned_variance=true", "--set", "model.fourier_features=[3, 4]"]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "run"
    assert main(["train", *TINY_LEARNED, "--out", str(out), "--no-progress"]) == 0
    return out


def test_evaluated_bound_equals_the_training_terms(learned_run):
    """``diffusekit evaluate --metrics bpd --exact`` of a learned-variance run (default variance: learned)
    equals the mean over the test split of L_T plus the hybrid loss's own L_vlb terms at every t."""
    evaluation, _ = evaluate_run(learned_run, EvaluateSettings(metrics=("bpd",), exact=True), progress=False)
    bpd = evaluation.result["bpd"]
    assert evaluation.result["settings"]["variance"] == "learned" and bpd["variance"] == "learned"

    model = open_run(learned_run)
    x0 = load_dataset(model.cfg.data, "test").x
    schedule = model.schedule
    total = prior_kl(x0, schedule)
    with torch.no_grad():
        for t in range(1, schedule.T + 1):
            tt = torch.full((x0.shape[0],), t)
            x_t = q_sample(x0, tt, schedule, _term_noise(0, t, tuple(x0.shape), x0.dtype))
            pred = model.denoiser(x_t, schedule.logsnr[tt], None)
            total = total + vlb_loss_term(pred, x0, x_t, tt, schedule, model.levels).double()
    assert bpd["bits_per_dim"] == pytest.approx(nats_to_bits_per_dim(total.mean().item(), x0[0].numel()), rel=1e-12)


def test_checkpoint_and_config_round_trip(learned_run):
    cfg = load_config(learned_run / "config.toml")
    assert cfg.model.learned_variance and cfg.model.fourier_features == [3, 4] and cfg.loss.vlb_weight == 0.001
    model = open_run(learned_run)
    assert model.denoiser.learned_variance and model.denoiser.net.conv_in.in_channels == 5
    assert model.denoiser.net.conv_out.out_channels == 2
    x = torch.zeros(2, 1, 8, 8)
    pred = model.denoiser(x, torch.tensor(0.0))
    assert pred.eps.shape == x.shape and pred.variance_v.shape == x.shape
    old = config_from_dict({"model": {"kind": "unet"}, "loss": {"weighting": "simple"}})  # a config from before the keys
    assert old.model.fourier_features == [] and not old.model.learned_variance


def test_sampling_a_learned_variance_run_reads_its_prediction(learned_run):
    assert main(["sample", "--run", str(learned_run), "--seeds", "0-1", "--sampler", "ddim", "--steps", "3",
                 "--no-progress"]) == 0


def test_learned_variance_on_a_fixed_variance_run_is_a_one_line_error(digits_run):
    with pytest.raises(ConfigError, match="--variance learned needs a run trained with model.learned_variance") as err:
        evaluate_run(digits_run, EvaluateSettings(metrics=("bpd",), variance="learned", strata=2), progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,key", [
    (["model.learned_variance=true", "loss.objective=continuous", "loss.weighting=elbo"], "model.learned_variance"),
    (["model.learned_variance=true", "model.kind=vae"], "model.learned_variance"),
    (["loss.vlb_weight=-0.1"], "loss.vlb_weight"),
    (["model.learned_variance=1"], "model.learned_variance"),
])
def test_bad_keys_are_one_line_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_learned_variance_needs_discrete_levels():
    cfg = load_config(None, ["data.name=moons", "model.kind=mlp", "model.learned_variance=true"])
    with pytest.raises(ConfigError, match="model.learned_variance = true needs data on discrete levels"):
        DiffusionObjective(cfg, fake_data((2,), levels=None))
