"""Per-step time spent outside the network: our stateless loops vs diffusers' scheduler.step loops.

Both sides drive the same trivial network (one multiply), the same batch, the same number of steps
and the same noise source, interleaved over repeats; the network's own time (measured alone) is
subtracted. Two noise settings: one torch.Generator for the batch, and per-sample seeds (ours:
``PerSampleNoise``; diffusers: a list of generators, which its ``randn_tensor`` loops over).
Prints JSON: medians in microseconds per step and the ratio ours / diffusers (target <= 0.5), both
outside the network and, for DDPM, also outside the noise draws (timed alone, same draws): for big
tensors drawing the Gaussian noise is most of a DDPM step on either side.

    .venv/bin/python bench/sampler_overhead.py [--repeats 15] [--steps 50] [--threads 2]

Timings on a shared machine drift: compare the two columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
from torch import nn

from diffusekit.parameterization import Denoiser
from diffusekit.sampling.ddim import sample_ddim
from diffusekit.sampling.ddpm import sample_ddpm
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.schedules import make_schedule


class TrivialNet(nn.Module):
    """eps = 0.1 x: one elementwise op, so the loop's own cost dominates."""

    def forward(self, x, c_noise):
        return x * 0.1


def _ours(kind: str, den, sch, x_T, noise, steps: int):
    if kind == "ddpm":
        return lambda: sample_ddpm(den, sch, x_T, noise(), steps=steps, spacing="leading")
    return lambda: sample_ddim(den, sch, x_T, None, steps=steps, spacing="leading", eta=0.0)


def _theirs(kind: str, net, x_T, generator, steps: int):
    import diffusers

    if kind == "ddpm":
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    else:
        sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)

    @torch.no_grad()
    def run():
        sched.set_timesteps(steps)
        gen = generator()
        x = x_T
        for t in sched.timesteps:
            eps = net(x, t)
            kw = {"generator": gen} if kind == "ddpm" else {"eta": 0.0}
            x = sched.step(eps, t, x, **kw).prev_sample
        return x

    return run


def _net_only(net, x_T, steps: int):
    c = torch.zeros(x_T.shape[0])

    @torch.no_grad()
    def run():
        for _ in range(steps):
            net(x_T, c)

    return run


def _noise_only(ours_noise, theirs_gen, shape, steps: int):
    """The noise draws each DDPM loop makes (steps - 1 of them), timed alone."""
    from diffusers.utils.torch_utils import randn_tensor

    def ours():
        draw = ours_noise()
        for _ in range(steps - 1):
            draw()

    def theirs():
        gen = theirs_gen()
        for _ in range(steps - 1):
            randn_tensor(shape, generator=gen, dtype=torch.float32)

    return ours, theirs


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(shape, steps: int, repeats: int, noise_mode: str, kind: str) -> dict:
    sch = make_schedule("linear", 1000)
    net = TrivialNet()
    den = Denoiser(net).eval()
    seeds = list(range(shape[0]))
    x_T = PerSampleNoise(seeds, shape[1:])()
    if noise_mode == "one-generator":
        def ours_noise():
            g = torch.Generator().manual_seed(0)
            return lambda: torch.randn(shape, generator=g)
        theirs_gen = lambda: torch.Generator().manual_seed(0)
    else:
        ours_noise = lambda: PerSampleNoise(seeds, shape[1:])
        theirs_gen = lambda: [torch.Generator().manual_seed(s) for s in seeds]
    fns = {"ours": _ours(kind, den, sch, x_T, ours_noise, steps), "diffusers": _theirs(kind, net, x_T, theirs_gen, steps),
           "net": _net_only(net, x_T, steps)}
    if kind == "ddpm":
        fns["noise_ours"], fns["noise_diffusers"] = _noise_only(ours_noise, theirs_gen, shape, steps)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved
        for k, fn in fns.items():
            times[k].append(_time(fn))
    med = {k: statistics.median(v) / steps * 1e6 for k, v in times.items()}
    ours_out, theirs_out = med["ours"] - med["net"], med["diffusers"] - med["net"]
    ours_loop = ours_out - med.get("noise_ours", 0.0)
    theirs_loop = theirs_out - med.get("noise_diffusers", 0.0)
    return {"sampler": kind, "shape": list(shape), "steps": steps, "noise": noise_mode,
            "us_per_step": {k: round(v, 1) for k, v in med.items()},
            "outside_net_us_per_step": {"ours": round(ours_out, 1), "diffusers": round(theirs_out, 1)},
            "ratio_ours_over_diffusers": round(ours_out / theirs_out, 3),
            "outside_net_and_noise_us_per_step": {"ours": round(ours_loop, 1), "diffusers": round(theirs_loop, 1)},
            "ratio_loop_only": round(ours_loop / theirs_loop, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import diffusers

    results = []
    for shape in ((64, 1, 8, 8), (64, 3, 32, 32)):
        results.append(bench_case(shape, args.steps, args.repeats, "one-generator", "ddpm"))
        results.append(bench_case(shape, args.steps, args.repeats, "per-sample-seeds", "ddpm"))
        results.append(bench_case(shape, args.steps, args.repeats, "none (eta=0)", "ddim"))
    print(json.dumps({"bench": "sampler_overhead", "torch": torch.__version__, "diffusers": diffusers.__version__,
                      "threads": torch.get_num_threads(), "machine": platform.machine(),
                      "target": "ratio <= 0.5", "results": results}, indent=1))


if __name__ == "__main__":
    main()
