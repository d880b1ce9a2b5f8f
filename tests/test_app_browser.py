"""``diffusekit app`` in a real browser: the command serves a tiny run, headless Chromium (Debian's
``chromium``, driven by Playwright; nothing is downloaded) loads the page, samples, follows a trajectory,
draws a mask with the mouse, restores an uploaded image, shows a bad upload's one-line error and deblurs
with DPS (the task menu and fields follow the method). The images the page shows equal the command line's
for the same settings and seeds.

Screenshots go to ``$DIFFUSEKIT_ARTIFACTS`` (else the test's tmp_path); with ``DIFFUSEKIT_UPDATE_DOCS=1``
the sample tab is also written to docs/app.png. Skipped, saying why, without Playwright or Chromium."""

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli import main as cli_main

TINY = ["data.name=digits", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=20", "train.steps=3",
        "train.batch_size=8", "train.sample_every=0", "train.n_sample=4", "train.log_every=1"]
DOCS = Path(__file__).resolve().parents[1] / "docs"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("DIFFUSEKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `dev` extra)")
    pytest.importorskip("starlette", reason="the `app` extra (starlette, uvicorn) is not installed")
    pytest.importorskip("uvicorn", reason="the `app` extra (starlette, uvicorn) is not installed")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium here (apt-get install chromium, or set DIFFUSEKIT_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    folder = tmp_path_factory.mktemp("browser") / "run"
    train(load_config(None, TINY), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def server(browser, tiny_run):
    """``diffusekit app --run RUN --port 0`` in a subprocess: (url, its temporary folder); stopped with Ctrl-C."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffusekit", "app", "--run", str(tiny_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    line = first[0] if first else ""
    match = re.search(r"(http://127\.0\.0\.1:\d+/).*outputs go to (\S+), removed", line)
    if match is None:
        proc.kill()
        pytest.fail(f"diffusekit app did not start: {line!r}{proc.stdout.read() if proc.poll() is not None else ''}")
    yield match.group(1), Path(match.group(2))
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped" in rest and "Traceback" not in rest, rest
    assert not Path(match.group(2)).exists()  # the temporary folder went with the server


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = Path(os.environ.get("DIFFUSEKIT_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def png_file(path: Path, array) -> Path:
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def wait_for_job(page, selector: str, previous: str | None = None):
    """Wait until the result box ``selector`` shows a new job (or the status line an error)."""
    page.wait_for_function(
        "([sel, prev]) => { const el = document.querySelector(sel);"
        " return (el.dataset.job && el.dataset.job !== prev) || document.querySelector('#status.error'); }",
        arg=[selector, previous], timeout=60_000)
    error = page.locator("#status.error")
    assert error.count() == 0, error.inner_text()
    return page.get_attribute(selector, "data-job")


def test_sample_trajectory_draw_restore_in_chromium(browser, server, tiny_run, tmp_path, artifacts, capsys):
    url, _ = server
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("body[data-state=idle]")
    assert "diffusion run" in page.inner_text("#run-info")
    assert page.is_visible("button[data-tab=restore]") and page.is_hidden("#control")

    # sample: DDIM, 4 steps, seeds 0-3; the tiles are the command line's PNGs
    form = page.locator("#sample-form")
    form.locator("select[name=sampler]").select_option("ddim")
    form.locator("input[name=steps]").fill("4")
    form.locator("input[name=seeds]").fill("0-3")
    form.locator("button[type=submit]").click()
    wait_for_job(page, "#sample-result")
    command = f"diffusekit sample --run {tiny_run} --seeds 0-3 --sampler ddim --steps 4"
    assert page.inner_text("#sample-result .command") == command
    sources = page.eval_on_selector_all("#sample-tiles img", "imgs => imgs.map(i => i.src)")
    assert len(sources) == 4
    code = cli_main(["sample", "--run", str(tiny_run), "--seeds", "0-3", "--sampler", "ddim", "--steps", "4",
                     "--out", str(tmp_path / "cli"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    for seed, src in enumerate(sources):
        assert fetch(src) == (tmp_path / "cli" / f"sample_{seed}.png").read_bytes(), src
    page_x = np.load(io.BytesIO(fetch(sources[0].rsplit("/", 1)[0] + "/samples.npz")))["x"]
    assert np.array_equal(page_x, np.load(tmp_path / "cli" / "samples.npz")["x"])

    # the trajectory slider: first frame the noisiest t, last t = 0; a click on a tile follows that sample
    assert page.is_visible("#trajectory") and page.inner_text("#traj-label").startswith("t = 20 ")
    page.focus("#traj-slider")
    page.keyboard.press("End")
    assert page.inner_text("#traj-label").startswith("t = 0 ")
    page.click("#sample-tiles figure[data-index='2']")
    page.wait_for_selector("#trajectory[data-index='2']")
    assert page.inner_text("#traj-which") == "seed 2"
    page.screenshot(path=str(artifacts / "app-sample.png"), full_page=True)
    if os.environ.get("DIFFUSEKIT_UPDATE_DOCS") == "1":
        page.screenshot(path=str(DOCS / "app.png"), full_page=True)

    # restore: upload an image, draw the mask with the mouse, inpaint with two seeds
    page.click("button[data-tab=restore]")
    image = png_file(tmp_path / "digit.png", (np.random.default_rng(0).random((8, 8)) * 255))
    page.set_input_files("#restore-files", str(image))
    page.click("#mask-clear")
    box = page.locator("#mask-canvas").bounding_box()
    y = box["y"] + box["height"] * 4.5 / 8
    page.mouse.move(box["x"] + box["width"] * 1.5 / 8, y)
    page.mouse.down()
    for k in range(2, 7):
        page.mouse.move(box["x"] + box["width"] * (k + 0.5) / 8, y, steps=3)
    page.mouse.up()
    assert page.locator("#restore-form select[name=mask]").input_value() == "drawn"
    restore = page.locator("#restore-form")
    restore.locator("input[name=steps]").fill("4")
    restore.locator("input[name=seeds]").fill("0-1")
    restore.locator("button[type=submit]").click()
    job = wait_for_job(page, "#restore-result")
    command = page.inner_text("#restore-result .command")
    assert "--task inpaint" in command and "--mask mask.png --images digit.png" in command
    picture = page.get_attribute("#restore-picture", "src")
    page_npz = np.load(io.BytesIO(fetch(url.rstrip("/") + picture.rsplit("/", 1)[0] + "/restored.npz")))
    unknown = ~page_npz["known"][0, 0]
    assert unknown[4, 1:7].all() and not unknown[[0, 1, 2, 6, 7]].any()  # the stroke along row 4, brush 3 pixels
    mask = png_file(tmp_path / "mask.png", unknown.astype(np.uint8) * 255)
    code = cli_main(["restore", "--run", str(tiny_run), "--task", "inpaint", "--method", "repaint", "--steps", "4",
                     "--resample", "1", "--jump", "10", "--seeds", "0-1", "--mask", str(mask), "--images", str(image),
                     "--out", str(tmp_path / "cli_restore"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(page_npz["restored"], np.load(tmp_path / "cli_restore" / "restored.npz")["restored"])
    page.screenshot(path=str(artifacts / "app-restore.png"), full_page=True)

    # a bad upload: the command line's one line, in the page
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#restore-files", str(bad))
    restore.locator("button[type=submit]").click()
    page.wait_for_selector("#status.error")
    assert page.inner_text("#status") == "--images bad.png: not an image Pillow can read (unknown or corrupt format)"
    assert page.get_attribute("#restore-result", "data-job") == job

    # DPS: blur and saturation are offered with dps only, whose fields replace RePaint's resample and jump
    def tasks():
        return page.eval_on_selector_all("#restore-form select[name=task] option", "os => os.map(o => o.value)")

    assert "blur" not in tasks() and page.is_visible("#restore-form input[name=jump]")
    restore.locator("select[name=method]").select_option("dps")
    assert tasks()[-2:] == ["blur", "saturation"] and page.is_hidden("#restore-form input[name=jump]")
    assert page.is_hidden("#restore-form input[name=resample]") and page.is_visible("#dps-fields")
    restore.locator("select[name=task]").select_option("blur")
    assert page.is_visible("#restore-form input[name=blur_size]") and page.is_hidden("#mask-fields")
    assert page.is_hidden("#restore-form input[name=gain]") and page.inner_text("#zeta-default") == "empty: 5/√4 = 2.5"
    restore.locator("input[name=blur_size]").fill("3")
    restore.locator("input[name=noise_std]").fill("0.1")
    page.set_input_files("#restore-files", str(image))
    restore.locator("button[type=submit]").click()
    wait_for_job(page, "#restore-result", job)
    assert page.inner_text("#restore-result .command") == (
        f"diffusekit restore --run {tiny_run} --task blur --method dps --blur-size 3 --blur-width 1 --steps 4 "
        "--noise-std 0.1 --measurement-seed 0 --seeds 0-1 --images digit.png")
    note = page.inner_text("#restore-result .note")
    assert note.startswith("blur with dps (zeta=2.5, noise std 0.1): PSNR ") and "(the blurred y: " in note, note
    picture = page.get_attribute("#restore-picture", "src")
    page_npz = np.load(io.BytesIO(fetch(url.rstrip("/") + picture.rsplit("/", 1)[0] + "/restored.npz")))
    code = cli_main(["restore", "--run", str(tiny_run), "--task", "blur", "--method", "dps", "--blur-size", "3",
                     "--steps", "4", "--noise-std", "0.1", "--seeds", "0-1", "--images", str(image),
                     "--out", str(tmp_path / "cli_dps"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(page_npz["restored"], np.load(tmp_path / "cli_dps" / "restored.npz")["restored"])
    page.screenshot(path=str(artifacts / "app-restore-dps.png"), full_page=True)
    restore.locator("select[name=method]").select_option("repaint")  # blur is gone: back to the first task
    assert "blur" not in tasks() and restore.locator("select[name=task]").input_value() == "inpaint"
    assert page.is_visible("#mask-fields") and page.is_hidden("#dps-fields")

    page.click("button[data-tab=measure]")
    assert page.is_visible("#evaluate-form") and "No evaluation report yet" in page.inner_text("#report")
    assert errors == [], errors
    page.close()
