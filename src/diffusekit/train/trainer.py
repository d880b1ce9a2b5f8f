"""The training loop: AdamW with warm-up, clipping, fp32 EMA, exact resume, rank-aware seeding.

Every source of randomness is explicit and checkpointed, so a run that is stopped and resumed ends
bit-for-bit equal to one that never stopped:
- data order: epoch e is a permutation drawn from a generator seeded by (seed, "epoch", e); the
  position (epoch, offset) is saved; every rank walks the same global order and takes its own slice
  of each global batch;
- diffusion noise and t: a per-rank torch.Generator seeded by (seed, rank), state saved; the same
  generator draws the horizontal flips of ``data.hflip`` (``data.augment.random_hflip``), before the loss;
- dropout and anything else: the global torch RNG seeded by (seed, rank), state saved.
Only rank 0 writes files; under torchrun the model trains through DistributedDataParallel and the
ranks agree once per step on the loss and on stopping (``diffusekit.train.distributed``,
docs/scale.md). Resuming checks every piece of the checkpoint before changing anything.

The trainer knows no model family and no checkpoint schema: the config's family gives it an
``Objective`` (a module and a per-example loss; ``build_objective``), and ``train.state`` says what a
checkpoint holds and checks it on resume.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.budget import TRAIN_COPIES, activation_bytes, fits, gib, parameter_bytes
from diffusekit.config import Config, save_config
from diffusekit.data.augment import random_hflip
from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.registry import load_dataset, resolved_data_config
from diffusekit.errors import CheckpointError, ConfigError, TrainingError
from diffusekit.families import family_for_config
from diffusekit.families.base import Objective, StatefulObjective
from diffusekit.io.atomic import atomic_write_text
from diffusekit.io.checkpoint import clean_leftovers, latest_checkpoint, list_checkpoints, save_checkpoint
from diffusekit.io.runfolder import claim_run_folder
from diffusekit.speed import CompiledOrEager, autocast, grad_scaler, set_tf32, switch_on
from diffusekit.train import distributed as ddp
from diffusekit.train.distributed import DistInfo
from diffusekit.train.ema import EMA
from diffusekit.train.state import read_resume, training_meta, training_tensors
from diffusekit.viz import plot_bound_curve, plot_loss_curve, save_samples_figure

__all__ = ["MAX_SKIPPED_IN_A_ROW", "DataStream", "DistInfo", "Trainer", "build_objective", "derive_seed", "train"]

# fp16: after this many overflowing steps in a row the scale has halved from 2^16 to below 2^-30 and no
# scale helps (the forward itself overflows); the run stops with a one-line error instead of idling
MAX_SKIPPED_IN_A_ROW = 50


def build_objective(cfg: Config, data: ArrayDataset) -> Objective:
    """What ``cfg`` trains on ``data``: the objective of its model family (``families.FAMILIES``)."""
    family = family_for_config(cfg)
    if family.build_objective is None:
        raise ConfigError(f"model.kind = {cfg.model.kind!r} ({family.name}) cannot be trained here")
    return family.build_objective(cfg, data)


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step + 1`` as a fraction of ``train.lr``.

    A linear warm-up over the first ``warmup_steps`` steps; after it, ``"constant"`` stays at 1 and
    ``"cosine"`` / ``"linear"`` fall from 1 to 0 at step ``steps`` (the decay of Loshchilov & Hutter 2017,
    SGDR, without restarts; the linear one is the budget-aware schedule of Li, Yumer & Ramanan 2020, "Budgeted
    training"). Warm-up and decay multiply, so a warm-up longer than the run stays well-defined."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    done = min(max(step - warmup_steps, 0) / max(steps - warmup_steps, 1), 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * done)) if schedule == "cosine" else 1.0 - done
    return warm * decay


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from (seed, parts...), stable across runs, platforms and processes."""
    text = "/".join(str(p) for p in (seed,) + parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


class DataStream:
    """Endless stream of global batches over N examples; position (epoch, offset) is resumable."""

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch)))

    def next(self, size: int) -> Tensor:
        """The next ``size`` indices, crossing into new epochs as needed."""
        out = []
        while size > 0:
            take = min(size, self.n - self.offset)
            out.append(self._perm[self.offset:self.offset + take])
            self.offset += take
            size -= take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(out)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Trainer:
    """Owns the model, EMA, optimizer, data stream and RNGs of one run; ``run()`` trains it.

    Under torchrun (``dist.world_size > 1``) it joins the process group, trains through
    DistributedDataParallel and keeps the ranks in lock step: every rank starts from the same
    weights (drawn with rank 0's seed), takes its slice of each global batch with its own noise,
    and all ranks agree each step on the mean loss and on whether to stop (SIGTERM, time limit,
    non-finite values), so they fail, stop and checkpoint at the same step."""

    def __init__(self, cfg, run_dir: Path | str, resume: bool = False, progress: bool = True,
                 dist: DistInfo | None = None):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.dist = dist or DistInfo.from_env()
        tc = cfg.train
        self.device = resolve_device(tc.device, self.dist.local_rank)
        self.lock = claim_run_folder(self.run_dir, resume) if self.dist.is_main else None
        try:
            self.owns_process_group = ddp.init_process_group(self.dist, self.device)
        except BaseException:
            self._release_lock()
            raise
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.model = None
            if self.owns_process_group:
                ddp.destroy_process_group()
            self._release_lock()
            raise

    def _setup(self, cfg, resume: bool) -> None:
        tc = cfg.train
        self.data = load_dataset(cfg.data, "train")
        # what was inferred from the data (a folder's channels) is recorded and checked on resume
        self.cfg = cfg = dataclasses.replace(cfg, data=resolved_data_config(cfg.data, self.data))
        self._place_data(tc)
        torch.manual_seed(derive_seed(tc.seed, "global", 0))  # the same initial weights on every rank
        self.objective = build_objective(cfg, self.data)
        encode = getattr(self.objective, "encode_data", None)
        if encode is not None:  # a frozen codec's latents of the whole set, once (the objective trains on them)
            self._place_data(tc, encode(self.data.x).float())
        self.net = self.objective.module.to(self.device)  # trained, EMA'd and checkpointed
        self._check_memory()
        if self.dist.rank != 0:
            torch.manual_seed(derive_seed(tc.seed, "global", self.dist.rank))  # rank-own dropout
        self.channels_last = switch_on(tc.channels_last, self.device) and self.x.ndim == 4
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":  # a process-wide PyTorch setting; a CPU has no TF32
            set_tf32(switch_on(tc.tf32, self.device))
        self.model = ddp.wrap_module(self.net, self.device) if self.dist.distributed else self.net
        if tc.compile:  # what the loss calls; self.net stays the module that is averaged and checkpointed
            self.model = CompiledOrEager(self.model, "train.compile")
        self.ema = EMA(self.net, tc.ema_decay)
        fused = {"fused": True} if switch_on(tc.fused_adamw, self.device) else {}  # absent: PyTorch's default
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **fused)
        self.scaler = grad_scaler(tc.precision, self.device)  # fp16 only; disabled it passes everything through
        self.skipped_steps = 0  # fp16 steps whose gradients overflowed (skipped by the scaler)
        self.skipped_in_a_row = 0  # since the last step taken; MAX_SKIPPED_IN_A_ROW of them end the run
        self.loss_variance = 0.0  # of the per-example losses of the last step's global batch (logged as loss_std)
        self.noise_gen = torch.Generator().manual_seed(derive_seed(tc.seed, "noise", self.dist.rank))
        self.stream = DataStream(len(self.data), derive_seed(tc.seed, "data"))
        self.step = 0
        self.log_path = self.run_dir / "log.jsonl"
        self.bound_path = self.run_dir / "bound.jsonl"  # train.bound_every: the held-out bound along training
        self._bound_x = self._heldout_examples(cfg)
        self._cpu_start = time.process_time()
        self._excluded_cpu = 0.0  # CPU seconds of held-out bounds, left out of cpu_s and train.cpu_limit_s
        self._stop_requested = False
        self._stop_agreed = False
        self._deadline = float("inf")
        self._cpu_limit = float("inf")
        if self.dist.is_main:
            clean_leftovers(self.run_dir)
        if resume:
            self._resume()
        elif self.dist.is_main:
            if list_checkpoints(self.run_dir) or (self.run_dir / "checkpoints" / "latest.json").exists():
                raise TrainingError(f"{self.run_dir}: run folder already has checkpoints; pass --resume to "
                                    "continue it or choose another --out")
            self._truncate_log(0)

    def _heldout_examples(self, cfg) -> Tensor | None:
        """The test split's first ``train.bound_examples`` images for ``train.bound_every`` (None: off); a
        family without a held-out bound is refused in one line."""
        tc = cfg.train
        if not tc.bound_every:
            return None
        if getattr(self.objective, "heldout_bound", None) is None:
            raise ConfigError(f"train.bound_every = {tc.bound_every}: the held-out bound along training is logged for "
                              f"unconditional diffusion runs (model.kind unet or mlp, discrete or continuous objective), "
                              f"not for model.kind = {cfg.model.kind!r} with loss.objective = {cfg.loss.objective!r}; "
                              "set it to 0")
        if self.data.levels is None and cfg.loss.objective == "discrete":
            raise ConfigError(f"train.bound_every = {tc.bound_every}: the discrete bound needs data on discrete levels; "
                              f"data.name = {cfg.data.name!r} is continuous (set it to 0, or train the continuous objective)")
        x = load_dataset(cfg.data, "test").x[:tc.bound_examples]
        if x.shape[0] < 2:
            raise ConfigError(f"train.bound_every = {tc.bound_every}: the test split of data.name = {cfg.data.name!r} has "
                              f"{x.shape[0]} image(s), too few for a held-out bound; set it to 0")
        return x.to(self.device)

    def log_bound(self) -> None:
        """The EMA model's bound on the held-out examples now, appended to bound.jsonl with the training CPU
        seconds so far; its own CPU time is left out of the budget (``_excluded_cpu``)."""
        if not self.dist.is_main or self._bound_x is None:
            return
        c0, w0 = time.process_time(), time.time()
        rng = torch.get_rng_state()  # the estimate draws its own seeded noise; training randomness is untouched
        # the same seed at every step: common draws of t and noise, so the curve's differences are the model's
        result = self.objective.heldout_bound(self.ema_module(), self._bound_x, self.cfg.train.seed)
        torch.set_rng_state(rng)
        self._excluded_cpu += time.process_time() - c0
        record = {"step": self.step, "cpu_s": self._cpu_s(), **result, "seconds": time.time() - w0}
        with open(self.bound_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.plot_losses()

    def _over_budget(self) -> bool:
        """Past ``train.time_limit_s`` (wall) or ``train.cpu_limit_s`` (this process's CPU, bounds left out)."""
        return time.time() > self._deadline or self._cpu_s() > self._cpu_limit

    def _cpu_s(self) -> float:
        """CPU seconds of training in this segment (every thread of the process), held-out bounds left out."""
        return time.process_time() - self._cpu_start - self._excluded_cpu

    def _place_data(self, tc, x: Tensor | None = None) -> None:
        """The training set (or ``x``, what the objective made of it) on the device once
        (``train.data_on_device``), or in host memory (pinned when training on CUDA) from which each batch is
        copied without blocking."""
        on_device = tc.data_on_device or self.device.type == "cpu"
        pin = not on_device and self.device.type == "cuda"
        place = (lambda t: t.to(self.device)) if on_device else (lambda t: t.pin_memory() if pin else t)
        self.x = place(self.data.x if x is None else x)
        self.labels = place(self.data.labels) if self.data.labels is not None else None

    def _check_memory(self) -> None:
        """Refuse, in one line naming the key, a batch or model that cannot train in this machine's free
        memory: parameters with their gradient, EMA and AdamW moments, and a batch's activations measured
        on one example (``budget.activation_bytes``; x3 for what the backward pass keeps and makes)."""
        tc = self.cfg.train
        labels = None if self.labels is None else self.labels[:1].to(self.device)
        saved = self._objective_state()
        with torch.random.fork_rng(devices=[]):
            per_example = activation_bytes(self.net, lambda: self.objective.loss(
                self.net, self.x[:1].to(self.device), labels, torch.Generator().manual_seed(0)))
        if saved:  # the measurement leaves the objective's state (the t history) as it was
            self.objective.load_state_tensors(saved, "the memory check")
        params = parameter_bytes(self.net) * TRAIN_COPIES
        batch = per_example * 3 * tc.batch_size
        ok, free = fits(params + batch, self.device)
        if not ok:
            key = f"train.batch_size = {tc.batch_size}" if batch > params else "the model's size (model.base_channels, ...)"
            raise ConfigError(f"{key}: training needs about {gib(params + batch)} (parameters with gradients, EMA and "
                              f"optimizer {gib(params)}, activations of a batch {gib(batch)}); {gib(free)} is free on "
                              f"{self.device.type}. Lower train.batch_size (train.grad_accum keeps the effective batch) "
                              "or the model's size")

    def close(self) -> None:
        """Leave the process group this trainer joined and release the run's lock. The DDP wrapper is
        released first: tearing it down after the group is gone can block forever in its destructor."""
        self.model = self.net
        gc.collect()
        if self.owns_process_group:
            ddp.destroy_process_group()
            self.owns_process_group = False
        self._release_lock()

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- state ---------------------------------------------------------------------------------
    def _rng_tensors(self) -> dict[str, Tensor]:
        """This rank's RNG states: global torch, diffusion noise, and CUDA when training on a GPU."""
        out = {"rng.torch": torch.get_rng_state(), "rng.noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def _objective_state(self) -> dict[str, Tensor]:
        """The objective's own state (``families.base.StatefulObjective``); {} for most objectives."""
        return self.objective.state_tensors() if isinstance(self.objective, StatefulObjective) else {}

    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor needed to continue exactly (``train.state``); a collective under DDP."""
        rngs = {key: ddp.gather_tensors(val.cpu()) for key, val in self._rng_tensors().items()}
        return training_tensors(self.net, self.ema, self.optimizer, rngs, self._objective_state())

    def state_meta(self) -> dict[str, Any]:
        """The checkpoint's metadata (``train.state.training_meta``), the data's fingerprint included, and
        the fp16 gradient scaler's state (its scale and growth tracker)."""
        meta = training_meta(self.cfg, self.data, self.stream.state(), self.ema, self.dist.world_size, self.net,
                             self.optimizer)
        if self.scaler.is_enabled():
            meta["grad_scaler"] = self.scaler.state_dict()
        return meta

    def _resume(self) -> None:
        """Restore everything from the latest checkpoint (checked first by ``train.state.read_resume``:
        nothing is changed unless every piece fits)."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise CheckpointError(f"{self.run_dir}: --resume given but no complete checkpoint was found")
        point = read_resume(ckpt, self.net, self.optimizer, self.data, self.dist.world_size, self.dist.rank,
                            self._rng_tensors(), self.cfg)
        if isinstance(self.objective, StatefulObjective):  # checks its tensors before anything changes
            self.objective.load_state_tensors(point.objective or {}, f"{ckpt}.safetensors")
        self.net.load_state_dict(point.model, strict=True)
        self.ema.shadow = {k: v.to(self.device) for k, v in point.ema.items()}
        self.ema.updates = point.ema_updates
        self.optimizer.load_state_dict(point.optimizer)
        if self.scaler.is_enabled() and point.grad_scaler is not None:  # absent: the run was not fp16 before
            self.scaler.load_state_dict(point.grad_scaler)
        torch.set_rng_state(point.rngs["rng.torch"])
        self.noise_gen.set_state(point.rngs["rng.noise"])
        if "rng.cuda" in point.rngs:
            torch.cuda.set_rng_state(point.rngs["rng.cuda"], self.device)
        self.stream = DataStream(len(self.data), self.stream.seed, **point.position)
        self.step = point.step
        self._truncate_log(self.step)

    def _truncate_log(self, step: int) -> None:
        """Drop log records written after the checkpoint we resume from (all of them for a fresh run)."""
        for path in (self.log_path, self.bound_path):
            self._truncate_records(path, step)

    def _truncate_records(self, path: Path, step: int) -> None:
        if not (self.dist.is_main and path.exists()):
            return
        keep = []
        for raw in path.read_bytes().splitlines():
            try:
                ln = raw.decode("utf-8")
                if ln.strip() and json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash, or damaged (UnicodeDecodeError is a ValueError)
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def save(self) -> None:
        """Checkpoint now (a collective under DDP: every rank calls it; rank 0 writes)."""
        tensors = self.state_tensors()
        if self.dist.is_main:
            save_checkpoint(self.run_dir, self.step, tensors, self.state_meta())

    # -- one optimizer step --------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step + 1`` (``train.warmup_steps``, ``train.lr_schedule``)."""
        tc = self.cfg.train
        return tc.lr * lr_factor(step, tc.steps, tc.warmup_steps, tc.lr_schedule)

    def _micro_batch(self) -> tuple[Tensor, Tensor | None]:
        """This rank's slice of the next global batch: (examples, their labels or None)."""
        tc = self.cfg.train
        idx = self.stream.next(tc.batch_size * self.dist.world_size)
        idx = idx[self.dist.rank * tc.batch_size:(self.dist.rank + 1) * tc.batch_size].to(self.x.device)
        x, labels = self.x[idx], None if self.labels is None else self.labels[idx]
        if self.x.device != self.device:  # host data (train.data_on_device = false): pinned, copied without blocking
            x = x.pin_memory() if self.x.is_pinned() else x
            x = x.to(self.device, non_blocking=True)
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
        x = random_hflip(x, self.noise_gen) if self.cfg.data.hflip else x
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def _stopped_here(self) -> str:
        if not list_checkpoints(self.run_dir):
            return "stopped before any checkpoint was written (lower train.lr or check the data)"
        return f"stopped, the last good checkpoint in {self.run_dir / 'checkpoints'} is kept"

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm).

        The loss is the mean over the global batch (all ranks). Gradients are all-reduced once per
        step: micro-batches before the last run under DDP's ``no_sync``. Raises ``TrainingError``
        naming the step, before the weights change, when the loss or gradient norm is not finite.
        ``loss_variance`` becomes the unbiased variance of the per-example losses of the global batch
        (as the objective returns them: importance-weighted under ``loss.t_sampling = "importance"``)."""
        tc = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        moments = torch.zeros(3, dtype=torch.float64)  # count, sum and sum of squares of the per-example losses
        for i in range(tc.grad_accum):
            x0, labels = self._micro_batch()
            sync = not self.dist.distributed or i == tc.grad_accum - 1
            with nullcontext() if sync else self.model.no_sync():
                with autocast(self.device, tc.precision):  # forward and loss; the loss reduced in fp32
                    per_example = self.objective.loss(self.model, x0, labels, self.noise_gen).float()
                    loss = per_example.mean() / tc.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach().to("cpu", torch.float64)
            values = per_example.detach().to("cpu", torch.float64)
            moments += torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64), values.sum(),
                                    (values ** 2).sum()])
        stop = self._stop_requested or self._over_budget()
        reduced = ddp.all_reduce_sum(torch.cat([total[None], torch.tensor([float(stop)], dtype=torch.float64),
                                                moments]))
        total, stop_votes = reduced[0], reduced[1]
        n, s1, s2 = (float(v) for v in reduced[2:])
        self.loss_variance = max(s2 - s1 * s1 / n, 0.0) / (n - 1) if n > 1 else 0.0
        loss_value = float(total) / self.dist.world_size
        self._stop_agreed = bool(stop_votes > 0)
        if not math.isfinite(loss_value):
            raise TrainingError(f"step {self.step + 1}: loss is {loss_value}; {self._stopped_here()}")
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        self.scaler.unscale_(self.optimizer)  # fp16: true gradients before clipping
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        finite = bool(torch.isfinite(norm))
        if not finite and not self.scaler.is_enabled():
            raise TrainingError(f"step {self.step + 1}: gradient norm is {norm.item()}; {self._stopped_here()}")
        self.scaler.step(self.optimizer)  # fp16 with an overflow: skipped, the weights stay as they are
        self.scaler.update()
        if finite:
            self.ema.update(self.net)
            self.skipped_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise TrainingError(
                    f"step {self.step + 1}: train.precision = 'fp16': the gradients overflowed at "
                    f"{self.skipped_in_a_row} steps in a row (gradient scale now {self.scaler.get_scale():.3g}), so "
                    f"nothing was learned; this model does not fit fp16's range, use train.precision = 'bf16'; "
                    f"{self._stopped_here()}")
        self.step += 1
        return loss_value, float(norm)

    # -- the loop ------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps``, checkpointing along the way. SIGTERM or the time limit stop it at
        the next step boundary (on every rank at the same step) with a checkpoint written."""
        tc = self.cfg.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        start, window, window_start = time.time(), [], time.time()
        self._cpu_start, self._excluded_cpu = time.process_time(), 0.0
        self._deadline = start + tc.time_limit_s if tc.time_limit_s else float("inf")
        self._cpu_limit = tc.cpu_limit_s or float("inf")
        stopped = "finished"
        try:
            variances = []  # per-step variances of the per-example losses, logged as loss_std
            while self.step < tc.steps:
                loss, norm = self.train_step()
                window.append(loss)
                variances.append(self.loss_variance)
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    rate = len(window) / max(time.time() - window_start, 1e-9)
                    self._log({"step": self.step, "loss": sum(window) / len(window),
                               "loss_std": math.sqrt(sum(variances) / len(variances)), "grad_norm": norm,
                               "lr": self.lr_at(self.step - 1), "steps_per_s": rate,
                               "images_per_s": rate * tc.batch_size * tc.grad_accum * self.dist.world_size,
                               "elapsed_s": time.time() - start, "cpu_s": self._cpu_s(),
                               **self._scaler_record()})
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
                    window, variances, window_start = [], [], time.time()
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save()
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    self.preview()
                if tc.bound_every and self.step % tc.bound_every == 0:
                    self.log_bound()
                over_time = self._over_budget()
                if self._stop_agreed or (not self.dist.distributed and (self._stop_requested or over_time)):
                    # one process stops at this boundary; ranks stop where they agreed (one step later at most)
                    stopped = ("sigterm" if self._stop_requested else "another rank" if not over_time
                               else "time_limit" if time.time() > self._deadline else "cpu_limit")
                    break
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if not (tc.checkpoint_every and self.step % tc.checkpoint_every == 0):
            self.save()
        cpu_seconds = self._cpu_s()
        if tc.bound_every and self.step % tc.bound_every:  # the end point of the curve
            self.log_bound()
        return {"step": self.step, "stopped": stopped, "train_seconds": time.time() - start,
                "train_cpu_seconds": cpu_seconds}

    def _scaler_record(self) -> dict[str, Any]:
        """fp16 runs log the gradient scale and the steps skipped so far for overflowing gradients."""
        if not self.scaler.is_enabled():
            return {}
        return {"grad_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps}

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def ema_module(self) -> torch.nn.Module:
        """A copy of the trained module carrying the EMA weights (for samples and evaluation)."""
        module = copy.deepcopy(self.net)
        self.ema.copy_to(module)
        return module.eval()

    def preview(self, path: Path | None = None, n: int | None = None) -> Path | None:
        """Sample a grid with the EMA weights (DDPM, 100 respaced steps) and redraw the loss curve."""
        if not self.dist.is_main:
            return None
        n = n or self.cfg.train.n_sample
        rng = torch.get_rng_state()  # sampling must not disturb training randomness
        x = self.objective.preview(self.ema_module(), n, self.device)
        torch.set_rng_state(rng)
        path = path or self.run_dir / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        reference = self.data.x[:2000] if self.data.x.ndim == 2 else None
        k = self.cfg.model.num_classes  # a conditional preview cycles through the classes: one per column
        save_samples_figure(x.cpu(), path, levels=self.data.levels, reference=reference, nrow=k if 1 < k <= 16 else None)
        self.plot_losses()
        return path

    def plot_losses(self) -> None:
        recs = read_records(self.log_path)
        if recs:
            plot_loss_curve([r["step"] for r in recs], [r["loss"] for r in recs], self.run_dir / "loss_curve.png")
        bounds = read_records(self.bound_path)
        if bounds:
            plot_bound_curve(bounds, recs, self.run_dir / "bound_curve.png")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a run's .jsonl file (none if it is missing; a damaged line is skipped)."""
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def train(cfg, run_dir: Path | str, resume: bool = False, progress: bool = True,
          dist: DistInfo | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; writes checkpoints, log.jsonl, pictures and summary.json.

    Under torchrun every process calls this; only rank 0 writes, and the process group this call
    joined is left again at the end (also on errors)."""
    run_dir = Path(run_dir)
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress, dist=dist)
    try:
        if trainer.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(trainer.cfg, run_dir / "config.toml")  # with what was inferred from the data
        result = trainer.run()
        if trainer.dist.is_main:
            trainer.preview(run_dir / "samples.png")
            summary = {**result, "run_dir": str(run_dir), "data": trainer.data.name,
                       "train_examples": len(trainer.data), "world_size": trainer.dist.world_size, "seed": cfg.train.seed,
                       "parameters": sum(p.numel() for p in trainer.net.parameters())}
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    finally:
        trainer.close()
    return {**result, "rank": trainer.dist.rank}
