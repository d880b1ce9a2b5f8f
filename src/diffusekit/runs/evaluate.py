"""Evaluating a run folder (``diffusekit evaluate``): the family's numbers, written as a report.

``evaluate_run`` opens the run once, asks its family for its evaluation (``Family.evaluate``: for
diffusion the bound in bits/dim term by term, the sample quality, the PF-ODE likelihood; for a VAE its
bounds and collapse diagnostics; for text-to-image its prompt accuracy; for ControlNet its edge
agreement) and writes ``<run>/eval/``: the results as JSON, the pictures, and ``report.md`` (the
table, a reading guide and every picture with its caption). The folder is replaced as a whole (files of
earlier evaluations that this one does not rewrite are kept), so it is never half written.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from diffusekit.errors import ConfigError
from diffusekit.families import read_run
from diffusekit.families.base import EvaluateSettings, Evaluation
from diffusekit.io.atomic import OutputFolder, atomic_write_text
from diffusekit.runs.grids import tuned_settings
from diffusekit.sampling.catalog import TUNED_GRID
from diffusekit.sampling.settings import SampleSettings

__all__ = ["evaluate_run", "format_table", "EVAL_MARKERS"]

EVAL_MARKERS = ("report.md", "metrics.json", "text2img-g*.json")  # files only an evaluation folder holds


def format_table(rows: list[tuple[str, str]]) -> str:
    """Rows of (name, value) as aligned plain text."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _report(evaluation: Evaluation, title: str) -> str:
    lines = [f"# {title}", "", "```", format_table(evaluation.rows), "```", ""]
    if evaluation.guide:
        lines += [evaluation.guide, ""]
    for name, (file, caption) in evaluation.pictures.items():
        lines += [f"## {name}", "", caption, "", f"![{name}]({file})", ""]
    return "\n".join(lines) + "\n"


def evaluate_run(run_dir: Path | str, settings: EvaluateSettings | None = None, progress: bool = True,
                 device: str | torch.device = "cpu", out_dir: Path | str | None = None) -> tuple[Evaluation, Path]:
    """Evaluate a run folder with its family's evaluation into ``out_dir`` (default: ``<run>/eval``);
    returns it and the report's path."""
    settings = settings or EvaluateSettings()
    family, source = read_run(run_dir)
    if family.evaluate is None:
        raise ConfigError(f"--run {run_dir}: evaluate is not offered for {family.name} folders ({family.summary})")
    if settings.compose and family.name != "text_latent":
        raise ConfigError(f"--compose: {run_dir} is a {family.name} run; composing prompts applies to text-to-image "
                          "runs on scenes")
    model = family.load(source, True, device)
    if settings.grid == TUNED_GRID and settings.times is None:  # the times of <run>/grids.json, as sample finds them
        asked = SampleSettings.from_config(model.cfg.sample, key=settings.key, **settings.sample_overrides())
        tuned = tuned_settings(family.name, model, asked, run_dir, settings.key)
        settings = replace(settings, steps=tuned.steps, times=tuned.times)
    out = Path(out_dir) if out_dir is not None else model.source / "eval"
    keep = [p.name for p in out.iterdir() if p.is_file()] if out.is_dir() else []
    with OutputFolder(out, EVAL_MARKERS, "evaluation folder", keep=keep) as folder:
        evaluation = family.evaluate(model, settings, folder.path, progress)
        atomic_write_text(folder.path / evaluation.metrics_file, json.dumps(evaluation.result, indent=1) + "\n")
        title = f"Evaluation of `{model.source}` ({family.name}, step {model.step}, {settings.split} split)"
        atomic_write_text(folder.path / "report.md", _report(evaluation, title))
    return evaluation, out / "report.md"

