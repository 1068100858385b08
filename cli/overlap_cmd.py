"""`sparsemerge overlap`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from mergekit_sparse.settings import CoreSettings, OverlapSettings
from mergekit_sparse.storage import atomic

from .main import (
    cli,
    emit,
    force_option,
    json_option,
    open_base,
    pickle_option,
    plotly_option,
    progress_enabled,
    scope_options,
    spec_option,
    warn,
)


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--base",
    help="Treat INPUTS as task checkpoints and compute their cores against BASE first. Task checkpoints "
    "without --base: the base they record (or name in their model card) is used.",
)
@spec_option(CoreSettings, "p", "--p", "percent", help="Core size in % (with --base).")
@spec_option(CoreSettings, "tie_seed", help="Seed of the cores' tie hash (with --base).")
@spec_option(OverlapSettings, "tau")
@spec_option(OverlapSettings, "order")
@spec_option(OverlapSettings, "seed")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("groups.json"),
    show_default=True,
    help="The groups file.",
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write an interactive report (one offline HTML file).",
)
@click.option(
    "--save-masks",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --base: keep the computed core masks in this folder.",
)
@plotly_option
@scope_options
@pickle_option
@force_option
@json_option
def overlap(
    inputs,
    base,
    percent,
    tie_seed,
    tau,
    order,
    seed,
    out,
    html_out,
    plotly_mode,
    save_masks,
    include,
    exclude,
    allow_pickle,
    force,
    as_json,
):
    """Measure how tasks' core regions overlap (Jaccard) and group the tasks (CPI-FT stage 2).

    INPUTS are mask files from `sparsemerge core` (*.mask.safetensors), or task checkpoints (their base
    given with --base or found from their records); each optionally named NAME=PATH.

    \b
    Examples:
      sparsemerge overlap cores/*.mask.safetensors --tau 0.1 --html overlap.html
      sparsemerge overlap --base base/ runs/math runs/code runs/chat --p 1 --order input
    """
    from mergekit_sparse.analysis.overlap import compute_overlap, group_tasks, groups_document
    from mergekit_sparse.storage.checkpoint import split_task_specs
    from mergekit_sparse.storage.masks import MaskSet
    from mergekit_sparse.storage.writer import check_output

    labels, paths = split_task_specs(inputs)
    are_masks = all(str(p).endswith(".mask.safetensors") for p in paths)
    given_p = click.get_current_context().get_parameter_source("percent") == click.core.ParameterSource.COMMANDLINE
    if are_masks and given_p:
        from mergekit_sparse.errors import OptionError

        raise OptionError("--p sizes cores computed from task checkpoints; mask files already are cores: drop --p")
    check_output(out, list(paths), force=force, side_files=[html_out] if html_out else [])
    settings = {
        "inputs": list(inputs),
        "base": base,
        "p": percent if not are_masks else None,
        "tau": tau,
        "order": order,
        "seed": seed,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if base or not are_masks:
            from mergekit_sparse.analysis.cores import compute_cores
            from mergekit_sparse.storage.checkpoint import Checkpoint
            from mergekit_sparse.storage.scope import align

            tasks = [Checkpoint.open(t, allow_pickle=allow_pickle) for t in paths]
            base_ck = open_base(base, tasks, force=force, allow_pickle=allow_pickle)
            scope = align([base_ck, *tasks], include=include, exclude=exclude)
            for w in scope.warnings:
                warn(w)
            mask_dir = save_masks or Path(tmp)
            summaries = compute_cores(
                base_ck,
                tasks,
                scope,
                percent=percent,
                out_dir=mask_dir,
                labels=labels,
                force=force,
                progress=progress_enabled(),
                tie_seed=tie_seed,
            )
            paths = [s.mask_path for s in summaries]
            settings["base"] = base_ck.sources()
        masks = [MaskSet.load(p) for p in paths]
        result = compute_overlap(masks, labels)
        if (base or not are_masks) and not save_masks:
            for row in result.inputs:
                row["mask"] = None  # a temporary, gone with this command (--save-masks keeps the masks)
    groups = group_tasks(result.matrix, labels, tau=tau, order=order, seed=seed)
    doc = groups_document(result, groups, tau=tau, order=order, seed=seed, settings=settings)
    files = {out: atomic.dumps(doc) + "\n"}
    if html_out:  # the groups file and its report are one output: a kill leaves both or neither
        from mergekit_sparse.reports.overlap import overlap_report_html

        files[html_out] = overlap_report_html(doc, plotly=plotly_mode)
    atomic.write_texts(files, force=force)
    m = doc["matrix"]
    width = max(len(t) for t in labels)
    lines = [" " * width + "  " + "  ".join(f"{t[:8]:>8}" for t in labels)]
    lines += [f"{t:<{width}}  " + "  ".join(f"{v:8.4f}" for v in row) for t, row in zip(labels, m)]
    strict = doc.get("strict")
    if strict and strict["sizes"] != doc["sizes"]:  # some core entries were picked by the tie rule
        lines.append("S over the strict cores (without the entries picked among ties at each threshold):")
        lines += [f"{t:<{width}}  " + "  ".join(f"{v:8.4f}" for v in row) for t, row in zip(labels, strict["matrix"])]
    lines += [f"groups (stage order, τ = {tau}): " + " | ".join(", ".join(g) for g in groups), f"wrote {out}"]
    if html_out:
        lines.append(f"wrote {html_out}")
    brief = {k: doc[k] for k in ("tasks", "tau", "order", "seed", "matrix", "chance", "sizes", "strict", "groups")}
    emit(brief | {"output": str(out), "html": str(html_out) if html_out else None}, as_json, "\n".join(lines))
