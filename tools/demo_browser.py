"""Drives the demo (app.py) in a real browser: Debian's chromium through Playwright.

    python -m tools.demo_browser [--out assets/demo.png] [--budget 64]

starts the app on the built-in tiny model, uploads matplotlib's grace_hopper.jpg, moves the
budget slider, runs, waits for the result and saves a screenshot (the README's picture).
tests/test_app.py drives the page with the same functions.

Needs `apt-get install -y chromium` and `pip install playwright`; never `playwright install`
(it downloads a browser).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def run_in_browser(page, url: str, image_path, question: str, budget: int, timeout_ms: int = 90_000) -> str:
    """Uploads the image, types the question, moves the budget slider (its number box, then Tab:
    that fires the slider's release event, which runs the model), clicks the button as well, and
    waits until the stats show `budget` kept tokens. Returns the stats text."""
    page.goto(url)
    page.locator("#image input[type=file]").set_input_files(str(image_path))
    page.locator("#image img").first.wait_for(timeout=timeout_ms)  # the upload's preview
    page.locator("#question textarea").fill(question)
    number_box = page.locator("#budget input[type=number]")
    number_box.fill(str(budget))
    number_box.press("Tab")
    page.locator("#run").click()
    pattern = re.compile(rf"Kept {budget} / \d+ visual tokens")
    page.wait_for_function(
        "pattern => new RegExp(pattern).test(document.querySelector('#stats').innerText)",
        arg=pattern.pattern,
        timeout=timeout_ms,
    )
    page.locator("#panel-mfpruner img").first.wait_for(timeout=timeout_ms)
    page.wait_for_load_state("networkidle")
    return page.locator("#stats").inner_text()


def main(argv=None):
    import matplotlib.cbook
    from playwright.sync_api import sync_playwright

    import app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/demo.png")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--model", default=None, help="hub id or local repo (default: the tiny model)")
    args = parser.parse_args(argv)

    page_app = app.build_demo(app.load_model(args.model))
    _, url, _ = app.launch(page_app, "127.0.0.1", None, prevent_thread_lock=True, quiet=True)
    image = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    try:
        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
            print(run_in_browser(page, url, image, app.EXAMPLE_QUESTIONS["grace_hopper.jpg"], args.budget))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        page_app.close()
    print("saved", args.out)


if __name__ == "__main__":
    main()
