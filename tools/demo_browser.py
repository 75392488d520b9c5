"""Screenshot of the demo (the README's picture), taken in a real browser.

    python -m tools.demo_browser [--out assets/demo.png] [--budget 64]

starts the app on the built-in tiny model, uploads matplotlib's grace_hopper.jpg, moves the
budget slider, runs, waits for the result and saves a screenshot (mfpruner_lib.browser drives the
page, as tests/test_app.py does).

Needs `apt-get install -y chromium` and `pip install playwright`; never `playwright install`
(it downloads a browser).
"""

from __future__ import annotations

from pathlib import Path

from mfpruner_lib.browser import open_browser, run_in_browser
from mfpruner_lib.cli import ArgumentParser, refusals_as_errors


@refusals_as_errors
def main(argv=None):
    import matplotlib.cbook
    from playwright.sync_api import sync_playwright

    from mfpruner_demo.loading import load_model
    from mfpruner_demo.ui import EXAMPLE_QUESTIONS, build_demo, launch

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/demo.png")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--model", default=None, help="hub id or local repo (default: the tiny model)")
    args = parser.parse_args(argv)

    page_app = build_demo(load_model(args.model))
    _, url, _ = launch(page_app, "127.0.0.1", None, prevent_thread_lock=True, quiet=True)
    image = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    try:
        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
            print(run_in_browser(page, url, image, EXAMPLE_QUESTIONS["grace_hopper.jpg"], args.budget))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        page_app.close()
    print("saved", args.out)


if __name__ == "__main__":
    main()
