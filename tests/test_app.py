"""``diffusekit app`` (diffusekit/app): the page's endpoints on tiny trained runs, through Starlette's
TestClient. Its samples and restorations equal the command line's for the same settings and seeds (and
the command it shows reproduces them); bad uploads get the command line's one-line messages; a second
job while one runs is answered "busy"; each family shows only its sections; nothing is written outside
the server's temporary folder unless asked."""

import base64
import io
import shlex
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli import main as cli_main

TINY = ["data.name=digits", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=20", "train.steps=3",
        "train.batch_size=8", "train.sample_every=0", "train.n_sample=4", "train.log_every=1"]


def _train(folder, *extra):
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    train(load_config(None, [*TINY, *extra]), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("app") / "run")


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("app_class") / "run", "model.num_classes=10", "train.class_dropout=0.2")


def _client(run, **kwargs):
    pytest.importorskip("starlette", reason="the `app` extra (starlette) is not installed")
    pytest.importorskip("httpx", reason="httpx (Starlette's TestClient) is not installed")
    from starlette.testclient import TestClient

    from diffusekit.app.actions import AppRun
    from diffusekit.app.jobs import JobRunner
    from diffusekit.app.server import create_app

    state = AppRun(run)
    return state, TestClient(create_app(state, JobRunner(), **kwargs), base_url="http://127.0.0.1:8765")


@pytest.fixture(scope="module")
def app(tiny_run):
    state, client = _client(tiny_run)
    yield state, client
    state.close()


def wait(client, job, timeout=120):
    """The job's final state (polled as the page does)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = client.get(f"/api/job/{job}").json()
        if state["state"] != "running":
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job} still running after {timeout} s")


def act(client, action, body):
    response = client.post(f"/api/{action}", json=body)
    assert response.status_code == 202, response.text
    return wait(client, response.json()["job"])


def done(client, action, body):
    state = act(client, action, body)
    assert state["state"] == "done", state
    return state["result"]


def upload(name, data: bytes):
    return {"name": name, "data": "data:image/png;base64," + base64.b64encode(data).decode()}


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def npz(client, url):
    response = client.get(url)
    assert response.status_code == 200, url
    return np.load(io.BytesIO(response.content))


def files_of(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- the command ---------------------------------------------------------------------------------------
def test_missing_extra_is_one_line_saying_how_to_install(capsys, monkeypatch, tmp_path):
    import importlib.util

    import diffusekit.app as app_package

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert app_package.missing_extra() == "uvicorn"
    code, _, err = cli(capsys, "app", "--run", tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "pip install 'diffusekit[app]'" in lines[0] and "uvicorn" in lines[0]


def test_bad_run_and_busy_port_are_one_line(capsys, tmp_path, tiny_run):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    code, _, err = cli(capsys, "app", "--run", tmp_path / "no_such_run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no_such_run" in err and "Traceback" not in err
    from diffusekit.app.server import bind

    taken = bind("127.0.0.1", 0)
    try:
        code, _, err = cli(capsys, "app", "--run", tiny_run, "--port", taken.getsockname()[1])
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--port" in err, err
    finally:
        taken.close()


def test_the_page_is_served_from_package_data_without_external_references(app):
    from importlib import resources

    _, client = app
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "default-src 'self'" in page.headers[
        "content-security-policy"]
    for name in ("index.html", "app.js", "app.css"):
        text = (resources.files("diffusekit.app") / "static" / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/secret.txt").status_code == 404


def test_foreign_host_and_cross_origin_posts_are_refused(app):
    _, client = app
    from diffusekit.app.server import host_name

    rebound = client.get("/api/run", headers={"host": "evil.example:8765"})  # DNS rebinding
    assert rebound.status_code == 400 and "evil.example" in rebound.json()["error"]
    assert client.get("/api/run", headers={"host": "localhost:8765"}).status_code == 200
    assert [host_name(h) for h in ("127.0.0.1:80", "[::1]:8765", "::1", "localhost")] == [
        "127.0.0.1", "::1", "::1", "localhost"]
    refused = client.post("/api/sample", json={}, headers={"origin": "http://evil.example"})
    assert refused.status_code == 403 and "cross-origin" in refused.json()["error"]
    wrong_type = client.post("/api/sample", content=b"seeds=0-3", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415 and "\n" not in wrong_type.json()["error"]


def test_an_unexpected_error_is_one_line_in_the_page_and_on_the_console(capsys, monkeypatch, app):
    state, client = app
    monkeypatch.setattr(state, "describe", lambda: 1 / 0)
    response = client.get("/api/run")
    assert response.status_code == 500 and response.json()["error"].startswith("internal error (ZeroDivisionError")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "ZeroDivisionError" in err


# -- sections per family ------------------------------------------------------------------------------
@pytest.mark.parametrize("family,shape,num_classes,shown,hidden", [
    ("diffusion", (1, 8, 8), 0, {"sampler", "trajectory", "restore", "measure"}, {"classes", "prompts", "control"}),
    ("diffusion", (1, 8, 8), 10, {"classes", "guidance", "trajectory"}, {"prompts", "control"}),
    ("diffusion", (2,), 0, {"sampler", "measure"}, {"trajectory", "restore"}),
    ("continuous", (1, 8, 8), 0, {"trajectory", "restore", "measure"}, {"control"}),
    ("vae", (1, 8, 8), 0, {"measure"}, {"sampler", "trajectory", "restore", "guidance"}),
    ("text_latent", (1, 28, 28), 0, {"prompts", "guidance", "sampler", "measure"},
     {"trajectory", "restore", "classes"}),
    ("controlnet", (1, 8, 8), 0, {"control", "sampler", "measure"}, {"trajectory", "restore", "prompts", "guidance"}),
    ("controlnet-text", (1, 32, 32), 0, {"control", "prompts", "guidance", "measure"}, {"trajectory", "restore"}),
    ("consistency", (1, 8, 8), 0, {"trajectory", "measure"}, {"restore", "control"}),
    ("diffusers", (3, 32, 32), 0, {"sampler", "trajectory"}, {"measure", "restore"}),
])
def test_each_family_shows_only_its_sections(family, shape, num_classes, shown, hidden):
    from diffusekit.app.actions import AppRun
    from diffusekit.families import family_named

    state = AppRun.__new__(AppRun)  # the sections read the family's row and the model's shape only
    state.family, state.data_shape, state.num_classes = family_named(family.split("-")[0]), shape, num_classes
    state.prompted = family != "controlnet"  # a ControlNet over a unet base takes no prompts; over a text base it does
    sections = state.sections()
    assert all(sections[s] for s in shown), sections
    assert not any(sections[s] for s in hidden), sections


def test_run_description_of_a_class_conditional_run(class_run):
    state, client = _client(class_run)
    with state:
        info = client.get("/api/run").json()
    assert info["family"] == "diffusion" and info["num_classes"] == 10 and info["T"] == 20
    assert info["sections"]["classes"] and info["sections"]["guidance"] and not info["sections"]["control"]
    assert "ddim" in info["choices"]["sampler"] and info["choices"]["method"] == ["repaint", "ddnm", "dps"]
    assert info["choices"]["task"] == ["inpaint", "outpaint", "superres", "blur", "saturation"]  # no colorize: 1 channel
    assert info["choices"]["dps_tasks"] == ["blur", "saturation"]  # offered with dps only
    restore = info["defaults"]["restore"]
    assert (restore["blur_size"], restore["blur_width"], restore["gain"], restore["noise_std"], restore["zeta"],
            restore["jump"], restore["zeta_sqrt_steps"]) == (5, 1.0, 3.0, 0.0, None, 10, 5.0)  # RestoreSettings'


def test_controlnet_run_shows_the_hint_and_samples_like_the_cli_from_a_drawing(capsys, tmp_path, tiny_run):
    """A ControlNet run over the tiny base: a drawn hint gives the samples of --control-images."""
    control = _train(tmp_path / "control", "model.kind=controlnet", f"controlnet.base_run={str(tiny_run)!r}",
                     "train.steps=2")
    state, client = _client(control)
    with state:
        assert client.get("/api/run").json()["sections"]["control"]
        sketch = np.zeros((64, 64), dtype=np.uint8)
        sketch[16:48, 28:36] = 255
        (tmp_path / "hint.png").write_bytes(png(sketch))
        result = done(client, "sample", {"sampler": "ddim", "steps": 4, "seeds": "0-2",
                                         "control": {"source": "image", "image": upload("hint.png", png(sketch)),
                                                     "scale": 0.5}})
        assert "--control-images hint.png --control-scale 0.5" in result["command"] and result["trajectory"] is None
        page = npz(client, result["files"] + "samples.npz")["x"]
    code, _, err = cli(capsys, "sample", "--run", control, "--sampler", "ddim", "--steps", "4", "--seeds", "0-2",
                       "--control-images", tmp_path / "hint.png", "--control-scale", "0.5", "--out", tmp_path / "cli",
                       "--no-progress")
    assert code == 0, err
    assert np.array_equal(page, np.load(tmp_path / "cli" / "samples.npz")["x"])


# -- sample ----------------------------------------------------------------------------------------------
def test_samples_equal_the_cli_and_the_shown_command_reproduces_them(capsys, tmp_path, app, tiny_run):
    _, client = app
    before = files_of(tiny_run)
    result = done(client, "sample", {"sampler": "ddim", "steps": 5, "seeds": "0-5", "eta": 0.5})
    assert result["n"] == 6 and [s["seed"] for s in result["samples"]] == list(range(6))
    assert result["command"] == f"diffusekit sample --run {tiny_run} --seeds 0-5 --sampler ddim --steps 5 --eta 0.5"
    code, _, err = cli(capsys, "sample", "--run", tiny_run, "--seeds", "0-5", "--sampler", "ddim", "--steps", "5",
                       "--eta", "0.5", "--out", tmp_path / "cli", "--no-progress")
    assert code == 0, err
    cli_x = np.load(tmp_path / "cli" / "samples.npz")["x"]
    assert np.array_equal(npz(client, result["files"] + "samples.npz")["x"], cli_x)
    for name in ("grid.png", "sample_0.png", "sample_5.png"):
        assert client.get(result["files"] + name).content == (tmp_path / "cli" / name).read_bytes(), name
    argv = shlex.split(result["command"])[1:] + ["--out", tmp_path / "again", "--no-progress"]
    assert cli(capsys, *argv)[0] == 0
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["x"], cli_x)
    assert files_of(tiny_run) == before  # the page wrote only into its temporary folder


def test_trajectory_is_the_same_sampler_and_ends_on_the_sample(app, tiny_run):
    from diffusekit.families import open_run
    from diffusekit.sampling.generate import sample_trajectory
    from diffusekit.sampling.settings import SampleSettings

    _, client = app
    result = done(client, "sample", {"sampler": "unipc", "steps": 6, "seeds": "3,8,11"})
    t = result["trajectory"]
    assert t["index"] == 0 and t["seed"] == 3 and len(t["x"]) == len(t["x0"]) == len(t["times"]) == 7
    assert t["times"][-1] == 0 and all(a > b for a, b in zip(t["times"], t["times"][1:]))
    assert all(client.get(url).status_code == 200 for url in t["x"] + t["x0"])
    other = done(client, "trajectory", {"index": 2})
    assert other["seed"] == 11 and other["index"] == 2
    samples = npz(client, result["files"] + "samples.npz")["x"]
    model = open_run(tiny_run)
    settings = SampleSettings(sampler="unipc", steps=6, seeds=[3, 8, 11])
    traj = sample_trajectory(model.denoiser, model.schedule, model.data_shape, settings, index=2)
    torch.testing.assert_close(traj.x[-1], torch.from_numpy(samples[2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(traj.x0[-1], traj.x[-1])
    assert 0.5 < traj.x[0].std() < 2  # the first frame is (nearly) the prior draw: x_t, not y = x_t / alpha_t
    assert traj.times[0] == pytest.approx(1.0) and traj.times[-1] == 0
    bad = client.post("/api/trajectory", json={"index": 3})
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]
    adaptive = done(client, "sample", {"sampler": "rk45", "seeds": "0"})["trajectory"]
    assert adaptive["times"] == [0] and "no intermediate states" in adaptive["note"]


def test_class_conditional_samples_equal_the_cli(capsys, tmp_path, class_run):
    state, client = _client(class_run)
    with state:
        result = done(client, "sample", {"sampler": "dpmpp_2m", "steps": 4, "seeds": "0-3", "guidance": 2.0,
                                         "classes": "3,7"})
        assert [s["label"] for s in result["samples"]] == ["class 3", "class 7", "class 3", "class 7"]
        page = npz(client, result["files"] + "samples.npz")["x"]
        assert done(client, "trajectory", {"index": 1})["seed"] == 1
    code, _, err = cli(capsys, "sample", "--run", class_run, "--sampler", "dpmpp_2m", "--steps", "4", "--seeds", "0-3",
                       "--guidance", "2", "--classes", "3,7", "--out", tmp_path / "cli", "--no-progress")
    assert code == 0, err
    assert np.array_equal(page, np.load(tmp_path / "cli" / "samples.npz")["x"])


def test_bad_sample_settings_are_the_cli_one_liners(app):
    _, client = app
    for body, needle in (({"steps": 500, "sampler": "ddpm"}, "--steps"), ({"seeds": "5-1"}, "--seeds"),
                         ({"steps": True}, "--steps"), ({"classes": "1"}, "--classes"),
                         ({"seeds": "0-5000"}, "at most 1024")):
        response = client.post("/api/sample", json=body)
        if response.status_code == 202:
            state = wait(client, response.json()["job"])
            assert state["state"] == "error", (body, state)
            message = state["error"]
        else:
            assert response.status_code == 400, (body, response.text)
            message = response.json()["error"]
        assert needle in message and "\n" not in message and "Traceback" not in message, (body, message)


# -- restore ---------------------------------------------------------------------------------------------
def test_restore_of_an_upload_with_a_drawn_mask_equals_the_cli(capsys, tmp_path, monkeypatch, app, tiny_run):
    _, client = app
    before = files_of(tiny_run)
    image = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 1:4] = 255  # white: generate
    result = done(client, "restore", {"task": "inpaint", "method": "repaint", "mask": "drawn", "steps": 5,
                                      "resample": 2, "jump": 2, "seeds": "0-1",
                                      "mask_image": upload("mask.png", png(mask)),
                                      "images": [upload("a.png", png(image))]})
    assert result["command"] == (f"diffusekit restore --run {tiny_run} --task inpaint --method repaint --steps 5 "
                                 "--resample 2 --jump 2 --seeds 0-1 --mask mask.png --images a.png")
    page = npz(client, result["files"] + "restored.npz")
    assert client.get(result["picture"]).status_code == 200
    (tmp_path / "a.png").write_bytes(png(image))
    (tmp_path / "mask.png").write_bytes(png(mask))
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(result["command"])[1:] + ["--out", "cli", "--no-progress"]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    ours = np.load(tmp_path / "cli" / "restored.npz")
    assert np.array_equal(page["restored"], ours["restored"]) and np.array_equal(page["known"], ours["known"])
    assert page["known"][0, 0, 2:6, 1:4].sum() == 0 and page["known"].sum() == 64 - 12
    assert files_of(tiny_run) == before


def test_restore_of_test_images_superres_equals_the_cli(capsys, tmp_path, monkeypatch, digits_cache, app, tiny_run):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))  # the classifier accuracy of test images
    _, client = app
    result = done(client, "restore", {"task": "superres", "method": "ddnm", "factor": 2, "steps": 4, "n": 2,
                                      "seeds": "1"})
    assert result["metrics"]["n_samples"] == 2 and "accuracy" in result["metrics"]
    code, _, err = cli(capsys, "restore", "--run", tiny_run, "--task", "superres", "--method", "ddnm", "--factor", "2",
                       "--steps", "4", "--n", "2", "--seeds", "1", "--out", tmp_path / "cli", "--no-progress")
    assert code == 0, err
    assert np.array_equal(npz(client, result["files"] + "restored.npz")["restored"],
                          np.load(tmp_path / "cli" / "restored.npz")["restored"])
    image = client.get("/api/test-image/0")
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (8, 8)


def test_restore_with_a_training_mask_from_a_seed_equals_the_cli(capsys, tmp_path, app, tiny_run):
    """mask "freeform" with a mask seed: the page's command is the CLI's, and the masks are the seeded draws."""
    from diffusekit.runs.restore import make_masks

    _, client = app
    result = done(client, "restore", {"task": "inpaint", "method": "ddnm", "mask": "freeform", "mask_seed": 7,
                                      "steps": 4, "n": 2, "seeds": "0"})
    assert "--mask freeform" in result["command"] and "--mask-seed 7" in result["command"]
    argv = shlex.split(result["command"])[1:] + ["--out", str(tmp_path / "cli"), "--no-progress"]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    page, ours = npz(client, result["files"] + "restored.npz"), np.load(tmp_path / "cli" / "restored.npz")
    assert np.array_equal(page["restored"], ours["restored"])
    assert np.array_equal(page["known"], make_masks("freeform", 2, (8, 8), mask_seed=7).numpy())


def test_dps_blur_with_noise_equals_the_cli_and_the_shown_command_reproduces_it(capsys, tmp_path, monkeypatch, app,
                                                                                tiny_run):
    from diffusekit.runs.restore import measurement_noise
    from diffusekit.sampling.dps import GaussianBlur

    _, client = app
    images = [(np.random.default_rng(k).random((8, 8)) * 255).astype(np.uint8) for k in (1, 2)]
    body = {"task": "blur", "method": "dps", "blur_size": 3, "blur_width": 0.8, "steps": 4, "noise_std": 0.1,
            "zeta": 0.5, "measurement_seed": 3, "seeds": "0-1", "images": [upload(f"b{k}.png", png(im))
                                                                           for k, im in enumerate(images)]}
    result = done(client, "restore", body)
    assert result["command"] == (f"diffusekit restore --run {tiny_run} --task blur --method dps --blur-size 3 "
                                 "--blur-width 0.8 --steps 4 --noise-std 0.1 --zeta 0.5 --measurement-seed 3 "
                                 "--seeds 0-1 --images b0.png b1.png")
    metrics = result["metrics"]
    assert (metrics["zeta"], metrics["noise_std"], metrics["n_samples"]) == (0.5, 0.1, 4)
    assert result["summary"].startswith("blur with dps (zeta=0.5, noise std 0.1): PSNR ")
    assert "(the blurred y: " in result["summary"] and "A+ y" not in result["summary"]
    page = npz(client, result["files"] + "restored.npz")
    for k, im in enumerate(images):
        (tmp_path / f"b{k}.png").write_bytes(png(im))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *shlex.split(result["command"])[1:], "--out", "cli", "--no-progress")
    assert code == 0, err
    assert out.split(";")[0] == result["summary"].split(";")[0]  # the line the command prints, but the seconds
    ours = np.load(tmp_path / "cli" / "restored.npz")
    for name in ("restored", "measurement", "degraded", "original", "noise_seeds"):
        assert np.array_equal(page[name], ours[name]), name
    assert np.array_equal(page["degraded"], page["measurement"])  # for blur the degraded image is y itself
    blurred = GaussianBlur(3, 0.8).A(torch.from_numpy(page["original"]))  # y = A(x) + 0.1 n, n from seed 3
    noise = torch.stack([measurement_noise(3, k, (1, 8, 8)) for k in range(2)])
    torch.testing.assert_close(torch.from_numpy(page["measurement"]), blurred + 0.1 * noise)


def test_dps_settings_the_cli_refuses_are_its_one_liners(capsys, tmp_path, monkeypatch, app, tiny_run):
    """Blur needs dps; RePaint's resample and jump are not dps settings; the noise and the operator parameters
    belong to their method and task: the page gets the command's own line, before any job runs."""
    _, client = app
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(png(np.zeros((8, 8))))
    for body, flags in (({"task": "blur", "method": "repaint"}, ["--task", "blur", "--method", "repaint"]),
                        ({"task": "saturation", "method": "ddnm"}, ["--task", "saturation", "--method", "ddnm"]),
                        ({"task": "blur", "method": "dps", "jump": 3}, ["--task", "blur", "--method", "dps", "--jump", "3"]),
                        ({"task": "superres", "method": "dps", "resample": 2},
                         ["--task", "superres", "--method", "dps", "--resample", "2"]),
                        ({"task": "inpaint", "method": "repaint", "noise_std": 0.1},
                         ["--task", "inpaint", "--method", "repaint", "--noise-std", "0.1"]),
                        ({"task": "blur", "method": "dps", "gain": 2}, ["--task", "blur", "--method", "dps", "--gain", "2"]),
                        ({"task": "blur", "method": "dps", "blur_size": 4},
                         ["--task", "blur", "--method", "dps", "--blur-size", "4"])):
        response = client.post("/api/restore", json={**body, "images": [upload("a.png", png(np.zeros((8, 8))))]})
        code, _, err = cli(capsys, "restore", "--run", tiny_run, *flags, "--images", "a.png", "--out", "cli",
                           "--no-progress")
        assert response.status_code == 400 and code == 2, (body, response.text, err)
        assert err == f"diffusekit restore: error: {response.json()['error']}\n", body
    assert not (tmp_path / "cli").exists()
    bad_type = client.post("/api/restore", json={"task": "blur", "method": "dps", "zeta": "big"})
    assert bad_type.status_code == 400 and bad_type.json()["error"] == "--zeta must be a number, got 'big'"


def test_bad_uploads_get_the_cli_messages(capsys, tmp_path, monkeypatch, app, tiny_run):
    _, client = app
    monkeypatch.chdir(tmp_path)
    good = png(np.zeros((8, 8)))
    cases = {"bad.png": (b"this is not an image", {}), "small.png": (png(np.zeros((4, 4))), {}),
             "empty.png": (b"", {}), "mask.png": (good, {"mask_file": png(np.zeros((10, 10)))})}
    for name, (data, extra) in cases.items():
        body = {"task": "inpaint", "steps": 2, "seeds": "0", "images": [upload(name, data)]}
        argv = ["restore", "--run", tiny_run, "--task", "inpaint", "--steps", "2", "--seeds", "0", "--images", name,
                "--out", "cli", "--no-progress"]
        (tmp_path / name).write_bytes(data)
        if "mask_file" in extra:
            body.update(mask="file", mask_image=upload("m.png", extra["mask_file"]))
            (tmp_path / "m.png").write_bytes(extra["mask_file"])
            argv += ["--mask", "m.png"]
        state = act(client, "restore", body)
        code, _, err = cli(capsys, *argv)
        assert code == 2 and state["state"] == "error", (name, state)
        assert err.strip() == f"diffusekit restore: error: {state['error']}", name
    not_base64 = client.post("/api/restore", json={"task": "inpaint", "images": [{"name": "x.png", "data": "%%%"}]})
    assert not_base64.status_code == 400 and "not valid base64" in not_base64.json()["error"]


def test_uploads_and_requests_over_the_limits_are_refused_in_one_line(monkeypatch, app):
    from diffusekit.app import actions, server

    _, client = app
    monkeypatch.setattr(actions, "MAX_UPLOAD_BYTES", 1000)
    big = client.post("/api/restore", json={"task": "inpaint", "images": [upload("big.png", bytes(5000))]})
    assert big.status_code == 400 and "big.png" in big.json()["error"] and "limit" in big.json()["error"]
    monkeypatch.setattr(server, "MAX_REQUEST_BYTES", 2000)
    huge = client.post("/api/restore", json={"task": "inpaint", "images": [upload("huge.png", bytes(3000))]})
    assert huge.status_code == 413 and huge.json()["error"].startswith("upload too large")


# -- jobs ------------------------------------------------------------------------------------------------
def test_a_second_job_while_one_runs_is_busy(monkeypatch, app):
    state, client = app
    release = threading.Event()
    monkeypatch.setattr(state, "evaluate", lambda body, job: lambda: (release.wait(30), {"ok": True})[1])
    first = client.post("/api/evaluate", json={})
    assert first.status_code == 202
    second = client.post("/api/sample", json={"seeds": "0"})
    assert second.status_code == 409 and second.json()["error"].startswith("busy: the evaluate job is running")
    assert client.get(f"/api/job/{first.json()['job']}").json()["state"] == "running"
    release.set()
    assert wait(client, first.json()["job"])["result"] == {"ok": True}
    assert act(client, "sample", {"seeds": "0", "sampler": "ddim", "steps": 2})["state"] == "done"
    assert client.get("/api/job/99999").status_code == 404


# -- measure ---------------------------------------------------------------------------------------------
def test_measure_shows_the_report_and_evaluate_writes_the_run_only_when_saved(tmp_path_factory):
    run = _train(tmp_path_factory.mktemp("app_eval") / "run")
    state, client = _client(run)
    with state:
        assert client.get("/api/report").json() == {"markdown": None}
        result = done(client, "evaluate", {"metrics": ["bpd"], "strata": 2, "variance": "beta_tilde"})
        assert result["command"] == f"diffusekit evaluate --run {run} --metrics bpd --strata 2 --variance beta_tilde"
        report = client.get(result["report"]).text
        assert "bits/dim" in report and "![trajectory](trajectory.png)" in report
        assert client.get(result["base"] + "trajectory.png").status_code == 200
        assert not (run / "eval").exists()
        saved = done(client, "evaluate", {"metrics": ["bpd"], "strata": 2, "variance": "beta_tilde", "save": True})
        assert saved["saved"] == str(run / "eval") and (run / "eval" / "report.md").is_file()
        shown = client.get("/api/report").json()
        assert "bits/dim" in shown["markdown"] and client.get(shown["base"] + "trajectory.png").status_code == 200
        bad = client.post("/api/evaluate", json={"metrics": ["bogus"]})
        assert bad.status_code == 400 and "--metrics" in bad.json()["error"]
        root = state.root
    assert not root.exists()  # the temporary folder goes with the server


def test_files_outside_the_served_folders_are_refused(app, tiny_run):
    from diffusekit.errors import ConfigError

    state, client = app
    for url in ("/files/job1/%2e%2e/%2e%2e/config.toml", "/files/run-eval/../config.toml", "/files/nope/x.png",
                "/files/job1/"):
        assert client.get(url).status_code == 404, url
    with pytest.raises(ConfigError):
        state.file("run-eval", "../config.toml")
    (state.root / "job-1").mkdir(exist_ok=True)
    link = state.root / "job-1" / "link.toml"
    link.symlink_to(tiny_run / "config.toml")
    state.folders["linked"] = state.root / "job-1"
    with pytest.raises(ConfigError):
        state.file("linked", "link.toml")
