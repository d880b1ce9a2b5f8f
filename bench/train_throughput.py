"""Training throughput: diffusekit's training step vs diffusers' UNet2DModel + DDPMScheduler step.

Both run in one process on the same batches of real data (sklearn digits 8x8, batch 128; MNIST-5k
28x28, batch 64), with AdamW, L_simple, uniform t, parameter counts within 10%. Timings are
interleaved (ours, theirs, ours, ...) and the medians compared, so machine drift hits both alike.

    python bench/train_throughput.py [--repeats 7] [--steps 10] [--threads 2] [--only digits]
                                     [--precision fp32 bf16] [--compile]

``--precision`` and ``--compile`` time every listed setting for both models (autocast of forward and loss,
``torch.compile`` of the network; diffusers gets the same treatment), each against diffusers' fp32 eager
step as well as against diffusers under the same setting. Prints JSON: images/s for both, the ratio
ours/diffusers, parameter counts and the configs, and whether the best setting reaches TARGET_SPEEDUP.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.data import load_digits, load_mnist
from diffusekit.losses import diffusion_loss, sample_timesteps
from diffusekit.nn import UNet
from diffusekit.parameterization import Denoiser
from diffusekit.schedules import make_schedule
from diffusekit.speed import autocast

TARGET_SPEEDUP = 1.3  # ours / diffusers' UNet2DModel training step at equal parameters

CASES = {
    "digits": dict(load=load_digits, batch=128, ours=dict(image_size=8, channel_mult=(1, 2), attn_resolutions=(4,)),
                   theirs=dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    "mnist": dict(load=load_mnist, batch=64, ours=dict(image_size=28, channel_mult=(1, 2, 2), attn_resolutions=(7,)),
                  theirs=dict(sample_size=28, block_out_channels=(32, 64, 64),
                              down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))),
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_ours(case) -> nn.Module:
    return UNet(in_channels=case.get("channels", 1), base_channels=case.get("base", 32), num_res_blocks=1,
                norm_groups=8, **case["ours"])


def build_theirs(case) -> nn.Module:
    from diffusers import UNet2DModel  # the comparison's optional dependency (the dev extra)

    c = case.get("channels", 1)
    return UNet2DModel(in_channels=c, out_channels=c, layers_per_block=1, norm_num_groups=8,
                       attention_head_dim=case.get("head_dim", 64), **case["theirs"])


def _maybe_compile(net: nn.Module, compile: bool):
    return torch.compile(net) if compile else net


def make_ours(case, precision: str = "fp32", compile: bool = False, device: str = "cpu", fused: bool = False):
    """(network, one AdamW training step on a batch x0): L_simple, uniform t, our Denoiser and loss."""
    net = build_ours(case).to(device)
    den = Denoiser(_maybe_compile(net, compile), "eps")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
    sch = make_schedule("linear", 1000)
    g, g_noise = torch.Generator().manual_seed(0), torch.Generator(device).manual_seed(1)  # t on the CPU, noise on the device

    def step(x0):
        t = sample_timesteps(x0.shape[0], sch.T, g)
        noise = torch.randn(x0.shape, generator=g_noise, device=x0.device)
        with autocast(x0.device, precision):
            loss = diffusion_loss(den, x0, t, sch, noise, "simple").float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step


def make_theirs(case, precision: str = "fp32", compile: bool = False, device: str = "cpu", fused: bool = False):
    """(network, one AdamW training step): diffusers' UNet2DModel, DDPMScheduler.add_noise and MSE."""
    from diffusers import DDPMScheduler  # the comparison's optional dependency (the dev extra)

    net = build_theirs(case).to(device)
    run = _maybe_compile(net, compile)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
    g = torch.Generator(device).manual_seed(0)

    def step(x0):
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g, device=x0.device)
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        with autocast(x0.device, precision):
            pred = run(sched.add_noise(x0, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step


def time_steps(step, batches) -> float:
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    return time.perf_counter() - t0


def setting_name(precision: str, compile: bool) -> str:
    return precision + ("+compile" if compile else "")


def run_case(name: str, repeats: int, steps: int, settings=(("fp32", False),)) -> dict:
    """Interleaved timings of every (precision, compile) setting for both models; diffusers' fp32 eager
    step is always timed too, as the baseline of ``speedup_vs_diffusers_fp32``."""
    case = CASES[name]
    data = case["load"]("train").x
    g = torch.Generator().manual_seed(1)
    batches = [data[torch.randint(0, data.shape[0], (case["batch"],), generator=g)] for _ in range(steps)]
    settings = list(dict.fromkeys([("fp32", False), *settings]))
    steps_of, params = {}, {}
    for precision, compile in settings:
        key = setting_name(precision, compile)
        for who, make in (("ours", make_ours), ("diffusers", make_theirs)):
            net, fn = make(case, precision, compile)
            params[who] = n_params(net)
            t0 = time.perf_counter()
            time_steps(fn, batches[:2])  # warm-up (and compilation)
            steps_of[(who, key)] = (fn, time.perf_counter() - t0)
    times = {k: [] for k in steps_of}
    for _ in range(repeats):
        for k, (fn, _) in steps_of.items():
            times[k].append(time_steps(fn, batches))
    ips = {k: case["batch"] * steps / statistics.median(ts) for k, ts in times.items()}
    out = {"batch": case["batch"], "params_ours": params["ours"], "params_diffusers": params["diffusers"],
           "param_ratio": params["ours"] / params["diffusers"],
           "images_per_s_ours": ips[("ours", "fp32")], "images_per_s_diffusers": ips[("diffusers", "fp32")],
           "speedup": ips[("ours", "fp32")] / ips[("diffusers", "fp32")],
           "config_ours": {k: list(v) if isinstance(v, tuple) else v for k, v in case["ours"].items()},
           "config_diffusers": {k: list(v) if isinstance(v, tuple) else v for k, v in case["theirs"].items()}}
    if len(settings) > 1:
        base = ips[("diffusers", "fp32")]
        out["settings"] = {key: {"images_per_s_ours": ips[("ours", key)], "images_per_s_diffusers": ips[("diffusers", key)],
                                 "speedup_same_setting": ips[("ours", key)] / ips[("diffusers", key)],
                                 "speedup_vs_diffusers_fp32": ips[("ours", key)] / base,
                                 "vs_our_fp32": ips[("ours", key)] / ips[("ours", "fp32")],
                                 "warmup_s_ours": steps_of[("ours", key)][1]}
                           for key in (setting_name(p, c) for p, c in settings)}
        best = max(out["settings"], key=lambda k: out["settings"][k]["speedup_vs_diffusers_fp32"])
        ratio = out["settings"][best]["speedup_vs_diffusers_fp32"]
        out["best"] = {"setting": best, "speedup_vs_diffusers_fp32": ratio,
                       "reaches_target": ratio >= TARGET_SPEEDUP, "target": TARGET_SPEEDUP}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(CASES), default=None)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"],
                        help="autocast precisions to time (default: fp32)")
    parser.add_argument("--compile", action="store_true", help="also time each precision under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    names = [args.only] if args.only else list(CASES)
    out = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "steps": args.steps}
    settings = [(p, c) for p in args.precision for c in ((False, True) if args.compile else (False,))]
    out.update({name: run_case(name, args.repeats, args.steps, settings) for name in names})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
