"""The likelihood table: trained runs side by side on the same held-out split, in bits/dim.

    python bench/likelihood.py --runs base=runs/a frontier=runs/b [--ode-examples 100] [--n-samples 500]

For every run, on the test split of its data (``--split train``: the training split; its first ``--examples``
images):
- the discrete bound (stratified, 50 strata x 2) with the run's reverse variances (learned, else fitted)
  and its x0 clipping (``model.bound_clip``), ± its standard error, and the same draws with beta_tilde;
- the continuous-time bound (VDM) of a continuous run;
- the probability-flow ODE likelihood with each dequantization (``--dequantizations``: uniform,
  truncated_normal, importance with ``--dequant-samples`` draws) on the first ``--ode-examples`` images;
  importance is a bound only with the exact trace, so it is left out (and the table says so) where the
  trace is Hutchinson's (``--trace``; auto: exact up to ``EXACT_TRACE_DIMS`` values per image);
- the training CPU seconds from the run's log (``cpu_s``; the segments of a resumed run add up; runs
  from before ``cpu_s`` was logged report wall seconds, marked);
- the sample quality of ``--n-samples`` samples with the run's sampler settings (fd_ratio and its 95%
  interval where a feature network exists, else the pixel sliced-W2 ratio);
- the per-pixel categorical and full-covariance Gaussian baselines of the data, once per dataset;
- with ``--also-clipped LABEL``, that run's bound again with x0 clipped (``--bound-clip on``), same weights.

Prints the results as JSON (``--json FILE`` also writes them), then a markdown table; ``--figure FILE``
draws the bound curves (``bound.jsonl`` of runs trained with ``train.bound_every``) against training CPU
seconds beside their ``loss_std``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cascade import emit, run_bench, training_clock

from diffusekit.config import LossConfig, TrainConfig
from diffusekit.data.registry import load_dataset
from diffusekit.errors import DiffusekitError
from diffusekit.evaluate import diffusion as metrics
from diffusekit.families import read_run
from diffusekit.families.base import EvaluateSettings
from diffusekit.families.diffusion import evaluation_sample_settings
from diffusekit.train.trainer import read_records
from diffusekit.viz import _figure, _save_figure  # the project's Agg figure helpers

EXACT_TRACE_DIMS = 64  # the exact divergence costs one backward pass per dimension: digits yes, MNIST no
DEQUANTIZATIONS = ("uniform", "truncated_normal", "importance")


def parse_runs(items: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise argparse.ArgumentTypeError(f"--runs wants LABEL=RUN_FOLDER items, got {item!r}")
        if label in runs:
            raise argparse.ArgumentTypeError(f"--runs: the label {label!r} is given twice")
        runs[label] = Path(path)
    return runs


def parse_dequantizations(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in DEQUANTIZATIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"wants a comma-separated list of {', '.join(DEQUANTIZATIONS)}, got {text!r}")
    return names


def training_cpu(run_dir: Path) -> dict[str, Any]:
    """Steps and training CPU seconds from log.jsonl (``cascade.training_clock``), or wall seconds
    (``elapsed_s``) for a log without ``cpu_s``."""
    recs = read_records(run_dir / "log.jsonl")
    key = "cpu_s" if recs and all("cpu_s" in r for r in recs) else "elapsed_s"
    clock = training_clock(run_dir, key)
    if clock is None:
        return {"steps": None, "seconds": None, "clock": None}
    return {**clock, "clock": "cpu" if key == "cpu_s" else "wall"}


def bench_run(label: str, run_dir: Path, args: argparse.Namespace, baselines: dict[str, dict]) -> list[dict[str, Any]]:
    """The run's row, and with ``--also-clipped LABEL`` a second row: its discrete bound with x0 clipped (the
    same weights; the clip changes the reverse mean only)."""
    family, source = read_run(run_dir)
    if family.name not in ("diffusion", "continuous"):
        raise DiffusekitError(f"--runs {label}={run_dir}: a {family.name} run; the likelihood table takes diffusion "
                              "and continuous runs")
    model = family.load(source, True, "cpu")
    cfg = model.cfg
    test = load_dataset(cfg.data, args.split)
    if args.examples and args.examples < len(test):
        test = test.subset(torch.arange(args.examples))
    if model.levels is None:
        raise DiffusekitError(f"--runs {label}={run_dir}: data.name = {cfg.data.name!r} is continuous; bits/dim "
                              "need data on discrete levels")
    progress = not args.no_progress
    row: dict[str, Any] = {"label": label, "run": str(run_dir), "data": cfg.data.name, "step": model.step,
                           "objective": cfg.loss.objective, "training": training_cpu(run_dir),
                           "switches": switches(cfg)}
    t0 = time.time()
    variance = "learned" if cfg.model.learned_variance else "fitted"
    bound = metrics.bound(model, test, False, args.strata, args.seed, progress, variance, None, cfg.model.bound_clip)
    baselines.setdefault(cfg.data.name, bound.pop("baselines"))
    bound.pop("baselines", None)
    row["bound"] = bound
    if model.logsnr_schedule is not None:
        row["continuous"] = metrics.continuous_bound_summary(model, test, args.seed, progress)
    dims = test.x[0].numel()
    trace = args.trace if args.trace != "auto" else "exact" if dims <= EXACT_TRACE_DIMS else "hutchinson"
    row["ode"] = {}
    for deq in args.dequantizations if args.ode_examples else ():
        if deq == "importance" and trace != "exact":
            row["ode"][deq] = {"skipped": f"the importance-weighted bound needs the exact trace ({dims} values per "
                                          f"image; --trace auto takes it up to {EXACT_TRACE_DIMS})"}
            continue
        k = args.dequant_samples if deq == "importance" else 1
        row["ode"][deq] = metrics.nll_ode(model, test, args.ode_examples, args.seed, trace, 1e-5, 1e-5, progress, deq, k)
    if args.n_samples:
        settings = EvaluateSettings(metrics=("fd",), n_samples=args.n_samples, seed=args.seed)
        sampling = evaluation_sample_settings(model, settings, args.n_samples)
        quality, _ = metrics.sample_quality(model, test, sampling, progress)
        row["quality"] = {k: quality[k] for k in ("fd_ratio", "fd_ratio_interval", "sliced_wasserstein_ratio",
                                                   "n_samples", "sampler", "steps") if k in quality}
    row["seconds"] = round(time.time() - t0, 1)
    row["curve"] = read_records(run_dir / "bound.jsonl")
    rows = [row]
    if label in args.also_clipped and not cfg.model.bound_clip and cfg.loss.objective == "discrete":
        clipped = metrics.bound(model, test, False, args.strata, args.seed, progress, variance, None, True)
        clipped.pop("baselines", None)
        rows.append({**row, "label": f"{label}, clipped at evaluation", "bound": clipped, "ode": {}, "curve": [],
                     "switches": row["switches"] + ", x0 clipped at evaluation (--bound-clip on)"})
    return rows


def switches(cfg) -> str:
    """The likelihood switches a run was trained with, in words."""
    m, lo, d = cfg.model, cfg.loss, cfg.diffusion
    out = []
    if lo.objective == "continuous":
        out.append(f"continuous ELBO, {'learned' if d.learned_schedule else d.schedule} schedule "
                   f"[{d.logsnr_min:g}, {d.logsnr_max:g}]")
    elif d.schedule == "logsnr_linear":
        out.append(f"{lo.weighting} loss, log-SNR linear [{d.logsnr_min:g}, {d.logsnr_max:g}]")
    elif d.schedule == "linear":
        out.append(f"{lo.weighting} loss, beta_1 = {d.beta_start:g}")
    else:
        out.append(f"{lo.weighting} loss, {d.schedule} schedule")
    if m.learned_variance:
        out.append("learned variances" + (f" (λ {lo.vlb_weight:g})" if lo.vlb_weight != LossConfig.vlb_weight else ""))
    if lo.t_sampling == "importance":
        out.append("importance t")
    if m.fourier_features:
        out.append(f"Fourier {m.fourier_features}")
    if m.bound_clip:
        out.append("x0 clipped")
    out.append(f"width {m.base_channels}")
    t = cfg.train  # the training settings the sweeps vary, where they differ from the defaults
    out += [f"{name} {value:g}" for name, value, default in (
        ("dropout", m.dropout, 0.0), ("weight decay", t.weight_decay, TrainConfig.weight_decay),
        ("lr", t.lr, TrainConfig.lr), ("batch", t.batch_size, TrainConfig.batch_size),
        ("EMA", t.ema_decay, TrainConfig.ema_decay)) if value != default]
    if t.lr_schedule != "constant":
        out.append(f"{t.lr_schedule} lr")
    return ", ".join(out)


def _fmt(value: float | None, se: float | None = None, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se else "")


def markdown(result: dict[str, Any]) -> str:
    deqs = result["dequantizations"]
    head = ["run", "switches", "bound", "β̃ bound", "continuous"] + [f"ODE, {d}" for d in deqs] + \
           ["train CPU s", "steps", "samples"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        b, c = r["bound"], r.get("continuous")
        cells = [r["label"], r["switches"], _fmt(b["bits_per_dim"], b["stderr_bits_per_dim"]),
                 _fmt(b.get("bits_per_dim_beta_tilde")),
                 _fmt(c["bits_per_dim"], c["stderr_bits_per_dim"]) if c else "-"]
        for d in deqs:
            o = r["ode"].get(d, {})
            cells.append(_fmt(o["bits_per_dim"], o["stderr_bits_per_dim"]) if "bits_per_dim" in o else "-")
        t = r["training"]
        cells += [f"{t['seconds']:.0f}" + (" (wall)" if t["clock"] == "wall" else "") if t["seconds"] else "-",
                  str(r["step"])]
        q = r.get("quality", {})
        if "fd_ratio" in q:
            lo, hi = q.get("fd_ratio_interval", [float("nan")] * 2)
            cells.append(f"fd_ratio {q['fd_ratio']:.2f} [{lo:.2f}, {hi:.2f}]")
        elif "sliced_wasserstein_ratio" in q:
            cells.append(f"SW ratio {q['sliced_wasserstein_ratio']:.2f}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    for name, base in result["baselines"].items():
        lines.append(f"\n{name}: per-pixel categorical {base['categorical_per_pixel']:.3f}, full-covariance Gaussian "
                     f"{base['gaussian_full_covariance']:.3f} bits/dim")
    return "\n".join(lines)


def curves_figure(result: dict[str, Any], path: Path) -> Path | None:
    """Held-out bound against training CPU seconds (±2 SE) per run with a curve, and each run's loss_std."""
    rows = [r for r in result["rows"] if r["curve"]]
    if not rows:
        return None
    fig, axes = _figure(1, 2, size=(11.0, 4.0))
    ax, ax2 = axes[0, 0], axes[0, 1]
    for r in rows:
        c = r["curve"]
        x = [p["cpu_s"] for p in c]
        y = np.array([p["bits_per_dim"] for p in c])
        se = np.array([p.get("stderr_bits_per_dim", 0.0) for p in c])
        kind = c[-1].get("variance", "")
        name = f"{r['label']} ({'continuous ELBO' if kind == 'continuous ELBO' else f'discrete bound, {kind} variances'})"
        line = ax.errorbar(x, y, yerr=2 * se, marker="o", markersize=3, capsize=2, label=name)
        log = read_records(Path(r["run"]) / "log.jsonl")
        ax2.plot([p["step"] for p in log if "loss_std" in p], [p["loss_std"] for p in log if "loss_std" in p],
                 color=line[0].get_color(), label=r["label"])
    for name, base in result["baselines"].items():
        ax.axhline(base["categorical_per_pixel"], color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"per-pixel categorical ({name})", (0.01, base["categorical_per_pixel"]),
                    xycoords=("axes fraction", "data"), fontsize=7, va="bottom", color="gray")
    ax.set_xlabel("training CPU seconds")
    ax.set_ylabel("held-out bound, bits/dim")
    ax.set_title("bound along training (±2 SE)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss_std")
    ax2.set_title("spread of the per-example losses in a batch", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    return _save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=[], metavar="LABEL=RUN", help="the runs, each with a label")
    p.add_argument("--from-json", nargs="+", type=Path, default=[], metavar="FILE",
                   help="rows of earlier runs of this bench (their --json files) to put in the same table first")
    p.add_argument("--examples", type=int, default=0,
                   help="score the first N images only, 0 = the whole split (default: 0)")
    p.add_argument("--split", choices=["test", "train"], default="test",
                   help="the images scored; train shows how far a run has overfitted (default: test)")
    p.add_argument("--strata", type=int, default=50, help="strata of t of the bound, 2 draws each (default: 50)")
    p.add_argument("--ode-examples", type=int, default=100,
                   help="test images scored by the ODE, 0 = no ODE columns (default: 100)")
    p.add_argument("--dequantizations", type=parse_dequantizations, default=list(DEQUANTIZATIONS),
                   help=f"comma-separated, of {', '.join(DEQUANTIZATIONS)} (default: all)")
    p.add_argument("--trace", choices=["auto", "exact", "hutchinson"], default="auto",
                   help=f"the ODE's divergence; auto: exact up to {EXACT_TRACE_DIMS} values per image (default: auto)")
    p.add_argument("--dequant-samples", type=int, default=4, help="draws of the importance option (default: 4)")
    p.add_argument("--n-samples", type=int, default=500, help="samples for the quality score, 0 = none (default: 500)")
    p.add_argument("--also-clipped", nargs="*", default=[], metavar="LABEL",
                   help="runs (by label) of the discrete objective trained without model.bound_clip that also get a row "
                        "with their bound clipped at evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--figure", type=Path, default=None, help="draw the bound curves here (PNG)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        runs = parse_runs(args.runs)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    unknown = [v for v in args.also_clipped if v not in runs]
    if unknown:
        p.error(f"--also-clipped: {unknown[0]!r} is not a label of --runs")
    for flag, value, lo, hi in (("--examples", args.examples, 0, 10**6), ("--strata", args.strata, 1, 1000),
                                ("--ode-examples", args.ode_examples, 0, 10_000),
                                ("--dequant-samples", args.dequant_samples, 1, 256),
                                ("--n-samples", args.n_samples, 0, 50_000)):
        if not lo <= value <= hi:
            p.error(f"{flag} must be in {lo}..{hi}, got {value}")
    if not runs and not args.from_json:
        p.error("give --runs LABEL=RUN ... or --from-json FILE ...")
    earlier = []
    for path in args.from_json:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"--from-json {path}: cannot be read as JSON ({type(exc).__name__})")
        if not (isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("baselines"), dict)):
            p.error(f"--from-json {path}: not a JSON file written by this bench (no rows and baselines)")
        earlier.append(data)
    result: dict[str, Any] = {"split": args.split, "examples": args.examples or "all", "strata": args.strata,
                              "ode_examples": args.ode_examples,
                              "dequantizations": args.dequantizations, "dequant_samples": args.dequant_samples,
                              "n_samples": args.n_samples, "seed": args.seed, "threads": torch.get_num_threads(),
                              "baselines": {}, "rows": []}
    for e in earlier:
        result["rows"] += e["rows"]
        for name, base in e["baselines"].items():
            result["baselines"].setdefault(name, base)
        result["dequantizations"] = list(dict.fromkeys(result["dequantizations"] + e.get("dequantizations", [])))
    for label, run_dir in runs.items():
        result["rows"] += bench_run(label, run_dir, args, result["baselines"])
    if args.figure:
        drawn = curves_figure(result, args.figure)
        result["figure"] = str(drawn) if drawn else None
    emit(result, args.json, markdown(result))
    return result


if __name__ == "__main__":
    run_bench(main, "bench/likelihood.py")
