"""Analysis commands: inspect, core."""

from __future__ import annotations

from pathlib import Path

import click

from .main import cli, emit, force_option, json_option, labels_for, pickle_option, progress_enabled, scope_options

PERCENT = click.FloatRange(0, 100, min_open=True)


@cli.command()
@click.argument("checkpoint")
@click.option("--base", help="Compare with this checkpoint: alignment and per-tensor relative delta norms.")
@pickle_option
@json_option
def inspect(checkpoint, base, allow_pickle, as_json):
    """Show a checkpoint's tensors, shapes, dtypes, parameter count, bytes and shards.

    CHECKPOINT is a .safetensors file, a Hugging Face model folder, or a cached Hub repo id.

    \b
    Example:
      sparsemerge inspect runs/math --base base/ --json
    """
    from mergekit_sparse.inspect import inspect_checkpoint, render_inspect
    report = inspect_checkpoint(checkpoint, base=base, allow_pickle=allow_pickle)
    emit(report, as_json, render_inspect(report))


@cli.command()
@click.argument("tasks", nargs=-1, required=True)
@click.option("--base", required=True, help="The pretrained checkpoint the tasks were fine-tuned from.")
@click.option("--p", "percent", type=PERCENT, default=1.0, show_default=True,
              help="Core size: the top p % of |θ_task − θ_base| (1 means 1 %).")
@click.option("--scope", "scope_kind", type=click.Choice(["global", "per-tensor"]), default="global",
              show_default=True, help="Select across the whole model, or p % inside each tensor.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cores"),
              show_default=True, help="Folder for <task>.mask.safetensors and core.json.")
@scope_options
@pickle_option
@force_option
@json_option
def core(tasks, base, percent, scope_kind, out_dir, include, exclude, allow_pickle, force, as_json):
    """Find each task's core region: the exact top-p % parameters by |θ_task − θ_base| (CPI-FT stage 1).

    Writes one mask file per task and core.json (counts, thresholds, per-layer shares, |Δ| quantiles,
    settings). TASKS are fine-tuned checkpoints of BASE (files, folders or cached Hub ids).

    \b
    Example:
      sparsemerge core --base base/ runs/math runs/code --p 1 -o cores/
    """
    from mergekit_sparse.core import compute_cores, write_core_json
    from mergekit_sparse.checkpoint import Checkpoint
    from mergekit_sparse.scope import align
    from mergekit_sparse.writer import check_output

    labels = labels_for(tasks)
    base_ck = Checkpoint.open(base, allow_pickle=allow_pickle)
    task_cks = [Checkpoint.open(t, allow_pickle=allow_pickle) for t in tasks]
    scope = align([base_ck, *task_cks], include=include, exclude=exclude)
    check_output(out_dir / "core.json", [base_ck.path, *[t.path for t in task_cks]], force=force)
    summaries = compute_cores(base_ck, task_cks, scope, percent=percent, out_dir=out_dir, labels=labels,
                              per_tensor=scope_kind == "per-tensor", force=force, progress=progress_enabled())
    settings = {"p": percent, "scope": scope_kind, "include": list(include), "exclude": list(exclude),
                "base": base_ck.sources(), "tasks": [t.sources() for t in task_cks]}
    write_core_json(out_dir / "core.json", summaries, settings, scope)
    data = {"settings": settings, "tasks": [s.to_json() | {"per_tensor": None} for s in summaries]}
    lines = [f"{'task':<20} {'selected':>12} {'of':>14} {'threshold':>12}  mask"]
    lines += [f"{s.task:<20} {s.selected:>12,} {s.total:>14,} {s.threshold:>12.4g}  {s.mask_path}" for s in summaries]
    lines.append(f"wrote {out_dir / 'core.json'}")
    emit(data, as_json, "\n".join(lines))
