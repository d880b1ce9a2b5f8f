"""Training throughput: diffusekit's training step vs diffusers' UNet2DModel + DDPMScheduler step.

Both run in one process on the same batches of real data (sklearn digits 8x8, batch 128; MNIST-5k
28x28, batch 64), with AdamW, L_simple, uniform t, parameter counts within 10%. Timings are
interleaved (ours, theirs, ours, ...) and the medians compared, so machine drift hits both alike.

    python bench/train_throughput.py [--repeats 7] [--steps 10] [--threads 2] [--only digits]

Prints JSON: images/s for both, the ratio ours/diffusers, parameter counts and the configs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from diffusekit.data import load_digits, load_mnist
from diffusekit.losses import diffusion_loss, sample_timesteps
from diffusekit.nn import UNet
from diffusekit.parameterization import Denoiser
from diffusekit.schedules import make_schedule

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


def make_ours(case):
    net = UNet(in_channels=1, base_channels=32, num_res_blocks=1, norm_groups=8, **case["ours"])
    den = Denoiser(net, "eps")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    sch = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)

    def step(x0):
        t = sample_timesteps(x0.shape[0], sch.T, g)
        noise = torch.randn(x0.shape, generator=g)
        loss = diffusion_loss(den, x0, t, sch, noise, "simple").mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step


def make_theirs(case):
    from diffusers import DDPMScheduler, UNet2DModel

    net = UNet2DModel(in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=8, attention_head_dim=64,
                      **case["theirs"])
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(x0):
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = net(sched.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step


def time_steps(step, batches) -> float:
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    return time.perf_counter() - t0


def run_case(name: str, repeats: int, steps: int) -> dict:
    case = CASES[name]
    data = case["load"]("train").x
    g = torch.Generator().manual_seed(1)
    batches = [data[torch.randint(0, data.shape[0], (case["batch"],), generator=g)] for _ in range(steps)]
    ours_net, ours = make_ours(case)
    theirs_net, theirs = make_theirs(case)
    for fn in (ours, theirs):  # warm-up
        time_steps(fn, batches[:2])
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(time_steps(ours, batches))
        t_theirs.append(time_steps(theirs, batches))
    ips = lambda ts: case["batch"] * steps / statistics.median(ts)
    p_ours, p_theirs = n_params(ours_net), n_params(theirs_net)
    return {"batch": case["batch"], "params_ours": p_ours, "params_diffusers": p_theirs,
            "param_ratio": p_ours / p_theirs, "images_per_s_ours": ips(t_ours),
            "images_per_s_diffusers": ips(t_theirs), "speedup": ips(t_ours) / ips(t_theirs),
            "config_ours": {k: list(v) if isinstance(v, tuple) else v for k, v in case["ours"].items()},
            "config_diffusers": {k: list(v) if isinstance(v, tuple) else v for k, v in case["theirs"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(CASES), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    names = [args.only] if args.only else list(CASES)
    out = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "steps": args.steps}
    out.update({name: run_case(name, args.repeats, args.steps) for name in names})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
