"""``model.bound_clip``: the reverse mean takes the predicted x0 clipped to [-1, 1] at t >= 2.

Checked against a hand computation of the Gaussian KL in float64, term by term against the unclipped
bound (never looser at t >= 2, equal at t = 1), through the hybrid loss, and through ``evaluate``."""

import json

import pytest
import torch
from conftest import fake_data
from torch import nn

from diffusekit.cli import main
from diffusekit.config import load_config
from diffusekit.errors import ConfigError
from diffusekit.families.base import EvaluateSettings
from diffusekit.families.continuous import ContinuousObjective
from diffusekit.families.diffusion import DiffusionObjective
from diffusekit.gaussian import q_sample
from diffusekit.likelihood import reverse_x0, vlb_exact, vlb_term
from diffusekit.losses import vlb_loss_term
from diffusekit.parameterization import Denoiser
from diffusekit.runs.evaluate import evaluate_run
from diffusekit.schedules import make_schedule

F64 = torch.float64
LEVELS = 17


class ConstantX0(nn.Module):
    """Predicts x0 = ``value`` everywhere (x0-parameterization), a mean far outside the data range."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, c_noise):
        return torch.full_like(x, self.value)


class Overshoot(nn.Module):
    """eps-parameterization whose x0 estimate overshoots: eps_hat = 1.5 tanh(x) (x0 leaves [-1, 1] often)."""

    def forward(self, x, c_noise):
        return 1.5 * torch.tanh(3 * x)


def _grid_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, LEVELS, (n, 1, 3, 3), generator=g).to(F64) / (LEVELS - 1)) * 2 - 1


def test_reverse_x0_clamps_at_t_from_2_and_leaves_the_decoder_alone():
    x0_hat = torch.tensor([[-1.7, 0.3], [1.4, -0.2], [2.0, -3.0]], dtype=F64)
    out = reverse_x0(x0_hat, torch.tensor([1, 2, 5]), clip=True)
    assert torch.equal(out[0], x0_hat[0])
    assert torch.equal(out[1], torch.tensor([1.0, -0.2], dtype=F64))
    assert torch.equal(out[2], torch.tensor([1.0, -1.0], dtype=F64))
    assert reverse_x0(x0_hat, torch.tensor([1, 2, 5]), clip=False) is x0_hat


@pytest.mark.parametrize("t", [2, 3, 9])
def test_clipped_term_equals_the_gaussian_kl_by_hand(t):
    """x0_hat = 1.7 everywhere: clipped to 1, the term is sum_d c0^2 (1 - x0)^2 / (2 beta_tilde_t) with
    c0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t) (equal variances: the KL is its mean part only)."""
    schedule = make_schedule("linear", 10)
    den = Denoiser(ConstantX0(1.7), "x0")
    x0 = _grid_data(6)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    term = vlb_term(den, x0, torch.tensor(t), schedule, noise, LEVELS, "beta_tilde", clip=True)
    abar, beta = schedule.alpha_bar, schedule.betas
    c0 = abar[t - 1].sqrt() * beta[t] / (1 - abar[t])
    beta_tilde = beta[t] * (1 - abar[t - 1]) / (1 - abar[t])
    hand = (c0**2 * (1.0 - x0) ** 2 / (2 * beta_tilde)).flatten(1).sum(1)
    assert torch.allclose(term, hand, rtol=1e-10, atol=1e-12)
    unclipped = vlb_term(den, x0, torch.tensor(t), schedule, noise, LEVELS, "beta_tilde")
    assert torch.allclose(unclipped, (c0**2 * (1.7 - x0) ** 2 / (2 * beta_tilde)).flatten(1).sum(1), rtol=1e-10)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_clipping_never_loosens_a_term_and_leaves_the_decoder_as_it_was(variance):
    schedule = make_schedule("linear", 12)
    den = Denoiser(Overshoot(), "eps")
    x0 = _grid_data(64)
    plain = vlb_exact(den, x0, schedule, LEVELS, variance=variance)
    clipped = vlb_exact(den, x0, schedule, LEVELS, variance=variance, clip=True)
    assert torch.equal(clipped.terms[:, 0], plain.terms[:, 0])  # t = 1: the decoder
    assert (clipped.terms[:, 1:] <= plain.terms[:, 1:] + 1e-12).all()
    assert (clipped.terms[:, 1:] < plain.terms[:, 1:] - 1e-6).any()  # the overshoot is really cut
    assert clipped.bits_per_dim < plain.bits_per_dim


def test_hybrid_losss_vlb_term_uses_the_clipped_mean():
    schedule = make_schedule("linear", 10)
    den = Denoiser(ConstantX0(-2.5), "x0")
    x0 = _grid_data(5)
    t = torch.tensor([1, 2, 3, 7, 10])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    x_t = q_sample(x0, t, schedule, noise)
    pred = den(x_t, schedule.logsnr[t])
    pred.variance_v = torch.zeros_like(x0)  # v = 0: beta_tilde
    train_terms = vlb_loss_term(pred, x0, x_t, t, schedule, LEVELS, clip=True)
    for i in range(5):
        bound = vlb_term(den, x0[i:i + 1], t[i], schedule, noise[i:i + 1], LEVELS, "beta_tilde", clip=True)
        assert train_terms[i].item() == pytest.approx(bound.item(), rel=1e-12)


@pytest.mark.parametrize("overrides", [
    ["model.bound_clip=true", "model.kind=vae"],
    ["model.bound_clip=true", "loss.objective=progressive"],
    ["model.bound_clip=1"],
])
def test_bad_bound_clip_settings_are_one_line_errors(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert "model.bound_clip" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("objective", ["discrete", "continuous"])
def test_bound_clip_needs_discrete_levels(objective):
    cfg = load_config(None, ["data.name=moons", "model.kind=mlp", "model.bound_clip=true",
                             f"loss.objective={objective}", "loss.weighting=elbo"])
    build = DiffusionObjective if objective == "discrete" else ContinuousObjective
    with pytest.raises(ConfigError, match="model.bound_clip = true needs image data on discrete levels"):
        build(cfg, fake_data((2,), levels=None))


def test_evaluate_reads_the_runs_setting_and_the_flag_overrides_it(digits_run, tmp_path, capsys):
    """A run trained without clipping: --bound-clip on gives a bound no looser, recorded in metrics.json."""
    off, _ = evaluate_run(digits_run, EvaluateSettings(metrics=("bpd",), strata=5), progress=False,
                          out_dir=tmp_path / "off")
    assert off.result["settings"]["bound_clip"] is False and off.result["bpd"]["x0_clipped"] is False
    assert main(["evaluate", "--run", str(digits_run), "--metrics", "bpd", "--strata", "5", "--bound-clip", "on",
                 "--variance", "beta_tilde", "--no-progress"]) == 0
    on = json.loads((digits_run / "eval" / "metrics.json").read_text())
    assert on["settings"]["bound_clip"] is True and on["bpd"]["x0_clipped"] is True
    beta_tilde, _ = evaluate_run(digits_run, EvaluateSettings(metrics=("bpd",), strata=5, variance="beta_tilde"),
                                 progress=False, out_dir=tmp_path / "bt")
    assert on["bpd"]["bits_per_dim"] <= beta_tilde.result["bpd"]["bits_per_dim"] + 1e-12
    assert "x0 clipped to [-1, 1]" in capsys.readouterr().out


# -- the continuous objective: the model's x0 is clipped everywhere ------------------------------------------
def test_a_clipping_denoiser_keeps_x_t_equal_to_alpha_x0_plus_sigma_eps():
    den = Denoiser(Overshoot(), "eps", clip_x0=True)
    x_t = torch.linspace(-2.5, 2.5, 50, dtype=F64).reshape(2, 1, 5, 5)
    logsnr = torch.tensor([-1.0, 3.0], dtype=F64)
    p = den(x_t, logsnr)
    alpha, sigma = torch.sigmoid(logsnr).sqrt().reshape(-1, 1, 1, 1), torch.sigmoid(-logsnr).sqrt().reshape(-1, 1, 1, 1)
    assert p.x0.abs().max() <= 1 and (Denoiser(Overshoot(), "eps")(x_t, logsnr).x0.abs() > 1).any()
    torch.testing.assert_close(alpha * p.x0 + sigma * p.eps, x_t, rtol=0, atol=1e-12)
    plain = Denoiser(Overshoot(), "eps")(x_t, logsnr)
    inside = plain.x0.abs() <= 1
    assert torch.equal(p.eps[inside], plain.eps[inside])  # untouched where the clamp does nothing


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_continuous_squared_error_of_the_clipped_model_by_hand(kind):
    """||eps - eps_hat||^2 of the clipped model = e^lambda ||x0 - clamp(x0_hat)||^2 where the clamp moves
    x0_hat, the network's own error elsewhere; and it equals the error of the Prediction's eps."""
    from diffusekit.continuous.elbo import diffuse, eps_sq_error

    den = Denoiser(Overshoot(), kind, clip_x0=True)
    x0 = _grid_data(8)
    logsnr = torch.linspace(-6, 9, 8, dtype=F64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    err = eps_sq_error(den, x0, logsnr, noise)
    z = diffuse(x0, logsnr, noise)
    by_prediction = ((noise - den(z, logsnr).eps) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(err, by_prediction, rtol=1e-9, atol=1e-9)
    plain = eps_sq_error(Denoiser(Overshoot(), kind), x0, logsnr, noise)
    assert (err <= plain + 1e-9).all() and (err < plain - 1e-6).any()


def test_a_continuous_run_with_bound_clip_trains_samples_and_evaluates(tmp_path):
    out = tmp_path / "c"
    assert main(["train", "--set", "data.name=digits", "--set", "model.base_channels=8", "--set", "model.norm_groups=4",
                 "--set", "diffusion.T=20", "--set", "train.steps=2", "--set", "train.batch_size=8",
                 "--set", "train.sample_every=0", "--set", "train.n_sample=4", "--set", "loss.objective=continuous",
                 "--set", "loss.weighting=elbo", "--set", "diffusion.learned_schedule=true",
                 "--set", "model.bound_clip=true", "--out", str(out), "--no-progress"]) == 0
    from diffusekit.families import open_run

    model = open_run(out)
    assert model.denoiser.clip_x0
    evaluation, _ = evaluate_run(out, EvaluateSettings(metrics=("bpd",), strata=5), progress=False)
    assert evaluation.result["bpd"]["x0_clipped"] and evaluation.result["bpd"]["continuous"]["bits_per_dim"] > 0
