"""How the network runs, not what it computes: mixed precision, ``torch.compile`` and the CUDA switches.

- ``autocast(device, precision)``: ``torch.autocast`` in bf16 or fp16 ("fp32": no context at all, so an
  fp32 run is bit-for-bit what it was without this module). Autocast lowers only the ops PyTorch lists
  (convolutions, matmuls, attention); weights, their gradients, the EMA and the optimizer stay fp32
  (Micikevicius et al. 2018, Sec. 3.1, "FP32 master copy of weights").
- ``grad_scaler(precision, device)``: ``torch.amp.GradScaler``, enabled for fp16 only: the loss is
  scaled before backward so small gradients survive fp16, and a step whose gradients overflow is
  skipped and the scale lowered (Micikevicius et al. 2018, Sec. 3.2, "Loss scaling").
- ``CompiledOrEager``: ``torch.compile`` of a module or function that falls back to eager execution,
  with a one-line warning, where the backend cannot compile (no C++ compiler, no Triton).
- ``FastDenoiser``: a denoiser whose network runs under ``sample.precision`` / ``sample.compile``; its
  prediction comes back in the dtype of x_t, so every sampler's own arithmetic is unchanged.
- ``switch_on`` and ``set_tf32``: the "auto" | "on" | "off" switches of ``[train]`` ("auto": on with CUDA).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from diffusekit.parameterization import Denoiser, DenoiserFn, Prediction

__all__ = ["PRECISION_DTYPES", "CompiledOrEager", "FastDenoiser", "autocast", "compiled_denoiser", "fast_denoiser", "grad_scaler", "set_tf32",
           "switch_on"]

PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``precision`` ("bf16" | "fp16"); "fp32" is no context at all."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}; got {precision!r}")
    dtype = PRECISION_DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(_device_type(device), dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """PyTorch's gradient scaler, enabled for fp16 only (bf16 has fp32's exponent range and needs none;
    a disabled scaler passes the loss and the optimizer step through unchanged)."""
    return torch.amp.GradScaler(_device_type(device), enabled=precision == "fp16")


def switch_on(value: str, device: torch.device | str) -> bool:
    """A ``[train]`` speed switch: "on", "off", or "auto" (on when training on CUDA)."""
    if value not in ("auto", "on", "off"):
        raise ValueError(f"a speed switch is 'auto', 'on' or 'off'; got {value!r}")
    return value == "on" or (value == "auto" and _device_type(device) == "cuda")


def set_tf32(enabled: bool) -> None:
    """CUDA fp32 matmuls and cuDNN convolutions in TF32 (10-bit mantissa, fp32 range) or in full IEEE fp32.
    A process-wide setting of PyTorch; it has no effect on a CPU."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


class CompiledOrEager:
    """``torch.compile(fn)``, called in place of ``fn``; when compiling fails (the backend's compiler is
    missing or cannot handle the graph) it warns once, in one line naming ``key``, and calls ``fn`` eagerly
    from then on. Compilation happens at the first call, before anything runs, so a fallback changes no
    result and draws no random number. Attributes (``no_sync``, a family's buffers) are ``fn``'s."""

    def __init__(self, fn: Callable, key: str, backend: str | Callable = "inductor"):
        self.eager, self.key = fn, key
        try:
            self.compiled: Callable | None = torch.compile(fn, backend=backend)
        except RuntimeError as exc:  # e.g. a Python version dynamo does not support
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        cause = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed wraps the backend's error
        first = next((ln for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
        warnings.warn(f"{self.key} = true: torch.compile is unavailable here ({first.strip()[:200]}); running eagerly",
                      RuntimeWarning, stacklevel=3)
        self.compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                self._fall_back(exc)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("eager", "compiled", "key"):  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.eager, name)


def compiled_denoiser(denoiser: DenoiserFn, backend: str | Callable = "inductor") -> DenoiserFn:
    """A ``Denoiser`` whose network is compiled (``CompiledOrEager``, key ``sample.compile``); the caller's
    denoiser is not changed. Only the network is compiled: the conversion to eps and x0 reads the noise
    level as a Python float, which would make the compiler specialise on every level of a sampler's grid.
    Any other denoiser runs eagerly, with a one-line warning."""
    if not isinstance(denoiser, Denoiser):
        warnings.warn(f"sample.compile = true compiles the network of a Denoiser; this {type(denoiser).__name__} "
                      "runs eagerly", RuntimeWarning, stacklevel=3)
        return denoiser
    net = CompiledOrEager(denoiser.net, "sample.compile", backend)  # held as a plain attribute: nothing is copied
    return Denoiser(net, denoiser.kind,  # type: ignore[arg-type]
                    learned_variance=denoiser.learned_variance).train(denoiser.training)


class FastDenoiser:
    """``denoiser`` with its network under autocast in ``precision`` and, with ``compile``, compiled
    (``compiled_denoiser``). The prediction (eps, x0, raw) is cast back to the dtype of x_t: only the
    network runs in low precision, the sampler's arithmetic stays float32/float64."""

    def __init__(self, denoiser: DenoiserFn, precision: str = "fp32", compile: bool = False):
        self.denoiser, self.precision = denoiser, precision
        self.call = compiled_denoiser(denoiser) if compile else denoiser

    def __call__(self, x_t: Tensor, logsnr: Tensor, cond: Any = None) -> Prediction:
        with autocast(x_t.device, self.precision):
            pred = self.call(x_t, logsnr, cond)
        dtype = x_t.dtype
        v = None if pred.variance_v is None else pred.variance_v.to(dtype)
        return dataclasses.replace(pred, eps=pred.eps.to(dtype), x0=pred.x0.to(dtype), raw=pred.raw.to(dtype),
                                   variance_v=v)

    def __getattr__(self, name: str) -> Any:
        if name in ("denoiser", "precision", "call"):
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def fast_denoiser(denoiser: DenoiserFn, precision: str = "fp32", compile: bool = False) -> DenoiserFn:
    """``denoiser`` itself for fp32 without compilation (bit-for-bit today's path), else a ``FastDenoiser``."""
    if precision == "fp32" and not compile:
        return denoiser
    return FastDenoiser(denoiser, precision, compile)
