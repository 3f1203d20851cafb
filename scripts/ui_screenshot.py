"""Screenshot the web UI for the README: start `meissonic ui` on a free port, generate once in Chromium, save a PNG.

    python scripts/ui_screenshot.py [--model demo] [--out docs/ui.png] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import shutil
import socket

from meissonic.ui import launch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="docs/ui.png")
    parser.add_argument("--prompt", default="a large red circle on the left")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, url = launch(args.model, port=port, block=False)
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(url)
            page.get_by_label("Prompt").first.fill(args.prompt)
            page.locator("#t2i-generate").click()
            page.locator("#info").filter(has_text="Text to image").wait_for(timeout=120_000)
            page.wait_for_function("() => { const i = document.querySelector('#gallery img'); "
                                   "return i && i.naturalWidth > 0; }")
            page.wait_for_timeout(500)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
