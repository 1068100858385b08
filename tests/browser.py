"""Open a report in headless Chromium (Debian's `chromium`): rendered DOM, console messages, screenshot."""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=10000",
]


def chromium() -> str:
    """Path to chromium; installs Debian's package when missing and we are root (the test setup)."""
    exe = shutil.which("chromium")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
            shell=True,
            check=False,
            capture_output=True,
            timeout=900,
        )
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    return exe


def render(html: Path, name: str, tmp_path: Path, height: int = 4000) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console messages); saves test-artifacts/<name>.png (1400 px wide, the whole
    page: the window is as tall as the rendered figures need)."""
    exe = chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    common = [exe, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"]
    url = html.resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    height = max(height, 900 + sum(figure_heights(dom.stdout)) + 200 * len(figure_heights(dom.stdout)))
    subprocess.run(
        [
            *common,
            "--hide-scrollbars",
            f"--screenshot={ARTIFACTS / (name + '.png')}",
            f"--window-size=1400,{height}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in dom.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    return dom.stdout, console


def figure_heights(dom: str) -> list[int]:
    """The rendered pixel height of every plotly figure in the DOM, in page order."""
    return [int(h) for h in re.findall(r'class="[^"]*svg-container"[^>]*style="[^"]*height: (\d+)px', dom)]


def figure_colours(dom: str, index: int) -> set[tuple[int, int, int]]:
    """The opaque colours of the heatmap images plotly drew in figure `index` (0-based)."""
    figures = dom.split('class="plot-container plotly"')[1:]
    colours: set[tuple[int, int, int]] = set()
    for uri in re.findall(r'href="data:image/png;base64,([^"]+)"', figures[index]):
        colours |= png_colours(base64.b64decode(uri))
    return colours


def png_colours(data: bytes) -> set[tuple[int, int, int]]:
    """Opaque RGB colours of an 8-bit RGBA, non-interlaced PNG (what a canvas's toDataURL writes)."""
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert (depth, ctype) == (8, 6), "expected an 8-bit RGBA PNG"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev, out = zlib.decompress(idat), width * 4, bytearray(width * 4), set()
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = row[i - 4] if i >= 4 else 0
            b, c = prev[i], prev[i - 4] if i >= 4 else 0
            if kind == 1:
                row[i] = (row[i] + a) & 255
            elif kind == 2:
                row[i] = (row[i] + b) & 255
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif kind == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out |= {tuple(row[i : i + 3]) for i in range(0, stride, 4) if row[i + 3] == 255}
        prev = row
    return out


MIN_HEIGHT = 300  # px: no figure is a strip


def assert_renders(html: Path, name: str, tmp_path: Path, figures: int) -> str:
    """No console errors, every figure rendered at a readable height, a screenshot kept."""
    dom, console = render(html, name, tmp_path)
    assert console == [], console
    assert dom.count('class="plot-container plotly"') == figures, "not every figure rendered"
    heights = figure_heights(dom)
    assert len(heights) == figures and min(heights) >= MIN_HEIGHT, heights
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
    return dom
