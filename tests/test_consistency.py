"""Consistency distillation and multistep consistency sampling (Song et al. 2023): the boundary condition,
exact answers on the oracle, the teacher's ODE step, exact resume, and a student run that samples, loads
and resumes on its own terms."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_checkpoints
from test_cli import assert_one_line_error, run_cli

from diffusekit.config import load_config
from diffusekit.errors import ConfigError
from diffusekit.families import open_run
from diffusekit.families.consistency import (
    ConsistencyDenoiser,
    consistency_scales,
    distance,
    sigma_min_of,
    teacher_step,
)
from diffusekit.io.checkpoint import load_checkpoint
from diffusekit.nn.build import build_network
from diffusekit.oracle import GaussianMixture
from diffusekit.sampling.consistency import sample_consistency
from diffusekit.sampling.generate import generate
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.ode import sample_euler, sample_heun, time_grid
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import make_schedule
from diffusekit.sde import vp_from_schedule
from diffusekit.train.trainer import build_objective, train

F64 = torch.float64
TEACHER = ["data.name=digits", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=20", "train.steps=3",
           "train.batch_size=8", "train.sample_every=0", "train.n_sample=4", "train.log_every=1"]


def _student(teacher, *extra):
    return TEACHER + ["loss.objective=consistency", f"distill.teacher_run={teacher}", "distill.teacher_steps=5",
                      "train.steps=4", "train.checkpoint_every=2", "train.lr=1e-3", "train.warmup_steps=1",
                      "sample.sampler=consistency", "sample.steps=1", *extra]


def _gaussian() -> GaussianMixture:
    mean = torch.tensor([0.7, -0.4], dtype=F64)
    cov = torch.tensor([[0.30, 0.12], [0.12, 0.20]], dtype=F64)
    return GaussianMixture.gaussian(mean, cov)


def _mlp_student(schedule):
    cfg = load_config(None, ["model.kind=mlp", "model.hidden=16", "model.depth=1"])
    torch.manual_seed(0)
    return ConsistencyDenoiser(build_network(cfg.model, (2,)), "eps", sigma_min_of(schedule)).double()


# -- the consistency function -----------------------------------------------------------------------------
@torch.no_grad()
def test_boundary_condition_is_exact_and_large_noise_is_the_denoiser():
    schedule = make_schedule("linear", 1000)
    sde = vp_from_schedule(schedule)
    f = _mlp_student(schedule)
    s_min = sigma_min_of(schedule)
    a, b = consistency_scales(torch.tensor([s_min], dtype=F64), s_min)
    assert float(a) == 1.0 and float(b) == 0.0
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    lam = sde.logsnr(sde.t_min)
    alpha = math.sqrt(torch.sigmoid(lam).item())
    assert torch.equal(f(x, lam).x0, x / alpha)  # f(x, t_min) = x / alpha, whatever the network says
    per_example = f(x, lam.expand(5)).x0
    assert torch.allclose(per_example, x / alpha, rtol=1e-15, atol=0)
    # at the largest noise f is the network's own denoiser up to c_skip ~ 1e-5
    lam_max = sde.logsnr(sde.t_max)
    d = f.inner(x, lam_max).x0
    a, b = consistency_scales(torch.exp(-0.5 * lam_max), s_min)
    assert abs(float(a)) < 1e-4 and abs(float(b) - 1) < 1e-3
    assert torch.allclose(f(x, lam_max).x0, d, atol=1e-3 * float(d.abs().max()) + 1e-4)
    # eps and x0 of the prediction are consistent: x_t = alpha x0 + sigma eps
    p = f(x, sde.logsnr(torch.tensor(0.3, dtype=F64)))
    al, si = float(sde.mean_coef(0.3)), float(sde.std(0.3))
    assert torch.allclose(al * p.x0 + si * p.eps, x, atol=1e-12)


def test_distance_metrics():
    a, b = torch.zeros(3, 64), torch.zeros(3, 64)
    b[1, 0], b[2] = 1.0, 0.5
    c = 0.00054 * 8
    ph = distance(a, b)
    assert ph[0] == 0 and math.isclose(float(ph[1]), math.sqrt(1 + c * c) - c, rel_tol=1e-6)
    assert math.isclose(float(ph[2]), math.sqrt(16 + c * c) - c, rel_tol=1e-6)
    assert torch.allclose(distance(a, b, "l2"), torch.tensor([0.0, 1 / 64, 0.25]))


# -- the sampler on exact answers -------------------------------------------------------------------------
def test_one_step_is_the_posterior_mean_and_more_steps_compose_exactly():
    """With the exact x0 denoiser of a Gaussian N(m, C), step 1 is E[x0 | x_T]; every later step is
    E[x0 | y = x + sigma_k z_k] = m + C (C + sigma_k^2 I)^-1 (y - m) with the stream's own z_k."""
    g, schedule = _gaussian(), make_schedule("linear", 200)
    sde = vp_from_schedule(schedule)
    seeds = [4, 9, 11]
    noise = PerSampleNoise(seeds, (2,), dtype=F64)
    x_T = sde.prior_sample(noise())
    one = sample_consistency(g.denoiser, sde, x_T, noise, torch.tensor([1.0], dtype=F64))
    want = g.x0_mean(x_T, sde.mean_coef(1.0), sde.std(1.0))
    assert torch.allclose(one, want, rtol=0, atol=1e-12)

    times = time_grid(sde, 3, "time_trailing")
    got = sample_consistency(g.denoiser, sde, x_T, _after_x_T(seeds), times)
    m, C = g.mean, g.covariance
    stream = _after_x_T(seeds)
    sig = torch.exp(-0.5 * sde.logsnr(times))
    K = lambda s: C @ torch.linalg.inv(C + s**2 * torch.eye(2, dtype=F64))
    x = m + (x_T / float(sde.mean_coef(times[0])) - m) @ K(sig[0]).T
    for s in sig[1:]:
        x = m + (x + s * stream() - m) @ K(s).T
    assert torch.allclose(got, x, rtol=0, atol=1e-10)


def _after_x_T(seeds):
    """The per-sample stream of ``seeds`` after its first draw (x_T, drawn by the sampler's caller)."""
    stream = PerSampleNoise(seeds, (2,), dtype=F64)
    stream()
    return stream


def test_samples_depend_on_their_seed_only():
    g, schedule = _gaussian(), make_schedule("cosine", 100)
    kw = {"sampler": "consistency", "steps": 3, "seeds": list(range(7))}
    a = generate(g.denoiser, schedule, (2,), SampleSettings(batch_size=7, **kw), progress=False)
    b = generate(g.denoiser, schedule, (2,), SampleSettings(batch_size=2, **kw), progress=False)
    c = generate(g.denoiser, schedule, (2,), SampleSettings(sampler="consistency", steps=3, seeds=[5, 6],
                                                            batch_size=1), progress=False)
    assert torch.equal(a, b) and torch.equal(a[5:], c)
    stats = {}
    generate(g.denoiser, schedule, (2,), SampleSettings(batch_size=7, **kw), progress=False, stats=stats)
    assert stats["nfe"] == 3  # one network call per step


# -- the teacher's step --------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,reference", [("heun", sample_heun), ("ddim", sample_euler)])
def test_teacher_step_is_the_library_ode_step(solver, reference):
    """Per example, between neighbours of a Karras grid (ratios on both sides of 1/2): the step
    ``sample_heun`` / ``sample_euler`` takes with times [t_hi, t_lo] (denoise_final off)."""
    mix = GaussianMixture(torch.tensor([0.4, 0.6], dtype=F64), torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
                          torch.stack([0.1 * torch.eye(2, dtype=F64), 0.2 * torch.eye(2, dtype=F64)]))
    sde = vp_from_schedule(make_schedule("linear", 100))
    t = time_grid(sde, 12, "karras").flip(0)
    sig = torch.exp(-0.5 * sde.logsnr(t))
    n = torch.tensor([0, 2, 4, 6, 8, 10, 10, 0])
    ratio = sig[n] / sig[n + 1]
    assert bool((ratio < 0.5).any()) and bool((ratio >= 0.5).any())
    y = torch.randn(len(n), 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * sig[n + 1, None]
    got = teacher_step(mix.denoiser, y, sig[n + 1], sig[n], solver)
    for i, k in enumerate(n.tolist()):
        times = torch.stack([t[k + 1], t[k]])
        x = reference(mix.denoiser, sde, y[i:i + 1] * float(sde.mean_coef(t[k + 1])), times, denoise_final=False)
        assert torch.allclose(got[i:i + 1], x / float(sde.mean_coef(t[k])), rtol=1e-9, atol=1e-9), (solver, k)


# -- the family, on a tiny teacher run --------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(None, TEACHER), path, progress=False)
    return path


def test_student_starts_as_the_teacher_and_checks_its_model(teacher_run):
    from diffusekit.data.registry import load_dataset

    cfg = load_config(None, _student(teacher_run))
    data = load_dataset(cfg.data, "train")
    obj = build_objective(cfg, data)
    teacher = open_run(teacher_run)
    for k, v in teacher.denoiser.net.state_dict().items():
        assert torch.equal(obj.module.inner.net.state_dict()[k], v), k
    assert obj.module.teacher_identity() == (load_checkpoint(teacher_run)[1]["record_sha256"], teacher.step)
    losses = obj.loss(obj.module, data.x[:6], None, torch.Generator().manual_seed(0))
    assert losses.shape == (6,) and bool(torch.isfinite(losses).all()) and bool((losses >= 0).all())
    with pytest.raises(ConfigError, match="model.base_channels"):
        build_objective(load_config(None, _student(teacher_run, "model.base_channels=16")), data)
    with pytest.raises(ConfigError, match="diffusion.T"):
        build_objective(load_config(None, _student(teacher_run, "diffusion.T=30")), data)
    # dropout is the student's own: the same weights, trained with another regulariser
    dropped = build_objective(load_config(None, _student(teacher_run, "model.dropout=0.2")), data)
    for k, v in teacher.denoiser.net.state_dict().items():
        assert torch.equal(dropped.module.inner.net.state_dict()[k], v), k
    # a student may read the same network in another parameterisation (v: no 1/alpha amplification of the
    # network's error at high noise), and the boundary condition f(x, t_min) = x / alpha holds for it too
    v_obj = build_objective(load_config(None, _student(teacher_run, "model.prediction=v")), data)
    assert v_obj.module.inner.kind == "v"
    for k, v in teacher.denoiser.net.state_dict().items():
        assert torch.equal(v_obj.module.inner.net.state_dict()[k], v), k
    sde = vp_from_schedule(v_obj.schedule)
    lam = sde.logsnr(sde.t_min)
    x = data.x[:3]
    assert torch.equal(v_obj.module(x, lam).x0, x / math.sqrt(torch.sigmoid(lam).item()))


def test_interrupted_and_resumed_student_equals_uninterrupted(teacher_run, tmp_path):
    train(load_config(None, _student(teacher_run, "train.steps=4")), tmp_path / "a", progress=False)
    train(load_config(None, _student(teacher_run, "train.steps=2")), tmp_path / "b", progress=False)
    train(load_config(None, _student(teacher_run, "train.steps=4")), tmp_path / "b", resume=True, progress=False)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 4)


def test_student_samples_without_its_teacher_and_refuses_a_changed_one(teacher_run, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    student = tmp_path / "student"
    args = _flags(_student(teacher, "train.steps=2"))
    code, _, err = run_cli(capsys, "train", *args, "--out", student, "--no-progress")
    assert code == 0, err
    # the teacher moves on (one more step, a new checkpoint): resuming the student against it is refused
    code, _, err = run_cli(capsys, "train", "--resume", "--out", teacher, "--set", "train.steps=4", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--resume", "--out", student, "--set", "train.steps=4", "--no-progress")
    assert_one_line_error(code, err, "distill.teacher_run", "step 4", "step 3")
    # a student loads and samples without its teacher, with its own defaults (consistency, 1 step)
    shutil.rmtree(teacher)
    model = open_run(student)
    assert type(model.denoiser).__name__ == "ConsistencyDenoiser"
    code, _, err = run_cli(capsys, "sample", "--run", student, "--seeds", "0-5", "--out", tmp_path / "s1",
                           "--no-progress")
    assert code == 0, err
    x = np.load(tmp_path / "s1" / "samples.npz")["x"]
    settings = json.loads((tmp_path / "s1" / "settings.json").read_text())
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    assert settings["sampler"] == "consistency" and settings["steps"] == 1
    code, _, err = run_cli(capsys, "sample", "--run", student, "--seeds", "3-5", "--steps", "2", "--batch-size", "1",
                           "--out", tmp_path / "s2", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", "--run", student, "--seeds", "0-5", "--steps", "2", "--out",
                           tmp_path / "s3", "--no-progress")
    assert code == 0, err
    alone, batched = np.load(tmp_path / "s2" / "samples.npz")["x"], np.load(tmp_path / "s3" / "samples.npz")["x"][3:]
    assert np.allclose(alone, batched, rtol=1e-5, atol=1e-5 * np.abs(batched).max())  # up to the network's own
    # batch invariance (the noise is per seed: sampling.noise)
    code, _, err = run_cli(capsys, "evaluate", "--run", student, "--metrics", "bpd", "--no-progress")
    assert_one_line_error(code, err, "--metrics", "likelihood")


def test_mismatched_architecture_is_one_line_naming_the_key(teacher_run, tmp_path, capsys):
    args = _flags(_student(teacher_run, "model.channel_mult=[1,1]"))
    code, _, err = run_cli(capsys, "train", *args, "--out", tmp_path / "s", "--no-progress")
    assert_one_line_error(code, err, "model.channel_mult", "teacher")
    code, _, err = run_cli(capsys, "train", *_flags(_student(tmp_path / "nothing")), "--out", tmp_path / "t",
                           "--no-progress")
    assert_one_line_error(code, err, "distill.teacher_run")


def _flags(pairs):
    return [a for kv in pairs for a in ("--set", kv)]


def test_a_student_record_claiming_another_network_is_refused_before_allocating(teacher_run, tmp_path, monkeypatch):
    """A re-hashed record whose [model] does not fit the stored weights (here a network far larger) is one
    CheckpointError naming the checkpoint and the shapes, found on a weightless copy: the full-size network
    is never built."""
    import diffusekit.families.consistency as consistency
    from diffusekit.errors import CheckpointError
    from diffusekit.io.checkpoint import latest_checkpoint, record_hash

    train(load_config(None, _student(teacher_run, "train.steps=2")), tmp_path / "s", progress=False)
    stem = latest_checkpoint(tmp_path / "s")
    record = json.loads(Path(f"{stem}.json").read_text())
    record["meta"]["config"]["model"]["base_channels"] = 1024  # the largest a config may ask for
    record["record_sha256"] = record_hash(record)
    Path(f"{stem}.json").write_text(json.dumps(record))
    built_on = []
    real_build = consistency.build_network

    def build(*args, **kwargs):
        net = real_build(*args, **kwargs)
        built_on.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(consistency, "build_network", build)
    with pytest.raises(CheckpointError, match=Path(stem).name) as info:
        open_run(tmp_path / "s")
    assert "expected" in str(info.value) and built_on == ["meta"]
