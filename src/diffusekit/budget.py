"""How much memory a piece of work needs, measured before the work that would exhaust it.

``activation_bytes`` runs one small call (one example) with forward hooks on every submodule and adds up
the bytes of their outputs: the activations one example costs, which a batch multiplies. With the bytes
of the parameters (and, for training, their gradients, EMA and AdamW moments) it estimates what a
setting implies, and ``fits`` compares that with the memory this machine (or GPU) has free, so that
``train.batch_size = 10**9`` is refused in one line instead of ending in an allocator traceback.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["available_bytes", "parameter_bytes", "activation_bytes", "fits", "gib", "TRAIN_COPIES"]

TRAIN_COPIES = 5  # bytes of training per parameter byte: weights, gradient, EMA and AdamW's two moments
SAFETY = 0.8  # use at most this share of the free memory


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for this process: the GPU's free memory, or MemAvailable of /proc/meminfo (where there
    is none, a large number: the check then only stops absurd settings)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**40


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def activation_bytes(root: nn.Module, call: Callable[[], Any]) -> int:
    """Bytes of every tensor output of every submodule of ``root`` during ``call()`` (run without gradients)."""
    total = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else [output]
        total += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, Tensor))

    handles = [m.register_forward_hook(hook) for m in root.modules()]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return total


def fits(needed: int, device: torch.device | str = "cpu") -> tuple[bool, int]:
    """(whether ``needed`` bytes fit in the free memory with a margin, the free bytes)."""
    free = available_bytes(device)
    return needed <= SAFETY * free, free
