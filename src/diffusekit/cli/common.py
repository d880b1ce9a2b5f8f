"""What several commands share: the device flag, and the sampler flags as settings overrides."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from diffusekit.cli.flags import SAMPLER_FLAGS, flag_of
from diffusekit.errors import ConfigError

__all__ = ["device_from_flag", "sampler_overrides", "flag_names"]


def device_from_flag(name: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:1, ... or auto (a GPU when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ... or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    return device


def sampler_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings given as flags (only those: the rest come from the run's ``[sample]``)."""
    return {f: getattr(args, f) for f in SAMPLER_FLAGS if getattr(args, f, None) is not None}


def flag_names(fields) -> dict[str, str]:
    return {f: flag_of(f) for f in fields}
