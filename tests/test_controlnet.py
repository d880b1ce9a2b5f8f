"""ControlNet on a frozen U-Net: exact identity at initialisation, residual layout, what trains, errors.

Tiny networks (8 base channels, 8x8 images) so the file runs in seconds on 2 CPU cores.
"""

from pathlib import Path

import pytest
import torch
from conftest import fake_data

from diffusekit.nn import UNet
from diffusekit.nn.controlnet import ControlledUNet, ControlNet

TINY = {"base_channels": 8, "norm_groups": 4, "image_size": 8, "channel_mult": (1, 2), "attn_resolutions": (4,)}


def perturb(model: torch.nn.Module, std: float = 0.2, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter (a stand-in for trained weights: the base's zero-initialised
    output conv would otherwise hide everything)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def trained_base(**kwargs) -> UNet:
    torch.manual_seed(0)
    return perturb(UNet(**{**TINY, **kwargs}))


def inputs(batch: int = 3, size: int = 8, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen)
    control = torch.rand(batch, 1, size, size, generator=gen)
    return x, torch.linspace(-10.0, 10.0, batch), control


def controlled(scale: float = 1.0, **kwargs) -> ControlledUNet:
    base = trained_base(**kwargs)
    torch.manual_seed(5)
    return ControlledUNet(base, ControlNet(base), scale=scale)


def test_initial_output_equals_the_base_exactly():
    model = controlled()
    x, logsnr, control = inputs()
    with torch.no_grad():
        expected = model.base(x, logsnr)
        got = model(x, logsnr, control=control)
    assert torch.equal(got, expected)
    # not vacuous: the control net's features are nonzero, only the zero convs silence them
    assert any(p.abs().sum() > 0 for p in model.controlnet.down.parameters())


def test_class_conditional_base_initial_output_equal_too():
    model = controlled(num_classes=3)
    x, logsnr, control = inputs()
    labels = torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert torch.equal(model(x, logsnr, control=control, class_labels=labels),
                           model.base(x, logsnr, class_labels=labels))


@pytest.mark.parametrize("mult,size", [((1, 2), 8), ((1, 2, 2), 16)])
def test_residuals_match_residual_shapes(mult, size):
    base = trained_base(channel_mult=mult, attn_resolutions=())
    net = ControlNet(base)
    x, logsnr, control = inputs(batch=2, size=size)
    residuals = net(x, logsnr, control)
    assert [tuple(r.shape) for r in residuals] == base.residual_shapes(2, size)
    assert all(torch.equal(r, torch.zeros_like(r)) for r in residuals)  # zero convs at init


def test_copy_starts_from_the_base_weights_and_is_independent_and_trainable():
    base = trained_base().requires_grad_(False)
    net = ControlNet(base)
    for name in ("conv_in", "down", "mid1", "mid2", "time_mlp"):
        ours, theirs = getattr(net, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key])
            assert ours[key].data_ptr() != theirs[key].data_ptr()
    rows = net.emb_proj.out_features
    assert rows < base.emb_proj.out_features
    assert torch.equal(net.emb_proj.weight, base.emb_proj.weight[:rows])
    assert all(p.requires_grad for p in net.parameters())


def test_one_step_changes_only_the_controlnet():
    model = controlled().train()
    assert not model.base.training and model.controlnet.training
    assert not any(p.requires_grad for p in model.base.parameters())
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    net_before = {k: v.clone() for k, v in model.controlnet.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # every parameter: frozen ones must not move
    x, logsnr, control = inputs()
    model(x, logsnr, control=control).square().mean().backward()
    opt.step()
    assert all(p.grad is None for p in model.base.parameters())
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    changed = [k for k, v in model.controlnet.state_dict().items() if not torch.equal(v, net_before[k])]
    assert any(k.startswith("zero_convs.") for k in changed)
    assert all(k.startswith("zero_convs.") for k in changed)  # everything upstream of a zero conv gets 0 grad


def test_gradients_reach_the_zero_convs_at_initialisation():
    model = controlled()
    x, logsnr, control = inputs()
    out = model(x, logsnr, control=control)
    with torch.no_grad():
        assert torch.equal(out, model.base(x, logsnr))
    out.square().sum().backward()
    for i, conv in enumerate(model.controlnet.zero_convs):
        assert torch.equal(conv.weight, torch.zeros_like(conv.weight))
        assert conv.weight.grad is not None and conv.weight.grad.abs().max() > 0, i
        assert conv.bias.grad.abs().max() > 0, i
    # and after the zero convs move, the control image changes the output
    with torch.no_grad():
        for conv in model.controlnet.zero_convs:
            conv.weight.add_(0.1)
        perturb(model.controlnet.hint, seed=7)
        a = model(x, logsnr, control=control)
        b = model(x, logsnr, control=1 - control)
    assert not torch.allclose(a, b)


def test_scale_zero_equals_the_base_and_scale_matters():
    model = controlled(scale=0.0)
    perturb(model.controlnet, seed=3)  # a "trained" ControlNet with nonzero residuals
    x, logsnr, control = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, logsnr, control=control), model.base(x, logsnr))
        model.scale = 1.0
        assert not torch.allclose(model(x, logsnr, control=control), model.base(x, logsnr))


def test_caller_residuals_are_added_and_not_mutated():
    model = controlled()
    perturb(model.controlnet, seed=3)
    x, logsnr, control = inputs()
    gen = torch.Generator().manual_seed(9)
    extra = [torch.randn(s, generator=gen) for s in model.residual_shapes(3)]
    copies, ids = [r.clone() for r in extra], [id(r) for r in extra]
    with torch.no_grad():
        got = model(x, logsnr, control=control, residuals=extra)
        mine = model.controlnet(x, logsnr, control)
        expected = model.base(x, logsnr, residuals=[r + e for r, e in zip(mine, extra)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [id(r) for r in extra] == ids and len(extra) == len(copies)
    assert all(torch.equal(a, b) for a, b in zip(extra, copies))


@pytest.mark.parametrize("shape", [(3, 1, 4, 4), (3, 2, 8, 8), (2, 1, 8, 8)])
def test_control_of_the_wrong_shape_is_a_one_line_error(shape):
    model = controlled()
    x, logsnr, _ = inputs()
    with pytest.raises(ValueError, match="control must have shape") as err:
        model(x, logsnr, control=torch.zeros(shape))
    assert "\n" not in str(err.value) and "(3, 1, 8, 8)" in str(err.value)


def test_bad_class_labels_are_one_line_errors_before_any_layer_runs():
    x, logsnr, control = inputs()
    with pytest.raises(ValueError, match="num_classes=0"):
        controlled()(x, logsnr, control=control, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \(3,\)") as err:
        controlled(num_classes=3)(x, logsnr, control=control, class_labels=torch.zeros(3, 1, dtype=torch.long))
    assert "\n" not in str(err.value)


def test_missing_control_and_foreign_base_are_errors():
    model = controlled()
    x, logsnr, _ = inputs()
    with pytest.raises(ValueError, match="no control image"):
        model(x, logsnr)
    other = UNet(**{**TINY, "channel_mult": (1, 2, 2), "image_size": 8, "attn_resolutions": ()})
    with pytest.raises(ValueError, match="another layout"):
        ControlledUNet(other, model.controlnet)


# ------------------------------------------------------------------ the family (model.kind = "controlnet")
def test_sobel_edges_of_a_step_and_of_a_constant():
    from diffusekit.families.controlnet import sobel_edges

    x = torch.ones(1, 1, 8, 8)
    x[..., :4] = -1.0  # a vertical step of height 2 between columns 3 and 4
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 3:5] = 2.0  # (1 + 2 + 1) * 2 / 4 on both sides of the step
    assert torch.equal(sobel_edges(x), expected)
    assert torch.equal(sobel_edges(x.transpose(2, 3)), expected.transpose(2, 3))
    torch.testing.assert_close(sobel_edges(torch.full((2, 3, 8, 8), 0.7)), torch.zeros(2, 1, 8, 8),
                               rtol=0, atol=1e-6)  # the channel mean of 0.7 rounds
    with pytest.raises(ValueError, match="B, C, H, W"):
        sobel_edges(torch.zeros(8, 8))


def test_edge_correlation():
    from diffusekit.families.controlnet import edge_correlation

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 8, 8, generator=gen)
    torch.testing.assert_close(edge_correlation(a, 2 * a + 3), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(edge_correlation(a, -a), -torch.ones(4, dtype=torch.float64))
    assert torch.equal(edge_correlation(a, torch.ones_like(a)), torch.zeros(4, dtype=torch.float64))
    b = torch.rand(4, 1, 8, 8, generator=gen)
    assert edge_correlation(a, b).abs().max() < 0.5


TINY_BASE = ["data.name=digits", "model.base_channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[4]",
             "model.norm_groups=4", "diffusion.T=50", "train.batch_size=16", "train.warmup_steps=1",
             "train.log_every=2", "train.sample_every=0", "train.checkpoint_every=2", "train.n_sample=4",
             "train.steps=2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    folder = tmp_path_factory.mktemp("base") / "run"
    train(load_config(None, TINY_BASE), folder, progress=False)
    return folder


def control_cfg(base_run, *extra):
    from diffusekit.config import load_config

    return load_config(None, ["data.name=digits", "model.kind=controlnet", f"controlnet.base_run={str(base_run)!r}",
                              "train.batch_size=16", "train.warmup_steps=1", "train.log_every=2",
                              "train.sample_every=0", "train.checkpoint_every=2", "train.n_sample=4",
                              "train.steps=2", *extra])


def test_family_loss_at_init_is_the_base_loss_and_only_controlnet_trains(base_run):
    from diffusekit.families import open_run as load_run
    from diffusekit.families.diffusion import DiffusionObjective
    from diffusekit.train.trainer import build_objective

    cfg = control_cfg(base_run)
    objective = build_objective(cfg, fake_data((1, 8, 8)))
    module = objective.module
    assert isinstance(module, ControlledUNet) and objective.schedule.T == 50  # the base run's schedule
    assert not any(p.requires_grad for p in module.base.parameters())
    assert all(p.requires_grad for p in module.controlnet.parameters())
    base = load_run(base_run)
    reference = DiffusionObjective(base.cfg, fake_data((1, 8, 8)))
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    ours = objective.loss(module, x0, None, torch.Generator().manual_seed(3))
    theirs = reference.loss(base.denoiser.net, x0, None, torch.Generator().manual_seed(3))
    assert ours.shape == (5,) and torch.equal(ours, theirs)


def test_family_trains_and_loads_back(base_run, tmp_path):
    from diffusekit.families import open_run as load_run
    from diffusekit.families.controlnet import edge_agreement
    from diffusekit.sampling.settings import SampleSettings
    from diffusekit.train.trainer import train

    train(control_cfg(base_run), tmp_path / "cn", progress=False)
    model = load_run(tmp_path / "cn")
    objective = model.objective
    base = load_run(base_run)
    for k, v in base.denoiser.net.state_dict().items():  # the frozen base came through training unchanged
        assert torch.equal(objective.module.base.state_dict()[k], v), k
    moved = [conv.weight.abs().max() > 0 for conv in objective.module.controlnet.zero_convs]
    assert all(moved)
    scores = edge_agreement(model, SampleSettings(sampler="ddim", steps=3, batch_size=6), n=6)
    assert set(scores) == {"n", "controlnet", "base", "chance"} and scores["n"] == 6
    assert all(-1 <= scores[k] <= 1 for k in ("controlnet", "base", "chance"))

    import json

    from diffusekit.errors import CheckpointError
    from diffusekit.io.checkpoint import latest_checkpoint, record_hash

    record_path = Path(f"{latest_checkpoint(tmp_path / 'cn')}.json")
    record = json.loads(record_path.read_text())
    del record["meta"]["config"]  # a record without its config is named, not a KeyError traceback
    record["record_sha256"] = record_hash(record)  # consistent: the loader itself must notice the gap
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"\.json: metadata lacks 'config'") as info:
        load_run(tmp_path / "cn")
    assert "\n" not in str(info.value)


def test_family_config_errors(base_run, tmp_path):
    from diffusekit.errors import CheckpointError, ConfigError
    from diffusekit.train.trainer import build_objective

    with pytest.raises(ConfigError, match="controlnet.base_run"):
        control_cfg(base_run, "controlnet.base_run=''")
    with pytest.raises(ConfigError, match="controlnet.hint"):
        control_cfg(base_run, "controlnet.hint='depth'")
    with pytest.raises(CheckpointError, match="controlnet.base_run") as err:
        build_objective(control_cfg(tmp_path / "missing"), fake_data((1, 8, 8)))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="shape"):
        build_objective(control_cfg(base_run), fake_data((1, 16, 16)))


def test_cli_samples_and_evaluates_a_controlnet_run(base_run, tmp_path, capsys):
    import json

    import numpy as np

    from diffusekit.cli import main
    from diffusekit.config import save_config

    cfg = tmp_path / "cn.toml"
    save_config(control_cfg(base_run), cfg)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "cn"), "--no-progress"]) == 0
    out = tmp_path / "s"
    assert main(["sample", "--run", str(tmp_path / "cn"), "--seeds", "0-3", "--sampler", "ddim", "--steps", "3",
                 "--control-from", "train", "--out", str(out), "--no-progress"]) == 0
    assert np.load(out / "samples.npz")["x"].shape == (4, 1, 8, 8)
    assert json.loads((out / "settings.json").read_text())["extra"]["control_from"] == "train"
    assert "mean correlation" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(tmp_path / "cn"), "--n-samples", "4", "--steps", "3", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 4 and -1 <= scores["controlnet"] <= 1
    assert main(["sample", "--run", str(base_run), "--seeds", "0", "--control-from", "test", "--no-progress",
                 "--out", str(tmp_path / "t")]) == 2  # --control-from on a run that is not a ControlNet
    err = capsys.readouterr().err
    assert "--control-from applies to controlnet runs (model.kind = 'controlnet')" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()

    # --control-scale 0 is the base model: the same samples, bit for bit, as sampling the base run
    common = ["--seeds", "0-3", "--sampler", "ddim", "--steps", "3", "--no-progress"]
    assert main(["sample", "--run", str(tmp_path / "cn"), *common, "--control-scale", "0", "--out",
                 str(tmp_path / "c0")]) == 0
    assert main(["sample", "--run", str(base_run), *common, "--out", str(tmp_path / "b")]) == 0
    c0, b = (np.load(tmp_path / d / "samples.npz")["x"] for d in ("c0", "b"))
    c1 = np.load(out / "samples.npz")["x"]
    assert np.array_equal(c0, b) and not np.array_equal(c0, c1)
    assert json.loads((tmp_path / "c0" / "settings.json").read_text())["extra"]["control_scale"] == 0.0

    # hints from image files: two PNGs of test digits, sample i follows image i % 2
    from PIL import Image

    from diffusekit.data import load_dataset

    digits = load_dataset(control_cfg(base_run).data, "test").x[:2]
    pngs = []
    for k, img in enumerate(digits):
        pngs.append(tmp_path / f"hint{k}.png")
        Image.fromarray(((img[0].numpy() + 1) / 2 * 255).round().astype(np.uint8)).save(pngs[-1])
    capsys.readouterr()
    assert main(["sample", "--run", str(tmp_path / "cn"), *common, "--control-images", *map(str, pngs),
                 "--out", str(tmp_path / "img")]) == 0
    assert "from 2 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "img" / "settings.json").read_text())["extra"]["control_from"] == list(map(str, pngs))
    # bad flags: one line each, nothing written
    for bad, says in ((["--control-scale", "nan"], "--control-scale must be a finite number"),
                      (["--control-images", str(tmp_path / "nope.png")], "nope.png"),
                      (["--control-images", str(pngs[0]), "--control-from", "test"], "alternatives")):
        assert main(["sample", "--run", str(tmp_path / "cn"), *common, *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()
