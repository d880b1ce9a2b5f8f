"""Progressive distillation (families.progressive): the exact target, the rounds and their grids, the teacher
copy at round boundaries, exact resume, loading and sampling without the teacher, one-line errors.

A tiny teacher (8 base channels, T = 20, 3 steps) is trained once per module; students distil it 4 -> 1
DDIM steps in 3 rounds of 4 optimizer steps.
"""

import shutil

import numpy as np
import pytest
import torch
from conftest import assert_same_checkpoints
from test_cli import TINY, assert_one_line_error, run_cli

from diffusekit.cli import main
from diffusekit.config import load_config, progressive_rounds
from diffusekit.data.registry import load_dataset
from diffusekit.errors import ConfigError
from diffusekit.families import family_for_config, open_run
from diffusekit.families.progressive import (
    ProgressiveObjective,
    distillation_target,
    round_grid,
    round_of_step,
    round_plan,
    teacher_chain,
)
from diffusekit.io.checkpoint import load_checkpoint
from diffusekit.parameterization import Denoiser, Prediction
from diffusekit.sampling.ddim import sample_ddim
from diffusekit.sampling.grids import timestep_grid
from diffusekit.schedules import make_schedule
from diffusekit.train.trainer import Trainer, train

TEACHER_SETS = [a for a in TINY[1::2] if not a.startswith("train.")]  # the teacher's [data] [model] [diffusion]
STUDENT = TEACHER_SETS + [
    "model.prediction=v", "loss.objective=progressive", "distill.teacher_steps=4", "distill.student_steps=1",
    "distill.steps_per_round=4", "train.steps=12", "train.batch_size=8", "train.ema_decay=0.5", "train.lr=1e-3",
    "train.warmup_steps=2", "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=1",
    "train.n_sample=4", "sample.sampler=ddim", "sample.steps=1", "sample.spacing=trailing"]


class SmoothNet(torch.nn.Module):
    """A fixed float64 nonlinear 'network' (x, c_noise) -> like x, for exact-arithmetic tests."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)

    def forward(self, x, c_noise, **cond):
        flat = x.flatten(1)
        out = torch.tanh(flat @ self.w + 0.1 * c_noise[:, None] * self.b) + 0.3 * flat
        return out.reshape(x.shape)


def _ideal_student(net, kind, schedule, substeps, n_student):
    """The denoiser whose x0 is the distillation target of the teacher's ``substeps`` DDIM steps."""
    grid = round_grid(schedule.T, n_student, substeps)

    def denoiser(z, logsnr, cond=None):
        t = int((schedule.logsnr == logsnr.double()).nonzero()[0])
        j = int((grid == t).nonzero()[0])
        times = grid[j:j + substeps + 1].repeat(z.shape[0], 1)
        a_t, s_t = schedule.alpha[t].item(), schedule.sigma[t].item()
        a_s, s_s = schedule.alpha[times[0, -1]].item(), schedule.sigma[times[0, -1]].item()
        z_s = teacher_chain(net, kind, schedule, z, times, None, torch.float64)
        x0 = distillation_target(z, z_s, *(torch.tensor(v, dtype=torch.float64) for v in (a_t, s_t, a_s, s_s)))
        return Prediction(eps=(z - a_t * x0) / s_t, x0=x0, raw=x0, kind="x0")
    return denoiser


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("n_student,substeps", [(4, 2), (1, 2), (3, 1), (8, 2)])
def test_one_student_step_on_the_target_is_two_teacher_steps_exactly(kind, n_student, substeps):
    """DDIM with the target x0 at N steps reproduces the teacher's DDIM at k N steps (float64, 1e-10), the
    last step to t = 0 included; with k = 1 the target is the teacher's own x0."""
    schedule = make_schedule("linear", 1000)
    net = SmoothNet(12)
    x_T = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    teacher = Denoiser(net, kind)
    want = sample_ddim(teacher, schedule, x_T, steps=substeps * n_student, spacing="trailing")
    got = sample_ddim(_ideal_student(net, kind, schedule, substeps, n_student), schedule, x_T, steps=n_student,
                      spacing="trailing")
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()
    assert (want - x_T).abs().max() > 0.1  # not vacuous


def test_rounds_and_nested_grids():
    assert round_plan(64, 4) == [(64, 1), (32, 2), (16, 2), (8, 2), (4, 2)]
    assert round_plan(4, 4) == [(4, 1)]
    with pytest.raises(ValueError):
        round_plan(12, 4)
    cfg = load_config(None, STUDENT)
    assert progressive_rounds(cfg.distill) == len(round_plan(4, 1)) == 3
    assert [round_of_step(s, 4, 3) for s in range(15)] == [0] * 5 + [1] * 4 + [2] * 6  # the last round goes on
    for T in (20, 1000, 1024, 999):
        n = 1
        while 2 * n <= min(T, 512):
            grid = round_grid(T, n, 2)
            assert grid[-1] == 0 and grid[0] == T and torch.all(grid[:-1] > grid[1:])
            assert torch.equal(grid[:-1:2], timestep_grid(T, n, "trailing"))
            n *= 2


@pytest.mark.parametrize("sets,key", [
    (["distill.teacher_steps=12", "distill.student_steps=4"], "distill.teacher_steps"),
    (["distill.teacher_steps=32"], "distill.teacher_steps"),  # > diffusion.T = 20
    (["model.prediction=eps"], "model.prediction"),
    (["train.steps=11"], "train.steps"),
    (["train.ema_decay=0.9"], "train.ema_decay"),
])
def test_config_rules_name_the_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as exc:
        load_config(None, STUDENT + sets)
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pd_teacher") / "run"
    assert main(["train", *TINY, "--out", str(run), "--no-progress"]) == 0
    return run


def _student_cfg(teacher, *extra):
    return load_config(None, STUDENT + [f"distill.teacher_run={teacher}", *extra])


def test_family_and_initial_weights(teacher_run):
    cfg = _student_cfg(teacher_run)
    assert family_for_config(cfg).name == "progressive"
    obj = ProgressiveObjective(cfg, load_dataset(cfg.data, "train"))
    teacher = open_run(teacher_run)
    for name, value in teacher.denoiser.net.state_dict().items():
        assert torch.equal(obj.module.student.state_dict()[name], value)
        assert torch.equal(obj.module.teacher.state_dict()[name], value)
    assert not any(p.requires_grad for p in obj.module.teacher.parameters())
    assert obj.teacher_kind == "eps" and obj.round_kind(1) == "v"


def test_mismatched_architecture_is_one_line_naming_the_key(capsys, tmp_path, teacher_run):
    code, _, err = run_cli(capsys, "train", *[a for s in STUDENT for a in ("--set", s)], "--set",
                           f"distill.teacher_run={teacher_run}", "--set", "model.base_channels=16", "--out",
                           tmp_path / "s", "--no-progress")
    assert_one_line_error(code, err, "model.base_channels", "16", "8")
    code, _, err = run_cli(capsys, "train", *[a for s in STUDENT for a in ("--set", s)], "--set",
                           f"distill.teacher_run={tmp_path / 'nothing'}", "--out", tmp_path / "s2", "--no-progress")
    assert_one_line_error(code, err, "distill.teacher_run")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_teacher_changes_only_at_round_boundaries(tmp_path, teacher_run, grad_accum):
    cfg = _student_cfg(teacher_run, f"train.grad_accum={grad_accum}")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        inner = trainer.net
        teacher0 = {k: v.clone() for k, v in inner.teacher.state_dict().items()}
        previous_student = None
        for step in range(1, 13):
            before = {k: v.clone() for k, v in inner.teacher.state_dict().items()}
            trainer.train_step()
            assert int(inner.step) == trainer.step == step
            assert int(inner.teacher_round) == round_of_step(step, 4, 3)
            after = inner.teacher.state_dict()
            if step in (5, 9):  # the first step of a round: teacher <- the student after the previous step
                assert all(torch.equal(after[k], previous_student[k]) for k in after)
                assert not all(torch.equal(after[k], before[k]) for k in after)
            else:
                assert all(torch.equal(after[k], before[k]) for k in after)
            if step <= 4:
                assert all(torch.equal(after[k], teacher0[k]) for k in after)
            previous_student = {k: v.clone() for k, v in inner.student.state_dict().items()}
    finally:
        trainer.close()


def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, teacher_run, stop=8, grad_accum=2):
    """Stopped after 8 steps (just before round 2's teacher copy) and resumed to 12, with two micro-batches a
    step: every tensor of the final checkpoint (student, teacher, counters, EMA, optimizer, RNGs) equals the
    straight run's."""
    cfg = _student_cfg(teacher_run, f"train.grad_accum={grad_accum}")
    train(cfg, tmp_path / "a", progress=False)
    trainer = Trainer(cfg, tmp_path / "b", progress=False)
    try:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(stop):
            trainer.train_step()
        trainer.save()
    finally:
        trainer.close()
    train(cfg, tmp_path / "b", resume=True, progress=False)
    ta = assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 12)
    assert int(ta["model.teacher_round"]) == 2 and int(ta["model.step"]) == 12


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, teacher_run):
    """A distilled student whose teacher run no longer exists."""
    root = tmp_path_factory.mktemp("pd_student")
    teacher = root / "teacher"
    shutil.copytree(teacher_run, teacher)
    run = root / "student"
    train(_student_cfg(teacher), run, progress=False)
    shutil.rmtree(teacher)
    return run


def test_loads_and_samples_without_the_teacher(student_run):
    model = open_run(student_run)
    assert model.denoiser.kind == "v" and model.schedule.T == 20 and model.step == 12
    tensors, _ = load_checkpoint(student_run)
    for name, value in model.denoiser.net.state_dict().items():  # the student's EMA weights
        assert torch.equal(value, tensors[f"ema.student.{name}"].to(value.dtype))
    raw = open_run(student_run, use_ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.denoiser.net.state_dict().values(),
                                                     model.denoiser.net.state_dict().values()))


def test_sample_cli_on_the_student(capsys, tmp_path, student_run):
    code, out, err = run_cli(capsys, "sample", "--run", student_run, "--seeds", "0-5", "--out", tmp_path / "s1",
                             "--no-progress")
    assert code == 0, err
    x = np.load(tmp_path / "s1" / "samples.npz")["x"]
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    assert "outside what it learned" not in out + err
    # per-seed guarantee: seed 3 alone gives the same sample (to float32 rounding: the U-Net's kernels differ
    # between batch sizes, as in test_sampling.test_seeding_with_the_project_mlp)
    code, _, err = run_cli(capsys, "sample", "--run", student_run, "--seeds", "3", "--out", tmp_path / "s2",
                           "--no-progress")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "s2" / "samples.npz")["x"][0], x[3], rtol=0, atol=1e-5)
    code, out, err = run_cli(capsys, "sample", "--run", student_run, "--seeds", "0-1", "--steps", "4",
                             "--out", tmp_path / "s3", "--no-progress")
    assert code == 0 and "outside what it learned" in out + err
