"""The `dalle eval` report opened in a real browser (headless Chromium); skipped when no Chromium is installed.

CI installs it with: apt-get update && apt-get install -y chromium
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import threading

import pytest
from PIL import Image

from dalle_eval.evaluate import EvalConfig, run_eval
from dalle_eval.pipeline import SamplingOptions

BROWSER = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="needs chromium (apt-get install -y chromium)")


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path, int(code)))

    def log_message(self, format, *args):  # keep the test output quiet
        pass


def _serve(directory):
    handler = type("Handler", (_LoggingHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler.requests


def test_every_image_of_the_report_loads_and_shows(make_bundle_dir, tmp_path):
    checkpoint = make_bundle_dir(tmp_path / "model", image_size=32, num_layers=3)
    config = EvalConfig(
        checkpoint=checkpoint,
        max_prompts=3,
        images_per_prompt=2,
        sampling=SamplingOptions(seed=1),
        reference_samples_per_spec=1,
    )
    report = tmp_path / "report"
    run_eval(config, report)
    sources = re.findall(r'src="([^"]+)"', (report / "index.html").read_text())
    assert len(sources) == 7

    server, requests = _serve(report)
    screenshot = tmp_path / "shot.png"
    try:
        command = [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1400,2000",
            f"http://127.0.0.1:{server.server_address[1]}/index.html",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()

    served = {path.lstrip("/"): code for path, code in requests}
    assert served.get("index.html") == 200
    for source in sources:
        assert served.get(source) == 200, f"the browser did not load {source}: {sorted(served)}"
    with Image.open(screenshot) as shot:
        shown = {colour for _, colour in shot.convert("RGB").getcolors(shot.width * shot.height)}
    assert len(shown) > 100  # not a blank page
    # The grid is drawn at its natural size, so every colour of every generated image is on screen exactly.
    for source in sources[:-1]:
        with Image.open(report / source) as picture:
            colours = {colour for _, colour in picture.convert("RGB").getcolors(picture.width * picture.height)}
        assert len(colours & shown) / len(colours) > 0.95, source
