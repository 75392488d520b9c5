"""Drives the demo (app.py) in a real browser: Debian's chromium through Playwright.

tests/test_app.py and the screenshot script (`python -m tools.demo_browser`) use these functions.

Needs `apt-get install -y chromium` and `pip install playwright`; never `playwright install`
(it downloads a browser).
"""

from __future__ import annotations

import re

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
