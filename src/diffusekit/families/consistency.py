"""The consistency family (``loss.objective = "consistency"``, ``model.kind`` = unet | mlp): consistency
distillation of a trained discrete-time run (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
Algorithm 2), sampled in 1-4 network calls by multistep consistency sampling (``sampling.consistency``).

The consistency function, in the VE variables of ``sampling.ode`` (y = x_t / alpha, sigma = sigma_t /
alpha_t = exp(-lambda / 2), the EDM noise level of Karras et al. 2022): with D_theta(y, sigma) the
student network's x0 prediction in the teacher's parameterisation (``parameterization.Denoiser``),

    f_theta(y, sigma) = c_skip(sigma) y + c_out(sigma) F_theta(y, sigma)            (Song et al. 2023, eq. 5
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),                        and Appendix C)
    c_out  = sigma_d (sigma - sigma_min) / sqrt(sigma^2 + sigma_d^2),

where F_theta is the raw network of EDM's preconditioning D = c_skip^EDM y + c_out^EDM F (Karras et al.
2022, Table 1: c_skip^EDM = sigma_d^2 / (sigma^2 + sigma_d^2), c_out^EDM = sigma sigma_d / sqrt(sigma^2 +
sigma_d^2)). Writing F through the denoiser, F = (D - c_skip^EDM y) / c_out^EDM, and since
c_out / c_out^EDM = 1 - sigma_min / sigma =: r,

    f_theta(y, sigma) = (c_skip - r c_skip^EDM) y + r D_theta(y, sigma)      (``consistency_scales``)

so f(y, sigma_min) = y exactly (c_skip = 1, r = 0: the boundary condition, built in), and at large sigma
f ~ D_theta: a student initialised with the teacher's weights starts as the teacher's denoiser, which is
the one-step answer where the ODE has no time left to move. sigma_d = 0.5 (Karras et al. 2022, Song et
al. 2023). sigma_min is the least noise the teacher saw (t_min = 1 / T of ``sde.vp_from_schedule``).
The module answers with a ``Prediction`` of kind x0 whose x0 is f, so every sampler can call it and
``families.diffusion.DiffusionModel`` holds it like any denoiser.

Training (``ConsistencyObjective``): the teacher's probability-flow ODE is discretised at N =
``distill.teacher_steps`` times t_1 = t_min < ... < t_N = 1 (``distill.grid``, default ``"karras"``: the
EDM discretisation Song et al. 2023 distil on, Sec. 6 and Appendix C, dense where the ODE's curvature in
sigma is; ``sampling.ode.time_grid``). Per example, n ~ U{1..N-1}, y_{n+1} = x0 + sigma_{n+1} z, one
teacher step to y_hat_n (``teacher_step``: Heun, Karras et al. 2022 Alg. 2 as ``sampling.ode.sample_heun``
takes it, or the DDIM/Euler step), and

    loss = lambda_n d(f_theta(y_{n+1}, sigma_{n+1}), stopgrad f_theta(y_hat_n, sigma_n))

with the target network theta^- = stopgrad(theta) (Song & Dhariwal 2023, "Improved techniques for
training consistency models", Sec. 3.2: EMA decay 0 for the target), d the pseudo-Huber distance
sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) (ibid. Sec. 3.3) or the mean squared error
(``distill.metric``), and lambda_n = 1 / (sigma_{n+1} - sigma_n) (ibid. Sec. 3.5) or 1
(``distill.step_weighting``). The trainer's EMA averages the weights that are sampled; the objective
never sees it.

The teacher is the frozen EMA denoiser of ``distill.teacher_run``; the student repeats its [model] and
[diffusion] (a difference is a one-line ConfigError naming the key) and starts from its weights. The
teacher's newest checkpoint is identified by its record hash (``io.checkpoint.record_hash``), kept in
the student's weights (buffers ``teacher_sha256``, ``teacher_step``), so a resume against a changed
teacher is refused. A trained student loads without its teacher (``load``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.config import Config
from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.families import diffusion
from diffusekit.families.base import EvaluateSettings, Evaluation, check_student_architecture, load_run_dependency
from diffusekit.io.checkpoint import check_state, load_module_state
from diffusekit.io.runfolder import RunCheckpoint
from diffusekit.nn.build import build_network
from diffusekit.parameterization import Denoiser, DenoiserFn, Prediction, append_dims, scales_from_logsnr
from diffusekit.sampling.generate import generate
from diffusekit.sampling.ode import time_grid, ve_denoise
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import DiscreteSchedule
from diffusekit.sde import vp_from_schedule

__all__ = ["KINDS", "NO_LIKELIHOOD", "SIGMA_DATA", "ConsistencyDenoiser", "ConsistencyObjective", "build_objective",
           "consistency_scales", "distance", "evaluate", "load", "sigma_min_of", "teacher_step"]

KINDS = ("unet", "mlp")
SIGMA_DATA = 0.5  # sigma_d of Karras et al. 2022 and Song et al. 2023
F64 = torch.float64


def _sigmoid(z: float) -> float:
    """1 / (1 + e^-z) without overflow."""
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def sigma_min_of(schedule: DiscreteSchedule) -> float:
    """The EDM noise level sigma / alpha at t_min = 1 / T: the boundary of the consistency function."""
    sde = vp_from_schedule(schedule)
    return math.exp(-0.5 * float(sde.logsnr(sde.t_min)))


def consistency_scales(sigma: Tensor, sigma_min: float, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor]:
    """(a, b) of f = a y + b D at EDM noise levels ``sigma`` (float64; module docstring): a = c_skip - r
    c_skip^EDM, b = r = 1 - sigma_min / sigma (Song et al. 2023, Appendix C, through the denoiser).
    Levels below sigma_min are taken as sigma_min (f = y there)."""
    s = torch.as_tensor(sigma, dtype=F64).clamp_min(sigma_min)
    d2 = sigma_data**2
    c_skip = d2 / ((s - sigma_min) ** 2 + d2)
    r = (s - sigma_min) / s
    return c_skip - r * d2 / (s**2 + d2), r


class ConsistencyDenoiser(nn.Module):
    """f_theta as a denoiser: (x_t, logsnr) -> ``Prediction`` of kind x0 with x0 = f_theta (module
    docstring). ``net`` predicts ``kind`` (the teacher's parameterisation); buffers ``teacher_sha256`` and
    ``teacher_step`` hold the identity of the teacher checkpoint it was distilled from (zeros: unknown).
    When built with a teacher identity (``check_teacher``), loading weights that record another one is a
    one-line ``CheckpointError`` (a resume against a changed teacher)."""

    def __init__(self, net: nn.Module, kind: str, sigma_min: float, sigma_data: float = SIGMA_DATA,
                 teacher: tuple[str, int] | None = None, teacher_run: str = ""):
        super().__init__()
        self.inner = Denoiser(net, kind)  # type: ignore[arg-type]
        self.sigma_min, self.sigma_data, self.teacher_run = float(sigma_min), float(sigma_data), teacher_run
        digest = bytes.fromhex(teacher[0]) if teacher else bytes(32)
        # float32 like every weight (the EMA keeps float32 copies): bytes 0..255 and steps < 2^24 are exact
        self.register_buffer("teacher_sha256", torch.tensor(list(digest), dtype=torch.float32))
        self.register_buffer("teacher_step", torch.tensor(float(teacher[1] if teacher else 0)))
        self.check_teacher = teacher is not None

    def forward(self, x_t: Tensor, logsnr: Tensor, cond: dict | None = None) -> Prediction:
        logsnr = torch.as_tensor(logsnr, dtype=F64).cpu()
        x0_hat = self.inner(x_t, logsnr.to(x_t.device), cond).x0
        if logsnr.numel() == 1:  # one level for the batch (samplers): scalar coefficients
            lam = float(logsnr)
            alpha, sigma = math.sqrt(_sigmoid(lam)), math.sqrt(_sigmoid(-lam))
            a, b = (float(v) for v in consistency_scales(torch.tensor(math.exp(-0.5 * lam)), self.sigma_min,
                                                          self.sigma_data))
        else:
            lam = logsnr.expand(x_t.shape[0])
            alpha, sigma = scales_from_logsnr(lam, x_t)
            a, b = (append_dims(v.to(x_t.dtype), x_t.ndim).to(x_t.device)
                    for v in consistency_scales(torch.exp(-0.5 * lam), self.sigma_min, self.sigma_data))
        f = a * (x_t / alpha) + b * x0_hat
        return Prediction(eps=(x_t - alpha * f) / sigma, x0=f, raw=f, kind="x0")

    def teacher_identity(self) -> tuple[str, int]:
        """(record SHA-256 hex, step) of the teacher checkpoint; ("00...0", 0) when unknown."""
        return bytes(int(v) for v in self.teacher_sha256.tolist()).hex(), int(self.teacher_step)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        recorded = state_dict.get("teacher_sha256")
        if self.check_teacher and recorded is not None:
            then = bytes(int(v) for v in recorded.reshape(-1).tolist()).hex()
            now, step = self.teacher_identity()
            if then != now:
                then_step = int(state_dict.get("teacher_step", torch.tensor(0)))
                raise CheckpointError(
                    f"distill.teacher_run = {self.teacher_run!r}: its newest checkpoint (step {step}, record sha256 "
                    f"{now[:12]}) is not the teacher these weights were distilled from (step {then_step}, "
                    f"{then[:12]}); restore that teacher or start a new run")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def teacher_step(teacher: DenoiserFn, y: Tensor, sigma: Tensor, sigma_next: Tensor, solver: str = "heun",
                 cond: Any = None) -> Tensor:
    """One step of the teacher's probability-flow ODE dy/dsigma = (y - x0_hat) / sigma from per-example
    levels ``sigma`` down to ``sigma_next`` ((B,) float64), in the VE variables of ``sampling.ode``.

    ``"ddim"``: the Euler step y' = D + r (y - D), r = sigma_next / sigma, D = x0_hat(y) (DDIM, exact for
    a constant x0_hat); ``"heun"``: that prediction corrected by D' = x0_hat(y'), y' + w (D' - D), with
    Karras et al. 2022's trapezoid weight w = (1 - r) / (2r) where r >= 1/2 (Algorithm 2) and the
    exponential integrator's w = h phi_2(h), h = -log r, below: per example, the step ``sampling.ode.
    sample_heun`` takes between two grid times (tested equal). 1 or 2 teacher calls."""
    sigma, sigma_next = torch.as_tensor(sigma, dtype=F64).cpu(), torch.as_tensor(sigma_next, dtype=F64).cpu()
    D = ve_denoise(teacher, y, sigma, cond)
    r = sigma_next / sigma
    y_next = D + append_dims(r.to(y.dtype), y.ndim).to(y.device) * (y - D)
    if solver == "ddim":
        return y_next
    if solver != "heun":
        raise ValueError(f"unknown teacher solver {solver!r}; choose heun or ddim")
    h = -torch.log(r)
    w = torch.where(r >= 0.5, (1.0 - r) / (2.0 * r), (h + torch.expm1(-h)) / h.clamp_min(1e-300))
    D_next = ve_denoise(teacher, y_next, sigma_next, cond)
    return y_next + append_dims(w.to(y.dtype), y.ndim).to(y.device) * (D_next - D)


def distance(a: Tensor, b: Tensor, metric: str = "pseudo_huber") -> Tensor:
    """Per-example d(a, b): pseudo-Huber sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (Song &
    Dhariwal 2023, Sec. 3.3), or ``"l2"``, the mean squared difference."""
    diff = (a - b).flatten(1).float()
    if metric == "l2":
        return diff.square().mean(1)
    if metric != "pseudo_huber":
        raise ValueError(f"unknown metric {metric!r}; choose pseudo_huber or l2")
    c = 0.00054 * math.sqrt(diff.shape[1])
    return (diff.square().sum(1) + c * c).sqrt() - c


def _load_teacher(cfg: Config, data_shape: tuple[int, ...]) -> tuple[diffusion.DiffusionModel, RunCheckpoint]:
    """The frozen teacher (EMA weights of ``distill.teacher_run``, a discrete-time unet or mlp run) and its
    checkpoint."""
    seen: dict[str, RunCheckpoint] = {}

    def discrete_run(rc: RunCheckpoint) -> bool:
        seen["rc"] = rc
        return rc.kind in KINDS and rc.cfg.loss.objective == "discrete"

    run = cfg.distill.teacher_run
    teacher = load_run_dependency(run, f"distill.teacher_run = {run!r}", "a discrete-time model.kind = 'unet' or "
                                  "'mlp' run", discrete_run, diffusion.load, data_shape, "the teacher models")
    return teacher, seen["rc"]


class ConsistencyObjective:
    """Consistency distillation (module docstring): ``module`` is the student ``ConsistencyDenoiser``,
    initialised from the teacher's EMA weights."""

    def __init__(self, cfg: Config, data: ArrayDataset):
        diffusion.check_class_labels(cfg, data)
        ds = cfg.distill
        self.cfg, self.data_shape = cfg, tuple(data.shape)
        with torch.random.fork_rng(devices=[]):  # loading the teacher leaves the caller's RNG alone
            teacher, rc = _load_teacher(cfg, self.data_shape)
        check_student_architecture(cfg, teacher.cfg, ds.teacher_run)
        self.teacher = teacher.denoiser.eval().requires_grad_(False)
        self.schedule = teacher.schedule
        sde = vp_from_schedule(self.schedule)
        times = time_grid(sde, ds.teacher_steps, ds.grid).flip(0)  # t_1 = t_min < ... < t_N = t_max
        self.sigmas = torch.exp(-0.5 * sde.logsnr(times))  # float64, increasing
        net = build_network(cfg.model, self.data_shape)
        net.load_state_dict(teacher.denoiser.net.state_dict())
        self.module = ConsistencyDenoiser(net, cfg.model.prediction, sigma_min_of(self.schedule),
                                          teacher=(rc.record["record_sha256"], rc.step), teacher_run=ds.teacher_run)

    def loss(self, module: nn.Module, x0: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """Per-example lambda_n d(f(y_{n+1}, sigma_{n+1}), stopgrad f(y_hat_n, sigma_n)); n and z from
        ``generator``."""
        ds = self.cfg.distill
        self.teacher.to(x0.device)
        cond = {"class_labels": labels} if labels is not None and self.cfg.model.num_classes > 0 else None
        n = torch.randint(0, len(self.sigmas) - 1, (x0.shape[0],), generator=generator)
        z = torch.randn(x0.shape, generator=generator).to(x0.device)
        s_lo, s_hi = self.sigmas[n], self.sigmas[n + 1]
        y_hi = x0 + append_dims(s_hi.to(x0.dtype), x0.ndim).to(x0.device) * z
        with torch.no_grad():
            y_lo = teacher_step(self.teacher, y_hi, s_hi, s_lo, ds.teacher_solver, cond)
            target = ve_denoise(module, y_lo, s_lo, cond)
        pred = ve_denoise(module, y_hi, s_hi, cond)
        weight = 1.0 / (s_hi - s_lo) if ds.step_weighting == "inverse_step" else torch.ones_like(s_hi)
        return weight.to(x0.device, torch.float32) * distance(pred, target, ds.metric)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n samples of 2-step consistency sampling, seeds 0..n-1."""
        settings = SampleSettings(sampler="consistency", steps=2, seeds=list(range(n)), batch_size=max(n, 1))
        return generate(module.eval(), self.schedule, self.data_shape, settings, device=device, progress=False,
                        num_classes=self.cfg.model.num_classes)


def build_objective(cfg: Config, data: ArrayDataset) -> ConsistencyObjective:
    """The trainer's objective: consistency distillation of ``distill.teacher_run`` on ``data``."""
    return ConsistencyObjective(cfg, data)


def load(rc: RunCheckpoint, use_ema: bool = True, device: str | torch.device = "cpu") -> diffusion.DiffusionModel:
    """A trained consistency student: its ``ConsistencyDenoiser`` and the schedule of its [diffusion] (the
    teacher's), from its newest checkpoint alone (the teacher run is not needed)."""
    cfg, ckpt = rc.cfg, rc.path
    schedule = diffusion.build_schedule(cfg.diffusion)
    weights = rc.weights(use_ema)

    def build(net: nn.Module) -> ConsistencyDenoiser:
        return ConsistencyDenoiser(net, cfg.model.prediction, sigma_min_of(schedule), teacher_run=cfg.distill.teacher_run)

    try:  # shapes checked on a weightless ("meta") network first: a hostile record allocates nothing
        with torch.device("meta"):
            shapes = build_network(cfg.model, rc.data_shape)
        check_state(build(shapes).state_dict(), *weights)
        student = build(build_network(cfg.model, rc.data_shape))
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}.json: recorded model cannot be built ({exc})") from None
    load_module_state(student, *weights)
    return diffusion.DiffusionModel(rc.run_dir, cfg, rc.data_shape, rc.levels, rc.step, ckpt,
                                    denoiser=student.to(device).eval(), schedule=schedule)


NO_LIKELIHOOD = ("bpd", "nll_ode")


def evaluate(model: diffusion.DiffusionModel, settings: EvaluateSettings, out_dir: Path,
             progress: bool = True) -> Evaluation:
    """Sample quality (fd) of the student, as ``families.diffusion.evaluate`` measures it; a consistency
    model defines no likelihood, so bpd and nll_ode are skipped (noted in the report), and asking for
    nothing else is a one-line error."""
    keep = tuple(m for m in settings.metrics if m not in NO_LIKELIHOOD)
    if not keep:
        raise ConfigError(f"--metrics: a consistency student has no likelihood ({', '.join(NO_LIKELIHOOD)}); ask for fd")
    ev = diffusion.evaluate(model, replace(settings, metrics=keep), out_dir, progress)
    skipped = [m for m in settings.metrics if m in NO_LIKELIHOOD]
    if skipped:
        note = f"skipped {', '.join(skipped)}: a consistency model defines no likelihood"
        ev.result["skipped"] = note
        ev.rows.append(("likelihood", note))
    return ev
