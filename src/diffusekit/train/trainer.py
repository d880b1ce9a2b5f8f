"""The training loop: AdamW with warm-up, clipping, fp32 EMA, exact resume, rank-aware seeding.

Every source of randomness is explicit and checkpointed, so a run that is stopped and resumed ends
bit-for-bit equal to one that never stopped:
- data order: epoch e is a permutation drawn from a generator seeded by (seed, "epoch", e); the
  position (epoch, offset) is saved; every rank walks the same global order and takes its own slice
  of each global batch;
- diffusion noise and t: a per-rank torch.Generator seeded by (seed, rank), state saved;
- dropout and anything else: the global torch RNG seeded by (seed, rank), state saved.
Only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit.errors import CheckpointError, TrainingError
from diffusekit.objectives import build_objective
from diffusekit.train.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint
from diffusekit.train.ema import EMA

__all__ = ["derive_seed", "DataStream", "Trainer", "train"]


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


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (defaults: a single process)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Trainer:
    """Owns the model, EMA, optimizer, data stream and RNGs of one run; ``run()`` trains it."""

    def __init__(self, cfg, run_dir: Path | str, resume: bool = False, progress: bool = True,
                 dist: DistInfo | None = None):
        from diffusekit.data import load_dataset

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.dist = dist or DistInfo.from_env()
        tc = cfg.train
        self.device = resolve_device(tc.device, self.dist.local_rank)
        self.data = load_dataset(cfg.data, "train")
        self.x = self.data.x.to(self.device)
        self.labels = self.data.labels.to(self.device) if self.data.labels is not None else None
        torch.manual_seed(derive_seed(tc.seed, "global", self.dist.rank))
        self.objective = build_objective(cfg, tuple(self.data.shape))
        self.net = self.objective.module.to(self.device)  # trained, EMA'd and checkpointed
        self.ema = EMA(self.net, tc.ema_decay)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.noise_gen = torch.Generator().manual_seed(derive_seed(tc.seed, "noise", self.dist.rank))
        self.stream = DataStream(len(self.data), derive_seed(tc.seed, "data"))
        self.step = 0
        self.log_path = self.run_dir / "log.jsonl"
        self._stop_requested = False
        if resume:
            self._resume()
        elif self.dist.is_main and (self.run_dir / "checkpoints").is_dir() and any((self.run_dir / "checkpoints").iterdir()):
            raise TrainingError(f"{self.run_dir}: run folder already has checkpoints; pass --resume to continue "
                                "it or choose another --out")

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor needed to continue exactly: weights, EMA, optimizer moments, RNG states."""
        out = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        names = {id(p): n for n, p in self.net.named_parameters()}
        for p, st in self.optimizer.state.items():
            for key, val in st.items():
                out[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(val)
        out["rng.torch"] = torch.get_rng_state()
        out["rng.noise"] = self.noise_gen.get_state()
        if self.device.type == "cuda":
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def state_meta(self) -> dict[str, Any]:
        from diffusekit.config import config_to_dict

        return {"config": config_to_dict(self.cfg), "data_position": self.stream.state(),
                "ema_updates": self.ema.updates, "world_size": self.dist.world_size,
                "data": {"name": self.data.name, "shape": list(self.data.shape), "levels": self.data.levels,
                         "num_classes": self.data.num_classes},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]}

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise CheckpointError(f"{self.run_dir}: --resume given but no complete checkpoint was found")
        tensors, record = load_checkpoint(ckpt)
        meta = record["meta"]
        required = ["rng.torch", "rng.noise"] + [f"ema.{k}" for k in self.ema.shadow] + \
            [f"model.{k}" for k in self.net.state_dict()]
        missing = [k for k in required if k not in tensors]
        for key in ("data_position", "ema_updates", "param_groups"):
            if key not in meta:
                missing.append(f"meta.{key}")
        if record["step"] > 0 and not any(k.startswith("optim.") for k in tensors):
            missing.append("optim.*")
        if missing:
            raise CheckpointError(f"{ckpt}: cannot resume exactly, missing {', '.join(missing[:5])}")
        self.net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.shadow = {k[4:]: v.float().to(self.device) for k, v in tensors.items() if k.startswith("ema.")}
        self.ema.updates = int(meta["ema_updates"])
        params = dict(self.net.named_parameters())
        state: dict[int, dict[str, Tensor]] = {}
        order = {n: i for i, n in enumerate(params)}
        for key, val in tensors.items():
            if key.startswith("optim."):
                pname, field = key[6:].rsplit(".", 1)
                state.setdefault(order[pname], {})[field] = val.to(self.device) if field != "step" else val
        groups = [dict(g, params=list(range(len(params)))) for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        self.noise_gen.set_state(tensors["rng.noise"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.stream = DataStream(len(self.data), self.stream.seed, **meta["data_position"])
        self.step = int(record["step"])
        self._truncate_log(self.step)

    def _truncate_log(self, step: int) -> None:
        """Drop log records written after the checkpoint we resume from."""
        if not (self.dist.is_main and self.log_path.exists()):
            return
        keep = [ln for ln in self.log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(self.log_path, "".join(ln + "\n" for ln in keep))

    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.run_dir, self.step, self.state_tensors(), self.state_meta())

    # -- one optimizer step --------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        tc = self.cfg.train
        return tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else tc.lr

    def _micro_batch(self) -> tuple[Tensor, dict | None]:
        tc = self.cfg.train
        idx = self.stream.next(tc.batch_size * self.dist.world_size)
        idx = idx[self.dist.rank * tc.batch_size:(self.dist.rank + 1) * tc.batch_size].to(self.device)
        x0 = self.x[idx]
        cond = None
        if self.cfg.model.num_classes > 0 and self.labels is not None:
            y = self.labels[idx].clone()
            drop = torch.rand(y.shape[0], generator=self.noise_gen) < tc.class_dropout
            y[drop.to(self.device)] = self.cfg.model.num_classes  # the null label (classifier-free guidance)
            cond = {"class_labels": y}
        return x0, cond

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm)."""
        tc = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(tc.grad_accum):
            x0, cond = self._micro_batch()
            loss = self.objective.loss(self.net, x0, cond, self.noise_gen).mean() / tc.grad_accum
            if not torch.isfinite(loss):
                raise TrainingError(f"step {self.step + 1}: loss is {loss.item()}; stopped, the last good "
                                    f"checkpoint in {self.run_dir / 'checkpoints'} is kept")
            loss.backward()
            total += loss.item()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        if not torch.isfinite(norm):
            raise TrainingError(f"step {self.step + 1}: gradient norm is {norm.item()}; stopped, the last good "
                                f"checkpoint in {self.run_dir / 'checkpoints'} is kept")
        self.optimizer.step()
        self.ema.update(self.net)
        self.step += 1
        return total, float(norm)

    # -- the loop ------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or the time limit / SIGTERM), checkpointing along the way."""
        from tqdm.auto import tqdm

        tc = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        start, window, window_start = time.time(), [], time.time()
        stopped = "finished"
        try:
            while self.step < tc.steps:
                loss, norm = self.train_step()
                window.append(loss)
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    rate = len(window) / max(time.time() - window_start, 1e-9)
                    self._log({"step": self.step, "loss": sum(window) / len(window), "grad_norm": norm,
                               "lr": self.lr_at(self.step - 1), "steps_per_s": rate,
                               "images_per_s": rate * tc.batch_size * tc.grad_accum * self.dist.world_size,
                               "elapsed_s": time.time() - start})
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
                    window, window_start = [], time.time()
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save()
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                    self.preview()
                if self._stop_requested:
                    stopped = "sigterm"
                    break
                if tc.time_limit_s and time.time() - start > tc.time_limit_s:
                    stopped = "time_limit"
                    break
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self.save()
        return {"step": self.step, "stopped": stopped, "train_seconds": time.time() - start}

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def ema_module(self) -> torch.nn.Module:
        """A copy of the trained module carrying the EMA weights (for samples and evaluation)."""
        import copy

        module = copy.deepcopy(self.net)
        self.ema.copy_to(module)
        return module.eval()

    def preview(self, path: Path | None = None, n: int | None = None) -> Path | None:
        """Sample a grid with the EMA weights (DDPM, 100 respaced steps) and redraw the loss curve."""
        if not self.dist.is_main:
            return None
        from diffusekit.viz import save_samples_figure

        n = n or self.cfg.train.n_sample
        rng = torch.get_rng_state()  # sampling must not disturb training randomness
        x = self.objective.preview(self.ema_module(), n, self.device)
        torch.set_rng_state(rng)
        path = path or self.run_dir / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        reference = self.data.x[:2000] if self.data.x.ndim == 2 else None
        save_samples_figure(x.cpu(), path, levels=self.data.levels, reference=reference)
        self.plot_losses()
        return path

    def plot_losses(self) -> None:
        from diffusekit.viz import plot_loss_curve

        if self.log_path.exists():
            recs = [json.loads(ln) for ln in self.log_path.read_text().splitlines() if ln.strip()]
            if recs:
                plot_loss_curve([r["step"] for r in recs], [r["loss"] for r in recs], self.run_dir / "loss_curve.png")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg, run_dir: Path | str, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; writes checkpoints, log.jsonl, pictures and summary.json."""
    from diffusekit.config import save_config

    run_dir = Path(run_dir)
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.toml")
    result = trainer.run()
    if trainer.dist.is_main:
        trainer.preview(run_dir / "samples.png")
        summary = {**result, "run_dir": str(run_dir), "data": trainer.data.name,
                   "parameters": sum(p.numel() for p in trainer.net.parameters())}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return result
