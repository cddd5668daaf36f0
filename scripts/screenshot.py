#!/usr/bin/env python3
"""Save a screenshot of a page `report` wrote, taken by the system's headless Chromium (Debian's
`chromium`, driven by playwright, whose own browser download is not used). It made
docs/report.png:

    python -m supervisor run --records 4000 --batch-size 200 --workers 2 --kill-at-batch 5 \\
        --kill-at-batch 14 --fail-at-batch 9 --retry-initial 0.2 --state-dir /tmp/demo --id demo
    python -m supervisor report --id demo --html /tmp/demo/report.html --state-dir /tmp/demo
    python scripts/screenshot.py /tmp/demo/report.html docs/report.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

WIDTH = 1240


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the HTML file `report --html` wrote")
    parser.add_argument("png", type=Path, help="the screenshot to write")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("error: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 1
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 600})
            page.goto(args.page.resolve().as_uri())
            page.screenshot(path=str(args.png), full_page=True)
        finally:
            browser.close()
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
