"""One benchmark for a GPU: training and sampling throughput of diffusekit's U-Net against diffusers'
``UNet2DModel`` at equal parameters, in fp32, bf16 and bf16 + ``torch.compile``.

    python bench/gpu.py [--out gpu.json] [--budget-s 420]
    python bench/gpu.py --cpu-smoke      # tiny sizes on the CPU: every code path, no meaningful number

Two U-Nets of about 35M parameters (``CASES``): 28x28x1 and 32x32x3, each against a diffusers model with
parameters within 10%, built and stepped as ``bench/train_throughput.py`` does (AdamW, L_simple, uniform
t; the same GPU switches for both: TF32 matmuls, fused AdamW, noise drawn on the device). For each
setting it prints, as JSON: training images/s of both models, the model FLOPs of one training step
(``torch.utils.flop_counter.FlopCounterMode`` on the eager model, forward and backward), the achieved
fraction of the device's dense bf16 peak (``PEAK_BF16_FLOPS``; null for a device not in the table), our
sampling images/s with DDIM at 50 steps (``diffusekit.sampling.generate``: the network under the
setting's precision and compilation, the sampler in fp32), and the peak memory of each. It stops
starting new measurements once ``--budget-s`` seconds have passed (default 420, so a run ends within 8
minutes); what was skipped is listed. Without CUDA (and without --cpu-smoke) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared builders of train_throughput.py
from train_throughput import build_ours, make_ours, make_theirs, n_params

from diffusekit.parameterization import Denoiser
from diffusekit.sampling.generate import generate
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import make_schedule
from diffusekit.speed import set_tf32

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12))


def _case(size: int, channels: int, base: int, batch: int, attn: int) -> dict:
    """U-Nets with levels of base x (1, 2, 2) channels, self-attention at the last (4 heads for both)."""
    mult = (1, 2, 2)
    return {"channels": channels, "base": base, "batch": batch, "size": size, "head_dim": base * mult[-1] // 4,
            "ours": {"image_size": size, "channel_mult": mult, "attn_resolutions": (attn,), "num_heads": 4},
            "theirs": {"sample_size": size, "block_out_channels": tuple(base * m for m in mult),
                       "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")}}


CASES = {"28x28x1": _case(28, 1, 176, 256, 7), "32x32x3": _case(32, 3, 176, 256, 8)}  # ~36M ours, ~34M diffusers
SMOKE_CASES = {"28x28x1": _case(28, 1, 8, 2, 7), "32x32x3": _case(32, 3, 8, 2, 8)}
SETTINGS = (("fp32", False), ("bf16", False), ("bf16", True))
SAMPLE_STEPS = 50


def peak_bf16_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, dense bf16 peak in FLOP/s or None when the device is not in ``PEAK_BF16_FLOPS``)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def step_flops(make, case: dict, device: torch.device) -> int:
    """Model FLOPs of one training step (forward and backward; the optimizer's elementwise work is not
    counted), counted by PyTorch's FLOP counter on the eager fp32 model."""
    from torch.utils.flop_counter import FlopCounterMode  # only this function needs it

    _, step = make(case, "fp32", False, str(device), device.type == "cuda")
    x = torch.randn(case["batch"], case["channels"], case["size"], case["size"], device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        step(x)
    return int(counter.get_total_flops())


def time_training(make, case: dict, precision: str, compile: bool, device: torch.device, steps: int,
                  repeats: int) -> dict:
    """Images/s of ``make``'s training step (median over ``repeats`` timings of ``steps`` steps), the
    warm-up time (compilation included) and the peak memory."""
    _reset_memory(device)
    net, step = make(case, precision, compile, str(device), device.type == "cuda")
    g = torch.Generator(device).manual_seed(1)
    x = torch.rand(case["batch"], case["channels"], case["size"], case["size"], generator=g, device=device) * 2 - 1
    t0 = time.perf_counter()
    for _ in range(3):
        step(x)
    _sync(device)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"images_per_s": case["batch"] * steps / statistics.median(times), "warmup_s": warmup,
            "peak_memory_gib": _peak_memory_gib(device), "params": n_params(net)}


def time_sampling(case: dict, precision: str, compile: bool, device: torch.device, n: int) -> dict:
    """Our DDIM at ``SAMPLE_STEPS`` steps over ``n`` images in one batch (the network under ``precision``,
    compiled or not; the sampler in fp32): images/s after one warm-up call, and the peak memory."""
    _reset_memory(device)
    den = Denoiser(build_ours(case).to(device), "eps").eval()
    schedule = make_schedule("linear", 1000)
    shape = (case["channels"], case["size"], case["size"])
    settings = SampleSettings(sampler="ddim", steps=SAMPLE_STEPS, seeds=list(range(n)), batch_size=n,
                              precision=precision, compile=compile)
    with torch.no_grad():
        generate(den, schedule, shape, settings.replace(steps=2), device=device, progress=False)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        generate(den, schedule, shape, settings, device=device, progress=False)
        _sync(device)
    return {"images_per_s": n / (time.perf_counter() - t0), "peak_memory_gib": _peak_memory_gib(device)}


def run(cases: dict, device: torch.device, steps: int, repeats: int, n_sample: int, budget_s: float,
        settings=SETTINGS) -> dict:
    start = time.perf_counter()
    name, peak = peak_bf16_flops(device)
    out = {"device": name, "peak_bf16_flops": peak, "torch": torch.__version__, "steps": steps, "repeats": repeats,
           "sample_steps": SAMPLE_STEPS, "switches": {"tf32": device.type == "cuda", "fused_adamw": device.type == "cuda"},
           "cases": {}, "skipped": []}
    for case_name, case in cases.items():
        flops = {who: step_flops(make, case, device) for who, make in (("ours", make_ours), ("diffusers", make_theirs))}
        row = {"batch": case["batch"], "flops_per_step": flops, "settings": {}}
        for precision, compile in settings:
            key = precision + ("+compile" if compile else "")
            if time.perf_counter() - start > budget_s:
                out["skipped"].append(f"{case_name} {key}")
                continue
            cell = {who: time_training(make, case, precision, compile, device, steps, repeats)
                    for who, make in (("ours", make_ours), ("diffusers", make_theirs))}
            for who, timing in cell.items():
                achieved = flops[who] * timing["images_per_s"] / case["batch"]
                timing["achieved_flops"] = achieved
                timing["fraction_of_bf16_peak"] = achieved / peak if peak else None
            cell["speedup"] = cell["ours"]["images_per_s"] / cell["diffusers"]["images_per_s"]
            cell["sampling_ours"] = time_sampling(case, precision, compile, device, n_sample)
            row["settings"][key] = cell
        row["param_ratio"] = n_params(build_ours(case)) / next(
            (c["diffusers"]["params"] for c in row["settings"].values()), float("nan"))
        out["cases"][case_name] = row
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny models on the CPU (fp32 and bf16, no compilation): proves the code paths")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new measurement after this many seconds (default: 420)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timing (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per setting, median taken (default: 3)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.cpu_smoke:
        result = run(SMOKE_CASES, torch.device("cpu"), steps=1, repeats=1, n_sample=2, budget_s=args.budget_s,
                     settings=SETTINGS[:2])
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured (--cpu-smoke runs the code paths on the CPU)")
        return 0
    else:
        device = torch.device("cuda")
        set_tf32(True)
        result = run(CASES, device, args.steps, args.repeats, n_sample=256, budget_s=args.budget_s)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
