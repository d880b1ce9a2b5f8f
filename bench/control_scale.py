"""A --control-scale sweep of a ControlNet over a text-conditioned scenes base: hint adherence, prompt
adherence and diversity at each scale, on the same prompts, hints and seeds.

``families.controlnet.evaluate_text`` at every scale of ``--scales`` (the first ``--n`` test scenes, each asked
with its full caption and the hint of its own image, 4 seeds each; the run's ``[sample]`` settings with
``--sampler``, ``--steps`` and ``--guidance`` overriding them). Scale 0 is the base alone and 1 the ControlNet as
trained; between and beyond, the residuals the ControlNet adds to the base are multiplied by the scale
(Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models", sec. 3).

    OMP_NUM_THREADS=2 .venv/bin/python bench/control_scale.py --run runs/controlnet_scenes \\
        [--scales 0,0.25,0.5,1,1.5,2] [--n 25] [--sampler ddim --steps 50] [--json out.json]

Prints the result as JSON, then a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cascade import emit, run_bench

from diffusekit.families import open_run
from diffusekit.families.controlnet import evaluate_text
from diffusekit.sampling.settings import SampleSettings


def markdown(result: dict[str, Any]) -> str:
    rows = [key for key, value in result.items() if isinstance(value, dict) and "control_scale" in value]
    hint_keys = list(result[rows[0]]["hint_adherence"])
    head = ["scale", "digit", "position", "size", "all right", *hint_keys, "diversity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(rows, key=lambda k: result[k]["control_scale"]):
        r = result[key]
        p = r["prompt_adherence"]
        lines.append("| " + " | ".join([f"{r['control_scale']:g}", *(f"{p[a]:.2f}" for a in ("digit", "position", "size")),
                                         f"{p['all_right']:.3f}", *(f"{r['hint_adherence'][h]:.3f}" for h in hint_keys),
                                         f"{r['diversity']:.1f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a ControlNet run over a text_unet scenes base")
    p.add_argument("--scales", type=lambda text: [float(s) for s in text.split(",")], default="0,0.25,0.5,1,1.5,2",
                   help="comma-separated control scales")
    p.add_argument("--n", type=int, default=25, help="test scenes (4 seeds each)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model = open_run(args.run)
    overrides = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("guidance", args.guidance))
                 if v is not None}
    settings = SampleSettings.from_config(model.cfg.sample, batch_size=250, **overrides)
    settings.check(lambda f: f"--{f}", T=model.schedule.T)
    result, _ = evaluate_text(model, settings, n_prompts=args.n, scales=args.scales)
    emit(result, args.json, markdown(result))
    return result


if __name__ == "__main__":
    run_bench(main, "bench/control_scale.py")
