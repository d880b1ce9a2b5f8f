"""Progressive distillation (``loss.objective = "progressive"``): a v-prediction student learns to take one
DDIM step where its teacher takes two, and each round halves the steps (Salimans & Ho 2022, "Progressive
distillation for fast sampling of diffusion models", Algorithm 2).

The teacher is the EMA network of ``distill.teacher_run`` (a discrete-time unet or mlp run, or another
progressive run); the student repeats its ``[model]`` and ``[diffusion]`` (checked when training starts)
with ``model.prediction = "v"`` and starts from its weights.

**Rounds.** Round 0 takes N_0 = ``distill.teacher_steps`` student steps and the teacher one DDIM step per
student step: it only turns the teacher's parameterization into v at the same DDIM grid. The weights start
as an eps-network; read as v they are wrong at every noise level, and eps itself cannot be the student's
output at 1-4 steps (x0 = (x - sigma eps) / alpha multiplies the network's error by sigma / alpha, about
160 at t = T of the linear schedule; Salimans & Ho 2022, sec. 4). Separating the change of output from the
first halving keeps each round a small step from a teacher it can match. Round r >= 1 takes
N_r = N_0 / 2^r steps with the previous round's student as teacher, two of its DDIM steps per student
step, until N = ``distill.student_steps``. Round r covers optimizer steps r S + 1 .. (r + 1) S
(S = ``distill.steps_per_round``); the last round takes every step after that.

**Grids.** Round r runs on ``timestep_grid(T, N_r, "trailing")`` and its teacher on the grid of k N_r
points (k = 1 in round 0, else 2), followed by t = 0, as DDIM's respaced schedule ends
(``schedules.respace``). Trailing grids of T and 2N nest: t_i(N) = round(T - i T / N) = t_{2i}(2N), so the
student's point i is the teacher's point 2i (checked for every round when training starts).

**The target** (Salimans & Ho 2022, Algorithm 2, written for the discrete table). With
alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), one deterministic DDIM step (Song et al. 2021,
eq. 12, eta = 0) from t to s for a prediction x0_hat is

    z_s = alpha_s x0_hat + sigma_s eps_hat,   eps_hat = (z_t - alpha_t x0_hat) / sigma_t
        = (sigma_s / sigma_t) z_t + (alpha_s - (sigma_s / sigma_t) alpha_t) x0_hat.

The teacher's k steps take z_t through t' to t'' = s and give z_s; the student's single step lands on the
same z_s exactly when its x0_hat equals

    x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t).

The denominator is sigma_s (alpha_s / sigma_s - alpha_t / sigma_t) > 0 because SNR falls with t; at the last
step s = 0 (alpha = 1, sigma = 0) it reads x_tilde = z_0, the teacher's final sample. With k = 1 it is the
teacher's own x0 prediction. The loss is the x0 error with the truncated SNR weight of Salimans & Ho
(2022, sec. 4), per example: max(SNR_t, 1) mean_dims (x0_hat - x_tilde)^2. The teacher's steps and the
target are computed in float64 (the networks run in the data's dtype).

**State.** The trained module (``ProgressiveModule``) holds the student, a frozen copy of the round's
teacher (parameters with requires_grad False, like ControlNet's base) and two counters as buffers: ``step``
(optimizer steps begun) and ``teacher_round``. A loss call with gradients on and no gradient yet on the
student begins an optimizer step (the trainer zeroes gradients to None before each step; the later
micro-batches of ``train.grad_accum`` find gradients and count nothing; the trainer's memory check runs
without gradients). When that step opens a new round the teacher becomes an exact copy of the student's
current weights (Algorithm 2: eta <- theta). Both counters and the teacher are in every checkpoint, so a
resumed run repeats the same copies at the same steps. The EMA averages the student as any run's (the
teacher's average is never read); ``train.ema_decay`` must leave a window 1 / (1 - decay) at most half a
round, or the student's average at the end of a round would mix in the previous round's weights.

**Loading** needs only the student's checkpoint: ``load`` returns a ``DiffusionModel`` (the student's EMA
network as a v-prediction denoiser, the teacher's schedule), sampled and evaluated like any diffusion run.
It was trained for DDIM (eta = 0) at ``distill.student_steps`` steps on the trailing grid, which its
``[sample]`` section should say; sampling it otherwise works but is noted as untrained settings.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import ConfigError
from diffusekit.families import diffusion
from diffusekit.families.base import SampleRequest, Samples, check_student_architecture, load_run_dependency
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.likelihood import mean_flat
from diffusekit.nn.build import build_network
from diffusekit.parameterization import Denoiser, append_dims, to_eps_x0, v_to_x0
from diffusekit.sampling.generate import generate
from diffusekit.sampling.grids import timestep_grid
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule

__all__ = [
    "ProgressiveModule",
    "ProgressiveObjective",
    "ddim_step",
    "distillation_target",
    "load",
    "round_grid",
    "round_of_step",
    "round_plan",
    "sample",
]

TEACHER_KINDS = ("discrete", "progressive")  # the loss.objective of runs a teacher may come from


def round_plan(teacher_steps: int, student_steps: int) -> list[tuple[int, int]]:
    """(student steps N_r, teacher DDIM steps per student step k_r) of each round: (N_0, 1), then
    (N_0 / 2^r, 2) down to ``student_steps`` (see the module docstring)."""
    plan, n = [(teacher_steps, 1)], teacher_steps
    while n > student_steps and n % 2 == 0:
        n //= 2
        plan.append((n, 2))
    if n != student_steps:
        raise ValueError(f"teacher_steps = {teacher_steps} is not student_steps = {student_steps} times a power of 2")
    return plan


def round_of_step(step: int, steps_per_round: int, rounds: int) -> int:
    """The round of optimizer step ``step`` (1-based; 0, before training, is round 0)."""
    return min(max(step - 1, 0) // steps_per_round, rounds - 1)


def round_grid(T: int, student_steps: int, substeps: int) -> Tensor:
    """The teacher's grid of a round: ``timestep_grid(T, substeps * student_steps, "trailing")`` then t = 0
    (int64, descending, length substeps * student_steps + 1); the student's point i is entry substeps * i.
    Raises ConfigError when the student's own trailing grid is not every ``substeps``-th point."""
    grid = torch.cat([timestep_grid(T, substeps * student_steps, "trailing"), torch.zeros(1, dtype=torch.int64)])
    if not torch.equal(grid[:-1:substeps], timestep_grid(T, student_steps, "trailing")):
        raise ConfigError(f"distill.teacher_steps: the trailing grids of {student_steps} and "
                          f"{substeps * student_steps} steps of diffusion.T = {T} do not nest")
    return grid


def ddim_step(x0: Tensor, eps: Tensor, alpha_s: Tensor | float, sigma_s: Tensor | float) -> Tensor:
    """One deterministic DDIM step to time s: z_s = alpha_s x0 + sigma_s eps (Song et al. 2021, eq. 12)."""
    return alpha_s * x0 + sigma_s * eps


def distillation_target(z_t: Tensor, z_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
                        sigma_s: Tensor) -> Tensor:
    """x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t): the x0 whose one
    DDIM step from z_t lands on the teacher's z_s (Salimans & Ho 2022, Algorithm 2)."""
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


class ProgressiveModule(nn.Module):
    """The trained module: ``student`` (trained; its forward is this module's), ``teacher`` (frozen, always
    in eval mode) and the buffers ``step`` and ``teacher_round`` (see the module docstring)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("teacher_round", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor, c_noise: Tensor, **cond) -> Tensor:
        return self.student(x, c_noise, **cond)

    def train(self, mode: bool = True) -> ProgressiveModule:
        super().train(mode)
        self.teacher.eval()  # no dropout in the teacher's targets
        return self


def _scales(schedule: DiscreteSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of the float64 table at per-example t, shaped to broadcast against ``like``."""
    return (append_dims(schedule.alpha[t].to(like.device), like.ndim),
            append_dims(schedule.sigma[t].to(like.device), like.ndim))


def teacher_chain(net: nn.Module, kind: str, schedule: DiscreteSchedule, z_t: Tensor, times: Tensor,
                  cond: dict | None, dtype: torch.dtype) -> Tensor:
    """The teacher's DDIM steps through ``times`` (B, k + 1) per example from z_t (float64 in and out; the
    network runs in ``dtype``)."""
    z = z_t
    for j in range(times.shape[1] - 1):
        t, s = times[:, j], times[:, j + 1]
        alpha_t, sigma_t = _scales(schedule, t, z)
        raw = net(z.to(dtype), schedule.logsnr[t].to(z.device, dtype), **(cond or {})).double()
        eps, x0 = to_eps_x0(kind, raw, z, alpha_t, sigma_t)
        z = ddim_step(x0, eps, *_scales(schedule, s, z))
    return z


class ProgressiveObjective:
    """The trainer's objective: the distillation loss of the current round (see the module docstring)."""

    def __init__(self, cfg: Config, data: ArrayDataset):
        diffusion.check_class_labels(cfg, data)
        ds = cfg.distill
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        with torch.random.fork_rng(devices=[]):  # loading the teacher leaves the caller's RNG alone
            teacher = load_run_dependency(ds.teacher_run, f"distill.teacher_run = {ds.teacher_run!r}",
                                          "a discrete-time (or progressive) model.kind = 'unet' or 'mlp' run",
                                          lambda rc: rc.kind in ("unet", "mlp") and rc.cfg.loss.objective
                                          in TEACHER_KINDS, _load_any, self.data_shape, "the teacher models")
        check_student_architecture(cfg, teacher.cfg, ds.teacher_run)
        self.schedule = teacher.schedule
        self.teacher_kind = teacher.denoiser.kind
        student = build_network(cfg.model, self.data_shape)
        student.load_state_dict(teacher.denoiser.net.state_dict())
        self.module = ProgressiveModule(student)
        self.plan = round_plan(ds.teacher_steps, ds.student_steps)
        self.grids = [round_grid(self.schedule.T, n, k) for n, k in self.plan]

    def round_kind(self, r: int) -> str:
        """The teacher's prediction kind in round r: the teacher run's in round 0, then the student's (v)."""
        return self.teacher_kind if r == 0 else "v"

    def begin_step(self, inner: ProgressiveModule) -> None:
        """Count an optimizer step at its first micro-batch; at a new round, teacher <- student exactly."""
        if not torch.is_grad_enabled() or any(p.grad is not None for p in inner.student.parameters()):
            return
        inner.step += 1
        r = round_of_step(int(inner.step), self.cfg.distill.steps_per_round, len(self.plan))
        if r != int(inner.teacher_round):
            inner.teacher.load_state_dict(inner.student.state_dict())
            inner.teacher_round.fill_(r)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """max(SNR_t, 1) mean_dims (x0_hat - x_tilde)^2 per example, t uniform on the round's student grid."""
        inner = getattr(module, "module", module)  # DistributedDataParallel wraps it
        self.begin_step(inner)
        r = int(inner.teacher_round)
        n, k = self.plan[r]
        labels = diffusion.drop_labels(labels, self.cfg, generator)
        cond = {"class_labels": labels} if labels is not None else {}
        i = torch.randint(0, n, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        times = self.grids[r][k * i[:, None] + torch.arange(k + 1)]  # (B, k + 1): t, (t'), s
        t, s = times[:, 0], times[:, -1]
        x = x0.double()
        alpha_t, sigma_t = _scales(self.schedule, t, x)
        z_t = alpha_t * x + sigma_t * noise.double()
        with torch.no_grad():
            z_s = teacher_chain(inner.teacher, self.round_kind(r), self.schedule, z_t, times, cond, x0.dtype)
            target = distillation_target(z_t, z_s, alpha_t, sigma_t, *_scales(self.schedule, s, x))
        z_in = z_t.to(x0.dtype)
        v = module(z_in, self.schedule.logsnr[t].to(x0.device, x0.dtype), **cond)
        x0_hat = v_to_x0(z_in, v, alpha_t.to(x0.dtype), sigma_t.to(x0.dtype))
        acc = torch.promote_types(x0.dtype, torch.float32)
        weight = self.schedule.snr[t].clamp_min(1.0).to(x0.device, acc)
        return weight * mean_flat((x0_hat.to(acc) - target.to(acc)) ** 2)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n samples of the student (DDIM at the current round's steps, trailing grid)."""
        inner = getattr(module, "module", module)
        steps = self.plan[int(inner.teacher_round)][0]
        settings = SampleSettings(sampler="ddim", steps=steps, spacing="trailing", seeds=list(range(n)),
                                  batch_size=max(n, 1))
        return generate(Denoiser(inner.student, "v").eval(), self.schedule, self.data_shape, settings, device=device,
                        progress=False, num_classes=self.cfg.model.num_classes)


def _load_any(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> diffusion.DiffusionModel:
    """A teacher: a discrete-time run, or a progressive run (distilled further)."""
    return (load if rc.cfg.loss.objective == "progressive" else diffusion.load)(rc, use_ema, device)


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> diffusion.DiffusionModel:
    """The student of a progressive run (its ``student.*`` weights, EMA or raw) as a v-prediction denoiser on
    the recorded schedule; the teacher run is not read."""
    cfg, data_shape = rc.cfg, rc.data_shape
    state, source, what = rc.weights(use_ema)
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    net = diffusion.load_network(rc, student, source, f"{what} of the student")
    denoiser = Denoiser(net, "v").to(device).eval()
    return diffusion.DiffusionModel(rc.run_dir, cfg, data_shape, rc.levels, rc.step, rc.path, denoiser=denoiser,
                                    schedule=diffusion.build_schedule(cfg.diffusion))


def sample(model: diffusion.DiffusionModel, settings: SampleSettings, request: SampleRequest,
           device: torch.device | str = "cpu", progress: bool = True) -> Samples:
    """``diffusion.sample``, with a note when the settings are not the DDIM steps the student learned."""
    out = diffusion.sample(model, settings, request, device, progress)
    n = model.cfg.distill.student_steps
    if settings.sampler != "ddim" or settings.steps != n or settings.spacing != "trailing" or settings.eta != 0:
        out.note = (f"the student was distilled for sampler = 'ddim', steps = {n}, spacing = 'trailing', eta = 0; "
                    "other settings are outside what it learned")
    return out
