"""How good is a trained VAE / MHVAE / autoencoder run, in the units used for diffusion.

- ``bound``: the negative ELBO on held-out data in bits/dim (a bound on -log P(x) of the quantized
  data, the same quantity ``diffusekit evaluate`` reports for diffusion), its terms
  (reconstruction, prior matching, per-level consistency) and the tighter IWAE bound with k samples;
- ``collapse``: posterior-collapse diagnostics: the latent cost of each level in bits/dim and its
  active units, the coordinates u with Cov_x(E[z_u | x]) > 0.01 (Burda et al. 2016, sec. 5.2);
- ``reconstruction``: MSE and PSNR of E[x | z = E[z | x]] (the codec of latent diffusion);
- ``quality``: ancestral samples scored like diffusion samples (``evaluate.quality``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.likelihood import nats_to_bits_per_dim
from diffusekit.vae.models import HierarchicalVAE, sample
from diffusekit.vae.objective import LATENT_KINDS, build_latent_model, neg_bound_per_example

__all__ = ["LatentRun", "run_model_kind", "is_latent_run", "load_latent_run", "bound", "active_units",
           "reconstruction_quality", "evaluate_latent_run", "format_latent_table", "sample_latent_run"]

ACTIVE_THRESHOLD = 0.01


# -- runs -------------------------------------------------------------------------------------------
@dataclass
class LatentRun:
    """A trained latent-variable run: config, module (EMA or raw weights) and data facts."""

    cfg: object
    module: HierarchicalVAE
    data_shape: tuple[int, ...]
    levels: int | None
    step: int
    checkpoint: Path


def run_model_kind(run_dir: Path | str) -> str | None:
    """``model.kind`` recorded in a run folder's newest checkpoint (its JSON record only), else in its
    config.toml; None when neither can be read (the regular loaders then report what is wrong)."""
    run_dir = Path(run_dir)
    try:
        name = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["name"]
        record = json.loads((run_dir / "checkpoints" / f"{name}.json").read_text())
        return str(record["meta"]["config"]["model"]["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        from diffusekit.config import load_config

        return load_config(run_dir / "config.toml").model.kind
    except Exception:
        return None


def is_latent_run(run_dir: Path | str) -> bool:
    return run_model_kind(run_dir) in LATENT_KINDS


def load_latent_run(run_dir: Path | str, use_ema: bool = True, device: str | torch.device = "cpu") -> LatentRun:
    """Load the newest complete checkpoint of a VAE / MHVAE / autoencoder run."""
    from diffusekit.models import read_run_checkpoint

    rc = read_run_checkpoint(run_dir)
    module = build_latent_model(rc.cfg, rc.data_shape)
    state = rc.weights(use_ema)[0]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{rc.path}.safetensors: weights do not fit the configured model ({first})") from None
    return LatentRun(rc.cfg, module.to(device).eval(), rc.data_shape, rc.levels, rc.step, rc.path)


# -- the bound --------------------------------------------------------------------------------------
def _chunks(n: int, rows_per_example: int, max_rows: int = 1024) -> list[slice]:
    size = max(1, max_rows // rows_per_example)
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


@torch.no_grad()
def bound(module: HierarchicalVAE, x: Tensor, iwae_k: int = 100, seed: int = 0) -> dict[str, Any]:
    """The ELBO and IWAE_k bounds on ``x`` per dimension: nats/dim, and bits/dim (for discrete data
    these bound -log P(x) of the quantized values).

    The ELBO uses one chain per example (analytic prior KL, Monte Carlo elsewhere) with its standard
    error over examples; its terms are averaged over examples. IWAE_k (Burda et al. 2016) uses k
    fresh chains per example and is at least as tight in expectation.
    """
    module.eval()
    g = torch.Generator().manual_seed(seed)
    dims = math.prod(x.shape[1:])
    rec, pri, con, neg, iw = [], [], [], [], []
    for sl in _chunks(x.shape[0], 1):
        t = module(x[sl], g, 1)
        rec.append(t["reconstruction"]), pri.append(t["prior"]), con.append(t["consistency"]), neg.append(t["neg_elbo"])
    for sl in _chunks(x.shape[0], iwae_k):
        iw.append(neg_bound_per_example(module(x[sl], g, iwae_k), iwae_k))
    rec, pri, con, neg, iw = (torch.cat(v).double() for v in (rec, pri, con, neg, iw))
    bpd = lambda nats: float(nats_to_bits_per_dim(nats, dims))
    per_level = [bpd(c) for c in con.mean(0).tolist()] + [bpd(pri.mean().item())]
    return {"bits_per_dim": bpd(neg.mean().item()), "stderr_bits_per_dim": bpd(neg.std().item() / math.sqrt(len(neg))),
            "iwae_bits_per_dim": bpd(iw.mean().item()), "iwae_k": iwae_k,
            "nats_per_dim": neg.mean().item() / dims, "n_examples": x.shape[0],
            "reconstruction_bits_per_dim": bpd(rec.mean().item()),
            "prior_bits_per_dim": per_level[-1],
            "latent_bits_per_dim_per_level": per_level}


@torch.no_grad()
def active_units(module: HierarchicalVAE, x: Tensor, seed: int = 0, threshold: float = ACTIVE_THRESHOLD,
                 n_chains: int = 8) -> dict[str, Any]:
    """Per level t: the number of latent coordinates u with Cov_x(E[z_{t,u} | x]) > ``threshold``
    (inactive units carry no information about x: posterior collapse), out of prod(latent_shape)."""
    module.eval()
    g = torch.Generator().manual_seed(seed)
    means = [[] for _ in range(module.T)]
    for sl in _chunks(x.shape[0], n_chains):
        for level, m in enumerate(module.posterior_means(x[sl], g, n_chains)):
            means[level].append(m.reshape(m.shape[0], -1).double())
    variances = [torch.cat(m).var(0) for m in means]
    return {"active_units": [int((v > threshold).sum()) for v in variances],
            "latent_units": math.prod(module.latent_shape), "threshold": threshold}


@torch.no_grad()
def reconstruction_quality(module: HierarchicalVAE, x: Tensor, batch_size: int = 256) -> dict[str, float]:
    """MSE of x_hat = E[x | z_1 = E[z_1 | x]] (data in [-1, 1]) and PSNR = 10 log10(2^2 / MSE) dB,
    the peak-to-peak range of the data being 2 (the same as 10 log10(1 / MSE) for images in [0, 1])."""
    module.eval()
    err = torch.cat([((module.decode(module.encode(x[lo:lo + batch_size])) - x[lo:lo + batch_size]) ** 2)
                     .reshape(min(batch_size, x.shape[0] - lo), -1).mean(1).double()
                     for lo in range(0, x.shape[0], batch_size)])
    mse = err.mean().item()
    psnr_each = 10 * torch.log10(4.0 / err.clamp_min(1e-12))
    return {"mse": mse, "psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)), "psnr_db_mean_per_image": psnr_each.mean().item()}


# -- a run ------------------------------------------------------------------------------------------
def _quality(run: LatentRun, test, n: int, seed: int) -> tuple[dict[str, Any], Tensor]:
    t0 = time.time()
    x = sample(run.module, range(seed, seed + n), run.cfg.vae.sample_noise)
    seconds = time.time() - t0
    name = run.cfg.data.name
    if x.ndim == 4:
        if name not in ("digits", "mnist"):
            return {"skipped": f"no feature network for data.name = {name!r}", "sampling_seconds": seconds}, x
        from diffusekit.evaluate.quality import image_quality

        out = image_quality(x, name, levels=run.levels)
    else:
        from diffusekit.evaluate.quality import vector_quality

        oracle = None
        if name == "gmm":
            from diffusekit.oracle import default_mixture

            oracle = default_mixture(x.shape[1])
        out = vector_quality(x, test.x, oracle=oracle)
    out.update(sampling_seconds=seconds, seconds_per_sample=seconds / n, n_samples=n,
               sampler="ancestral, " + ("draw of p(x|z)" if run.cfg.vae.sample_noise else "E[x|z]"))
    return out, x


def evaluate_latent_run(run_dir: Path | str, *, metrics: Sequence[str] = ("bpd", "fd"), split: str = "test",
                        n_samples: int | None = None, iwae_k: int = 100, seed: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """Evaluate a latent-variable run folder; writes ``eval/metrics.json``, ``eval/report.md`` and pictures."""
    from diffusekit.data import load_dataset

    unknown = [m for m in metrics if m not in ("bpd", "fd")]
    if unknown:
        raise ConfigError(f"--metrics: unknown metric {unknown[0]!r}; choose from bpd, fd")
    if split not in ("train", "test"):
        raise ConfigError(f"--split must be 'train' or 'test', got {split!r}")
    if iwae_k < 1:
        raise ConfigError(f"--iwae-k must be >= 1, got {iwae_k}")
    run = load_latent_run(run_dir)
    test = load_dataset(run.cfg.data, split)
    result: dict[str, Any] = {"run": str(run_dir), "kind": run.cfg.model.kind, "step": run.step, "split": split,
                              "data": run.cfg.data.name}
    samples = None
    with torch.random.fork_rng():
        if "bpd" in metrics:
            t0 = time.time()
            b = bound(run.module, test.x, iwae_k, seed)
            if run.levels is not None:
                from diffusekit.evaluate.baselines import categorical_baseline, gaussian_baseline

                train = load_dataset(run.cfg.data, "train")
                b["levels"] = run.levels
                b["baselines"] = {"categorical_per_pixel": categorical_baseline(train.x, test.x, run.levels),
                                  "gaussian_full_covariance": gaussian_baseline(train.x, test.x, run.levels)}
            else:
                b["note"] = "continuous data: bits/dim of a density (not comparable to discrete-data numbers)"
            b["seconds"] = time.time() - t0
            result["bpd"] = b
            result["collapse"] = active_units(run.module, test.x, seed)
            result["reconstruction"] = reconstruction_quality(run.module, test.x)
        if "fd" in metrics:
            result["quality"], samples = _quality(run, test, n_samples or min(len(test), 1000), seed)
    _write_report(run, test, result, samples, Path(run_dir) / "eval")
    return result


def format_latent_table(result: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers."""
    rows = [("run", result["run"]), ("model", result["kind"]), ("checkpoint step", result["step"]),
            ("split", result["split"])]
    b = result.get("bpd", {})
    if b:
        rows += [("bound (-ELBO), bits/dim", f"{b['bits_per_dim']:.4f} ± {b['stderr_bits_per_dim']:.4f}"),
                 (f"IWAE bound (k = {b['iwae_k']}), bits/dim", f"{b['iwae_bits_per_dim']:.4f}"),
                 ("  reconstruction", f"{b['reconstruction_bits_per_dim']:.4f}")]
        levels = b["latent_bits_per_dim_per_level"]
        for t, v in enumerate(levels, 1):
            name = "prior matching" if t == len(levels) else "consistency"
            rows.append((f"  level {t} ({name})", f"{v:.4f}"))
        for key, val in b.get("baselines", {}).items():
            rows.append((f"baseline: {key.replace('_', ' ')}", f"{val:.4f}"))
    c = result.get("collapse")
    if c:
        rows.append(("active units per level", f"{c['active_units']} of {c['latent_units']}"))
    r = result.get("reconstruction")
    if r:
        rows += [("reconstruction MSE", f"{r['mse']:.5f}"), ("reconstruction PSNR (dB)", f"{r['psnr_db']:.2f}")]
    q = result.get("quality", {})
    for key in ("fd", "fd_train_test", "fd_ratio", "confidence", "class_entropy_bits", "sliced_wasserstein", "mmd",
                "oracle_nll", "seconds_per_sample"):
        if key in q:
            rows.append((key, f"{q[key]:.4f}" if isinstance(q[key], float) else str(q[key])))
    if "skipped" in q:
        rows.append(("quality", q["skipped"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _write_report(run: LatentRun, test, result: dict[str, Any], samples: Tensor | None, out_dir: Path) -> Path:
    from diffusekit.train.checkpoint import atomic_write_text
    from diffusekit.viz import save_image_grid, save_samples_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1))
    pics: dict[str, Path] = {}
    if samples is not None:
        ref = test.x if test.x.ndim == 2 else None
        pics["samples"] = save_samples_figure(samples[:64], out_dir / "samples.png", levels=run.levels, reference=ref)
    if test.x.ndim == 4:
        with torch.no_grad():
            x = test.x[:16]
            pair = torch.cat([x, run.module.decode(run.module.encode(x)).cpu()])
        pics["reconstructions (top: data, bottom: E[x | z = E[z | x]])"] = save_image_grid(
            pair, out_dir / "reconstructions.png", nrow=16, levels=run.levels)
    lines = [f"# Evaluation of `{result['run']}` ({result['kind']}, step {result['step']}, {result['split']} split)",
             "", "```", format_latent_table(result), "```", ""]
    lines += [f"![{name}]({path.name})" for name, path in pics.items()]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return out_dir / "report.md"


# -- sampling a run ---------------------------------------------------------------------------------
def sample_latent_run(run_dir: Path | str, seeds: Sequence[int], out_dir: Path | str | None = None, *,
                      use_ema: bool = True, decoder_noise: bool | None = None, batch_size: int = 500,
                      settings_path: Path | str | None = None) -> tuple[Tensor, Path]:
    """Draw ancestral samples for ``seeds`` from a latent-variable run and write them like diffusion
    samples (grid.png, sample_<seed>.png, samples.npz, settings.json). ``settings_path``: the
    settings.json of an earlier call, reproduced exactly. Returns (samples, output folder)."""
    import io

    import numpy as np

    from diffusekit.train.checkpoint import atomic_write_bytes, atomic_write_text
    from diffusekit.viz import image_grid, png_bytes, save_samples_figure

    if settings_path is not None:
        try:
            rec = json.loads(Path(settings_path).read_text())
            seeds, use_ema, decoder_noise = rec["seeds"], rec["use_ema"], rec["decoder_noise"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--settings {settings_path}: cannot read sampler settings ({exc})") from None
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    run = load_latent_run(run_dir, use_ema=use_ema)
    noise = run.cfg.vae.sample_noise if decoder_noise is None else bool(decoder_noise)
    seeds = [int(s) for s in seeds]
    x = sample(run.module, seeds, noise, batch_size=batch_size)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"samples-{run.cfg.model.kind}"
    out.mkdir(parents=True, exist_ok=True)
    save_samples_figure(x, out / "grid.png", levels=run.levels)
    if x.ndim == 4:
        for seed, img in zip(seeds, x):
            atomic_write_bytes(out / f"sample_{seed}.png", png_bytes(image_grid(img[None], pad=0, upscale=1,
                                                                               levels=run.levels)))
    buf = io.BytesIO()
    np.savez(buf, x=x.numpy(), seeds=np.asarray(seeds, dtype=np.int64))
    atomic_write_bytes(out / "samples.npz", buf.getvalue())
    record = {"kind": run.cfg.model.kind, "seeds": seeds, "use_ema": use_ema, "decoder_noise": noise,
              "extra": {"run": str(run_dir), "checkpoint": str(run.checkpoint), "step": run.step}}
    atomic_write_text(out / "settings.json", json.dumps(record) + "\n")
    return x, out
