"""The diffusers family: a folder saved by diffusers (a ``UNet2DModel`` with a DDPM scheduler) as a
diffusekit denoiser, so every sampler and the discrete bound run on a foreign model.

``load_diffusers_folder(path)`` returns ``(denoiser, schedule)``: the ``DiscreteSchedule`` rebuilt
in float64 from the scheduler config, and a ``Denoiser`` around the U-Net, so every sampler and the
discrete bound run on the model unchanged (the network knows nothing of noise semantics;
an adapter maps our network input to the foreign one, as k-diffusion's ``external.py`` does). It
cannot be trained or evaluated here; ``diffusekit sample --run FOLDER`` samples it.

Time correspondence (schedules.py): diffusers' step k = 0..T-1 is our t = k + 1, so the U-Net's
timestep k was trained on noise level logsnr[k + 1] of our table. ``DiffusersUNet`` receives
c_noise = logsnr and feeds the U-Net the timestep whose logsnr it is:

- on a grid point (logsnr equal to a table entry in the input's dtype) the integer k itself;
- between grid points, k is interpolated linearly in logsnr between the two neighbouring steps (the
  U-Net's sinusoidal embedding accepts fractional timesteps; k-diffusion interpolates the same way,
  in log sigma);
- outside the trained range (logsnr above that of k = 0 or below that of k = T-1) k is clamped to
  0 or T-1: the network is asked about the nearest level it knows.

Our discrete samplers (ddpm, ddim, respaced or not) and the discrete bound only ask on grid points;
the continuous-time samplers ask between them.

Weights are read only from ``diffusion_pytorch_model.safetensors``; a folder with only pickled
``.bin`` weights is refused (nothing here unpickles files).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diffusekit.budget import fits, gib
from diffusekit.config import MAX_IMAGE_SIZE, MAX_SAMPLE_STEPS, MAX_WIDTH, Config, json_object
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.families.diffusion import DiffusionModel
from diffusekit.io.atomic import read_input_file
from diffusekit.parameterization import Denoiser
from diffusekit.schedules import DiscreteSchedule, cosine_betas

__all__ = ["load_diffusers_folder", "is_diffusers_folder", "data_shape", "diffusers_schedule", "diffusers_betas",
           "DiffusersUNet", "logsnr_to_timestep", "PREDICTION_KINDS", "DiffusersModel", "load"]

F64 = torch.float64
WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers' prediction_type -> our Prediction kind
PREDICTION_KINDS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _read_json(path: Path) -> dict[str, Any]:
    return json_object(read_input_file(path, "JSON config"), str(path))


def diffusers_betas(config: dict[str, Any], source: str = "scheduler config") -> Tensor:
    """The T betas of a DDPM-style scheduler config, float64 (diffusers numbers them k = 0..T-1).

    linear: beta_k = beta_start + k (beta_end - beta_start) / (T - 1) (Ho et al. 2020, sec. 4, at
    any T, no rescaling); scaled_linear: sqrt(beta) linear between sqrt(beta_start) and
    sqrt(beta_end) (latent diffusion); squaredcos_cap_v2: Nichol & Dhariwal 2021 eq. 17 with beta
    capped at 0.999 (``schedules.cosine_betas``); ``trained_betas`` in the config wins over all three.
    """
    T = config.get("num_train_timesteps", 1000)
    if not isinstance(T, int) or isinstance(T, bool) or not 1 <= T <= MAX_SAMPLE_STEPS:
        raise ConfigError(f"{source}: num_train_timesteps must be an integer in 1..{MAX_SAMPLE_STEPS}, got {T!r}")
    if config.get("rescale_betas_zero_snr"):
        raise ConfigError(f"{source}: rescale_betas_zero_snr = true (beta_T = 1, infinite noise) is not supported")
    trained = config.get("trained_betas")
    if trained is not None:
        if not (isinstance(trained, list) and 0 < len(trained) <= MAX_SAMPLE_STEPS and all(_number(b) for b in trained)):
            raise ConfigError(f"{source}: trained_betas must be a list of at most {MAX_SAMPLE_STEPS} numbers")
        return torch.as_tensor(trained, dtype=F64).flatten()
    name = config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    for key, value in (("beta_start", start), ("beta_end", end)):
        if not (_number(value) and 0 < value < 1):
            raise ConfigError(f"{source}: {key} must be a number in (0, 1), got {value!r}")
    if name == "linear":
        return torch.linspace(start, end, T, dtype=F64)
    if name == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=F64) ** 2
    if name == "squaredcos_cap_v2":
        return cosine_betas(T, s=0.008, max_beta=0.999)
    raise ConfigError(f"{source}: unsupported beta_schedule {name!r}; supported: {', '.join(BETA_SCHEDULES)}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_unet_config(config: dict[str, Any], path: Path) -> None:
    """The keys of a UNet2DModel config.json that fix its size, type-checked and bounded (one line naming
    the file and key): a config with block_out_channels of 200000 is refused before any allocation."""
    def integer(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    size = config.get("sample_size", 32)
    rules = (
        ("sample_size", integer(size, 1, MAX_IMAGE_SIZE) or (isinstance(size, list) and len(size) == 2 and all(
            integer(v, 1, MAX_IMAGE_SIZE) for v in size)), f"an integer (or two) in 1..{MAX_IMAGE_SIZE}"),
        ("in_channels", integer(config.get("in_channels", 3), 1, 64), "an integer in 1..64"),
        ("out_channels", integer(config.get("out_channels", 3), 1, 128), "an integer in 1..128"),
        ("block_out_channels", isinstance(config.get("block_out_channels", [64]), list) and 0 < len(
            config.get("block_out_channels", [64])) <= 8 and all(integer(c, 1, MAX_WIDTH) for c in config.get(
                "block_out_channels", [64])), f"a list of 1 to 8 integers in 1..{MAX_WIDTH}"),
        ("layers_per_block", integer(config.get("layers_per_block", 2), 1, 16), "an integer in 1..16"),
        ("norm_num_groups", integer(config.get("norm_num_groups", 32), 1, MAX_WIDTH), f"an integer in 1..{MAX_WIDTH}"),
    )
    for key, ok, want in rules:
        if not ok:
            raise ConfigError(f"{path}: {key} must be {want}, got {config.get(key)!r}")


def diffusers_schedule(config: dict[str, Any], source: str = "scheduler config") -> DiscreteSchedule:
    """The float64 ``DiscreteSchedule`` of a scheduler config (our t = diffusers' k + 1)."""
    betas = diffusers_betas(config, source)
    try:
        return DiscreteSchedule.from_betas(betas)
    except ValueError as e:
        raise ConfigError(f"{source}: betas do not make a schedule ({e})") from None


def logsnr_to_timestep(logsnr: Tensor, table: Tensor) -> Tensor:
    """diffusers' (fractional) timestep k for each logsnr, given ``table[k]`` = logsnr of step k
    (strictly decreasing, float64). Exact integers on grid points, linear in logsnr between them,
    clamped to [0, T-1] outside."""
    T = table.numel()
    exact = logsnr.unsqueeze(-1) == table.to(logsnr.dtype)  # grid point in the caller's precision
    lam = logsnr.to(F64).clamp(float(table[-1]), float(table[0]))
    if T == 1:
        return torch.zeros_like(lam)
    ascending = table.flip(0)
    hi = torch.searchsorted(ascending, lam).clamp(1, T - 1)
    lo_val, hi_val = ascending[hi - 1], ascending[hi]
    pos = (hi - 1).to(F64) + (lam - lo_val) / (hi_val - lo_val)
    k = (T - 1) - pos
    on_grid = exact.any(-1)
    k_grid = (exact.to(torch.int64).argmax(-1)).to(F64)
    return torch.where(on_grid, k_grid, k)


class DiffusersUNet(nn.Module):
    """A diffusers U-Net seen as our raw network (x, c_noise = logsnr) -> tensor shaped like x.

    ``table`` holds logsnr of diffusers' steps k = 0..T-1 (our ``schedule.logsnr[1:]``). ``cond``
    keywords (e.g. ``class_labels``) pass through to the U-Net. With a learned variance the U-Net
    outputs 2C channels; only the first C (the mean prediction) are returned.
    """

    def __init__(self, unet: nn.Module, table: Tensor, learned_variance: bool = False):
        super().__init__()
        self.unet = unet
        self.register_buffer("table", table.to(F64).clone(), persistent=False)
        self.learned_variance = learned_variance

    def forward(self, x: Tensor, c_noise: Tensor, **cond: Any) -> Tensor:
        k = logsnr_to_timestep(c_noise.detach().cpu(), self.table.cpu())
        out = self.unet(x, k.to(device=x.device, dtype=torch.float32), **cond).sample
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"the U-Net returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return out


def _find(folder: Path, sub: str, name: str) -> Path | None:
    for p in (folder / sub / name, folder / name):
        if p.is_file():
            return p
    return None


def _load_unet(model_dir: Path) -> nn.Module:
    """UNet2DModel from config.json and the safetensors weights (strict), never from pickles."""
    try:
        from diffusers import UNet2DModel  # optional dependency (the dev extra), imported on use
    except ImportError:
        raise ConfigError(f"{model_dir}: loading a diffusers model needs the diffusers package "
                          "(pip install diffusers)") from None
    config_path = model_dir / "config.json"
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        if pickled:
            raise CheckpointError(f"{model_dir / pickled[0]}: pickled .bin weights are refused; "
                                  f"convert them to {WEIGHTS} with a trusted tool")
        raise CheckpointError(f"{weights}: weights file not found")
    config = _read_json(config_path) if config_path.is_file() else None
    if config is None:
        raise CheckpointError(f"{config_path}: U-Net config not found")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{config_path}: _class_name {config['_class_name']!r} is not supported (UNet2DModel only)")
    if config.get("time_embedding_type", "positional") != "positional":
        raise ConfigError(f"{config_path}: time_embedding_type {config['time_embedding_type']!r} is not supported "
                          "(positional only: the timestep must be a DDPM step)")
    _check_unet_config(config, config_path)
    try:
        with torch.device("meta"):  # the size first, on a weightless copy: nothing is allocated yet
            n_params = sum(p.numel() for p in UNet2DModel.from_config(config).parameters())
        ok, free = fits(n_params * 4)
        if not ok:
            raise ConfigError(f"{config_path}: the U-Net has {n_params} parameters ({gib(n_params * 4)}); "
                              f"{gib(free)} is free here")
        unet = UNet2DModel.from_config(config)
    except ConfigError:
        raise
    except Exception as e:  # diffusers' own errors for a config it cannot build (wrong types, bad combinations)
        raise ConfigError(f"{config_path}: diffusers cannot build a UNet2DModel from it "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        state = load_file(str(weights))
        unet.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors' and torch's errors are long; keep the first line
        raise CheckpointError(f"{weights}: weights do not load into the U-Net "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return unet.eval()


def load_diffusers_folder(path: str | Path) -> tuple[Denoiser, DiscreteSchedule]:
    """(denoiser, schedule) for a diffusers folder written by ``save_pretrained``.

    Accepted layouts: a pipeline folder (``unet/`` and ``scheduler/`` subfolders) or one folder
    holding ``config.json``, the safetensors weights and ``scheduler_config.json``. The scheduler's
    ``prediction_type`` ("epsilon", "sample", "v_prediction") picks the Prediction kind.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: diffusers model folder not found")
    sched_path = _find(folder, "scheduler", "scheduler_config.json")
    if sched_path is None:
        raise ConfigError(f"{folder}: no scheduler_config.json (looked in the folder and scheduler/)")
    config = _read_json(sched_path)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_KINDS:
        raise ConfigError(f"{sched_path}: unsupported prediction_type {prediction!r}; "
                          f"supported: {', '.join(PREDICTION_KINDS)}")
    schedule = diffusers_schedule(config, str(sched_path))
    model_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = _load_unet(model_dir)
    learned = str(config.get("variance_type", "fixed_small")).startswith("learned")
    net = DiffusersUNet(unet, schedule.logsnr[1:], learned_variance=learned)
    return Denoiser(net, PREDICTION_KINDS[prediction]).eval(), schedule


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a diffusers folder (a scheduler config beside a U-Net config), not a
    diffusekit run folder (which has ``checkpoints/``)."""
    folder = Path(path)
    return (folder.is_dir() and not (folder / "checkpoints").is_dir()
            and _find(folder, "scheduler", "scheduler_config.json") is not None
            and _find(folder, "unet", "config.json") is not None)


def data_shape(path: str | Path) -> tuple[int, int, int]:
    """(C, H, W) of the images the folder's U-Net generates, from its config."""
    folder = Path(path)
    config_path = _find(folder, "unet", "config.json")
    config = _read_json(config_path)
    _check_unet_config(config, config_path)
    size = config.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.get("in_channels", 3)), int(h), int(w)


class DiffusersModel(DiffusionModel):
    """A diffusers folder loaded as a diffusion model; its samples record the folder they came from."""

    def provenance(self) -> dict[str, Any]:
        return {"diffusers_folder": str(self.source)}


def load(folder: Path, use_ema: bool = True, device: str | torch.device = "cpu") -> DiffusersModel:
    """A diffusers folder as a ``DiffusionModel`` (8-bit images, 256 levels; a default config, whose
    ``[sample]`` section gives the sampler defaults). ``use_ema`` has no meaning here: the folder holds
    one set of weights."""
    denoiser, schedule = load_diffusers_folder(folder)
    return DiffusersModel(Path(folder), Config(), data_shape(folder), 256, None, None, denoiser=denoiser.to(device),
                          schedule=schedule)
