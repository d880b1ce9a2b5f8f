"""Data-parallel training with PyTorch's DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc_per_node N -m diffusekit train ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment; ``DistInfo.from_env`` reads them and
``init_process_group`` joins the group (NCCL on CUDA devices, gloo on the CPU) with a timeout, so a
rank that dies makes the others fail instead of waiting forever. Everything that crosses ranks is a
tensor collective (never a pickled object): the per-step agreement on loss and stop flags
(``all_reduce_sum``) and the RNG states gathered into checkpoints (``gather_tensors``).

The timeout is ``DIFFUSEKIT_DIST_TIMEOUT_S`` seconds (default 600): it bounds how long a rank waits
for a peer at a collective, including the time rank 0 spends writing a checkpoint or a preview.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from diffusekit.errors import ConfigError, TrainingError

__all__ = ["DistInfo", "init_process_group", "destroy_process_group", "wrap_module", "all_reduce_sum",
           "gather_tensors", "timeout_seconds", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class DistInfo:
    """This process's place in the job: global rank, number of processes, rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistInfo":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (defaults: a single process)."""
        values = {}
        for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            text = os.environ.get(key, str(default))
            try:
                values[key] = int(text)
            except ValueError:
                raise ConfigError(f"environment variable {key}={text!r} is not an integer") from None
        info = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
        if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
            raise ConfigError(f"environment RANK={info.rank}, WORLD_SIZE={info.world_size}, "
                              f"LOCAL_RANK={info.local_rank} are inconsistent")
        return info


def timeout_seconds() -> float:
    text = os.environ.get("DIFFUSEKIT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"environment variable DIFFUSEKIT_DIST_TIMEOUT_S={text!r} must be a positive number")
    return value


def init_process_group(info: DistInfo, device: torch.device) -> bool:
    """Join the process group torchrun set up (env://). Returns True when this call created it
    (the caller then destroys it), False for a single process or an already initialised group."""
    if not info.distributed:
        return False

    if dist.is_initialized():
        if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
            raise TrainingError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                                f"the environment says {info.rank} of {info.world_size}")
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={info.world_size} but {', '.join(missing)} is not set; launch with "
                          "torchrun --nproc_per_node N -m diffusekit train ...")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_seconds()))
    return True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_module(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` inside DistributedDataParallel (parameters broadcast from rank 0 once; gradients
    averaged over ranks at the end of each backward pass outside ``no_sync``)."""
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=device.index if ids else None)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of ``values`` over all ranks (float64 on the CPU in and out); identity for one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    buf = values.to(_comm_device(), torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def gather_tensors(t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (1-D, same dtype on every rank, any length), in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [t]
    device, world = _comm_device(), dist.get_world_size()
    size = torch.tensor([t.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=device)
    padded[:t.numel()] = t.reshape(-1).to(device)
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:int(s.item())].cpu() for o, s in zip(out, sizes)]
