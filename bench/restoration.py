"""Trained image-to-image restoration against the training-free samplers and the simple baselines, side by side.

For each task, every method restores the same held-out inputs (the first ``--n`` of the test split) with the
same seeds, through ``diffusekit restore`` itself (``runs.restore.restore_run``; each folder is kept under
``--out`` and reproduces its rows with ``--settings``):

- ``img2img``: the trained conditional sampler of ``--trained`` (an image-to-image run, ``model.kind = "img2img"``);
- ``repaint``, ``ddnm``, ``dps``: the training-free samplers on ``--free`` (an unconditional run of the same data);
- the simple baselines, which need no model: A+ y (zero fill for masks, nearest upsampling, gray), and
  bicubic upsampling of y for super-resolution.

Columns (``restored`` clamped to [-1, 1]; the region is the unknown pixels for masks, every pixel otherwise):

- ``psnr_sample``: PSNR (dB, peak-to-peak 2) of one restoration, averaged over the seeds, mean and standard
  error over the inputs; ``psnr_mean``: the same for the mean of the seeds' restorations (an estimate of the
  posterior mean, which PSNR favours); ``psnr_mean_pooled``: 10 log10(4 / MSE) with the MSE of that mean
  averaged over the inputs first, the loss the posterior mean minimises (an average of per-image PSNR weighs
  the inputs a baseline gets almost exactly right, e.g. gray patches for colorization, far more);
- ``psnr_mean_gain``: the paired difference, per input, between this row's ``psnr_mean`` and the strongest simple
  baseline's (bicubic for super-resolution, A+ y otherwise; named by ``reference``), mean and standard error over
  the inputs: the same inputs on both sides, so its standard error is far below that of either average;
- ``ssim_sample`` / ``ssim_mean``: SSIM over the whole image (Wang et al. 2004, "Image Quality Assessment: From
  Error Visibility to Structural Similarity": a Gaussian window of sigma 1.5 and side 7; on images smaller
  than 7 pixels a uniform window of their odd side; scikit-image), likewise;
- ``consistency``: RMS of A(restored) - y over the measured values (how far the restoration is from agreeing
  with its measurement; 0 for a projection);
- ``distribution``: the feature-net ``fd_ratio`` (digits, MNIST) or the pixel sliced-W2 ratio (photos) of all
  restorations against the test split, as ``diffusekit evaluate`` scores samples, with its 95% bootstrap interval
  (redrawing inputs with all their seeds: the restorations of one input are not independent draws);
- ``accuracy``: the dataset's classifier on the restorations against the inputs' labels, with its binomial
  standard error, and ``y_only_accuracy`` (per task): a logistic regression trained on the degraded train images (the same
  degradation, other masks) reading only A+ y: about what y alone tells of the class;
- ``diversity``: RMS distance between two seeds' restorations of the same input over the region, averaged over
  pairs and inputs (0 for a deterministic method);
- ``s_per_image``: wall seconds per restored image on this machine (``torch.get_num_threads()`` threads).

Each task's folder also gets ``side_by_side.png``: for the first inputs, the degraded image (unknown pixels red),
seed 0 of every method in the row order, and the original.

    OMP_NUM_THREADS=2 .venv/bin/python bench/restoration.py --trained runs/digits_palette --free runs/digits_lik \\
        --tasks superres,inpaint,inpaint:freeform,outpaint [--n 64] [--seeds 0-3] [--steps 100] \\
        [--out runs/bench-restoration/digits] [--json digits.json]

Prints the rows as JSON, then as a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cascade import emit, run_bench, training_clock
from torch import Tensor

from diffusekit.data.registry import load_dataset
from diffusekit.evaluate.features import load_feature_net
from diffusekit.evaluate.samples import has_feature_net, score_samples
from diffusekit.families import read_run
from diffusekit.io.atomic import atomic_write_bytes
from diffusekit.runs.restore import RestoreSettings, _picture, build_operator, measure, psnr, restore_run
from diffusekit.sampling.restore import Inpaint

FREE_METHODS = ("repaint", "ddnm", "dps")
Y_ONLY_MASK_SEED = 1_000_003  # the train images' masks for the y-only classifier: a seed no test mask uses


def mean_se(values: Tensor | np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def ssim(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image SSIM of x (N, C, H, W) against ref over the whole image (data range [-1, 1])."""
    from skimage.metrics import structural_similarity  # optional: pip install 'diffusekit[photos]'

    side = min(7, *x.shape[-2:])
    side -= 1 - side % 2  # an odd window
    a, b = x.clamp(-1, 1).double().numpy(), ref.double().numpy()
    return torch.tensor([structural_similarity(a[i], b[i], data_range=2.0, channel_axis=0, win_size=side,
                                               gaussian_weights=side >= 7, sigma=1.5, use_sample_covariance=False)
                         for i in range(len(a))])


def diversity(restored: Tensor, region: Tensor | None) -> float:
    """Mean over inputs and seed pairs of the RMS distance between two restorations over the region."""
    S = restored.shape[1]
    if S < 2:
        return float("nan")
    restored = restored.clamp(-1, 1)
    mask = (torch.ones_like(restored[:, 0]) if region is None else region.expand_as(restored[:, 0]).double())
    out = []
    for s, r in combinations(range(S), 2):
        d = (restored[:, s] - restored[:, r]).double().pow(2) * mask
        out.append((d.flatten(1).sum(1) / mask.flatten(1).sum(1)).sqrt())
    return torch.stack(out).mean().item()


def repeat_per_seed(S: int):
    """Per input -> per restored sample: each input's row repeated for its S seeds (restored.flatten(0, 1) order)."""
    return lambda t: t.repeat_interleave(S, 0)


class Scorer:
    """The columns of one task: inputs, labels, operator and measurement of the restore folders, and the
    dataset's classifier and distribution score."""

    def __init__(self, run, task_settings: RestoreSettings, first: dict[str, np.ndarray]):
        self.run, self.settings = run, task_settings
        self.x = torch.from_numpy(first["original"])
        self.y = torch.from_numpy(first["measurement"])
        self.labels = torch.from_numpy(first["labels"])
        known = torch.from_numpy(first["known"])
        self.known = known if known.numel() else None
        self.region = None if self.known is None else ~self.known
        op, _ = build_operator(task_settings, run.data_shape, len(self.x))
        self.op = Inpaint(self.known) if self.known is not None else op
        self.test = load_dataset(run.cfg.data, "test")
        self.net = load_feature_net(run.cfg.data.name) if has_feature_net(run.cfg.data) else None
        self.reference: Tensor | None = None  # per-input PSNR of the reference baseline (``baselines`` sets it)
        self.reference_name = ""

    def consistency(self, restored: Tensor) -> float:
        S = restored.shape[1]
        rep = repeat_per_seed(S)
        op = Inpaint(rep(self.known)) if self.known is not None else self.op
        residual = (op.A(restored.flatten(0, 1).clamp(-1, 1)) - rep(self.y)).double().flatten(1)
        measured = (rep(self.known).expand(-1, self.x.shape[1], -1, -1).flatten(1).sum(1) if self.known is not None
                    else residual.shape[1])
        return (residual.pow(2).sum(1) / measured).sqrt().mean().item()

    def accuracy(self, restored: Tensor) -> tuple[float, float] | None:
        if self.net is None or (self.labels < 0).any():
            return None
        S = restored.shape[1]
        pred = self.net.features_and_logits(restored.flatten(0, 1).clamp(-1, 1))[1].argmax(1)
        right = (pred == self.labels.repeat_interleave(S)).double()
        p = right.mean().item()
        return p, math.sqrt(p * (1 - p) / len(self.labels))  # the inputs are the independent draws

    def distribution(self, restored: Tensor) -> dict[str, Any]:
        K, S = restored.shape[:2]
        q = score_samples(restored.flatten(0, 1).clamp(-1, 1), self.run.cfg.data, self.test, self.run.levels,
                          groups=torch.arange(K).repeat_interleave(S))  # an input's seeds are redrawn together
        if "fd_ratio" in q:
            return {"name": "fd_ratio", "value": q["fd_ratio"], "interval": q["fd_ratio_interval"]}
        return {"name": "sliced_w2_ratio", "value": q["sliced_wasserstein_ratio"],
                "interval": q["sliced_wasserstein_ratio_interval"]}

    def row(self, method: str, restored: Tensor, seconds: float | None) -> dict[str, Any]:
        """The columns for restorations (K, S, C, H, W)."""
        K, S = restored.shape[:2]
        rep = repeat_per_seed(S)
        flat = restored.flatten(0, 1)
        per_sample = psnr(flat, rep(self.x), None if self.region is None else rep(self.region)).reshape(K, S).mean(1)
        mean = restored.mean(1)
        psnr_of_mean = psnr(mean, self.x, self.region)
        mse_of_mean = 4.0 / 10 ** (psnr_of_mean / 10)  # per input, over the region
        row: dict[str, Any] = {
            "method": method, "n_inputs": K, "n_seeds": S,
            "psnr_sample": mean_se(per_sample), "psnr_mean": mean_se(psnr_of_mean),
            "psnr_mean_gain": None if self.reference is None else mean_se(psnr_of_mean - self.reference),
            "psnr_mean_pooled": 10 * math.log10(4.0 / mse_of_mean.mean().item()),
            "ssim_sample": mean_se(ssim(flat, rep(self.x)).reshape(K, S).mean(1)),
            "ssim_mean": mean_se(ssim(mean, self.x)),
            "consistency": self.consistency(restored),
            "distribution": self.distribution(restored),
            "diversity": diversity(restored, self.region),
            "s_per_image": None if seconds is None else seconds / (K * S),
        }
        acc = self.accuracy(restored)
        if acc is not None:
            row["accuracy"] = acc
        return row

    def y_only_accuracy(self) -> float | None:
        """Accuracy of a logistic regression on A+ y, trained on the degraded train split (masks from another seed)."""
        if self.net is None or (self.labels < 0).any():
            return None
        from sklearn.linear_model import LogisticRegression  # sklearn ships with the project's data extras

        train = load_dataset(self.run.cfg.data, "train")
        s_train = RestoreSettings(**{**self.settings.__dict__, "mask_seed": Y_ONLY_MASK_SEED, "n": len(train.x)})
        op, known = build_operator(s_train, self.run.data_shape, len(train.x))
        _, degraded_train = measure(Inpaint(known) if known is not None else op, train.x.float(), s_train)
        _, degraded_test = measure(self.op, self.x, self.settings)
        clf = LogisticRegression(max_iter=3000, C=0.1).fit(degraded_train.flatten(1).numpy(), train.labels.numpy())
        return float(clf.score(degraded_test.flatten(1).numpy(), self.labels.numpy()))


def baselines(scorer: Scorer, task: str, degraded: Tensor, factor: int) -> list[dict[str, Any]]:
    """The simple baselines' rows; the last is the reference of every row's ``psnr_mean_gain``."""
    name = {"superres": "A+y (nearest)", "colorize": "A+y (gray)"}.get(task, "A+y (zero fill)")
    images = {name: degraded}
    if task == "superres":
        images["bicubic"] = F.interpolate(scorer.y, scale_factor=factor, mode="bicubic", align_corners=False)
    scorer.reference_name = list(images)[-1]
    scorer.reference = psnr(images[scorer.reference_name], scorer.x, scorer.region)
    return [scorer.row(n, image[:, None], None) for n, image in images.items()]


def load_npz(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "restored.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


PICTURE_INPUTS = 6


def side_by_side(scorer: Scorer, degraded: Tensor, restored: dict[str, Tensor], path: Path) -> None:
    """The first inputs' rows: degraded (unknown pixels red) | seed 0 of each method in ``restored`` | original."""
    k = min(PICTURE_INPUTS, len(scorer.x))
    columns = torch.stack([r[:k, 0] for r in restored.values()], 1)
    known = None if scorer.known is None else scorer.known[:k]
    atomic_write_bytes(path, _picture(degraded[:k], columns, scorer.x[:k], known, scorer.run.levels))


def bench_task(task: str, trained: Path, free: Path, settings: RestoreSettings, out: Path,
               progress: bool) -> dict[str, Any]:
    rows, scorer, pictured = [], None, {}
    first_original = None  # the first folder's originals: every method must restore these
    for run_dir, methods in ((trained, ("img2img",)), (free, FREE_METHODS)):
        for method in methods:
            if run_dir is None:
                continue
            s = RestoreSettings(**{**settings.__dict__, "method": method})
            metrics, folder = restore_run(run_dir, s, out / f"{task}-{method}", progress=progress)
            z = load_npz(folder)
            if scorer is not None and not np.array_equal(z["original"], first_original):
                raise SystemExit(f"bench/restoration.py: --trained {trained} and --free {free} restore different "
                                 "inputs; their [data] sections must match (e.g. data.photo_split)")
            if scorer is None:
                first_original = z["original"]
                family, source = read_run(run_dir)
                scorer = Scorer(family.load(source, True, "cpu"), s, z)
                rows += baselines(scorer, task, torch.from_numpy(z["degraded"]), settings.factor)
            pictured[method] = torch.from_numpy(z["restored"])
            row = scorer.row(method, pictured[method], metrics["seconds"])
            row["folder"] = str(folder)
            rows.append(row)
            print(f"{task} {method}: PSNR of the mean {row['psnr_mean'][0]:.2f} dB", file=sys.stderr)
    side_by_side(scorer, torch.from_numpy(z["degraded"]), pictured, out / "side_by_side.png")
    return {"task": task, "mask": settings.mask, "reference": scorer.reference_name,
            "y_only_accuracy": scorer.y_only_accuracy(), "rows": rows,
            "picture": str(out / "side_by_side.png"), "picture_columns": ["degraded", *pictured, "original"]}


def markdown(result: dict[str, Any]) -> str:
    header = ("| task | method | PSNR, a sample | PSNR, mean of seeds | gain over the reference, paired | PSNR of the "
              "pooled MSE, mean of seeds | SSIM, a sample | SSIM, mean | consistency | distribution | accuracy | "
              "diversity | s / image |")
    lines = [header, "|" + "---|" * 13]
    for task in result["tasks"]:
        label = task["task"] + (f" ({task['mask']})" if task["mask"] else "")
        for i, r in enumerate(task["rows"]):
            d = r["distribution"]
            dist = f"{d['value']:.2f}" + (f" [{d['interval'][0]:.2f}, {d['interval'][1]:.2f}]" if "interval" in d else "")
            acc = f"{r['accuracy'][0]:.3f} ± {r['accuracy'][1]:.3f}" if "accuracy" in r else ""
            two = lambda v, f=".2f": f"{v[0]:{f}} ± {v[1]:{f}}"
            lines.append(" | ".join([
                "", label if i == 0 else "", r["method"], two(r["psnr_sample"]), two(r["psnr_mean"]),
                "" if r["psnr_mean_gain"] is None else two(r["psnr_mean_gain"]) + f" ({task['reference']})",
                f"{r['psnr_mean_pooled']:.2f}",
                two(r["ssim_sample"], ".3f"), two(r["ssim_mean"], ".3f"), f"{r['consistency']:.3f}", dist, acc,
                "" if math.isnan(r["diversity"]) else f"{r['diversity']:.3f}",
                "" if r["s_per_image"] is None else f"{r['s_per_image']:.3f}", ""]).strip())
        if task["y_only_accuracy"] is not None:
            lines.append(f"| | | *classifier on A+y alone: accuracy {task['y_only_accuracy']:.3f}* |" + " |" * 10)
    return "\n".join(lines)


def training_cost(run_dir: Path | None) -> dict[str, Any] | None:
    """Steps and wall seconds of a run's training (``cascade.training_clock`` on ``elapsed_s``)."""
    return None if run_dir is None else training_clock(run_dir, "elapsed_s")


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trained", type=Path, required=True, help="an image-to-image run")
    p.add_argument("--free", type=Path, default=None, help="an unconditional run of the same data (training-free rows)")
    p.add_argument("--tasks", default="superres,inpaint,outpaint",
                   help="comma-separated; TASK:MASK picks a mask, e.g. inpaint:freeform (default: the task's own)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seeds", type=parse_seeds, default="0-3", help="e.g. 0-3 or 0,5,7")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-restoration"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"trained": str(args.trained), "free": str(args.free) if args.free else None,
                              "n": args.n, "seeds": args.seeds, "steps": args.steps,
                              "threads": torch.get_num_threads(), "tasks": [],
                              "training": {"trained": training_cost(args.trained), "free": training_cost(args.free)}}
    for spec in args.tasks.split(","):
        task, _, mask = spec.partition(":")
        settings = RestoreSettings(task=task, mask=mask, factor=args.factor, steps=args.steps, n=args.n,
                                   seeds=args.seeds)
        result["tasks"].append(bench_task(task, args.trained, args.free, settings,
                                          args.out / spec.replace(":", "-"), not args.no_progress))
    emit(result, args.json, markdown(result))
    return result


if __name__ == "__main__":
    run_bench(main, "bench/restoration.py")
