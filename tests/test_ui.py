"""`meissonic ui` in a real browser: Debian's Chromium driven by Playwright, on a tiny model, every tab.

Screenshots go to $MEISSONIC_SCREENSHOTS (default: the test's temporary folder). Without Chromium the browser tests
skip, unless MEISSONIC_REQUIRE_BROWSER=1 (set by .ci/run, which installs it) makes that a failure.
"""

import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio = pytest.importorskip("gradio")

from meissonic.ui import Settings, Studio, UserError, mask_from_editor  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


NO_IMAGES = {"i2i_img": None, "editor_value": None, "out_img": None}  # the image tabs' inputs, in API calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- without a browser


def test_mask_from_editor_takes_any_stroke_and_refuses_none():
    background = Image.new("RGB", (64, 48), "white")
    layer = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (10, 10, 20, 20))
    image, mask = mask_from_editor({"background": background, "layers": [layer], "composite": background})
    assert image is background and mask.sum() == 100 and mask[10:20, 10:20].all()
    with pytest.raises(UserError, match="Upload an image"):
        mask_from_editor({"background": None, "layers": [], "composite": None})
    with pytest.raises(UserError, match="Paint over"):
        mask_from_editor({"background": background, "layers": [Image.new("RGBA", (64, 48))], "composite": None})


def test_studio_reports_bad_input_as_user_errors(tiny_folder):
    from meissonic import MeissonicPipeline

    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    studio = Studio(pipe, str(tiny_folder))
    settings = Settings(randomize=False, seed=3, width=32, height=32, steps=2)
    with pytest.raises(UserError, match="Enter a prompt"):
        studio.make("Text to image", "  ", None, None, 0.5, (0, 0, 0, 0), settings)
    with pytest.raises(UserError, match="Upload an image"):
        studio.make("Image to image", "x", None, None, 0.5, (0, 0, 0, 0), settings)
    with pytest.raises(UserError, match="nothing to extend"):
        studio.make("Outpaint", "x", Image.new("RGB", (32, 32)), None, 0.5, (0, 0, 0, 0), settings)
    steps = []
    images, seed = studio.make("Text to image", "x", None, None, 0.5, (0, 0, 0, 0), settings,
                               on_step=lambda step, total, tokens: steps.append((step, total)))
    assert seed == 3 and images[0].size == (32, 32) and steps == [(0, 2), (1, 2)]


def test_studio_passes_the_fewer_passes_settings_on(tiny_folder, monkeypatch):
    from meissonic import MeissonicPipeline

    pipe = MeissonicPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    call = MeissonicPipeline.__call__
    monkeypatch.setattr(MeissonicPipeline, "__call__", lambda self, **kw: seen.append(kw) or call(self, **kw))
    studio = Studio(pipe, str(tiny_folder))
    fewer = Settings(randomize=False, width=32, height=32, steps=4, guidance_interval=(0.25, 0.75),
                     guidance_ramp=True, order="halton", schedule="arccos")
    studio.make("Text to image", "x", None, None, 0.5, (0, 0, 0, 0), fewer)
    studio.make("Text to image", "x", None, None, 0.5, (0, 0, 0, 0), Settings(randomize=False, width=32, height=32))
    assert (seen[0]["guidance_interval"], seen[0]["guidance_ramp"], seen[0]["order"]) == ((0.25, 0.75), True, "halton")
    assert seen[1]["guidance_interval"] is None  # the whole range: every step guided, as without the setting
    assert seen[1]["speed"] is None and seen[1]["masking_schedule"] is None  # exact, the model's own schedule
    studio.make("Text to image", "x", None, None, 0.5, (0, 0, 0, 0),
                Settings(randomize=False, width=32, height=32, steps=6, speed="fastest"))
    assert seen[2]["speed"] == "fastest" and pipe.last_work["partial"] > 0
    with pytest.raises(ValueError, match="needs 0 <= start < end <= 1"):
        studio.make("Text to image", "x", None, None, 0.5, (0, 0, 0, 0),
                    Settings(randomize=False, width=32, height=32, guidance_interval=(0.6, 0.4)))


# ---------------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def server(tiny_folder):
    from meissonic.ui import launch

    app, url = launch(str(tiny_folder), port=free_port(), block=False, max_queue=4)
    yield url
    app.close()


@pytest.fixture(scope="module")
def page(server):
    if CHROMIUM is None:
        if os.environ.get("MEISSONIC_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is not installed (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("MEISSONIC_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "photo.png"
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, np.full_like(x, 100)], -1).astype(np.uint8)).save(path)
    return path


def wait_for_result(page, task: str, size: tuple[int, int]):
    """Wait until the task's result is shown; check the image's pixel size; return the info line."""
    info = page.locator("#info")
    info.filter(has_text=task).wait_for(timeout=120_000)
    image = page.locator("#gallery img").first
    image.wait_for(timeout=10_000)
    page.wait_for_function("() => { const i = document.querySelector('#gallery img'); "
                           "return i && i.naturalWidth > 0; }")
    assert tuple(image.evaluate("i => [i.naturalWidth, i.naturalHeight]")) == size
    return info.inner_text()


def test_text_to_image_tab(page, shots):
    page.get_by_label("Prompt").first.fill("a red circle on the left")
    page.locator("#t2i-generate").click()
    text = wait_for_result(page, "Text to image", (128, 128))  # the tiny model's default size
    assert "Seed" in text and " s " in text
    page.screenshot(path=str(shots / "ui-text-to-image.png"), full_page=True)


def test_empty_prompt_gets_a_message_in_the_page(page, shots):
    page.get_by_role("tab", name="Text to image").click()
    page.locator("#t2i-prompt textarea").fill("")
    page.locator("#t2i-generate").click()
    page.get_by_text("Enter a prompt.").first.wait_for(timeout=30_000)
    page.screenshot(path=str(shots / "ui-error.png"), full_page=True)


def upload_and_generate(page, shots, photo, task: str, prefix: str, prompt: str, size: tuple[int, int]):
    """On the tab `task`: upload `photo` into #{prefix}-image, type the prompt, generate, check the result's size."""
    page.get_by_role("tab", name=task).click()
    page.locator(f"#{prefix}-image input[type=file]").set_input_files(str(photo))
    page.locator(f"#{prefix}-image img").first.wait_for(timeout=30_000)
    page.locator(f"#{prefix}-prompt textarea").fill(prompt)
    page.locator(f"#{prefix}-generate").click()
    wait_for_result(page, task, size)
    page.screenshot(path=str(shots / f"ui-{task.lower().replace(' ', '-')}.png"), full_page=True)


def test_image_to_image_tab(page, shots, photo):
    upload_and_generate(page, shots, photo, "Image to image", "i2i", "a blue square", (64, 64))


def test_inpaint_tab_with_a_brush_stroke(page, shots, photo):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Inpaint").click()
    editor = page.locator("#inpaint-editor")
    zoom = editor.get_by_text(re.compile(r"^\d+%$")).first  # the canvas zoom: changes once the image is in
    empty_canvas = zoom.inner_text()
    with page.expect_file_chooser() as chooser:
        editor.get_by_label("Click to upload or drop files").first.click()
    chooser.value.set_files(str(photo))
    expect(zoom).not_to_have_text(empty_canvas, timeout=60_000)
    page.wait_for_timeout(500)
    editor.get_by_label("Brush").first.click()
    canvas = editor.locator("canvas").last
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy)
    page.mouse.down()
    for step in range(1, 13):
        page.mouse.move(cx - 30 + 5 * step, cy + step)
    page.mouse.up()
    page.wait_for_timeout(500)  # let the editor commit the stroke to its layer
    page.locator("#inpaint-prompt textarea").fill("a green star")
    page.locator("#inpaint-generate").click()
    wait_for_result(page, "Inpaint", (64, 64))
    page.screenshot(path=str(shots / "ui-inpaint.png"), full_page=True)


def test_outpaint_tab(page, shots, photo):  # 64 pixels added on the right by default
    upload_and_generate(page, shots, photo, "Outpaint", "outpaint", "a yellow triangle", (128, 64))


def test_a_full_queue_turns_requests_away_with_a_message(tiny_folder):
    """One request runs, one waits; the rest are told the queue is full. The server stays up."""
    import time

    from gradio_client import Client
    from gradio_client.utils import Status

    from meissonic.ui import launch

    app, url = launch(str(tiny_folder), port=free_port(), block=False, max_queue=1, concurrency=1)
    try:
        client = Client(url, verbose=False)

        def submit(i):
            return client.submit(prompt=f"shape {i}", n_steps=20, randomize_seed=False, api_name="/text_to_image",
                                 **NO_IMAGES)

        first = submit(0)  # wait until it runs, so exactly one place is left in the queue
        deadline = time.monotonic() + 120
        while first.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING, Status.FINISHED):
            assert time.monotonic() < deadline, first.status()
            time.sleep(0.05)
        jobs = [first] + [submit(i) for i in range(1, 6)]
        outcomes = []
        for job in jobs:
            try:
                job.result(timeout=300)
                outcomes.append("done")
            except Exception as err:  # gradio_client raises its own error types
                assert "queue is full" in str(err).lower(), err
                outcomes.append("full")
        assert outcomes.count("done") >= 2 and outcomes.count("full") >= 1, outcomes
        images, info = client.predict(prompt="after the rush", n_steps=2, api_name="/text_to_image", **NO_IMAGES)
        assert "Seed" in info  # still serving
    finally:
        app.close()


def serve(model, port: int, *extra) -> "subprocess.Popen":
    """`meissonic ui` in its own process (so its memory is its own), once it answers on `port`."""
    import subprocess
    import sys
    import time
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "meissonic", "ui", "--model", str(model), "--port", str(port),
                               *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            return server
        except OSError:
            if server.poll() is not None:
                raise AssertionError(server.stdout.read())
            time.sleep(0.5)
    server.kill()
    raise AssertionError("the UI did not start")


@pytest.mark.slow
def test_load_50_requests_from_10_clients(tiny_folder):
    """Every request completes or is told the queue is full; the server stays up; its memory returns to baseline."""
    import threading

    import psutil
    from gradio_client import Client

    port = free_port()
    server = serve(tiny_folder, port, "--max-queue", "8")
    url = f"http://127.0.0.1:{port}/"
    memory = psutil.Process(server.pid)
    try:
        for _ in range(3):  # warm up: first requests allocate the model's working memory
            Client(url, verbose=False).predict(prompt="warm up", n_steps=4, api_name="/text_to_image", **NO_IMAGES)
        baseline = memory.memory_info().rss
        outcomes, lock = [], threading.Lock()

        def client(number):
            c = Client(url, verbose=False)
            for i in range(5):
                try:
                    c.predict(prompt=f"client {number} request {i}", n_steps=4, api_name="/text_to_image", **NO_IMAGES)
                    result = "done"
                except Exception as err:
                    result = "full" if "queue is full" in str(err).lower() else f"error: {err}"
                with lock:
                    outcomes.append(result)

        def load():
            outcomes.clear()
            threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=600)
            assert len(outcomes) == 50 and set(outcomes) <= {"done", "full"}, outcomes
            assert outcomes.count("done") >= 10 and server.poll() is None
            _, info = Client(url, verbose=False).predict(prompt="up", n_steps=4, api_name="/text_to_image", **NO_IMAGES)
            assert "Seed" in info
            return memory.memory_info().rss

        after_first = load()
        report = f"{outcomes.count('done')} done, {outcomes.count('full')} queue full, 0 failed"
        after_second = load()
        first, second = (after_first - baseline) / 2**20, (after_second - after_first) / 2**20
        print(f"\nload: 2 x 50 requests from 10 clients: {report}, then {outcomes.count('done')} done, "
              f"{outcomes.count('full')} queue full; server RSS {baseline / 2**20:.0f} MiB, {first:+.0f} MiB after "
              f"the first 50, {second:+.0f} MiB more after the second")
        assert first < 100 and second < 25, (first, second)  # a one-off warm-up, then flat: nothing accumulates
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_uploads_beyond_the_limit_are_refused(tiny_folder):
    import urllib.error
    import urllib.request

    from meissonic.ui import launch

    app, url = launch(str(tiny_folder), port=free_port(), block=False, max_file_size="1kb")
    try:
        boundary = "meissonicboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * 4096 + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(url.rstrip("/") + "/gradio_api/upload", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code in (400, 413)
        assert "size" in refused.value.read().decode().lower()
    finally:
        app.close()
