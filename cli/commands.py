"""Analysis commands: inspect, core."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sparse.settings import CoreSettings, FuseSettings

from .main import (
    cli,
    emit,
    force_option,
    json_option,
    open_base,
    pickle_option,
    progress_enabled,
    scope_options,
    spec_option,
    warn,
)


@cli.command()
@click.argument("checkpoint")
@click.option(
    "--base",
    help="Compare with this checkpoint: alignment and per-tensor relative delta norms. `--base auto`: the "
    "base the checkpoint records (metadata from `sparsemerge train`, or its model card's base_model).",
)
@scope_options
@pickle_option
@click.option("--force", is_flag=True, help="Use --base even when it contradicts the base the checkpoint records.")
@json_option
def inspect(checkpoint, base, include, exclude, allow_pickle, force, as_json):
    """Show a checkpoint's tensors, shapes, dtypes, parameter count, bytes and shards.

    CHECKPOINT is a .safetensors file, a Hugging Face model folder, or a cached Hub repo id.

    \b
    Examples:
      sparsemerge inspect runs/math --base base/ --json
      sparsemerge inspect runs/math --base auto --exclude 'embed'
    """
    from mergekit_sparse.analysis.describe import inspect_checkpoint, render_inspect

    report = inspect_checkpoint(
        checkpoint, base=base, allow_pickle=allow_pickle, include=include, exclude=exclude, force=force
    )
    for w in report.get("base", {}).get("warnings", []):
        warn(w)
    emit(report, as_json, render_inspect(report))


@cli.command()
@click.argument("tasks", nargs=-1, required=True)
@click.option(
    "--base",
    help="The pretrained checkpoint the tasks were fine-tuned from. Default: found from the tasks' own "
    "records (written by `sparsemerge train`) or their model cards' base_model.",
)
@spec_option(CoreSettings, "p", "--p", "percent")
@spec_option(CoreSettings, "scope", "--scope", "scope_kind")
@spec_option(CoreSettings, "tie_seed")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cores"),
    show_default=True,
    help="Folder for <task>.mask.safetensors and core.json.",
)
@scope_options
@pickle_option
@force_option
@json_option
def core(tasks, base, percent, scope_kind, tie_seed, out_dir, include, exclude, allow_pickle, force, as_json):
    """Find each task's core region: the exact top-p % parameters by |θ_task − θ_base| (CPI-FT stage 1).

    Writes one mask file per task and core.json (counts, thresholds, per-layer shares, |Δ| quantiles,
    settings). TASKS are fine-tuned checkpoints of BASE (files, folders or cached Hub ids), each
    optionally named NAME=PATH (default name: the folder or file name).

    \b
    Examples:
      sparsemerge core --base base/ runs/math runs/code --p 1 -o cores/
      sparsemerge core math=exp_math/checkpoint-40 rev=exp_rev/checkpoint-40 --p 1
    """
    from mergekit_sparse.analysis.cores import compute_cores, core_json
    from mergekit_sparse.storage.checkpoint import Checkpoint, split_task_specs
    from mergekit_sparse.storage.scope import align
    from mergekit_sparse.storage.writer import check_output

    labels, paths = split_task_specs(tasks)
    task_cks = [Checkpoint.open(t, allow_pickle=allow_pickle) for t in paths]
    base_ck = open_base(base, task_cks, force=force, allow_pickle=allow_pickle)
    scope = align([base_ck, *task_cks], include=include, exclude=exclude)
    for w in scope.warnings:
        warn(w)
    check_output(
        out_dir / "core.json",
        [base_ck.path, *base_ck.files, *[p for t in task_cks for p in (t.path, *t.files)]],
        force=force,
        side_files=[out_dir / f"{label}.mask.safetensors" for label in labels],
    )
    settings = {"p": percent, "scope": scope_kind, "tie_seed": tie_seed, "include": list(include)}
    settings["exclude"] = list(exclude)

    def side_files(summaries) -> dict:  # core.json, committed with the masks as one output
        settings.update(base=base_ck.sources(), tasks=[t.sources() for t in task_cks])
        return {out_dir / "core.json": core_json(summaries, settings, scope)}

    summaries = compute_cores(
        base_ck,
        task_cks,
        scope,
        percent=percent,
        out_dir=out_dir,
        labels=labels,
        per_tensor=scope_kind == "per-tensor",
        force=force,
        progress=progress_enabled(),
        tie_seed=tie_seed,
        side_files=side_files,
    )
    data = {"settings": settings, "tasks": [s.to_json() | {"per_tensor": None} for s in summaries]}
    lines = [f"{'task':<20} {'selected':>12} {'of':>14} {'threshold':>12}  mask"]
    lines += [f"{s.task:<20} {s.selected:>12,} {s.total:>14,} {s.threshold:>12.4g}  {s.mask_path}" for s in summaries]
    lines.append(f"wrote {out_dir / 'core.json'}")
    for s in summaries:
        if s.ties.get("warning"):
            warn(f"{s.task}: {s.ties['warning']}")
    emit(data, as_json, "\n".join(lines))


@cli.command()
@click.argument("tasks", nargs=-1, required=True)
@click.option(
    "--base",
    help="Pretrained checkpoint: core regions are computed from |θ_task − θ_base|. Default: found from the "
    "tasks' own records (written by `sparsemerge train`) or their model cards' base_model.",
)
@spec_option(CoreSettings, "p", "--p", "percent")
@spec_option(CoreSettings, "scope", "--scope", "scope_kind")
@spec_option(
    CoreSettings,
    "tie_seed",
    help="Seed of the tie hash: of the cores' threshold ties and of max-delta conflicts with equal |Δ|.",
)
@click.option(
    "--masks",
    multiple=True,
    help="Core mask files instead of --p, one per task in order (repeatable; NAME=PATH accepted).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    help="Output file or folder (mirrors the fusion base). Default: fused.safetensors or fused/.",
)
@spec_option(FuseSettings, "omega", default=None, help="For two models: SLERP(θ_b, θ_a, ω). Default 0.5.")
@click.option("--weights", help="Comma-separated fold weights, one per task (then one for --onto if separate).")
@spec_option(FuseSettings, "conflict")
@click.option("--onto", help="Fusion base. Default: the last task given.")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Output dtype. Default: the fusion base's."
)
@click.option("--shard-size", help="Shard a folder output, e.g. 5GB.")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Folder outputs: load with transformers and check the logits are finite before finishing.",
)
@scope_options
@pickle_option
@force_option
@json_option
def fuse(
    tasks,
    base,
    percent,
    scope_kind,
    tie_seed,
    masks,
    out,
    omega,
    weights,
    conflict,
    onto,
    dtype,
    shard_size,
    check,
    include,
    exclude,
    allow_pickle,
    force,
    as_json,
):
    """Fuse fine-tuned checkpoints: SLERP everything, then write back each task's core region (CPI-FT stage 3).

    TASKS are fine-tuned checkpoints (files, folders or cached Hub ids), each optionally named
    NAME=PATH. Without --base, the pretrained model is the one the tasks record (`sparsemerge train`
    writes it into their metadata) or name in their model card (base_model:).

    \b
    Examples (two task models, cores = top 1 % of |Δ| against the base):
      sparsemerge fuse a.safetensors b.safetensors --p 1
      sparsemerge fuse a.safetensors b.safetensors --base base.safetensors --p 1 -o fused.safetensors
    """
    from mergekit_sparse.errors import OptionError
    from mergekit_sparse.fusion.api import fuse_checkpoints

    if masks and click.get_current_context().get_parameter_source("percent") == click.core.ParameterSource.COMMANDLINE:
        raise OptionError("--p and --masks both give the cores; give one (masks from `sparsemerge core` or --p)")
    data = fuse_checkpoints(
        list(tasks),
        base=base,
        percent=percent,
        per_tensor=scope_kind == "per-tensor",
        masks=list(masks),
        out=out,
        omega=omega,
        weights=weights,
        conflict=conflict,
        onto=onto,
        dtype=dtype,
        shard_size=shard_size,
        check=check,
        include=include,
        exclude=exclude,
        allow_pickle=allow_pickle,
        force=force,
        progress=progress_enabled(),
        tie_seed=tie_seed,
    )
    c = data["counts"]
    if not base and data["settings"]["base"]:
        click.echo(f"base: {data['settings']['base']['path']} ({data['settings']['base_found']})", err=True)
    for w in data["settings"]["scope"].get("missing_buffers", {}):
        warn(f"buffer '{w}' is missing from some inputs; copied from the fusion base when it has it")
    for label, t in c.get("ties", {}).items():
        if t.get("warning"):
            warn(f"{label}: {t['warning']}")
    text = "\n".join(
        [
            f"fused {', '.join(c['tasks'])} onto {c['onto']} -> {data['output']}",
            "core positions overwritten: " + ", ".join(f"{k} {v:,}" for k, v in c["overwritten"].items()),
            "conflicts: " + (", ".join(f"{k} {v:,}" for k, v in c["conflicts"].items()) or "none"),
            f"interpolated (non-core): {c['interpolated']:,}; nearly colinear (lerp) tensors: "
            f"{len(c['linear_tensors'])}",
        ]
    )
    emit(data, as_json, text)
