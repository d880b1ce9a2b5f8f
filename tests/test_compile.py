"""``torch.compile`` (``train.compile``, ``sample.compile``; ``diffusekit.speed``) on the CPU with inductor
(a C++ compiler is needed): compiled training and sampling equal eager within float tolerance, and a
backend that cannot compile falls back to eager with one warning line. A tiny MLP keeps compilation short."""

import warnings

import pytest
import torch

from diffusekit.config import load_config
from diffusekit.families.diffusion import build_schedule
from diffusekit.io.checkpoint import load_checkpoint
from diffusekit.nn.build import build_network
from diffusekit.parameterization import Denoiser
from diffusekit.sampling.generate import generate
from diffusekit.sampling.settings import SampleSettings
from diffusekit.speed import CompiledOrEager, compiled_denoiser
from diffusekit.train.trainer import train

TOY = ["data.name=moons", "data.n_train=256", "data.n_test=64", "model.kind=mlp", "model.hidden=32", "model.depth=2",
       "diffusion.T=40", "train.batch_size=32", "train.log_every=1", "train.sample_every=0", "train.steps=4",
       "train.warmup_steps=2", "train.n_sample=8"]


def _no_backend(graph, example_inputs):
    raise RuntimeError("no compiler on this machine")


def _denoiser() -> Denoiser:
    torch.manual_seed(0)
    net = build_network(load_config(None, TOY).model, (2,))
    for p in net.parameters():  # the output layer starts at zero; random weights make the outputs differ
        torch.nn.init.normal_(p, std=0.3)
    return Denoiser(net, "eps").eval()


@pytest.mark.slow  # inductor compiles C++ (about 20 s each on one quiet core)
def test_compiled_training_equals_eager_within_tolerance(tmp_path):
    train(load_config(None, TOY), tmp_path / "eager", progress=False)
    train(load_config(None, TOY + ["train.compile=true"]), tmp_path / "compiled", progress=False)
    (ta, _), (tb, _) = load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "compiled")
    for k in ta:
        if ta[k].dtype.is_floating_point and not k.startswith("rng."):
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(ta[k], tb[k]), k  # the same data, noise and steps


@pytest.mark.slow  # inductor compiles C++ (about 20 s each on one quiet core)
def test_compiled_sampling_equals_eager_within_tolerance():
    den = _denoiser()
    schedule = build_schedule(load_config(None, TOY).diffusion)
    settings = SampleSettings(sampler="ddim", steps=8, seeds=list(range(16)), batch_size=16)
    with torch.no_grad():
        eager = generate(den, schedule, (2,), settings, progress=False)
        compiled = generate(den, schedule, (2,), settings.replace(compile=True), progress=False)
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_a_backend_that_cannot_compile_falls_back_to_eager_with_one_warning_line():
    den = _denoiser()
    x, logsnr = torch.randn(5, 2), torch.tensor(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = compiled_denoiser(den, backend=_no_backend)
        with torch.no_grad():
            first, second = fallback(x, logsnr).x0, fallback(x, logsnr).x0
            expected = den(x, logsnr).x0
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "sample.compile = true" in messages[0] and "no compiler on this machine" in messages[0]
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_training_runs_eagerly_where_torch_compile_is_missing(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    train(load_config(None, TOY), tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", missing)
    with pytest.warns(RuntimeWarning, match="train.compile = true: torch.compile is unavailable here"):
        train(load_config(None, TOY + ["train.compile=true"]), tmp_path / "fallback", progress=False)
    (ta, _), (tb, _) = load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "fallback")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # eager is eager: bit for bit


def test_compiled_callable_forwards_attributes():
    den = _denoiser()
    wrapped = CompiledOrEager(den, "train.compile", backend=_no_backend)
    assert wrapped.kind == "eps" and wrapped.net is den.net
