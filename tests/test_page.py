"""The web page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright through its
own executable, nothing downloaded): it loads, an upload shows a result with a box, switching the
configuration changes the reported configuration, and the webcam (Chromium's fake camera fed from a
test video) is checked too. The screenshot goes to the test's own folder; `make screenshot`
(PTANET_SCREENSHOT=docs/screenshot.png) writes the README's, so a test run leaves the checkout as it was.

Without chromium or Playwright the test is skipped, except under CI (CI=true), where it fails."""

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_serve import Server

def _need(what: str, missing: bool) -> None:
    if missing:
        message = f"{what} is not installed (apt-get install chromium; pip install playwright)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    _need("chromium", chromium is None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    _need("the playwright Python package", sync_playwright is None)
    return chromium, sync_playwright


def _y4m(path: Path, rgb: np.ndarray, frames: int = 10) -> Path:
    """A Y4M video (what Chromium's fake camera reads) showing one picture."""
    h, w = (s - s % 2 for s in rgb.shape[:2])
    i420 = cv2.cvtColor(np.ascontiguousarray(rgb[:h, :w]), cv2.COLOR_RGB2YUV_I420).tobytes()
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n" + i420)
    return path


def test_page_upload_switch_and_webcam(browser, tiny_model, nuaa_dev, tmp_path):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from ptanet.liveness import LivenessChecker
    from ptanet.preprocess import read_image_rgb
    from ptanet.serve.app import create_app

    chromium, sync_playwright = browser
    photo = sorted((nuaa_dev / "Data" / "test" / "3" / "live").glob("*.jpg"))[0]
    camera = _y4m(tmp_path / "camera.y4m", read_image_rgb(photo))
    checker = LivenessChecker(tiny_model, detect="haar")
    server = Server(create_app(checker))
    url = f"http://127.0.0.1:{server.port}/"
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium, headless=True, args=[
                "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-video-capture={camera}"])
            page = b.new_page(viewport={"width": 900, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#config option').length === 27")
            assert page.eval_on_selector("#config", "e => e.value") == "HHH"

            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#faces tr.face")
            assert page.text_content("#result-config") == "HHH"
            box = [int(v) for v in page.text_content("#faces tr.face td:nth-child(2)").split(",")]
            assert len(box) == 4 and box[2] > 40 and box[3] > 40
            assert page.text_content("#faces tr.face td:nth-child(4)") in ("live", "spoof")
            # The box is drawn: the canvas has the decision colour along the box's top edge.
            drawn = page.evaluate(f"""() => {{
                const c = document.getElementById('canvas').getContext('2d');
                const d = c.getImageData({box[0] + box[2] // 2}, {box[1]}, 1, 1).data;
                return [d[0], d[1], d[2]]; }}""")
            assert drawn in ([10, 122, 38], [179, 18, 27]), drawn

            page.select_option("#config", "LLL")
            page.wait_for_function("document.getElementById('result-config')?.textContent === 'LLL'")
            assert checker.config == "LLL"
            shot = Path(os.environ.get("PTANET_SCREENSHOT") or tmp_path / "screenshot.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert cv2.imread(str(shot)).shape[0] > 200  # a rendered page, not an empty image

            page.click("#camera")
            page.wait_for_function("!document.getElementById('snap').disabled")
            page.wait_for_function("document.getElementById('video').currentTime > 0.5")
            page.evaluate("document.getElementById('result').remove()")
            page.click("#snap")
            page.wait_for_selector("#result")
            assert page.text_content("#result-config") == "LLL"
            assert page.eval_on_selector_all("#faces tr.face", "rows => rows.length") >= 1
            assert not errors, errors
            b.close()
    finally:
        checker.set_config("HHH")
        server.stop()
