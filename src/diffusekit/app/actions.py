"""What the page can do with a run, as the command line's library calls.

``AppRun`` opens a run once (``families.read_run``: its family decides the page's sections, ``describe``)
and owns a temporary folder, removed by ``close``. Each action turns the page's JSON values into the
typed settings of the command it mirrors and returns the work to run as a job:

- ``sample``: ``runs.sample.sample_run`` with the overrides ``diffusekit sample`` would pass (sampler
  settings, ``--seeds``, ``--classes``, ``--prompt``, ``--control-images`` / ``--control-from`` /
  ``--control-scale``, ``--no-ema``), then the reverse trajectory of sample 0
  (``sampling.generate.sample_trajectory``: the same sampler, seed and weights);
- ``trajectory``: that trajectory for another sample of the last sampling call;
- ``restore``: ``runs.restore.restore_run`` with the ``RestoreSettings`` of ``diffusekit restore``, built
  by the command's own ``settings_from_args`` from its defaults and the page's values (so a combination it
  refuses, such as blur without dps, gets its one-line message); uploaded images and masks are written to
  files and passed as ``--images`` / ``--mask`` would be; the result carries the line the command prints;
- ``evaluate``: ``runs.evaluate.evaluate_run`` with ``EvaluateSettings`` (cheap defaults: the bound only).

Outputs go into the temporary folder; only a request with ``save`` writes where the command would by
default (``<run>/samples-*``, ``<run>/restore-*``, ``<run>/eval``). Errors are the command's one-line
``DiffusekitError``s, with the temporary folder left out of file names (an upload ``a.png`` is named
``a.png``, as ``--images a.png`` would be). Uploads are size-limited bytes; nothing is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffusekit.cli.flags import SAMPLER_FLAGS, build_parser, flag_of
from diffusekit.cli.restore import format_metrics, settings_from_args
from diffusekit.data.registry import load_dataset
from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.families import read_run
from diffusekit.families.base import EvaluateSettings, SampleRequest
from diffusekit.runs.evaluate import evaluate_run
from diffusekit.runs.restore import RestoreSettings, restore_run
from diffusekit.runs.sample import sample_run
from diffusekit.sampling.catalog import (
    BOUND_VARIANCES,
    DPS_ONLY_TASKS,
    DPS_ZETA_SQRT_STEPS,
    EVAL_METRICS,
    GRID_CHOICES,
    IMG2IMG_METHOD,
    MASKS,
    RESTORE_METHODS,
    RESTORE_TASKS,
    SAMPLERS,
    SPACINGS,
    VARIANCES,
)
from diffusekit.sampling.generate import sample_trajectory
from diffusekit.sampling.settings import SampleSettings, parse_int_list, parse_seeds
from diffusekit.viz import image_grid, png_bytes

if TYPE_CHECKING:
    from typing import Self  # Python 3.11, read by type checkers only

__all__ = ["MAX_PAGE_SAMPLES", "MAX_UPLOAD_BYTES", "TRAJECTORY_FAMILIES", "AppRun", "decode_upload"]

# the families whose sampling is ``generate`` on the model's own denoiser: the page shows their trajectory
TRAJECTORY_FAMILIES = ("diffusion", "continuous", "consistency", "progressive", "diffusers")
MAX_UPLOAD_BYTES = 8 * 2**20  # one uploaded file, decoded
MAX_UPLOADS = 16  # images in one request
MAX_PAGE_SAMPLES = 1024  # samples (or restorations) in one request: more is the command line's work
MAX_PROMPTS, MAX_PROMPT_CHARS = 64, 500
MAX_REPORT_BYTES = 2**20
TRAJECTORY_FRAMES = 25
SAMPLE_NAMES = {**{f: flag_of(f) for f in SAMPLER_FLAGS}, "seeds": "--seeds", "batch_size": "--batch-size",
                "use_ema": "--no-ema", "classes": "--classes"}  # as ``diffusekit sample`` names them
BATCH_SIZE = 64  # the command line's --batch-size default (it changes no sample)
RESTORE_DEFAULTS = ("resample", "jump", "fraction", "mask_seed", "factor", "blur_size", "blur_width", "gain", "noise_std",
                    "zeta", "measurement_seed")  # the page's restore fields that start at RestoreSettings' defaults
# the ``diffusekit restore`` flags the page sets besides --task, --seeds, --mask, --images and --no-ema, with the
# type its parser reads them as (a float flag also takes an integer)
RESTORE_FLAGS = (("method", str), ("fraction", float), ("mask_seed", int), ("factor", int), ("blur_size", int),
                 ("blur_width", float), ("gain", float), ("steps", int), ("spacing", str), ("resample", int),
                 ("jump", int), ("variance", str), ("clip_x0", float), ("noise_std", float), ("zeta", float),
                 ("measurement_seed", int), ("n", int), ("split", str))


def _value(body: dict[str, Any], name: str, kind: type | tuple[type, ...], flag: str, default: Any = None) -> Any:
    """``body[name]`` if present and not null, checked to be of ``kind`` (bools are not numbers)."""
    v = body.get(name)
    if v is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = {str: "text", int: "an integer", bool: "true or false"}.get(kinds[0], "a number")
        raise ConfigError(f"{flag} must be {want}, got {v!r}")
    return v


def _safe_name(name: Any, default: str) -> str:
    """A file name for an upload: its base name with letters, digits, '.', '_' and '-' only."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", str(name).replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    return base[:80] or default


def decode_upload(upload: Any, flag: str, folder: Path, default: str) -> Path:
    """An uploaded file (``{"name": ..., "data": base64 or a data URL}``) written to ``folder``; one-line
    ConfigErrors for a malformed or oversized one. Its contents are checked by whoever reads the file."""
    if not isinstance(upload, dict) or not isinstance(upload.get("data"), str):
        raise ConfigError(f"{flag}: an upload must be {{\"name\": ..., \"data\": base64}}")
    name = _safe_name(upload.get("name") or default, default)
    text = upload["data"].split(",", 1)[1] if upload["data"].startswith("data:") else upload["data"]
    if len(text) > (MAX_UPLOAD_BYTES // 3 + 2) * 4:
        raise ConfigError(f"{flag} {name}: upload is over the {MAX_UPLOAD_BYTES // 2**20} MiB limit")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{flag} {name}: the upload is not valid base64") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise ConfigError(f"{flag} {name}: upload is {len(data) / 2**20:.1f} MiB, over the "
                          f"{MAX_UPLOAD_BYTES // 2**20} MiB limit")
    folder.mkdir(parents=True, exist_ok=True)
    path, k = folder / name, 1
    while path.exists():
        stem, dot, ext = name.rpartition(".")
        path = folder / (f"{stem}-{k}.{ext}" if dot else f"{name}-{k}")
        k += 1
    path.write_bytes(data)
    return path


def _write_png(path: Path, image: torch.Tensor, upscale_to: int = 96) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image_grid(image[None], pad=0, upscale=max(1, math.ceil(upscale_to / image.shape[-1])))))


class AppRun:
    """A run opened for the page: its family and model summary, a temporary folder for outputs, and the
    actions (see the module docstring). ``close`` removes the folder; use it as a context manager."""

    def __init__(self, run: Path | str, device: str | torch.device = "cpu", tmp_root: Path | str | None = None):
        self.run, self.device = Path(run), device
        self.family, source = read_run(self.run)
        model = self.family.load(source, True, device)
        self.data_shape = tuple(model.data_shape)
        self.num_classes, self.cfg, self.step, self.levels = model.num_classes, model.cfg, model.step, model.levels
        schedule = getattr(model, "schedule", None)
        self.T = schedule.T if schedule is not None else None
        self.trained_tasks = {task.name for task in getattr(model, "tasks", ())}  # an image-to-image run's
        self.prompted = bool(getattr(model, "text_base", True))  # a ControlNet takes prompts over a text base only
        del model
        self._tmp = tempfile.TemporaryDirectory(prefix="diffusekit-app-", dir=tmp_root, ignore_cleanup_errors=True)
        self.root = Path(self._tmp.name)
        self.folders: dict[str, Path] = {"run-eval": self.run / "eval"}  # what /files/<key>/ may serve
        self._last_sample: tuple[int, SampleSettings, bool] | None = None  # (job, settings, use_ema)
        self._test_x: torch.Tensor | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    # -- what the page shows ------------------------------------------------------------------
    @property
    def image(self) -> bool:
        return len(self.data_shape) == 3

    def sections(self) -> dict[str, bool]:
        """Which parts of the page apply to this run, from its family's row and its model."""
        f, conditioning = self.family, self.family.conditioning
        prompted = "prompts" in conditioning and getattr(self, "prompted", True)
        return {"sample": True, "sampler": f.settings is None, "classes": self.num_classes > 0,
                "guidance": (f.guidance and prompted) or self.num_classes > 0, "prompts": prompted,
                "control": "control_images" in conditioning,
                "trajectory": f.name in TRAJECTORY_FAMILIES and self.image and f.settings is None,
                "restore": (f.restore or f.trained_restore) and self.image, "measure": f.evaluate is not None}

    def restore_tasks(self) -> list[str]:
        if not self.image:
            return []
        c, h, w = self.data_shape
        fits = {"colorize": c == 3, "superres": h % 2 == 0 and w % 2 == 0}  # the default factor 2 divides the size
        trained = self.trained_tasks if self.family.trained_restore else set(RESTORE_TASKS)  # img2img: its own
        return [t for t in RESTORE_TASKS if fits.get(t, True) and t in trained]

    def describe(self) -> dict[str, Any]:
        """The run, its sections, the defaults of every field and the choices of every menu (JSON). The restore
        tasks of ``dps_tasks`` are offered with method dps only; an empty zeta is DPS_ZETA_SQRT_STEPS / sqrt(steps)
        (``runs.restore.dps_zeta``)."""
        sample = {name: getattr(self.cfg.sample, name) for name in SAMPLER_FLAGS}
        restore = RestoreSettings()  # the command's defaults
        tasks = self.restore_tasks()
        return {
            "run": str(self.run), "family": self.family.name, "summary": self.family.summary, "step": self.step,
            "data_shape": list(self.data_shape), "levels": self.levels, "num_classes": self.num_classes, "T": self.T,
            "sections": self.sections(), "report": (self.run / "eval" / "report.md").is_file(),
            "defaults": {"sample": {**sample, "seeds": "0-15"},
                         "restore": {"steps": min(self.T or 0, 100), "seeds": "0-2", "n": 4,
                                     **{name: getattr(restore, name) for name in RESTORE_DEFAULTS},
                                     "zeta_sqrt_steps": DPS_ZETA_SQRT_STEPS},
                         "evaluate": {"metrics": ["bpd"], "strata": 20, "variance": "beta_tilde", "n_samples": 200}},
            "choices": {"sampler": list(SAMPLERS), "grid": list(GRID_CHOICES), "spacing": list(SPACINGS),
                        "variance": list(VARIANCES), "task": tasks,
                        "method": [IMG2IMG_METHOD] if self.family.trained_restore else list(RESTORE_METHODS),
                        "dps_tasks": [t for t in DPS_ONLY_TASKS if t in tasks],
                        "mask": list(MASKS), "metrics": list(EVAL_METRICS), "bound_variance": list(BOUND_VARIANCES)},
            "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "uploads": MAX_UPLOADS, "samples": MAX_PAGE_SAMPLES},
        }

    def test_image(self, index: int) -> bytes:
        """Image ``index`` of the run's test split as a PNG (what restore takes with --n)."""
        if not self.sections()["restore"]:
            raise ConfigError(f"{self.run} is a {self.family.name} run: no test images to restore")
        if self._test_x is None:
            self._test_x = load_dataset(self.cfg.data, "test").x[:64]
        if not 0 <= index < len(self._test_x):
            raise ConfigError(f"test image {index} is out of range (0..{len(self._test_x) - 1})")
        x = self._test_x[index]
        return png_bytes(image_grid(x[None], pad=0, upscale=1, levels=self.levels))

    def report(self) -> dict[str, Any]:
        """The run's own ``eval/report.md`` (written by ``diffusekit evaluate``), or None where there is none."""
        try:
            path = self.file("run-eval", "report.md")
        except ConfigError:
            return {"markdown": None}
        if path.stat().st_size > MAX_REPORT_BYTES:
            return {"markdown": None}
        return {"markdown": path.read_text(errors="replace"), "base": "/files/run-eval/"}

    def file(self, key: str, name: str) -> Path:
        """A file the page may read: inside folder ``key`` (a job's outputs, the run's eval folder), never
        outside it (``..`` and links out are refused); ConfigError otherwise."""
        folder = self.folders.get(key)
        if folder is None or not name:
            raise ConfigError(f"no such file: {key}/{name}")
        root = folder.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ConfigError(f"no such file: {key}/{name}")
        return path

    def _job_folder(self, job: int) -> Path:
        return self.root / f"job-{job}"

    def _serve(self, key: str, folder: Path) -> str:
        self.folders[key] = folder
        return f"/files/{key}/"

    def _clean(self, work: Callable[[], dict[str, Any]], folder: Path) -> Callable[[], dict[str, Any]]:
        """``work`` whose one-line errors name uploads by their own names, not by the temporary folder."""
        def run() -> dict[str, Any]:
            try:
                return work()
            except DiffusekitError as exc:
                message = str(exc).replace(f"{folder}/", "").replace(str(self.root), "<temporary folder>")
                raise type(exc)(message) from None
        return run

    # -- sample ---------------------------------------------------------------------------------
    def sample(self, body: dict[str, Any], job: int) -> Callable[[], dict[str, Any]]:
        """The work of ``diffusekit sample`` with the page's settings (checked now, run later)."""
        sections, folder = self.sections(), self._job_folder(job)
        inputs = folder / "inputs"
        overrides = {f: body[f] for f in SAMPLER_FLAGS if body.get(f) is not None}
        seeds_text = _value(body, "seeds", str, "--seeds", "0-15")
        seeds = parse_seeds(seeds_text)
        if len(seeds) > MAX_PAGE_SAMPLES:
            raise ConfigError(f"--seeds: the page draws at most {MAX_PAGE_SAMPLES} samples at a time, got "
                              f"{len(seeds)}; use `diffusekit sample` for more")
        use_ema = _value(body, "ema", bool, "--no-ema", True)
        overrides.update(seeds=seeds, use_ema=use_ema, batch_size=BATCH_SIZE)
        argv = ["diffusekit", "sample", "--run", str(self.run), "--seeds", seeds_text]
        argv += [a for f in SAMPLER_FLAGS if f in overrides for a in (flag_of(f), str(overrides[f]))]
        classes = _value(body, "classes", str, "--classes")
        if classes is not None and classes.strip():
            overrides["classes"] = parse_int_list(classes, "--classes", distinct=False, example="3 or 0,1,2 or 0-4")
            argv += ["--classes", classes]
        request = SampleRequest()
        prompts = body.get("prompts")
        if prompts is not None:
            if (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)
                    or len(prompts) > MAX_PROMPTS or any(len(p) > MAX_PROMPT_CHARS for p in prompts)):
                raise ConfigError(f"--prompt: give 1..{MAX_PROMPTS} prompts of at most {MAX_PROMPT_CHARS} characters")
            request.prompts = list(prompts)
            argv += [a for p in prompts for a in ("--prompt", p)]
        control = body.get("control")
        if control is not None:
            if not isinstance(control, dict):
                raise ConfigError("--control-images: the hint must be {\"source\": ..., \"image\": ...}")
            source = _value(control, "source", str, "--control-from", "test")
            if source == "image":
                path = decode_upload(control.get("image"), "--control-images", inputs, "hint.png")
                request.control_images = [path]
                argv += ["--control-images", path.name]
            else:
                request.control_from = source
                argv += ["--control-from", source]
            scale = _value(control, "scale", (int, float), "--control-scale")
            if scale is not None:
                request.control_scale = float(scale)
                argv += ["--control-scale", str(scale)]
        if not use_ema:
            argv.append("--no-ema")
        save = _value(body, "save", bool, "save", False)
        out = None if save else folder / "samples"
        trajectory = sections["trajectory"]

        def work() -> dict[str, Any]:
            result = sample_run(self.run, overrides, request, out=out, names=SAMPLE_NAMES, device=self.device,
                                progress=False)
            url = self._serve(f"job{job}", result.out)
            settings = result.settings
            samples = []
            if self.image:
                for i, seed in enumerate(settings.seeds[:256]):
                    label = ""
                    if getattr(settings, "classes", None):
                        label = f"class {settings.classes[i % len(settings.classes)]}"
                    elif request.prompts:
                        label = repr(request.prompts[i % len(request.prompts)])
                    samples.append({"seed": seed, "url": f"{url}sample_{seed}.png", "label": label})
            out_dict = {"grid": f"{url}grid.png", "files": url, "samples": samples, "n": len(settings.seeds),
                        "note": result.samples.note, "seconds": round(result.seconds, 2), "command": shlex.join(argv),
                        "saved": str(result.out) if save else None, "trajectory": None}
            if trajectory:
                self._last_sample = (job, settings, use_ema)
                out_dict["trajectory"] = self._trajectory(job, settings, use_ema, 0)
            return out_dict

        return self._clean(work, inputs)

    def trajectory(self, body: dict[str, Any], job: int) -> Callable[[], dict[str, Any]]:
        """The trajectory of sample ``index`` of the last sampling call (same settings and weights)."""
        if not self.sections()["trajectory"]:
            raise ConfigError(f"{self.run} is a {self.family.name} run: the page draws no trajectory for it")
        if self._last_sample is None:
            raise ConfigError("draw samples first: the trajectory is that of one of the last samples")
        index = _value(body, "index", int, "index", 0)
        _, settings, use_ema = self._last_sample
        if not 0 <= index < len(settings.seeds):
            raise ConfigError(f"sample index {index} is out of range for {len(settings.seeds)} samples")
        return lambda: self._trajectory(job, settings, use_ema, index)

    def _trajectory(self, job: int, settings: SampleSettings, use_ema: bool, index: int) -> dict[str, Any]:
        family, source = read_run(self.run)
        model = family.load(source, use_ema, self.device)
        traj = sample_trajectory(model.denoiser, model.schedule, model.data_shape, settings, index, self.device,
                                 num_classes=model.num_classes, max_frames=TRAJECTORY_FRAMES)
        folder = self._job_folder(job) / f"trajectory-{index}"
        for k in range(len(traj.times)):
            _write_png(folder / f"x_{k:03d}.png", traj.x[k])
            _write_png(folder / f"x0_{k:03d}.png", traj.x0[k])
        url = self._serve(f"job{job}-trajectory-{index}", folder)
        note = "" if len(traj.times) > 1 else f"sampler {settings.sampler} reports no intermediate states"
        return {"index": index, "seed": settings.seeds[index], "times": traj.times, "note": note,
                "x": [f"{url}x_{k:03d}.png" for k in range(len(traj.times))],
                "x0": [f"{url}x0_{k:03d}.png" for k in range(len(traj.times))]}

    # -- restore --------------------------------------------------------------------------------
    def restore(self, body: dict[str, Any], job: int) -> Callable[[], dict[str, Any]]:
        """The work of ``diffusekit restore`` with the page's settings and uploads: the page's values become
        the command's flags, and the command's own ``settings_from_args`` turns them into ``RestoreSettings``
        (so the same combinations are refused with the same one-line messages)."""
        if not self.sections()["restore"]:
            raise ConfigError(f"--run {self.run}: restoration needs a diffusion model on images (model.kind unet, "
                              f"mlp or img2img); this is a {self.family.name} run")
        folder = self._job_folder(job)
        inputs = folder / "inputs"
        args = build_parser().parse_args(["restore", f"--run={self.run}"])  # the command's defaults
        args.batch_size = BATCH_SIZE
        args.task = _value(body, "task", str, "--task")
        argv = ["diffusekit", "restore", "--run", str(self.run), "--task", str(args.task)]
        for name, kind in RESTORE_FLAGS:
            value = _value(body, name, (float, int) if kind is float else kind, flag_of(name))
            if value is not None:
                setattr(args, name, kind(value))  # a float flag's 2 is 2.0, as argparse reads it
                argv += [flag_of(name), str(value)]
        args.seeds = _value(body, "seeds", str, "--seeds", "0-2")
        argv += ["--seeds", args.seeds]
        mask = _value(body, "mask", str, "--mask")
        if mask in ("drawn", "file"):
            path = decode_upload(body.get("mask_image"), "--mask", inputs, "mask.png")
            args.mask = str(path)
            argv += ["--mask", path.name]
        elif mask is not None:
            if mask not in MASKS:
                raise ConfigError(f"--mask must be one of {', '.join(MASKS)}, drawn or file, got {mask!r}")
            args.mask = mask
            argv += ["--mask", mask]
        images = body.get("images")
        if images:
            if not isinstance(images, list) or len(images) > MAX_UPLOADS:
                raise ConfigError(f"--images: upload 1..{MAX_UPLOADS} images")
            paths = [decode_upload(u, "--images", inputs, f"image{i}.png") for i, u in enumerate(images)]
            args.images = [str(p) for p in paths]
            argv += ["--images", *[p.name for p in paths]]
        args.ema = _value(body, "ema", bool, "--no-ema", True)
        if not args.ema:
            argv.append("--no-ema")
        settings = settings_from_args(args)
        count = (len(settings.images) or settings.n) * len(settings.seeds)
        if count > MAX_PAGE_SAMPLES:
            raise ConfigError(f"--n/--seeds: the page restores at most {MAX_PAGE_SAMPLES} samples at a time, got "
                              f"{count}; use `diffusekit restore` for more")
        save = _value(body, "save", bool, "save", False)
        out = None if save else folder / "restore"

        def work() -> dict[str, Any]:
            metrics, where = restore_run(self.run, settings, out, device=self.device, progress=False)
            url = self._serve(f"job{job}", where)
            return {"picture": f"{url}restore.png", "files": url, "metrics": metrics, "summary": format_metrics(metrics),
                    "command": shlex.join(argv), "saved": str(where) if save else None}

        return self._clean(work, inputs)

    # -- evaluate -------------------------------------------------------------------------------
    def evaluate(self, body: dict[str, Any], job: int) -> Callable[[], dict[str, Any]]:
        """The work of ``diffusekit evaluate`` (by default the bound only, on 20 strata, beta_tilde)."""
        if not self.sections()["measure"]:
            raise ConfigError(f"--run {self.run}: evaluate is not offered for {self.family.name} folders")
        metrics = body.get("metrics", ["bpd"])
        if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
            raise ConfigError(f"--metrics must be a list of {', '.join(EVAL_METRICS)}, got {metrics!r}")
        kwargs: dict[str, Any] = {"metrics": tuple(metrics)}
        argv = ["diffusekit", "evaluate", "--run", str(self.run), "--metrics", ",".join(metrics)]
        for name, kind in (("strata", int), ("variance", str), ("n_samples", int), ("split", str), ("seed", int)):
            value = _value(body, name, kind, flag_of(name))
            if value is not None:
                kwargs[name] = value
                argv += [flag_of(name), str(value)]
        if _value(body, "exact", bool, "--exact", False):
            kwargs["exact"] = True
            argv.append("--exact")
        settings = EvaluateSettings(**kwargs)
        save = _value(body, "save", bool, "save", False)
        out = None if save else self._job_folder(job) / "eval"

        def work() -> dict[str, Any]:
            evaluation, report = evaluate_run(self.run, settings, progress=False, device=self.device, out_dir=out)
            url = self._serve("run-eval" if save else f"job{job}", report.parent)
            return {"report": f"{url}report.md", "base": url, "rows": evaluation.rows, "command": shlex.join(argv),
                    "saved": str(report.parent) if save else None}

        return self._clean(work, self._job_folder(job) / "inputs")
