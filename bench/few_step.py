"""Few-step sampling on trained models: sample quality and cost at 1 to 50 network calls.

For a teacher run (a trained diffusion run) and any distilled students of it, at each budget of
network calls (``--calls``): 1000 samples (``--n``, seeds 0..n-1) with every sampler of ``--samplers``
(the teacher; calls translated into steps by the catalog's rule, heun 2 steps - 1, rounded down, so a
sampler never spends more than the budget) and, with ``--tuned``, on the grids ``diffusekit tune-grid``
stored in the run; each student with its own sampler (its ``[sample]`` section) at the budgets it
takes. Scored like ``diffusekit evaluate``: fd_ratio with its 95% bootstrap interval and kid_excess
with its standard error, on the project's feature network (digits and MNIST); seconds per 1000 samples
on this machine (``torch`` threads as set by OMP_NUM_THREADS; timings drift by +-30% between runs).
Students report their distillation cost: the CPU seconds of training recorded in their summary.json.

    .venv/bin/python bench/few_step.py --teacher runs/digits --student pd=/tmp/pd --student cd=/tmp/cd \\
        [--calls 1,2,4,8,10,20,50] [--samplers ddim,dpmpp_2m,unipc,heun,euler] [--tuned] [--n 1000] [--json out.json]

Prints a table (Markdown) and JSON. Two rows differ only where their fd_ratio intervals do not overlap.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from diffusekit.data.registry import load_dataset
from diffusekit.evaluate.samples import score_samples
from diffusekit.families import open_run
from diffusekit.runs.grids import grid_key, read_grids
from diffusekit.sampling.catalog import sampler_spec
from diffusekit.sampling.generate import check_finite, generate
from diffusekit.sampling.settings import SampleSettings


def steps_for(sampler: str, calls: int) -> int | None:
    """The most steps of ``sampler`` whose network calls fit in ``calls`` (None: none fit)."""
    rule = sampler_spec(sampler).calls
    if rule == "steps":
        return calls
    if rule == "2 steps - 1":
        return (calls + 1) // 2 if calls >= 1 else None
    return None


def calls_of(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler_spec(sampler).calls == "2 steps - 1" else steps


def tuned_times(run: Path, sampler: str, calls: int) -> list[float] | None:
    """The grid ``diffusekit tune-grid`` stored in ``run`` for (sampler, calls; unipc of order 2), if any."""
    entry = read_grids(run).get(grid_key(sampler, 2 if sampler == "unipc" else None), {}).get(str(calls))
    return list(entry["times"]) if entry else None


def measure(model, settings: SampleSettings, test, repeat_timing: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    x = generate(model.denoiser, model.schedule, model.data_shape, settings, progress=False, stats=stats,
                 num_classes=model.num_classes)
    seconds = time.perf_counter() - t0
    check_finite(x)
    q = score_samples(x, model.cfg.data, test, model.levels, stats.get("labels"))
    return {"nfe_per_batch": stats["nfe"] / math.ceil(len(settings.seeds) / settings.batch_size),
            "seconds_per_1000": seconds / x.shape[0] * 1000, "fd": q["fd"], "fd_ratio": q["fd_ratio"],
            "fd_ratio_interval": q["fd_ratio_interval"], "kid_excess": q["kid_excess"],
            "kid_excess_stderr": q["kid_excess_stderr"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--student", action="append", default=[], help="label=run folder of a distilled student")
    p.add_argument("--calls", default="1,2,4,8,10,20,50")
    p.add_argument("--samplers", default="ddim,dpmpp_2m,unipc,heun,euler")
    p.add_argument("--student-calls", default=None, help="budgets for the students (default: 1,2,4,8 within --calls)")
    p.add_argument("--tuned", action="store_true", help="also the teacher on its tuned grids (diffusekit tune-grid)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    budgets = [int(c) for c in args.calls.split(",")]
    student_budgets = ([int(c) for c in args.student_calls.split(",")] if args.student_calls
                       else [c for c in budgets if c <= 8])
    seeds = list(range(args.n))
    rows: list[dict[str, Any]] = []

    def add(label: str, model, settings: SampleSettings, calls: int, grid: str, extra: dict | None = None) -> None:
        r = measure(model, settings, test)
        row = {"model": label, "sampler": settings.sampler, "grid": grid, "steps": settings.steps, "calls": calls,
               **r, **(extra or {})}
        rows.append(row)
        lo, hi = row["fd_ratio_interval"]
        print(f"{label:>10} {settings.sampler:>12} {grid:>16} calls {calls:>3}  fd_ratio {row['fd_ratio']:7.3f} "
              f"[{lo:.3f}, {hi:.3f}]  kid_excess {row['kid_excess']:.4f}±{row['kid_excess_stderr']:.4f}  "
              f"{row['seconds_per_1000']:.1f} s/1000", file=sys.stderr, flush=True)

    teacher = open_run(args.teacher)
    test = load_dataset(teacher.cfg.data, "test")
    for sampler in filter(None, args.samplers.split(",")):  # --samplers "": the students alone
        for calls in budgets:
            steps = steps_for(sampler, calls)
            if steps is None or steps < 1 or calls_of(sampler, steps) != calls:
                continue  # heun spends an odd number of calls; budgets it cannot meet exactly are left out
            base = {"sampler": sampler, "steps": steps, "seeds": seeds, "batch_size": args.batch_size}
            add("teacher", teacher, SampleSettings(**base), calls, "auto" if sampler != "ddim" else "trailing")
            if args.tuned and sampler_spec(sampler).call == "ode":
                times = tuned_times(args.teacher, sampler, calls)
                if times is not None:
                    add("teacher", teacher, SampleSettings(**base, grid="tuned", times=times), calls, "tuned")
    for spec in args.student:
        label, _, path = spec.partition("=")
        student = open_run(Path(path))
        summary = json.loads((Path(path) / "summary.json").read_text())
        cost = {"distill_cpu_seconds": summary.get("train_seconds")}
        for calls in student_budgets:
            settings = SampleSettings.from_config(student.cfg.sample, steps=calls, seeds=seeds,
                                                  batch_size=args.batch_size)
            try:
                add(label, student, settings, calls, settings.grid if settings.sampler != "ddim" else "trailing", cost)
            except Exception as exc:  # noqa: BLE001 - a budget a student cannot take is reported, not fatal
                print(f"{label} at {calls} calls: {exc}", file=sys.stderr)
    print("| model | sampler | grid | calls | fd_ratio [95% interval] | kid_excess | s / 1000 samples |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["fd_ratio_interval"]
        print(f"| {r['model']} | {r['sampler']} | {r['grid']} | {r['calls']} | {r['fd_ratio']:.2f} [{lo:.2f}, {hi:.2f}] "
              f"| {r['kid_excess']:.3f} ± {r['kid_excess_stderr']:.3f} | {r['seconds_per_1000']:.1f} |")
    out = {"teacher": str(args.teacher), "n": args.n, "torch_threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
