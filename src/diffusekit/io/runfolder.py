"""What a run folder written by ``diffusekit train`` holds, read once: its newest complete checkpoint,
the verified tensors, the recorded config and the data facts every model family needs to load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffusekit.config import Config, config_from_dict
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.checkpoint import latest_checkpoint, load_checkpoint

__all__ = ["RunCheckpoint", "read_run_checkpoint"]


@dataclass
class RunCheckpoint:
    """The newest complete checkpoint of a run folder, its record parsed (``read_run_checkpoint``)."""

    run_dir: Path
    path: Path  # checkpoint stem: path.json is the record, path.safetensors the tensors
    tensors: dict[str, torch.Tensor]
    record: dict
    cfg: Config  # the recorded config
    data_shape: tuple[int, ...]
    levels: int | None
    num_classes: int
    step: int

    @property
    def kind(self) -> str:
        """The recorded ``model.kind``."""
        return self.cfg.model.kind

    def weights(self, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str, str]:
        """(state dict of the EMA or raw weights, the file they come from, what they are) for
        ``check_state`` / ``load_module_state``."""
        prefix = "ema." if use_ema else "model."
        state = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return state, f"{self.path}.safetensors", f"{prefix[:-1]} weights"


def read_run_checkpoint(run_dir: Path | str) -> RunCheckpoint:
    """Load, verify and parse the newest complete checkpoint of ``run_dir``, for every model family; a
    missing folder or checkpoint, or a record without its config or data description, is a one-line
    ``CheckpointError`` naming the file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder does not exist")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint found in {run_dir / 'checkpoints'}")
    tensors, record = load_checkpoint(ckpt)
    try:
        meta = record["meta"]
        cfg = config_from_dict(meta["config"])
        data = meta["data"]
        data_shape = tuple(int(s) for s in data["shape"])
        levels, num_classes = data["levels"], data["num_classes"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}.json: metadata lacks {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt}.json: recorded config is invalid ({exc})") from None
    if not (levels is None or (isinstance(levels, int) and levels >= 2)) or not isinstance(num_classes, int):
        raise CheckpointError(f"{ckpt}.json: meta.data has levels {levels!r} and num_classes {num_classes!r}")
    return RunCheckpoint(run_dir, ckpt, tensors, record, cfg, data_shape, levels, num_classes, int(record["step"]))
