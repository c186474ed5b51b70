"""Render a ``sparsity.html`` to a PNG with headless Chromium, so a person can look at it.

    python examples/render_html.py examples/lenet5_snip-out/sparsity.html [-o out.png]

Needs Debian's ``chromium`` (``apt-get install -y chromium``) or Chrome on PATH; the page is
self-contained, and Chromium runs with networking features off and a throwaway profile.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def render(html: Path, png: Path, width: int = 1400, height: int = 1000,
           browser: str | None = None, timeout: float = 60.0) -> Path:
    """Screenshot ``html`` into ``png`` with headless Chromium; returns ``png``."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH; install it: apt-get install -y chromium")
    png = png.resolve()
    with tempfile.TemporaryDirectory(prefix="chop-chromium-") as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
            f"--window-size={width},{height}", html.resolve().as_uri(),
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium did not write {png}")
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="PNG path (default: next to the HTML)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    png = render(args.html, args.output or args.html.with_suffix(".png"), args.width, args.height)
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
