"""Render ``report.html`` pages in a real browser (headless Debian Chromium) and save full-page screenshots, so that
the layout (headline box first, legends off the curves, no duplicate plot) can be looked at, not only parsed.

    python benchmarks/report_screenshots.py RUN_DIR_OR_HTML [...] --out shots/ [--width 1280] [--tile 1600]

For each page: ``<out>/<name>.png`` (the whole page) and ``<out>/<name>-<k>.png`` tiles of ``--tile`` px height
to read on a screen; prints the page height and the tiles written. ``--demo DIR`` takes every
``DIR/runs/*/report.html``. Chromium is found as ``chromium`` / ``chromium-browser`` on PATH or ``--chromium``;
Debian: ``apt-get install chromium``. The browser runs with a fresh profile and no network.

What it does not show: how the page prints, or other browsers' layout.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")


def find_chromium(given: str | None = None) -> str | None:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _chromium(browser: str, url: str, extra: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="mmcli-shot-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True,
                              text=True, timeout=timeout)


def page_height(browser: str, html: Path, width: int) -> int:
    """The page's scroll height in CSS px at ``width``, measured by the browser (a script run on a copy)."""
    probe = html.with_name(f".{html.stem}.probe.html")
    text = html.read_text(encoding="utf-8")
    script = ("<script>document.title='H'+Math.ceil(document.documentElement.scrollHeight);</script>")
    probe.write_text(text.replace("</body>", script + "</body>"), encoding="utf-8")
    try:
        res = _chromium(browser, probe.resolve().as_uri(), [f"--window-size={width},800", "--dump-dom",
                                                             "--virtual-time-budget=5000"])
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r"<title>H(\d+)</title>", res.stdout)
    if not m:
        raise RuntimeError(f"could not measure {html}: {res.stderr[-400:]}")
    return int(m.group(1))


def screenshot(browser: str, html: Path, png: Path, width: int = 1280) -> int:
    """Full-page PNG of ``html`` at ``width`` CSS px; returns the page height."""
    height = page_height(browser, html, width)
    png.parent.mkdir(parents=True, exist_ok=True)
    res = _chromium(browser, html.resolve().as_uri(), [f"--window-size={width},{height}",
                                                       f"--screenshot={png.resolve()}"])
    if not png.is_file():
        raise RuntimeError(f"no screenshot of {html}: {res.stderr[-400:]}")
    return height


def tiles(png: Path, tile: int) -> list[Path]:
    """Cut ``png`` into tiles of ``tile`` px height (``<stem>-<k>.png``)."""
    from PIL import Image

    out = []
    with Image.open(png) as im:
        for k, top in enumerate(range(0, im.height, tile)):
            part = png.with_name(f"{png.stem}-{k}.png")
            im.crop((0, top, im.width, min(im.height, top + tile))).save(part)
            out.append(part)
    return out


def pages(args: argparse.Namespace) -> list[tuple[str, Path]]:
    found = []
    for item in args.pages:
        p = Path(item)
        html = p / "report.html" if p.is_dir() else p
        found.append((p.name if p.is_dir() else p.stem, html))
    if args.demo:
        found += [(d.name, d / "report.html") for d in sorted(Path(args.demo).glob("runs/*"))
                  if (d / "report.html").is_file()]
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pages", nargs="*", help="run folders (their report.html) or HTML files")
    ap.add_argument("--demo", help="a demo output folder: every runs/*/report.html")
    ap.add_argument("--out", default="shots", help="folder for the PNGs")
    ap.add_argument("--width", type=int, default=1280, help="window width in CSS px")
    ap.add_argument("--tile", type=int, default=1600, help="height of the tiles in px (0: none)")
    ap.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    args = ap.parse_args(argv)
    browser = find_chromium(args.chromium)
    if browser is None:
        print("no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    for name, html in pages(args):
        png = Path(args.out) / f"{name}.png"
        height = screenshot(browser, html, png, args.width)
        parts = tiles(png, args.tile) if args.tile else []
        print(f"{html}: {height} px -> {png}" + (f" ({len(parts)} tiles)" if parts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
