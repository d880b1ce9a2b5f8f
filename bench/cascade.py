"""A cascade against a single-stage model on MNIST-5k: sample quality and cost.

The cascade samples a low-resolution run (``--low``, e.g. configs/mnist14.toml) and upsamples with a
super-resolution image-to-image run (``--sr``, configs/mnist_sr.toml), as ``diffusekit sample --run LOW
--then SR`` does; the single stage samples a 28x28 run (``--single``, configs/mnist.toml) directly. Each
draws ``--n`` samples (seeds 0..n-1) with ancestral DDPM at the given steps, scored like ``diffusekit
evaluate`` on the project's MNIST feature network (fd_ratio with its 95% bootstrap interval, kid_excess
with its standard error), with the seconds of sampling on this machine. Training cost: the seconds of one
training step of each run's config, timed side by side in this process (``--repeats`` rounds of
``--train-steps`` steps each, interleaved; the median), times the steps each run was trained for.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cascade.py --low runs/mnist14 --sr runs/mnist_sr --single runs/mnist \\
        [--steps 100] [--sr-steps 50] [--n 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusekit.config import load_config
from diffusekit.data.registry import load_dataset
from diffusekit.errors import DiffusekitError
from diffusekit.evaluate.samples import score_samples
from diffusekit.io.checkpoint import load_checkpoint
from diffusekit.runs.sample import sample_run
from diffusekit.train.trainer import Trainer, read_records


def trained_steps(run: Path) -> int:
    return int(load_checkpoint(run)[1]["step"])


def training_clock(run_dir: Path, key: str) -> dict[str, Any] | None:
    """Steps and seconds of a run's training by the clock ``key`` of its log.jsonl (``cpu_s`` or ``elapsed_s``);
    a resumed run's clock restarts, so the last reading of each segment is added. None without readings."""
    timed = [r for r in read_records(run_dir / "log.jsonl") if key in r]
    if not timed:
        return None
    seconds = sum(a[key] for a, b in pairwise(timed) if b[key] < a[key]) + timed[-1][key]
    return {"steps": timed[-1]["step"], "seconds": round(seconds, 1)}


def emit(result: dict[str, Any], path: Path | None, table: str | None = None) -> None:
    """Print ``result`` as JSON (then ``table``, its markdown, when given), and write the JSON to ``path``."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        try:
            path.write_text(text + "\n")
        except OSError as exc:
            raise DiffusekitError(f"cannot write --json {path}: {exc.strerror or exc}") from exc
    if table is not None:
        print(table)


def run_bench(main: Callable[[], Any], script: str) -> None:
    """Run a bench's ``main``; a bad run, flag value or file (a ``DiffusekitError``) ends it with the project's
    one-line message under the script's name, and Ctrl-C a line and exit status 130."""
    try:
        main()
    except DiffusekitError as exc:
        sys.exit(f"{script}: error: {exc}")
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        sys.exit(130)


def step_seconds(runs: dict[str, Path], train_steps: int, repeats: int) -> dict[str, float]:
    """Median seconds of one training step of each run's config, timed interleaved."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: Trainer(load_config(run / "config.toml"), Path(tmp) / name, progress=False)
                    for name, run in runs.items()}
        try:
            for trainer in trainers.values():
                trainer.train_step()  # warm-up
            for _ in range(repeats):
                for name, trainer in trainers.items():
                    t0 = time.perf_counter()
                    for _ in range(train_steps):
                        trainer.train_step()
                    times[name].append((time.perf_counter() - t0) / train_steps)
        finally:
            for trainer in trainers.values():
                trainer.close()
    return {name: statistics.median(t) for name, t in times.items()}


def score(folder: Path, data_cfg, test) -> dict[str, Any]:
    x = torch.from_numpy(np.load(folder / "samples.npz")["x"])
    q = score_samples(x, data_cfg, test, 256)
    keep = ("fd_ratio", "fd_ratio_interval", "kid_excess", "kid_excess_stderr", "confidence", "class_entropy_bits")
    return {k: q[k] for k in keep if k in q}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--low", type=Path, required=True)
    p.add_argument("--sr", type=Path, required=True)
    p.add_argument("--single", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100, help="DDPM steps of the single stage and the first stage")
    p.add_argument("--sr-steps", type=int, default=50, help="DDPM steps of the super-resolution stage")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    data_cfg = load_config(args.single / "config.toml").data
    test = load_dataset(data_cfg, "test")
    overrides = {"sampler": "ddpm", "steps": args.steps, "seeds": list(range(args.n))}
    result: dict[str, Any] = {"n": args.n, "steps": args.steps, "sr_steps": args.sr_steps,
                              "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        single = sample_run(args.single, dict(overrides), out=Path(tmp) / "single", progress=False)
        cascade = sample_run(args.low, dict(overrides), out=Path(tmp) / "cascade", progress=False, then=args.sr,
                             then_steps=args.sr_steps)
        result["single"] = {**score(single.out, data_cfg, test), "sampling_s": single.seconds}
        result["cascade"] = {**score(cascade.out, data_cfg, test), "sampling_s": cascade.seconds}
    runs = {"single": args.single, "low": args.low, "sr": args.sr}
    per_step = step_seconds(runs, args.train_steps, args.repeats)
    steps = {name: trained_steps(run) for name, run in runs.items()}
    result["training"] = {name: {"seconds_per_step": per_step[name], "steps": steps[name],
                                 "seconds": per_step[name] * steps[name]} for name in runs}
    single_s = result["training"]["single"]["seconds"]
    cascade_s = result["training"]["low"]["seconds"] + result["training"]["sr"]["seconds"]
    result["training_cost_ratio_cascade_to_single"] = cascade_s / single_s
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
