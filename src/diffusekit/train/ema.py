"""Exponential moving average of parameters, kept in float32 whatever the model's dtype."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after each optimizer step.

    The decay is warmed up as min(decay, (1 + n) / (10 + n)) over the first updates n, so early
    averages are not dominated by the random initialisation. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if name in params and value.dtype.is_floating_point:
                shadow.lerp_(value.float(), 1.0 - d)
            else:
                shadow.copy_(value)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
