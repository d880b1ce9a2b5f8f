"""What a training checkpoint holds, and the checks a resume makes before it changes anything.

Tensors (``io.checkpoint`` format): ``model.*`` (the trained module's weights), ``ema.*`` (their fp32
average), ``optim.<parameter>.<field>`` (AdamW's moments and step), ``rng.<name>`` (this rank's RNG
states; rank r > 0 under ``rng.<name>.rank<r>``) and ``objective.<name>`` (the state an objective keeps
beyond its module, ``families.base.StatefulObjective``; absent for most). Metadata: ``config``, ``data`` (name, shape, levels,
number of classes), ``data_position`` (epoch, offset), ``ema_updates``, ``world_size``,
``optimizer_state`` (the fields of each parameter's state) and ``param_groups``; an fp16 run
(``train.precision``) adds ``grad_scaler``, the state of ``torch.amp.GradScaler`` (its scale and
growth tracker as JSON numbers, so a resumed run scales and skips exactly as one that never stopped).

``training_tensors`` / ``training_meta`` write them; ``read_resume`` checks every piece against the
trainer that resumes (its config, module, optimizer, data and process count) and returns them, or raises
a one-line error naming the file and the missing or misfitting piece.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.config import Config, config_from_dict, config_to_dict
from diffusekit.data.dataset import ArrayDataset
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.checkpoint import check_state, load_checkpoint
from diffusekit.train.ema import EMA

__all__ = ["rng_key", "training_tensors", "training_meta", "data_fingerprint", "check_same_run", "ResumePoint",
           "read_resume", "RESUMABLE_CHANGES"]

META_KEYS = ("config", "data_position", "ema_updates", "param_groups", "world_size", "optimizer_state")


def rng_key(key: str, rank: int) -> str:
    return key if rank == 0 else f"{key}.rank{rank}"


def _param_names(net: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in net.named_parameters()}


def training_tensors(net: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                     rng_states: dict[str, list[Tensor]],
                     objective_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Every tensor needed to continue exactly; ``rng_states[name][r]`` is rank r's state ``name``,
    ``objective_state`` the objective's own (the same on every rank)."""
    out = {f"model.{k}": v for k, v in net.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    names = _param_names(net)
    for p, st in optimizer.state.items():
        for key, val in st.items():
            out[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(val)
    for key, states in rng_states.items():
        for rank, state in enumerate(states):
            out[rng_key(key, rank)] = state
    out.update({f"objective.{k}": v for k, v in (objective_state or {}).items()})
    return out


def data_fingerprint(data: ArrayDataset) -> str:
    """SHA-256 (hex, 16 digits) of the training examples and labels: an image added to or removed from a
    folder dataset changes it, and with it the split a run would train and be evaluated on."""
    digest = hashlib.sha256(data.x.detach().cpu().contiguous().numpy().tobytes())
    if data.labels is not None:
        digest.update(data.labels.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def training_meta(cfg: Config, data: ArrayDataset, position: dict[str, int], ema: EMA, world_size: int,
                  net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The metadata of a training checkpoint (see the module docstring)."""
    names = _param_names(net)
    return {"config": config_to_dict(cfg), "data_position": position, "ema_updates": ema.updates,
            "world_size": world_size,
            "data": {"name": data.name, "shape": list(data.shape), "levels": data.levels,
                     "num_classes": data.num_classes, "fingerprint": data_fingerprint(data)},
            "optimizer_state": {names[id(p)]: sorted(st) for p, st in optimizer.state.items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}


@dataclass
class ResumePoint:
    """The checked pieces of a checkpoint, ready to load into a trainer."""

    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    ema_updates: int
    optimizer: dict[str, Any]  # ``Optimizer.load_state_dict`` form
    position: dict[str, int]
    rngs: dict[str, Tensor]  # this rank's states
    grad_scaler: dict[str, Any] | None = None  # ``GradScaler.load_state_dict`` form (fp16 runs)
    objective: dict[str, Tensor] | None = None  # the ``objective.*`` tensors, prefix removed (checked by the objective)


# the config sections a resumed run may change: how long and how it trains, and how it samples; the rest
# (data, model, diffusion, loss and the family sections) define the model being trained
RESUMABLE_CHANGES = ("train", "sample")


def check_same_run(cfg: Config, recorded: dict[str, Any], source: str) -> None:
    """A ConfigError naming the first key outside ``RESUMABLE_CHANGES`` where ``cfg`` differs from the
    config the checkpoint was trained with (an edited config.toml or a --set would otherwise resume a
    different model on the old weights)."""
    now = config_to_dict(cfg)
    then = config_to_dict(config_from_dict(recorded))
    for section, table in now.items():
        if section in RESUMABLE_CHANGES:
            continue
        for key, value in table.items():
            if then[section][key] != value:
                raise ConfigError(f"--resume: {section}.{key} is {value!r} but the run was trained with "
                                  f"{then[section][key]!r} ({source}); a resumed run keeps its data, model, diffusion "
                                  f"and loss settings (only [{'] and ['.join(RESUMABLE_CHANGES)}] may change)")


def read_resume(ckpt: Path, net: nn.Module, optimizer: torch.optim.Optimizer, data: ArrayDataset, world_size: int,
                rank: int, rng_template: dict[str, Tensor], cfg: Config | None = None) -> ResumePoint:
    """Load checkpoint ``ckpt`` and check that it continues this trainer exactly (see the module docstring):
    the same config but for [train] and [sample] (``cfg``), the same training data (its fingerprint, when
    the checkpoint has one), every piece present and fitting; ``rng_template`` holds this rank's current
    RNG states (names, shapes and dtypes to expect)."""
    n_examples = len(data)
    tensors, record = load_checkpoint(ckpt)
    st_file, js_file = f"{ckpt}.safetensors", f"{ckpt}.json"
    meta, step = record["meta"], int(record["step"])
    missing = [f"meta.{k}" for k in META_KEYS if k not in meta]
    missing += [k for k in (rng_key(k, r) for r in range(world_size) for k in rng_template) if k not in tensors]
    if missing:
        raise CheckpointError(f"{st_file}: cannot resume exactly, missing {', '.join(missing[:5])}")
    try:
        config_from_dict(meta["config"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{js_file}: recorded config is invalid ({exc})") from None
    if cfg is not None:
        check_same_run(cfg, meta["config"], js_file)
    recorded_data = meta.get("data", {}).get("fingerprint") if isinstance(meta.get("data"), dict) else None
    if recorded_data is not None and recorded_data != data_fingerprint(data):
        raise CheckpointError(f"{js_file}: the training data changed since this run started (data.name = "
                              f"{cfg.data.name if cfg else '?'!r}, now {n_examples} examples): resuming would train "
                              "on a different split; restore the data or start a new run")
    if meta["world_size"] != world_size:
        raise CheckpointError(f"{js_file}: written by {meta['world_size']} processes, resumed with {world_size}; "
                              "exact resume needs every rank's RNG state (use the same --nproc_per_node)")
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = net.state_dict()
    check_state(expected, model, st_file, "model weights")
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    check_state({k: v.float() for k, v in expected.items()}, ema, st_file, "EMA weights")
    state = _check_optimizer(net, tensors, meta, step, st_file)
    groups = _check_param_groups(optimizer, meta["param_groups"], js_file)
    position = _check_position(meta, n_examples, js_file)
    rngs = {k: tensors[rng_key(k, rank)] for k in rng_template}
    check_state(rng_template, rngs, st_file, "RNG states")
    ema_updates = meta["ema_updates"]
    if isinstance(ema_updates, bool) or not isinstance(ema_updates, int) or ema_updates < 0:
        raise CheckpointError(f"{js_file}: meta.ema_updates must be a non-negative integer, got {ema_updates!r}")
    return ResumePoint(step, model, ema, ema_updates, {"state": state, "param_groups": groups}, position, rngs,
                       _check_grad_scaler(meta.get("grad_scaler"), js_file),
                       {k[10:]: v for k, v in tensors.items() if k.startswith("objective.")})


GRAD_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _check_grad_scaler(state: Any, source: str) -> dict[str, Any] | None:
    """The recorded ``GradScaler`` state (None when absent): positive finite numbers under its five keys."""
    if state is None:
        return None
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(state, dict) and set(state) == set(GRAD_SCALER_KEYS) and all(number(v) for v in state.values())
            and state["scale"] > 0 and state["growth_interval"] >= 1 and state["_growth_tracker"] >= 0):
        raise CheckpointError(f"{source}: meta.grad_scaler must hold positive numbers {', '.join(GRAD_SCALER_KEYS)}; "
                              f"got {state!r}"[:300])
    return dict(state)


def _check_optimizer(net: nn.Module, tensors: dict[str, Tensor], meta: dict, step: int, source: str) -> dict:
    params = dict(net.named_parameters())
    order = {n: i for i, n in enumerate(params)}
    recorded = meta["optimizer_state"]
    if not isinstance(recorded, dict) or any(n not in params or not isinstance(f, list) for n, f in recorded.items()):
        raise CheckpointError(f"{source}: meta.optimizer_state does not describe this network's parameters")
    if step > 0 and not recorded:
        raise CheckpointError(f"{source}: cannot resume exactly, missing the optimizer state")
    wanted = {f"optim.{n}.{f}" for n, fs in recorded.items() for f in fs}
    present = {k for k in tensors if k.startswith("optim.")}
    if wanted != present:
        gone, extra = sorted(wanted - present), sorted(present - wanted)
        raise CheckpointError(f"{source}: optimizer state does not match its record"
                              + (f"; missing {', '.join(gone[:3])}" if gone else "")
                              + (f"; unexpected {', '.join(extra[:3])}" if extra else ""))
    state: dict[int, dict[str, Tensor]] = {}
    for name, fields in recorded.items():
        for field in fields:
            val = tensors[f"optim.{name}.{field}"]
            if field != "step" and (val.shape != params[name].shape or val.dtype != params[name].dtype):
                raise CheckpointError(f"{source}: optim.{name}.{field} is {tuple(val.shape)} {val.dtype}, "
                                      f"the parameter is {tuple(params[name].shape)} {params[name].dtype}")
            if field == "step" and val.numel() != 1:
                raise CheckpointError(f"{source}: optim.{name}.step is not a scalar")
            state.setdefault(order[name], {})[field] = val.to(params[name].device) if field != "step" else val
    return state


def _check_param_groups(optimizer: torch.optim.Optimizer, groups: Any, source: str) -> list[dict]:
    current = optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(current) or not all(
            isinstance(g, dict) and set(g) == set(c) - {"params"} for g, c in zip(groups, current)):
        raise CheckpointError(f"{source}: meta.param_groups does not fit this optimizer")
    return [dict(g, params=ids) for g, ids in zip(groups, _group_param_ids(current))]


def _group_param_ids(groups: list[dict]) -> list[list[int]]:
    """The optimizer's own numbering of parameters, group by group (as ``state_dict`` numbers them)."""
    ids, n = [], 0
    for g in groups:
        ids.append(list(range(n, n + len(g["params"]))))
        n += len(g["params"])
    return ids


def _check_position(meta: dict, n_examples: int, source: str) -> dict[str, int]:
    pos = meta["data_position"]
    ok = (isinstance(pos, dict) and set(pos) == {"epoch", "offset"}
          and all(isinstance(v, int) and not isinstance(v, bool) for v in pos.values())
          and pos["epoch"] >= 0 and 0 <= pos["offset"] < n_examples)
    if not ok:
        raise CheckpointError(f"{source}: meta.data_position {pos!r} does not fit the {n_examples} training examples")
    return pos
