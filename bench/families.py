"""VAE vs Markov hierarchical VAE vs DDPM on the same data, split and units (seed 000's storyline).

Trains each family from its config (or loads a run folder given on the command line, or one left in
``--out`` by an earlier call), then evaluates all of them on the held-out split with the same code:

- bits/dim: an upper bound on -log P(x) of the quantized test images (VAE, MHVAE: -ELBO with one
  chain, and the IWAE bound with k chains; DDPM: the discrete VLB, stratified estimate over t);
- quality: Fréchet distance of samples in the project's feature space, ``fd_ratio`` = fd / (the same
  distance between real train and test images; ~1 is indistinguishable from data);
- training time (the run's ``summary.json``) and sampling time per image;
- active units per latent level (posterior collapse) for the latent-variable models.

Prints a markdown table and JSON, and writes ``<out>/families.json`` and ``<out>/families.png``
(64 samples of each family side by side).

    OMP_NUM_THREADS=1 .venv/bin/python bench/families.py --data digits \\
        [--ddpm-run runs/families_digits/ddpm] [--vae-run R] [--mhvae-run R] [--out runs/families_digits]

MNIST-5k (``configs/vae_mnist.toml``, ``mhvae_mnist.toml``, ``mnist_likelihood.toml``; about 30 min on one
thread, 13 of them training the DDPM, 9 evaluating it): ``... bench/families.py --data mnist``. Use one
thread per process on a busy machine: with OMP_NUM_THREADS=2 and other jobs on the two cores, training
ran ~15x slower (OpenMP threads waiting on each other).

Timings on a shared machine drift (±30%): compare the columns of one call, not calls with each other.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIGS = {
    "digits": {"vae": "configs/vae_digits.toml", "mhvae": "configs/mhvae_digits.toml",
               "ddpm": "configs/digits_likelihood.toml"},
    "mnist": {"vae": "configs/vae_mnist.toml", "mhvae": "configs/mhvae_mnist.toml",
              "ddpm": "configs/mnist_likelihood.toml"},
}


def _has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints" / "latest.json").is_file()


def _train_or_load(family: str, data: str, given: Path | None, out: Path, overrides: list[str]) -> tuple[Path, float]:
    """The run folder of ``family`` and its training seconds (trained here unless it exists)."""
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    run = given or out / family
    if not _has_checkpoint(run):
        if given is not None:
            raise SystemExit(f"--{family}-run {given}: no checkpoint in that folder")
        cfg = load_config(CONFIGS[data][family], [f"data.name={data}", *overrides])
        print(f"training {family} from {CONFIGS[data][family]} into {run} ...", flush=True)
        train(cfg, run, progress=False)
    summary = run / "summary.json"
    seconds = json.loads(summary.read_text())["train_seconds"] if summary.is_file() else float("nan")
    return run, seconds


def _reusable(run: Path) -> dict | None:
    """The run's eval/metrics.json when it holds both metrics for the newest checkpoint."""
    path = run / "eval" / "metrics.json"
    try:
        res = json.loads(path.read_text())
        step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None
    return res if res.get("step") == step and "bpd" in res and "quality" in res else None


def _evaluate(family: str, run: Path, n_samples: int | None, strata: int, iwae_k: int, seed: int,
              reuse: bool = False) -> dict:
    from diffusekit.families.base import EvaluateSettings
    from diffusekit.runs.evaluate import evaluate_run

    t0 = time.time()
    if reuse and _reusable(run) is not None:
        res = _reusable(run)
    else:
        settings = EvaluateSettings(metrics=("bpd", "fd"), n_samples=n_samples, strata=strata, iwae_k=iwae_k, seed=seed)
        res = evaluate_run(run, settings, progress=False)[0].result
    b, q = res["bpd"], res["quality"]
    row = {"family": family, "run": str(run), "step": res["step"], "bits_per_dim": b["bits_per_dim"],
           "bits_per_dim_stderr": b["stderr_bits_per_dim"], "fd": q["fd"], "fd_train_test": q["fd_train_test"],
           "fd_ratio": q["fd_ratio"], "confidence": q["confidence"], "seconds_per_sample": q["seconds_per_sample"],
           "n_samples": q["n_samples"], "baselines": b.get("baselines"), "eval_seconds": time.time() - t0}
    if family == "ddpm":
        row["bound"] = f"VLB, {b['mode']}"
        row["sampler"] = f"{q['sampler']}, {q['steps']} steps"
    else:
        row.update(bound="-ELBO (1 chain)", iwae_bits_per_dim=b["iwae_bits_per_dim"], iwae_k=b["iwae_k"],
                   active_units=res["collapse"]["active_units"], latent_units=res["collapse"]["latent_units"],
                   latent_bits_per_dim_per_level=b["latent_bits_per_dim_per_level"], sampler=q["sampler"],
                   reconstruction_psnr_db=res["reconstruction"]["psnr_db"])
    return row


def _table(rows: list[dict]) -> str:
    head = ("| family | bits/dim (bound) | IWAE bits/dim | fd | fd_ratio | train s | sample s/image | active units |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        iwae = f"{r['iwae_bits_per_dim']:.3f} (k={r['iwae_k']})" if "iwae_bits_per_dim" in r else "-"
        active = f"{r['active_units']} of {r['latent_units']}" if "active_units" in r else "-"
        lines.append(f"| {r['family']} | {r['bits_per_dim']:.3f} ± {r['bits_per_dim_stderr']:.3f} | {iwae} | "
                     f"{r['fd']:.2f} | {r['fd_ratio']:.2f} | {r['train_seconds']:.0f} | {r['seconds_per_sample']:.2e} | "
                     f"{active} |")
    return "\n".join(lines)


def _picture(runs: dict[str, Path], rows: list[dict], path: Path) -> Path:
    """64 samples per family side by side (the grids written by the evaluation, seeds 0-63)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4.4))
    for ax, (family, run), row in zip(axes, runs.items(), rows):
        ax.imshow(Image.open(run / "eval" / "samples.png"), cmap="gray")
        ax.set_title(f"{family}: {row['bits_per_dim']:.2f} bits/dim, fd_ratio {row['fd_ratio']:.1f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(CONFIGS), default="digits")
    p.add_argument("--out", type=Path, default=None, help="folder for trained runs and results (default runs/families_<data>)")
    for family in ("ddpm", "vae", "mhvae"):
        p.add_argument(f"--{family}-run", type=Path, default=None, help=f"use this trained {family} run folder")
    p.add_argument("--n-samples", type=int, default=None, help="samples for the quality score (default: test size, <= 1000)")
    p.add_argument("--strata", type=int, default=50, help="strata of t for the DDPM bound (2 draws each)")
    p.add_argument("--iwae-k", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reuse-eval", action="store_true",
                   help="reuse a run's eval/metrics.json when it is for the newest checkpoint (default: re-evaluate)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for the trained configs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"families_{args.data}"
    out.mkdir(parents=True, exist_ok=True)
    runs, rows = {}, []
    for family in ("ddpm", "vae", "mhvae"):
        run, train_s = _train_or_load(family, args.data, getattr(args, f"{family}_run"), out, args.overrides)
        runs[family] = run
        print(f"evaluating {family} ({run}) ...", flush=True)
        row = _evaluate(family, run, args.n_samples, args.strata, args.iwae_k, args.seed, args.reuse_eval)
        row["train_seconds"] = train_s
        rows.append(row)
    result = {"data": args.data, "split": "test", "threads": torch.get_num_threads(), "rows": rows,
              "picture": str(_picture(runs, rows, out / "families.png"))}
    (out / "families.json").write_text(json.dumps(result, indent=1))
    print(_table(rows))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
