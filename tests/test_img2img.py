"""The image-to-image family (families/img2img.py, SR3 / Palette) and ``diffusekit restore`` routing to it:
pairs are made by the operators of sampling/restore.py (the same A and y as a restoration), the U-Net reads
[x_t, A+ y, mask], the loss is the hand-computed denoising loss, the sampler passes the condition through
exactly, a tiny run trains and restores through the command line with the outputs and per-seed guarantees of
the training-free path, checkpoints load and resume exactly, and bad requests are one line."""

import json

import numpy as np
import pytest
import torch
from conftest import fake_data
from PIL import Image

from diffusekit.cli import main as cli_main
from diffusekit.config import load_config
from diffusekit.errors import ConfigError
from diffusekit.families import open_run, read_run
from diffusekit.families.img2img import (
    Img2ImgModel,
    Img2ImgObjective,
    Task,
    box_masks,
    build_network,
    condition_image,
    freeform_masks,
    from_residual,
    make_pairs,
    residual,
    sample_img2img,
    tasks_of,
    uncrop_masks,
)
from diffusekit.oracle import GaussianMixture, linear_posterior
from diffusekit.parameterization import Denoiser
from diffusekit.runs import restore as runs_restore
from diffusekit.runs.restore import RestoreSettings, build_operator, measure, restore_run
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.restore import Colorization, Inpaint, SuperResolution
from diffusekit.schedules import make_schedule

TINY = ["--set", "data.name=digits", "--set", "model.base_channels=8", "--set", "model.norm_groups=4",
        "--set", "diffusion.T=20", "--set", "train.batch_size=8", "--set", "train.sample_every=0",
        "--set", "train.n_sample=4", "--set", "train.log_every=1", "--set", "model.kind=img2img",
        "--set", 'img2img.tasks=["superres", "inpaint"]']
FAST = ["--steps", "5", "--no-progress"]


def cli(*argv) -> int:
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: a bad flag (its one line already printed)
        return int(exc.code or 0)


def one_line_error(capsys, argv, *needles):
    code = cli(*argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def img2img_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("img2img") / "run"
    assert cli("train", *TINY, "--set", "train.steps=4", "--out", out, "--no-progress") == 0
    return out


@pytest.fixture(autouse=True)
def no_classifier(monkeypatch):
    """The digits classifier's accuracy is the training-free path's business (tested there); skip its training."""
    monkeypatch.setattr(runs_restore, "_classifier_accuracy", lambda *args: {})


def digits(n=6, channels=1, size=8, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- pairs: the operators and measurements of sampling/restore.py and runs/restore.py -----------------------
@pytest.mark.parametrize("task", [Task("superres", 2), Task("superres", 4), Task("colorize"), Task("inpaint"),
                                  Task("outpaint")], ids=str)
def test_pairs_are_the_restore_operators_measurements(task):
    channels = 3 if task.name == "colorize" else 1
    x = digits(n=7, channels=channels)
    pairs = make_pairs(x, [task], torch.Generator().manual_seed(3))
    again = make_pairs(x, [task], torch.Generator().manual_seed(3))
    assert torch.equal(pairs.source, again.source) and torch.equal(pairs.known, again.known)  # the generator's only
    assert pairs.source.shape == (7, channels + 1, 8, 8) and (pairs.task == 0).all()
    # the same A and y as `diffusekit restore`: its operator, its measurement, its degraded image A+ y
    settings = RestoreSettings(task=task.name, factor=task.factor or 2, method="repaint")
    op, known = build_operator(settings, (channels, 8, 8), 7)
    if known is not None:  # masks: the pair's own mask through the same Inpaint
        op = Inpaint(pairs.known)
        assert not pairs.known.all(dim=(1, 2, 3)).any() and pairs.known.any(dim=(1, 2, 3)).all()
    else:
        assert pairs.known.all()
    y, degraded = measure(op, x, settings)
    assert torch.equal(pairs.source[:, :channels], degraded)
    assert torch.equal(pairs.source[:, channels:], pairs.known.float())
    assert torch.equal(condition_image(op, y), pairs.source)
    # A (A+ y) = y: exactly for masks, to one rounding for pooling and the channel mean
    assert torch.allclose(op.A(pairs.source[:, :channels]), op.A(x), atol=1e-6)
    if task.name in ("inpaint", "outpaint"):
        assert torch.equal(pairs.source[:, :channels], torch.where(pairs.known, x, torch.zeros(())))


def test_several_tasks_share_a_batch_with_their_own_operators():
    tasks = [Task("inpaint"), Task("superres", 2), Task("superres", 4)]
    x = digits(n=64)
    pairs = make_pairs(x, tasks, torch.Generator().manual_seed(0))
    assert set(pairs.task.tolist()) == {0, 1, 2}
    for index, op in ((1, SuperResolution(2)), (2, SuperResolution(4))):
        rows = pairs.task == index
        assert torch.equal(pairs.source[rows, :1], op.A_pinv(op.A(x[rows]))) and pairs.known[rows].all()
    rows = pairs.task == 0
    assert torch.equal(pairs.source[rows, :1], Inpaint(pairs.known[rows]).A(x[rows]))


def test_masks_are_boxes_strokes_and_uncrops():
    g = torch.Generator().manual_seed(1)
    for mask in box_masks(50, (16, 16), g):  # one unknown box, sides 4..12
        rows, cols = (~mask[0]).nonzero(as_tuple=True)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 4 <= h <= 12 and 4 <= w <= 12 and (~mask).sum() == h * w
    strokes = freeform_masks(50, (8, 8), g)
    assert (~strokes).any(dim=(1, 2, 3)).all() and 0.05 < (~strokes).float().mean() < 0.6
    for mask in uncrop_masks(50, (8, 8), g):  # a known box, or all but a strip at one side
        rows, cols = mask[0].nonzero(as_tuple=True)
        assert mask[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all() and not mask.all()
        assert mask[0, 0].all() or mask[0, -1].all() or mask[0, :, 0].all() or mask[0, :, -1].all() \
            or not (mask[0, 0].any() and mask[0, -1].any() and mask[0, :, 0].any() and mask[0, :, -1].any())


# -- the network and the loss ------------------------------------------------------------------------------
def test_the_unet_reads_the_image_the_condition_and_the_mask():
    cfg = load_config(None, ["model.kind=img2img", "model.base_channels=8", "model.norm_groups=4",
                             'img2img.tasks=["superres", "colorize"]', "img2img.superres_factors=[2, 4]",
                             "model.attn_resolutions=[8]"])
    assert [str(t) for t in tasks_of(cfg)] == ["superres x2", "superres x4", "colorize"]
    net = build_network(cfg, (3, 16, 16))
    assert net.unet.conv_in.in_channels == 3 + 3 + 1 and net.unet.conv_out.out_channels == 3
    assert net.unet.class_embed.num_embeddings == 3 + 1  # one per task (+ the U-Net's null label)
    x, source = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16)
    assert net(x, torch.zeros(2), source=source, task=torch.tensor([0, 2])).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="condition image"):
        net(x, torch.zeros(2))
    with pytest.raises(ConfigError, match="img2img.tasks has 'colorize'") as info:
        build_network(cfg, (1, 16, 16))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="img2img.superres_factors: factor 4 does not divide"):
        build_network(load_config(None, ["model.kind=img2img", "img2img.superres_factors=[4]"]), (1, 6, 6))


@pytest.mark.parametrize("override, key", [('img2img.tasks=["blur"]', "img2img.tasks"),
                                           ("img2img.tasks=[]", "img2img.tasks"),
                                           ("img2img.superres_factors=[1]", "img2img.superres_factors"),
                                           ("model.num_classes=10", "model.num_classes"),
                                           ("img2img.residual_scale=-0.1", "img2img.residual_scale"),
                                           ("img2img.residual_scale=1e-9", "img2img.residual_scale"),
                                           ('img2img.residual_scale="auto"', "img2img.residual_scale")])
def test_config_keys_are_checked_in_one_line(override, key):
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, ["model.kind=img2img", override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_the_loss_is_the_hand_computed_denoising_loss(scale):
    """Pairs, then t and the noise, all from the generator; the per-example eps error of the conditional U-Net,
    on x0 itself or (img2img.residual_scale = s) on r0 = (x0 - A+ y) / s."""
    cfg = load_config(None, ["model.kind=img2img", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=50",
                             'img2img.tasks=["inpaint", "superres"]', f"img2img.residual_scale={scale}"])
    objective = Img2ImgObjective(cfg, fake_data((1, 8, 8)))
    x0 = digits(n=5)
    loss = objective.loss(objective.module, x0, None, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    pairs = make_pairs(x0, objective.tasks, g)
    t = torch.randint(1, 51, (5,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    schedule = make_schedule("linear", 50, beta_start=1e-4, beta_end=0.02)
    abar = schedule.alpha_bar[t].reshape(-1, 1, 1, 1)
    target = (x0 - pairs.source[:, :1]) / scale if scale else x0
    x_t = (abar.sqrt() * target + (1 - abar).sqrt() * noise).float()
    logsnr = torch.log(abar / (1 - abar)).flatten().float()
    eps = objective.module.unet(torch.cat([x_t, pairs.source], 1), logsnr, class_labels=pairs.task)
    assert loss.shape == (5,)
    torch.testing.assert_close(loss, (eps - noise).square().mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", [Task("superres", 2), Task("inpaint"), Task("colorize")], ids=str)
def test_the_sampler_passes_the_condition_and_task_exactly(task):
    """A denoiser that predicts x0 = the A+ y it is given ends the ancestral chain exactly there (the last step's
    mean is x0, with no noise): the output is A+ y, the condition reached the network, and A x = y holds."""
    channels = 3 if task.name == "colorize" else 1
    x = digits(n=4, channels=channels)
    op = Inpaint(box_masks(4, (8, 8), torch.Generator().manual_seed(0))) if task.name == "inpaint" else \
        (SuperResolution(2) if task.name == "superres" else Colorization(3))
    seen = []

    class ReadsTheCondition(torch.nn.Module):
        def forward(self, x_t, c_noise, source=None, task=None):
            seen.append(task)
            return source[:, :channels]

    y = op.A(x)
    noise = PerSampleNoise(range(4), x.shape[1:])
    out = sample_img2img(Denoiser(ReadsTheCondition(), "x0"), make_schedule("linear", 20), noise(), noise, op, y,
                         task=3, steps=7)
    torch.testing.assert_close(out, op.A_pinv(y), rtol=0, atol=1e-6)
    assert torch.allclose(op.A(out), y, atol=1e-6) and len(seen) == 7 and all((s == 3).all() for s in seen)


# -- residual diffusion (img2img.residual_scale) --------------------------------------------------------------
@pytest.mark.parametrize("task", [Task("superres", 2), Task("colorize"), Task("inpaint")], ids=str)
def test_the_residual_is_the_unseen_part_and_round_trips(task):
    """r0 = (x0 - A+ y) / s lies in A's null space (A r0 = 0: the measurement fixes none of it), and A+ y + s r0
    is x0 again."""
    channels = 3 if task.name == "colorize" else 1
    x = digits(n=5, channels=channels, seed=4)
    pairs = make_pairs(x, [task], torch.Generator().manual_seed(2))
    op = degradation_of(task, pairs, channels)
    r = residual(x, pairs.source, 0.2)
    torch.testing.assert_close(op.A(r), torch.zeros_like(op.A(x)), rtol=0, atol=1e-6)
    torch.testing.assert_close(r * 0.2, op.project_null(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(from_residual(r, pairs.source, 0.2), x, rtol=0, atol=1e-6)
    assert residual(x, pairs.source, 0.0) is x and from_residual(x, pairs.source, 0.0) is x


def degradation_of(task, pairs, channels):
    if task.name in ("inpaint", "outpaint"):
        return Inpaint(pairs.known)
    return SuperResolution(task.factor) if task.name == "superres" else Colorization(channels)


# Measured with 4000 draws, 50 of the 1000 linear steps: (mean error, covariance error) against the exact
# posterior (Euclidean / Frobenius), x diffused, then r diffused with s = 0.3 (prior-posterior mean gap 0.87, 0.84):
#   superres x2, 4 -> 1: 0.009 / 0.107, then 0.012 / 0.064;   colorize 3 -> 1: 0.009 / 0.059, then 0.006 / 0.029
# The covariance errors are the 50 steps' discretisation; on the residual the chain starts at the posterior's
# own scale, which halves them here.
@pytest.mark.parametrize("task, shape", [(Task("superres", 2), (1, 2, 2)), (Task("colorize"), (3, 1, 1))], ids=str)
@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_the_residual_sampler_draws_the_exact_posterior_from_the_exact_denoiser(task, shape, scale):
    """Gaussian data x ~ N(m, S) and y = A x: the exact conditional denoiser of what the run diffuses (x | y, or
    r | y = (x - A+ y) / s | y, both Gaussian in closed form) restores draws whose mean and covariance are the
    closed-form posterior's (``oracle.linear_posterior``), up to 50 ancestral steps and 4000 draws."""
    F64, n = torch.float64, 4000
    D = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(3)
    B = torch.randn(D, D, generator=g, dtype=F64)
    prior = GaussianMixture.gaussian(torch.linspace(0.3, -0.3, D, dtype=F64), 0.3 * B @ B.T / D + 0.1 * torch.eye(D))
    op = SuperResolution(2) if task.name == "superres" else Colorization(3)
    M = op.A(torch.eye(D, dtype=F64).reshape(D, *shape)).reshape(D, -1).T
    x_true = torch.tensor([1.0, 0.8, -0.5, 0.2], dtype=F64)[:D].reshape(1, *shape)
    _, means, covs = linear_posterior(prior, M, M @ x_true.reshape(-1))
    y = op.A(x_true)
    up = op.A_pinv(y).reshape(-1)
    mean, cov = ((means[0] - up) / scale, covs[0] / scale**2) if scale else (means[0], covs[0])
    exact = GaussianMixture.gaussian(mean, cov + 1e-10 * torch.eye(D, dtype=F64))  # singular: the null space only
    gn = torch.Generator().manual_seed(0)
    x = sample_img2img(exact.denoiser, make_schedule("linear", 1000), torch.randn(n, *shape, generator=gn, dtype=F64),
                       lambda: torch.randn(n, *shape, generator=gn, dtype=F64), op, y.expand(n, *y.shape[1:]),
                       task=0, steps=50, residual_scale=scale).reshape(n, -1)
    torch.testing.assert_close(x @ M.T, (M @ x_true.reshape(-1)).expand(n, -1), rtol=0, atol=1e-12)
    mean_error, cov_error = (x.mean(0) - means[0]).norm().item(), (torch.cov(x.T) - covs[0]).norm().item()
    prior_gap = (prior.mean - means[0]).norm().item()
    assert mean_error < 0.04 and cov_error < 0.16 and mean_error < 0.1 * prior_gap, (mean_error, cov_error, prior_gap)


def test_a_residual_run_trains_and_restores_through_the_command_line(tmp_path, capsys):
    """img2img.residual_scale goes into the run, the model and the sampler: the restoration is consistent
    (A x = y) and the preview works; --clip-x0, which clips images, is refused in one line with nothing written."""
    run = tmp_path / "run"
    assert cli("train", *TINY, "--set", "train.steps=2", "--set", "img2img.residual_scale=0.2", "--set",
               "train.sample_every=2", "--out", run, "--no-progress") == 0
    model = open_run(run)
    assert model.cfg.img2img.residual_scale == 0.2 and (run / "samples.png").exists()
    out = tmp_path / "sr"
    assert cli("restore", "--run", run, "--task", "superres", "--n", "3", "--seeds", "0-1", "--out", out, *FAST) == 0
    capsys.readouterr()
    d = np.load(out / "restored.npz")
    pooled = d["restored"].reshape(3, 2, 4, 2, 4, 2).mean((3, 5))
    scale = max(1.0, float(abs(d["restored"]).max()))
    np.testing.assert_allclose(pooled, np.repeat(d["measurement"][:, None], 2, 1).reshape(3, 2, 4, 4), rtol=0,
                               atol=1e-5 * scale)
    one_line_error(capsys, ["restore", "--run", run, "--task", "superres", "--clip-x0", "1", "--out",
                            tmp_path / "clipped", *FAST], "--clip-x0", "img2img.residual_scale")
    assert not (tmp_path / "clipped").exists()


# -- trained through the command line, restored through the command line -----------------------------------
def test_train_then_restore_writes_what_the_training_free_path_writes(img2img_run, digits_run, tmp_path, capsys):
    trained, free = tmp_path / "trained", tmp_path / "free"
    assert cli("restore", "--run", img2img_run, "--task", "inpaint", "--n", "3", "--seeds", "0-1", "--out", trained,
               *FAST) == 0
    line = capsys.readouterr().out
    assert "inpaint with img2img (trained on pairs): PSNR" in line and "of the mean over seeds" in line
    assert cli("restore", "--run", digits_run, "--task", "inpaint", "--n", "3", "--seeds", "0-1", "--out", free,
               *FAST) == 0
    capsys.readouterr()
    names = {p.name for p in free.iterdir()}
    assert names == {p.name for p in trained.iterdir()} == {"restore.png", "restored.npz", "settings.json",
                                                            "metrics.json"}
    a, b = np.load(trained / "restored.npz"), np.load(free / "restored.npz")
    assert set(a.files) == set(b.files)
    for key in a.files:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
    for key in ("original", "measurement", "degraded", "known", "noise_seeds"):
        assert np.array_equal(a[key], b[key]), key  # the same inputs, y and per-seed streams
    known = a["known"]
    for s in range(2):  # the known pixels are the originals', bit for bit
        assert np.array_equal(a["restored"][:, s][known], a["original"][known])
    settings = json.loads((trained / "settings.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert settings["method"] == "img2img" and metrics["method"] == "img2img" and metrics["nfe"] == 5
    assert json.loads((free / "settings.json").read_text())["method"] == "repaint"  # the unconditional default
    # settings.json reproduces the restoration bit for bit
    again = tmp_path / "again"
    assert cli("restore", "--run", img2img_run, "--settings", trained / "settings.json", "--out", again,
               "--no-progress") == 0
    assert np.array_equal(np.load(again / "restored.npz")["restored"], a["restored"])


def test_a_seed_restores_the_same_image_in_any_batch(img2img_run):
    def restored(**kw):
        settings = RestoreSettings(task="superres", steps=4, n=3, **kw)
        metrics, out = restore_run(img2img_run, settings, img2img_run / f"r-{len(list(img2img_run.iterdir()))}",
                                   progress=False)
        d = np.load(out / "restored.npz")
        scale = max(1.0, float(abs(d["restored"]).max()))  # an untrained network's output can be large
        assert metrics["measurement_error"] < 1e-6 * scale  # A x = y: the pooled restoration is y, up to rounding
        assert np.allclose(d["restored"].reshape(-1, 4, 2, 4, 2).mean((2, 4)),
                           np.repeat(d["measurement"][:, None], len(kw["seeds"]), 1).reshape(-1, 4, 4),
                           atol=1e-6 * scale)
        return d["restored"]

    # the noise is the seed's alone; the U-Net's convolutions round differently per batch size (as in
    # test_restore_cli), so equal to float32 rounding, relative to the (untrained, large) values
    whole = restored(seeds=[0, 1, 2], batch_size=64)
    np.testing.assert_allclose(restored(seeds=[0, 1, 2], batch_size=2), whole, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(restored(seeds=[1], batch_size=1)[:, 0], whole[:, 1], rtol=1e-4, atol=1e-4)
    assert np.abs(whole[:, 0] - whole[:, 1]).max() > 0.1  # and another seed is another restoration


def test_bad_requests_are_one_line(img2img_run, digits_run, capsys, tmp_path):
    one_line_error(capsys, ["restore", "--run", img2img_run, "--task", "outpaint", *FAST], "--task outpaint",
                   str(img2img_run), "trained for superres x2, inpaint only")
    one_line_error(capsys, ["restore", "--run", img2img_run, "--task", "superres", "--factor", "4", *FAST],
                   "--factor 4", "superres x2, inpaint")
    for method in ("repaint", "ddnm", "dps"):
        one_line_error(capsys, ["restore", "--run", img2img_run, "--task", "superres", "--method", method, *FAST],
                       f"--method {method}", "image-to-image run", str(img2img_run))
    one_line_error(capsys, ["restore", "--run", img2img_run, "--task", "superres", "--resample", "3", *FAST],
                   "--resample", "img2img")
    one_line_error(capsys, ["restore", "--run", digits_run, "--task", "superres", "--method", "img2img", *FAST],
                   "--method img2img", "model.kind = 'img2img'", str(digits_run))
    one_line_error(capsys, ["sample", "--run", img2img_run, "--no-progress", "--out", tmp_path / "s"],
                   "restores images", "diffusekit restore --run")
    assert not (tmp_path / "s").exists() and not list(img2img_run.glob("restore-*"))


def test_the_checkpoint_loads_and_training_resumes_exactly(img2img_run, tmp_path):
    family, rc = read_run(img2img_run)
    model = open_run(img2img_run)
    assert family.name == "img2img" and family.trained_restore and not family.restore
    assert isinstance(model, Img2ImgModel) and model.tasks == (Task("superres", 2), Task("inpaint"))
    ema, _, _ = rc.weights(use_ema=True)
    state = model.denoiser.net.state_dict()
    assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli("train", *TINY, "--set", "train.steps=4", "--out", straight, "--no-progress") == 0
    assert cli("train", *TINY, "--set", "train.steps=2", "--out", resumed, "--no-progress") == 0
    assert cli("train", *TINY, "--set", "train.steps=4", "--out", resumed, "--resume", "--no-progress") == 0
    a, b = read_run(straight)[1].tensors, read_run(resumed)[1].tensors
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.")))


def test_the_app_restores_with_an_img2img_run(img2img_run):
    from diffusekit.app.actions import AppRun

    with AppRun(img2img_run) as app:
        info = app.describe()
        assert info["sections"]["restore"] and info["choices"]["method"] == ["img2img"]
        assert info["choices"]["task"] == ["inpaint", "superres"]
        result = app.restore({"task": "superres", "steps": 3, "n": 1, "seeds": "0"}, job=1)()
        assert result["metrics"]["method"] == "img2img" and "trained on pairs" in result["summary"]
        with pytest.raises(ConfigError, match="--method repaint") as info:
            app.restore({"task": "superres", "method": "repaint", "steps": 3, "n": 1, "seeds": "0"}, job=2)()
        assert "\n" not in str(info.value)


# -- the training masks as restore masks, and the side-by-side bench -----------------------------------------
@pytest.mark.parametrize("name,draw", [("freeform", freeform_masks), ("box", box_masks), ("uncrop", uncrop_masks)])
def test_restore_draws_each_input_a_training_mask_from_its_own_seed(name, draw):
    """--mask freeform / box / uncrop: input k's mask is the family's draw from SeedSequence([mask_seed, k]), so it
    does not depend on how many inputs there are."""
    masks = runs_restore.make_masks(name, 5, (8, 8), mask_seed=3)
    for k in range(5):
        own = draw(1, (8, 8), torch.Generator().manual_seed(runs_restore.noise_seed(3, k)))
        assert torch.equal(masks[k:k + 1], own)
    assert torch.equal(runs_restore.make_masks(name, 2, (8, 8), mask_seed=3), masks[:2])
    assert not torch.equal(runs_restore.make_masks(name, 5, (8, 8), mask_seed=4), masks)
    assert len({m.numpy().tobytes() for m in masks}) > 1  # one mask per input, not one for all


def test_the_restoration_bench_scores_what_restore_wrote(img2img_run, digits_run, tmp_path, monkeypatch):
    """bench/restoration.py on tiny runs: its PSNR columns are restore's own metrics, the projections are
    consistent, A+ y is consistent and deterministic, bicubic is not consistent, and SSIM and diversity are what
    they are on hand-made cases."""
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    bench = importlib.import_module("restoration")
    try:
        x = digits(4)
        assert torch.allclose(bench.ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)
        assert (bench.ssim(x + 0.3 * digits(4, seed=1), x) < 1).all()
        two = torch.stack([x, -x], 1)  # seeds 2 apart by |2 x| everywhere
        assert bench.diversity(two, None) == pytest.approx((2 * x).pow(2).flatten(1).mean(1).sqrt().mean().item())
        out = tmp_path / "json"
        result = bench.main(["--trained", str(img2img_run), "--free", str(digits_run), "--tasks", "superres,inpaint:freeform",
                             "--n", "4", "--seeds", "0-1", "--steps", "4",
                             "--out", str(tmp_path / "b"), "--json", str(out), "--no-progress"])
        assert json.loads(out.read_text()) == json.loads(json.dumps(result))
        sr, inpaint = result["tasks"]
        assert inpaint["mask"] == "freeform"
        assert [r["method"] for r in sr["rows"]] == ["A+y (nearest)", "bicubic", "img2img", "repaint", "ddnm", "dps"]
        for task in (sr, inpaint):
            for row in task["rows"]:
                if "folder" in row:
                    m = json.loads((Path(row["folder"]) / "metrics.json").read_text())
                    assert row["psnr_sample"][0] == pytest.approx(m["psnr"], abs=1e-9)
                    assert row["psnr_mean"][0] == pytest.approx(m["psnr_of_mean"], abs=1e-9)
                    d = row["distribution"]  # the feature-net score of the 8 restorations, as evaluate scores
                    assert d["name"] == "fd_ratio" and d["interval"][0] <= d["interval"][1] and d["value"] > 0
                    if row["method"] != "dps" and task is inpaint:  # a projection keeps the known pixels
                        assert row["consistency"] == 0
                    z = np.load(Path(row["folder"]) / "restored.npz")
                    mse = [np.mean((r.clip(-1, 1) - o) ** 2) for r, o in zip(z["restored"].mean(1), z["original"])]
                    if task is sr:  # every pixel is the region: the pooled MSE of the seeds' mean
                        assert row["psnr_mean_pooled"] == pytest.approx(10 * np.log10(4 / np.mean(mse)), abs=1e-4)
                else:  # a baseline is one deterministic image per input
                    assert row["psnr_sample"] == row["psnr_mean"] and row["diversity"] != row["diversity"]
            base = task["rows"][0]
            assert base["consistency"] < 1e-6 and base["s_per_image"] is None
        assert sr["rows"][1]["consistency"] > 1e-3  # bicubic upsampling does not pool back to y
        # the paired gain: per input, the row's PSNR of the mean minus the reference baseline's (bicubic; A+ y)
        assert sr["reference"] == "bicubic" and inpaint["reference"] == "A+y (zero fill)"
        assert sr["rows"][1]["psnr_mean_gain"] == (0.0, 0.0) and inpaint["rows"][0]["psnr_mean_gain"] == (0.0, 0.0)
        z = np.load(Path(sr["rows"][2]["folder"]) / "restored.npz")
        orig, y = torch.from_numpy(z["original"]), torch.from_numpy(z["measurement"])
        bicubic = torch.nn.functional.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False)
        gain = runs_restore.psnr(torch.from_numpy(z["restored"]).mean(1), orig, None) - runs_restore.psnr(bicubic, orig,
                                                                                                             None)
        assert sr["rows"][2]["psnr_mean_gain"] == pytest.approx(bench.mean_se(gain.numpy()), abs=1e-9)
        assert sr["rows"][2]["psnr_mean_gain"][0] == pytest.approx(
            sr["rows"][2]["psnr_mean"][0] - sr["rows"][1]["psnr_mean"][0], abs=1e-9)
        with Image.open(sr["picture"]) as im:  # 4 inputs x (degraded, 4 methods, original), 64-px tiles
            assert sr["picture_columns"] == ["degraded", "img2img", "repaint", "ddnm", "dps", "original"]
            assert im.size[0] > 6 * 64 and im.size[1] > 4 * 64 and im.size[1] < 5 * 64
        assert result["training"]["trained"]["steps"] == 4
        resumed = tmp_path / "resumed"  # a resumed run's clock restarts: its segments add up
        resumed.mkdir()
        (resumed / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (
            {"step": 50, "elapsed_s": 10.0}, {"step": 100, "elapsed_s": 20.0}, {"event": "resume"},
            {"step": 150, "elapsed_s": 12.5})))
        assert bench.training_cost(resumed) == {"steps": 150, "seconds": 32.5}
    finally:
        sys.modules.pop("restoration", None)


def test_the_restoration_bench_refuses_runs_that_restore_different_inputs(tmp_path, monkeypatch, capsys):
    """A trained and an unconditional run whose [data] differ (here the photo split) would be scored on different
    images; the bench stops with one line naming both runs."""
    import importlib
    import sys
    from pathlib import Path

    pytest.importorskip("skimage")
    photos = ["--set", "data.name=photos", "--set", "data.n_train=64", "--set", "data.n_test=8",
              "--set", "model.channel_mult=[1, 2]", "--set", "model.attn_resolutions=[]"]
    trained, free = tmp_path / "trained", tmp_path / "free"
    assert cli("train", *TINY, *photos, "--set", 'img2img.tasks=["colorize"]', "--set", "train.steps=2",
               "--out", trained, "--no-progress") == 0
    assert cli("train", *TINY, *photos, "--set", "model.kind=unet", "--set", "data.photo_split=tiles",
               "--set", "train.steps=2", "--out", free, "--no-progress") == 0
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    bench = importlib.import_module("restoration")
    try:
        with pytest.raises(SystemExit, match="restore different inputs; their \\[data\\] sections must match"):
            bench.main(["--trained", str(trained), "--free", str(free), "--tasks", "colorize", "--n", "2",
                        "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "b"), "--no-progress"])
    finally:
        sys.modules.pop("restoration", None)
