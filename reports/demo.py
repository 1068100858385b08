"""The demo report: the run report (reports/run.py) of the demo's folder, with the GaLLoP score map."""

from __future__ import annotations

from pathlib import Path

from .run import write_run_report


def write_demo_report(run: str | Path, *, plotly: str = "inline") -> Path:
    return write_run_report(run, title="mergekit-sparse demo: CPI-FT and GaLLoP on the built-in model", plotly=plotly)
