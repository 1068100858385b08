"""Open a report in headless Chromium (Debian's `chromium`): rendered DOM, console messages, screenshot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


def render(html: Path, name: str, tmp_path: Path) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console messages); saves test-artifacts/<name>.png."""
    exe = chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    common = [exe, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    url = html.resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    subprocess.run(
        [*common, f"--screenshot={ARTIFACTS / (name + '.png')}", "--window-size=1200,3200", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in dom.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    return dom.stdout, console


def assert_renders(html: Path, name: str, tmp_path: Path, figures: int) -> str:
    dom, console = render(html, name, tmp_path)
    assert console == [], console
    assert dom.count('class="plot-container plotly"') == figures, "not every figure rendered"
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
    return dom
