"""`sparsemerge run` and `sparsemerge demo`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .main import cli, emit, json_option, plotly_option, warn


@cli.command("run")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder (default: the config's `output`).",
)
@click.option(
    "--dry-run", is_flag=True, help="Validate the config and print the resolved settings as JSON; run nothing."
)
@plotly_option
@json_option
def run_cmd(config, out, dry_run, plotly_mode, as_json):
    """Run a whole pipeline from a YAML/JSON config; a rerun resumes and skips finished stages.

    Writes summary.json and report.html (the summary table, accuracy per task, ID vs OOD, forgetting,
    and for CPI-FT the overlap) into the run folder.

    The config is validated before any work starts, with every problem listed at once.
    See the README for the keys. `--dry-run` checks everything and prints the settings every stage
    would use (defaults filled in), without touching any model.

    \b
    Example:
      sparsemerge run pipeline.yaml --dry-run
      sparsemerge run pipeline.yaml -o runs/exp1
    """
    from mergekit_sparse.pipeline.config import load_config

    cfg = load_config(config)
    root = out or (config.parent / cfg["output"])
    if dry_run:
        click.echo(json.dumps({"config": str(config), "run_folder": str(root), "settings": cfg}, indent=2))
        return
    from mergekit_sparse.pipeline.run import render_summary, run_pipeline

    summary = run_pipeline(cfg, root, log=lambda m: click.echo(m, err=True))
    from mergekit_sparse.reports.run import write_run_report

    summary["report"] = str(write_run_report(root, title=f"mergekit-sparse run: {cfg['kind']}", plotly=plotly_mode))
    for name, m in summary["metrics"].items():
        if m.get("warning"):
            warn(f"{name}: {m['warning']}")
    emit(summary, as_json, render_summary(summary) + f"\nrun folder: {root}\nreport: {summary['report']}")


@cli.command()
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-run"),
    show_default=True,
    help="Run folder (a rerun reuses finished stages).",
)
@click.option("--fast", is_flag=True, help="Tiny settings for a smoke test (seconds, not minutes).")
@plotly_option
@json_option
def demo(out, fast, plotly_mode, as_json):
    """Run CPI-FT and GaLLoP on the built-in tiny model and tasks; print a summary; write report.html.

    Needs no download. Takes a few minutes on 2 CPU cores.

    \b
    Example:
      sparsemerge demo -o demo-run && open demo-run/report.html
    """
    from mergekit_sparse.pipeline.demo import run_demo
    from mergekit_sparse.reports.demo import write_demo_report

    summary = run_demo(out, fast=fast, log=lambda m: click.echo(m, err=True))
    summary["report"] = str(write_demo_report(out, plotly=plotly_mode))
    emit(summary, as_json, summary["text"] + f"\nreport: {summary['report']}")
