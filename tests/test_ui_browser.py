"""The web app in a real browser: Debian's chromium driven by Playwright (both installed by .ci/run).

One flow, as a user would: a too-large upload is refused in the page, upload a toy scene, paint one mask
and take one from a file, a bad mask is refused, build the scene, train a few steps on the shipped toy
model and watch the progress move, generate and see the images (with their attention maps), download
the bundle as a zip. Skipped when gradio, playwright or chromium is missing. ``SCENETOK_UI_SHOTS=DIR``
also saves a screenshot of each tab (docs/img holds the ones in docs/ui.md).
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_scene(folder: Path) -> dict[str, Path]:
    """A 128 px toy photo (red square left, blue disc right), the blue disc's mask, a bad (empty) mask and
    an upload over the app's limit."""
    img = np.full((128, 128, 3), 200, np.uint8)
    img[24:64, 16:56] = [220, 30, 30]
    yy, xx = np.mgrid[:128, :128]
    disc = (yy - 84) ** 2 + (xx - 88) ** 2 < 22 ** 2
    img[disc] = [30, 60, 220]
    out = {"photo": folder / "photo.png", "blue": folder / "blue.png", "bad": folder / "empty.png",
           "big": folder / "big.png"}
    Image.fromarray(img).save(out["photo"])
    Image.fromarray(disc.astype(np.uint8) * 255).save(out["blue"])
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(out["bad"])
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(out["big"])  # ~480 KB of incompressible pixels > the 0.25 MB limit
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ui-workspace")
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "scenetok.cli", "ui", "--workspace", str(ws), "--port", str(port),
                             "--max-upload-mb", "0.25"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("scenetok ui exited:\n" + proc.stdout.read())
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("scenetok ui did not start listening")
    yield url, ws
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _wait_text(page, elem_id: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    value = ""
    while time.monotonic() < deadline:
        value = _text(page, elem_id)
        if re.search(pattern, value):
            return value
        page.wait_for_timeout(200)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it says {value!r}")


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.press("Tab")


def _shot(page, name: str) -> None:
    folder = os.environ.get("SCENETOK_UI_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"ui-{name}.png"), full_page=True)


def test_the_whole_flow_in_a_browser(server, tmp_path):
    url, ws = server
    files = _toy_scene(tmp_path)
    outside = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:",
                                                                                     "blob:")) else None)
        page.goto(url)
        page.wait_for_selector("#photo-upload")

        # a too-large upload: the page's error, in the CLI's form, and nothing kept
        page.locator("#photo-upload input[type=file]").set_input_files(str(files["big"]))
        msg = _wait_text(page, "scene-status", r"^error: ")
        assert "uploads are limited to 256 KB" in msg and "hint: upload a smaller image" in msg
        assert not (ws / "uploads" / "scene" / "photo.png").exists()
        page.locator("#photo-upload button[aria-label*='Clear' i], #photo-upload button[aria-label*='Remove' i]") \
            .first.click()

        # the toy photo
        page.locator("#photo-upload input[type=file]").set_input_files(str(files["photo"]))
        _wait_text(page, "scene-status", r"photo of scene scene: 128×128 px")

        # one mask painted with the brush over the red square
        canvas = page.locator("#mask-editor canvas").first
        canvas.wait_for()
        page.wait_for_timeout(500)
        box = canvas.bounding_box()
        side = min(box["width"], box["height"])
        x0 = box["x"] + (box["width"] - side) / 2
        y0 = box["y"] + (box["height"] - side) / 2
        page.mouse.move(x0 + side * 0.20, y0 + side * 0.30)
        page.mouse.down()
        for k in range(12):
            page.mouse.move(x0 + side * (0.20 + 0.02 * k), y0 + side * (0.30 + 0.01 * (k % 3)), steps=2)
        page.mouse.up()
        _fill(page, "paint-name", "red")
        page.click("#add-painted")
        _wait_text(page, "scene-status", r"^1 mask\(s\) collected")

        # one mask from a file, then a bad (empty) one: the scene build refuses it with the CLI's message
        page.get_by_role("tab", name="Mask files").click()
        page.locator("#mask-upload input[type=file]").set_input_files([str(files["blue"])])
        _fill(page, "file-names", "blue")
        page.click("#add-files")
        _wait_text(page, "scene-status", r"^2 mask\(s\) collected")
        page.locator("#mask-upload input[type=file]").set_input_files([str(files["bad"])])
        _fill(page, "file-names", "nothing")
        page.click("#add-files")
        _wait_text(page, "scene-status", r"^3 mask\(s\) collected")
        page.click("#build-scene")
        msg = _wait_text(page, "scene-status", r"^error: ")
        assert "nothing" in msg and "Traceback" not in msg
        page.locator("label:has-text('mask #') input").fill("2")
        page.get_by_role("button", name="Remove mask").click()
        _wait_text(page, "scene-status", r"^2 mask\(s\) collected")
        page.click("#build-scene")
        _wait_text(page, "scene-status", r"built with 2 mask\(s\)")
        page.locator("#scene-preview img").wait_for()
        assert (ws / "scenes" / "scene" / "mask1.png").is_file()
        _shot(page, "scene")

        # train a few steps on the toy model; the progress moves and ends done
        page.get_by_role("tab", name="Train").click()
        _fill(page, "train-scene", "scene")
        page.keyboard.press("Enter")
        _fill(page, "train-bundle", "toy")
        page.locator("#settings-break-a-scene").click()
        # enough steps that the page (refreshed every 1.5 s) shows one while the run is going on
        wanted = {"set-phase1-steps": "60", "set-phase2-steps": "60", "set-preview_every": "5"}
        for _ in range(5):  # the settings form may re-render once the scene is picked: fill until it holds
            for elem, value in wanted.items():
                _fill(page, elem, value)
            page.wait_for_timeout(1000)
            if all(page.locator(f"#{e} textarea, #{e} input").first.input_value() == v for e, v in wanted.items()):
                break
        page.click("#start-train")
        _wait_text(page, "train-status", r"job 1: toy queued")

        lines: list[str] = []

        def watch(until_done: bool) -> set[int]:
            seen = set()
            lines.clear()
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                line = _text(page, "train-progress")
                if not lines or lines[-1] != line:
                    lines.append(line)
                if m := re.search(r"step (\d+)/120", line):
                    seen.add(int(m.group(1)))
                if "done" in line or (not until_done and any(0 < k < 120 for k in seen)):
                    break
                page.wait_for_timeout(250)
            return seen

        before = watch(until_done=False)
        assert any(0 < k < 120 for k in before), lines[-5:]  # a step of the running run was shown
        # closing the tab loses nothing: a fresh page shows the same run, which goes on to the end
        page.reload()
        page.get_by_role("tab", name="Train").click()
        after = watch(until_done=True)
        line = _text(page, "train-progress")
        assert line.startswith("toy: done") and max(after) == 120, line
        assert len(before | after) >= 2, before | after  # the progress moved
        page.locator("#train-previews img").first.wait_for()
        page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for()
        _shot(page, "train")

        # generate: the handle inserted by a click, two images with prompt and seed, attention maps
        page.get_by_role("tab", name="Generate").click()
        _fill(page, "gen-bundle", "toy")
        page.keyboard.press("Enter")
        _wait_text(page, "gen-status", r"<asset0> = red")
        _fill(page, "gen-prompt", "a photo of")
        page.locator("#gen-handles button", has_text="<asset0>").first.click()
        _wait_text(page, "gen-prompt", r"^a photo of <asset0>$")
        _fill(page, "gen-count", "2")
        _fill(page, "gen-steps", "5")
        page.click("#generate")
        _wait_text(page, "gen-status", r"2 image\(s\)", timeout=120)
        assert page.locator("#gen-gallery img").count() == 2
        assert "seed 1 · a photo of <asset0>" in page.locator("#gen-gallery").inner_text()
        page.locator("#gen-gallery img").first.click()
        page.locator("#gen-attention img").first.wait_for()
        _shot(page, "generate")

        # bundles: listed with its method; the zip downloads and holds the bundle
        page.get_by_role("tab", name="Bundles").click()
        page.locator("#bundle-table", has_text="break-a-scene").wait_for()
        _fill(page, "bundle-pick", "toy")
        page.keyboard.press("Enter")
        page.click("#zip-bundle")
        link = page.locator("#bundle-zip a").first
        link.wait_for()
        _shot(page, "bundles")
        with page.expect_download() as dl:
            link.click()
        data = Path(dl.value.path()).read_bytes()
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        assert "toy/manifest.json" in names and "toy/embeddings/asset0.safetensors" in names
        browser.close()
    assert outside == []  # offline: no request left the machine
