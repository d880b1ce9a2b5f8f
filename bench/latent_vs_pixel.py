"""Latent against pixel text-to-image diffusion on the scenes: what a training step costs.

Times one training step of each run's config side by side in this process (``--repeats`` rounds of
``--train-steps`` steps each, interleaved; the median, as bench/cascade.py does): the pixel run
(``--pixel``, configs/text2img_scenes.toml), the latent run (``--latent``, configs/text2img_scenes_latent.toml)
and its autoencoder (``--autoencoder``, configs/autoencoder_scenes.toml). Training cost = seconds per step x
the steps each run was trained for (its newest checkpoint, or ``--pixel-steps`` / ``--latent-steps``); the
latent side pays for its autoencoder too. It also times what computing the latents once saves: the frozen
encoder on one batch against one latent step (``encode_share``: the part of a step that encoding every
batch would add). Adherence and realism come from ``diffusekit evaluate`` on each run (docs/text2img.md).

    OMP_NUM_THREADS=2 .venv/bin/python bench/latent_vs_pixel.py --pixel runs/text2img_scenes \\
        --latent runs/text2img_scenes_latent --autoencoder runs/autoencoder_scenes [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cascade import emit, step_seconds, trained_steps

from diffusekit.config import load_config
from diffusekit.data.registry import load_dataset
from diffusekit.families.text_latent import load_codec
from diffusekit.latent.model import latent_scale


def encode_seconds(autoencoder_run: Path, batch_size: int, repeats: int) -> float:
    """Median seconds of the frozen encoder (scaled posterior means) on one batch of training scenes."""
    cfg = load_config(autoencoder_run / "config.toml")
    x = load_dataset(cfg.data, "train").x[:batch_size]
    codec = load_codec(autoencoder_run).module
    scale = latent_scale(codec, x)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            codec.encode(x) * scale
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pixel", type=Path, required=True)
    p.add_argument("--latent", type=Path, required=True)
    p.add_argument("--autoencoder", type=Path, required=True)
    p.add_argument("--pixel-steps", type=int, default=None, help="steps of the pixel run (default: its newest)")
    p.add_argument("--latent-steps", type=int, default=None, help="steps of the latent run (default: its newest)")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    runs = {"pixel": args.pixel, "latent": args.latent, "autoencoder": args.autoencoder}
    per_step = step_seconds(runs, args.train_steps, args.repeats)
    steps = {name: trained_steps(run) for name, run in runs.items()}
    steps["pixel"] = args.pixel_steps or steps["pixel"]
    steps["latent"] = args.latent_steps or steps["latent"]
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    result["training"] = {name: {"seconds_per_step": per_step[name], "steps": steps[name],
                                 "seconds": per_step[name] * steps[name]} for name in runs}
    t = result["training"]
    latent_total = t["latent"]["seconds"] + t["autoencoder"]["seconds"]
    result["latent_total_seconds"] = latent_total
    result["cost_ratio_latent_to_pixel"] = latent_total / t["pixel"]["seconds"]
    result["step_ratio_pixel_to_latent"] = per_step["pixel"] / per_step["latent"]
    batch = load_config(args.latent / "config.toml").train.batch_size
    encode = encode_seconds(args.autoencoder, batch, args.repeats)
    result["encode_seconds_per_batch"] = encode
    result["encode_share"] = encode / (encode + per_step["latent"])
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
