"""A diffusers UNet2DModel folder as a diffusekit denoiser (families/diffusers.py), checked against diffusers itself."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from diffusekit.errors import CheckpointError, ConfigError  # noqa: E402
from diffusekit.families.diffusers import load_diffusers_folder, logsnr_to_timestep  # noqa: E402
from diffusekit.likelihood import vlb_exact  # noqa: E402
from diffusekit.sampling.ddpm import sample_ddpm  # noqa: E402

T = 20


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def save_folder(path, prediction_type="epsilon", beta_schedule="linear", pipeline=False, **sched_kwargs):
    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction_type,
                              clip_sample=False, **sched_kwargs)
    if pipeline:
        unet.save_pretrained(path / "unet")
        scheduler.save_pretrained(path / "scheduler")
    else:
        unet.save_pretrained(path)
        scheduler.save_pretrained(path)
    return unet, scheduler


@pytest.mark.parametrize("prediction_type,kind", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
def test_wrapper_equals_the_unet_at_every_grid_time(tmp_path, prediction_type, kind):
    unet, scheduler = save_folder(tmp_path, prediction_type, pipeline=prediction_type == "sample")
    denoiser, schedule = load_diffusers_folder(tmp_path)
    assert denoiser.kind == kind and schedule.T == T
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ab = scheduler.alphas_cumprod.double()
    with torch.no_grad():
        for k in range(T):
            direct = unet(x, k).sample
            pred = denoiser(x, schedule.logsnr[k + 1])
            torch.testing.assert_close(pred.raw, direct, rtol=0, atol=1e-6)
            a, s = ab[k].sqrt().float(), (1 - ab[k]).sqrt().float()
            # what diffusers' scheduler would take as x0 and eps from the same output
            if prediction_type == "epsilon":
                eps, x0 = direct, (x - s * direct) / a
            elif prediction_type == "sample":
                eps, x0 = (x - a * direct) / s, direct
            else:
                eps, x0 = a * direct + s * x, a * x - s * direct
            torch.testing.assert_close(pred.eps, eps, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(pred.x0, x0, rtol=1e-4, atol=1e-4)
        # per-example noise levels and float32 logsnr (as the bound passes them) hit the grid too
        ks = torch.tensor([0, 7, 19])
        batched = denoiser(x, schedule.logsnr[ks + 1].float()).raw
        torch.testing.assert_close(batched, unet(x, ks).sample, rtol=0, atol=1e-6)


def test_timestep_between_grid_points_is_interpolated_in_logsnr():
    table = torch.tensor([5.0, 1.0, -3.0], dtype=torch.float64)
    lam = torch.tensor([5.0, 3.0, 1.0, -1.0, -3.0, 9.0, -9.0], dtype=torch.float64)
    k = logsnr_to_timestep(lam, table)
    torch.testing.assert_close(k, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 0.0, 2.0], dtype=torch.float64))
    assert logsnr_to_timestep(torch.tensor([float("inf")]), table).item() == 0.0


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_equals_diffusers_alphas_cumprod(tmp_path, beta_schedule):
    kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if beta_schedule == "scaled_linear" else {}
    _, scheduler = save_folder(tmp_path, beta_schedule=beta_schedule, **kwargs)
    _, schedule = load_diffusers_folder(tmp_path)
    assert schedule.log_alpha_bar.dtype == torch.float64
    torch.testing.assert_close(schedule.alpha_bar[1:].float(), scheduler.alphas_cumprod, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(schedule.betas[1:].float(), scheduler.betas, rtol=2e-6, atol=1e-8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [T, 5])
def test_ddpm_sampling_equals_diffusers_loop(tmp_path, prediction_type, steps):
    unet, scheduler = save_folder(tmp_path, prediction_type)
    denoiser, schedule = load_diffusers_folder(tmp_path)
    shape = (2, 1, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    # diffusers' DDPMPipeline loop: scheduler.step draws its noise from the generator
    g = torch.Generator().manual_seed(4)
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x, generator=g).prev_sample
    theirs = x

    g2 = torch.Generator().manual_seed(4)
    ours = sample_ddpm(denoiser, schedule, x_T.clone(), lambda: torch.randn(shape, generator=g2),
                       steps=steps, spacing="leading", variance="beta_tilde")
    assert theirs.abs().max() > 0.1  # a real trajectory, not all zeros
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_discrete_bound_runs_on_the_wrapped_model(tmp_path):
    save_folder(tmp_path)
    denoiser, schedule = load_diffusers_folder(tmp_path)
    levels = 256
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, levels, (4, 1, 8, 8), generator=g).float() / (levels - 1) * 2 - 1
    result = vlb_exact(denoiser, x0, schedule, levels)
    bpd = result.bits_per_dim
    assert math.isfinite(bpd) and bpd > 0
    assert result.terms.shape == (4, T) and torch.isfinite(result.terms).all()


def _one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as e:
        load_diffusers_folder(tmp_path / "nope")
    assert _one_line(e) and "nope" in str(e.value)


def test_pickled_bin_weights_are_refused(tmp_path):
    unet, _ = save_folder(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*refused") as e:
        load_diffusers_folder(tmp_path)
    assert _one_line(e)


@pytest.mark.parametrize("key,value", [("beta_schedule", "exotic"), ("prediction_type", "score")])
def test_unknown_scheduler_setting_names_file_and_key(tmp_path, key, value):
    import json

    save_folder(tmp_path)
    path = tmp_path / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_diffusers_folder(tmp_path)
    msg = str(e.value)
    assert _one_line(e) and "scheduler_config.json" in msg and key in msg and value in msg


def test_weights_that_do_not_fit_are_a_one_line_error(tmp_path):
    import json

    save_folder(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg["block_out_channels"] = [16, 32]
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not load") as e:
        load_diffusers_folder(tmp_path)
    assert _one_line(e)


def test_ddim_equals_diffusers_ddim_scheduler(tmp_path):
    from diffusers import DDIMScheduler

    from diffusekit.sampling.ddim import sample_ddim

    unet, ddpm = save_folder(tmp_path, "epsilon", beta_schedule="squaredcos_cap_v2")
    denoiser, schedule = load_diffusers_folder(tmp_path)
    scheduler = DDIMScheduler.from_config(ddpm.config)  # set_alpha_to_one: the last step lands on clean data
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    scheduler.set_timesteps(5)
    x = x_T.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x, eta=0.0).prev_sample
    ours = sample_ddim(denoiser, schedule, x_T.clone(), steps=5, spacing="leading", eta=0.0)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_between_grid_points_the_unet_sees_the_interpolated_timestep(tmp_path):
    unet, _ = save_folder(tmp_path)
    denoiser, schedule = load_diffusers_folder(tmp_path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    k = 6
    mid = 0.5 * (schedule.logsnr[k + 1] + schedule.logsnr[k + 2])  # halfway between steps k and k+1
    # (a tensor timestep: UNet2DModel casts a Python float to long)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, mid).raw, unet(x, torch.tensor(k + 0.5)).sample, rtol=0, atol=1e-6)
        assert not torch.allclose(denoiser(x, mid).raw, unet(x, k).sample, atol=1e-6)


def test_continuous_sampler_runs_through_the_wrapper(tmp_path):
    from diffusekit.sampling.generate import generate
    from diffusekit.sampling.settings import SampleSettings

    save_folder(tmp_path)
    denoiser, schedule = load_diffusers_folder(tmp_path)
    settings = SampleSettings(sampler="dpmpp_2m", steps=8, seeds=[0, 1, 2], batch_size=2)
    x = generate(denoiser, schedule, (1, 8, 8), settings, progress=False)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    # sample i depends only on seed i
    again = generate(denoiser, schedule, (1, 8, 8), SampleSettings(sampler="dpmpp_2m", steps=8, seeds=[2]),
                     progress=False)
    torch.testing.assert_close(again[0], x[2], rtol=1e-5, atol=1e-5)


def test_learned_variance_uses_the_mean_half_of_the_output(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    unet.save_pretrained(tmp_path)
    DDPMScheduler(num_train_timesteps=T, variance_type="learned_range").save_pretrained(tmp_path)
    denoiser, schedule = load_diffusers_folder(tmp_path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, schedule.logsnr[5]).eps, unet(x, 4).sample[:, :1], rtol=0, atol=1e-6)


def test_cli_samples_a_diffusers_folder_reproducibly(tmp_path, capsys):
    import json

    import numpy as np

    from diffusekit.cli import main
    from diffusekit.families.diffusers import is_diffusers_folder

    folder = tmp_path / "pipe"
    save_folder(folder, pipeline=True)
    assert is_diffusers_folder(folder) and not is_diffusers_folder(tmp_path)
    common = ["sample", "--run", str(folder), "--seeds", "0-3", "--sampler", "ddim", "--steps", "5", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--batch-size", "1", "--out", str(tmp_path / "b")]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["x"] for d in ("a", "b"))
    assert a.shape == (4, 1, 8, 8) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)  # sample i depends only on seed i
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["sampler"] == "ddim" and settings["extra"]["diffusers_folder"] == str(folder)
    assert main([*common, "--settings", str(tmp_path / "a" / "settings.json"), "--out", str(tmp_path / "c")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "samples.npz")["x"], a)
    capsys.readouterr()
    assert main([*common, "--classes", "3", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--classes" in err and "takes no class labels" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()
