"""Text-to-image latent diffusion (``model.kind = "latent_unet"``): the codec, the network, the loss.

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models": a frozen
autoencoder maps an image x to a latent z = E(x) (here the posterior mean of the KL autoencoder of
``configs/autoencoder_mnist.toml``: 28x28 -> 4x7x7), diffusion runs on z, and samples are decoded
by D. They rescale KL-regularized latents by one factor so they have unit variance (the
"scale factor" of Stable Diffusion); here it is measured on the train split when training starts
(``latent_scale``) and kept as a buffer of the trained module, so every checkpoint carries it.
Conditioning follows their sec. 3.3: the U-Net's cross-attention reads the token features tau(y) of the
caption y (MiniLM, ``diffusekit.text``), and the loss is the usual per-example denoising loss,

    L = E_{E(x), y, eps, t} || eps - eps_theta(z_t, t, tau(y)) ||^2      (any prediction kind)

Captions come from the labels (``data.captions``): the trainer hands the objective the class label
of each example (``model.num_classes = 10``), already replaced by the null label with probability
``train.class_dropout``; the objective draws a training template per example from the run's noise
generator (exact resume) and turns null labels into the empty caption "" (classifier-free guidance).
The caption features of the fixed training set are computed once (``text.CaptionFeatures``).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusekit.errors import CheckpointError, ConfigError

__all__ = ["KIND", "LatentCodec", "LatentTextNet", "load_codec", "latent_scale", "codec_fingerprint",
           "build_latent_net", "TextLatentObjective"]

KIND = "latent_unet"
FINGERPRINT_WORDS = 8  # 16-bit words of the codec's SHA-256 kept in the trained module


class LatentCodec:
    """The frozen autoencoder as codec: ``encode(x)`` = scale * E[z | x], ``decode(z)`` = E[x | z / scale]."""

    def __init__(self, autoencoder: nn.Module, scale: float, source: str = ""):
        self.autoencoder, self.scale, self.source = autoencoder.eval().requires_grad_(False), float(scale), source

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.autoencoder.latent_shape)

    def to(self, device: torch.device | str) -> "LatentCodec":
        self.autoencoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.autoencoder.encode(x) * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale)


def load_codec(path: str | Path, data_shape: tuple[int, ...] | None = None, device: torch.device | str = "cpu"):
    """The autoencoder of run folder ``path`` (EMA weights), or a one-line ``CheckpointError`` that
    names ``latent.autoencoder_run`` and the path when it is missing, incomplete or not an autoencoder."""
    from diffusekit.vae.evaluate import load_latent_run, run_model_kind

    where = f"latent.autoencoder_run = {str(path)!r}"
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{where}: autoencoder run folder {path} does not exist (train it: diffusekit train "
                              f"--config configs/autoencoder_mnist.toml --out {path})")
    kind = run_model_kind(path)
    if kind is not None and kind != "autoencoder":
        raise CheckpointError(f"{where}: {path} is a model.kind = {kind!r} run, not an autoencoder")
    try:
        run = load_latent_run(path, use_ema=True, device=device)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if data_shape is not None and tuple(run.data_shape) != tuple(data_shape):
        raise CheckpointError(f"{where}: the autoencoder codes images of shape {tuple(run.data_shape)}, the data "
                              f"has {tuple(data_shape)}")
    return run


@torch.no_grad()
def latent_scale(autoencoder: nn.Module, x: Tensor, batch_size: int = 500) -> float:
    """1 / std of the posterior means E[z | x] over all of ``x`` and every latent coordinate, so that
    the scaled train latents have unit variance (the rescaling of Rombach et al. 2022)."""
    total, total_sq, count = 0.0, 0.0, 0
    for lo in range(0, x.shape[0], batch_size):
        z = autoencoder.encode(x[lo:lo + batch_size]).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    mean = total / count
    var = total_sq / count - mean * mean
    if not (math.isfinite(var) and var > 0):
        raise ValueError(f"the latents have variance {var}; cannot scale them to unit variance")
    return 1.0 / math.sqrt(var)


def codec_fingerprint(autoencoder: nn.Module) -> Tensor:
    """The first 128 bits of a SHA-256 over the autoencoder's state (names, dtypes, shapes, bytes), as
    ``FINGERPRINT_WORDS`` 16-bit words in float32 (exact there, and unchanged by the trainer's float32
    EMA, which copies buffers). Any change of the codec's weights changes it."""
    digest = hashlib.sha256()
    for name, value in sorted(autoencoder.state_dict().items()):
        v = value.detach().cpu().contiguous()
        digest.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        digest.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    raw = digest.digest()[:2 * FINGERPRINT_WORDS]
    return torch.tensor([int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)], dtype=torch.float32)


class LatentTextNet(nn.Module):
    """The trained module: a cross-attention U-Net on scaled latents, plus the buffers ``latent_scale``
    and ``codec_fingerprint`` (of the autoencoder it was trained with; both saved in every checkpoint
    with the weights, so a run cannot silently decode with a retrained autoencoder)."""

    latent_scale: Tensor
    codec_fingerprint: Tensor

    def __init__(self, unet: nn.Module, scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.register_buffer("latent_scale", torch.tensor(float(scale)))
        self.register_buffer("codec_fingerprint", torch.zeros(FINGERPRINT_WORDS))

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        return self.unet(x, c_noise, context=context, context_mask=context_mask)


def build_latent_net(model_cfg, latent_shape: tuple[int, ...], context_dim: int, scale: float = 1.0) -> LatentTextNet:
    """The U-Net of ``[model]`` on latents of shape (C, H, W), with cross-attention of width ``context_dim``."""
    from diffusekit.models import _check_unet_fits
    from diffusekit.nn import UNet

    c, h, w = latent_shape
    if h != w:
        raise ConfigError(f"model.kind = {KIND!r} needs square latents, got {h}x{w}")
    _check_unet_fits(model_cfg, h)
    m = model_cfg
    unet = UNet(in_channels=c, image_size=h, base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
                dropout=m.dropout, time_embedding=m.time_embedding, norm_groups=m.norm_groups,
                context_dim=context_dim)
    return LatentTextNet(unet, scale)


def check_latent_config(cfg) -> None:
    """The keys a text-conditioned latent run needs, as one-line ``ConfigError``s."""
    if cfg.data.name not in ("digits", "mnist"):
        raise ConfigError(f"model.kind = {KIND!r} captions digit labels; data.name must be 'digits' or 'mnist', "
                          f"got {cfg.data.name!r}")
    if cfg.model.num_classes != 10:
        raise ConfigError(f"model.kind = {KIND!r} makes captions from the 10 digit labels: set model.num_classes = "
                          f"10 (got {cfg.model.num_classes})")
    if cfg.loss.objective != "discrete":
        raise ConfigError(f"model.kind = {KIND!r} trains the discrete-time loss; set loss.objective = 'discrete'")


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the network in .module


class TextLatentObjective:
    """The trainer's ``Objective`` for ``model.kind = "latent_unet"`` (see the module docstring)."""

    def __init__(self, cfg, data_shape: tuple[int, ...]):
        from diffusekit.data import load_dataset
        from diffusekit.data.captions import TRAIN_TEMPLATES, caption_grid
        from diffusekit.models import build_schedule
        from diffusekit.text import CONTEXT_DIM, NULL_CAPTION, CaptionFeatures

        check_latent_config(cfg)
        self.cfg, self.data_shape = cfg, tuple(data_shape)
        self.schedule = build_schedule(cfg.diffusion)
        self.kind = cfg.model.prediction
        with torch.random.fork_rng(devices=[]):  # loading codec, data and encoder leaves the caller's RNG alone
            run = load_codec(cfg.latent.autoencoder_run, self.data_shape)
        self.latent_shape = tuple(run.module.latent_shape)
        self.module = build_latent_net(cfg.model, self.latent_shape, CONTEXT_DIM)
        with torch.random.fork_rng(devices=[]):
            scale = latent_scale(run.module, load_dataset(cfg.data, "train").x)
            self.templates = TRAIN_TEMPLATES
            self.captions = CaptionFeatures(caption_grid(TRAIN_TEMPLATES) + [NULL_CAPTION])
        self.module.latent_scale.fill_(scale)
        self.module.codec_fingerprint.copy_(codec_fingerprint(run.module))
        self.codec = LatentCodec(run.module, scale, str(cfg.latent.autoencoder_run))
        self.null_row = len(self.captions.captions) - 1

    def denoiser(self, module: nn.Module):
        from diffusekit.parameterization import Denoiser

        return Denoiser(module, self.kind)

    def caption_rows(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Row of the caption of each example: digit label * templates + a template drawn from
        ``generator``; the null label (``model.num_classes``) gets the empty caption."""
        labels = labels.cpu()
        picks = torch.randint(len(self.templates), labels.shape, generator=generator)
        null = labels == self.cfg.model.num_classes
        rows = labels.clamp(max=9) * len(self.templates) + picks
        return torch.where(null, torch.full_like(rows, self.null_row), rows)

    def loss(self, module: nn.Module, x0: Tensor, cond: dict | None, generator: torch.Generator) -> Tensor:
        from diffusekit.losses import diffusion_loss, sample_timesteps

        if not isinstance(cond, dict) or "class_labels" not in cond:
            raise ValueError(f"model.kind = {KIND!r} needs the labels of the batch (cond = {{'class_labels': y}})")
        self.codec.scale = float(_unwrap(module).latent_scale)  # the checkpoint's scale, after a resume
        z0 = self.codec.to(x0.device).encode(x0)
        text = self.captions.lookup(self.caption_rows(cond["class_labels"], generator).to(x0.device))
        lc = self.cfg.loss
        t = sample_timesteps(z0.shape[0], self.schedule.T, generator, lc.t_sampling)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        return diffusion_loss(self.denoiser(module), z0, t, self.schedule, noise, lc.weighting,
                              cond=text.as_cond(), gamma=lc.min_snr_gamma)

    def preview(self, module: nn.Module, n: int, device: torch.device) -> Tensor:
        """n decoded samples prompted "a handwritten 0", ..., "a handwritten 9" in turn (DDPM, <= 100
        steps) at the guidance scale of ``sample.guidance``."""
        from diffusekit.latent.sampling import sample_latents
        from diffusekit.sampling.run import SampleSettings

        rows = torch.arange(n) % 10 * len(self.templates)
        text = self.captions.lookup(rows)
        null = self.captions.lookup(torch.tensor([self.null_row]))
        settings = SampleSettings(sampler="ddpm", steps=min(100, self.schedule.T), seeds=list(range(n)),
                                  batch_size=max(n, 1), guidance=self.cfg.sample.guidance)
        z = sample_latents(self.denoiser(module).eval(), self.schedule, self.latent_shape, settings, text, null,
                           device=device)
        self.codec.scale = float(_unwrap(module).latent_scale)
        return self.codec.to(device).decode(z.to(device))
