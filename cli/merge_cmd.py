"""`sparsemerge merge`: the sparse merge family from a mergekit-schema config."""

from __future__ import annotations

from pathlib import Path

import click

from .main import cli, emit, force_option, json_option, pickle_option, progress_enabled


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    help="Output model folder (a .safetensors file when the base is one). Required unless --dry-run.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the config and every model's tensors and shapes against the base (headers only); print the "
    "plan, the disk the output needs and the expected peak memory; merge nothing.",
)
@click.option("--shard-size", help="Shard a folder output, e.g. 5GB.")
@click.option(
    "--save-masks",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write each model's kept entries (TIES trim, Breadcrumbs window, TALL mask, localize-stitch γ) as "
    "DIR/<model>.mask.safetensors, "
    "ordinary mask files for `overlap` and the reports; committed with the merged model.",
)
@pickle_option
@force_option
@json_option
def merge(config, out, dry_run, shard_size, save_masks, allow_pickle, force, as_json):
    """Merge models with a mergekit config: linear, task_arithmetic, ties, dare_linear, dare_ties,
    breadcrumbs, breadcrumbs_ties, slerp, and tall, consensus, localize_stitch, cpi_ft (METHODS §10), streamed
    tensor by tensor; `scope: global` under
    `parameters` ranks |τ| over the whole model at once (TIES, Breadcrumbs) instead of per tensor.

    The config is mergekit's schema (merge_method, base_model, models, parameters, dtype, out_dtype,
    tokenizer_source, full-range slices); an existing mergekit config for one of these methods runs
    unchanged and, with `semantics: mergekit` (the default), gives mergekit's result. Paths are relative
    to the config's folder. Every problem in the config is listed at once, before any tensor is read.

    \b
    Example:
      sparsemerge merge ties.yml -o merged/ --dry-run
      sparsemerge merge ties.yml -o merged/
      sparsemerge merge ties.yml -o merged/ --save-masks masks/ && sparsemerge overlap masks/*.mask.safetensors
    """
    from mergekit_sparse.errors import OptionError
    from mergekit_sparse.pipeline.merge import merge_plan, parse_merge_config, run_merge

    cfg = parse_merge_config(config)
    if dry_run:
        plan = merge_plan(cfg, allow_pickle=allow_pickle)
        lines = [
            f"{cfg.method.name} ({cfg.semantics} semantics, {cfg.scope} scope) of {len(cfg.models)} model(s) "
            f"onto {cfg.base}:",
            *(f"  {label}: {path}" for label, path in zip(cfg.labels, cfg.models)),
            f"{plan['tensors']:,} tensors ({plan['in_scope']:,} merged, {plan['copied']:,} copied from the base), "
            f"{plan['parameters']:,} parameters",
            f"disk needed: {plan['output_bytes'] / 1e6:,.1f} MB; "
            f"{'peak memory at most' if plan['peak_memory_is_bound'] else 'expected peak memory'}: "
            f"{plan['peak_memory_bytes'] / 1e6:,.0f} MB (largest tensor: {plan['largest_tensor']})",
        ]
        emit({"config": cfg.to_json(), "plan": plan}, as_json, "\n".join(lines))
        return
    if out is None:
        raise OptionError("give the output with -o OUT (or --dry-run to check the config only)")
    res = run_merge(
        cfg,
        out,
        force=force,
        progress=progress_enabled(),
        allow_pickle=allow_pickle,
        shard_size=shard_size,
        save_masks=save_masks,
    )
    c = res["counts"]
    kept = ", ".join(f"{k} {v / max(1, c['total']):.1%}" for k, v in c["kept"].items())
    kept = f" (kept per model: {kept})" if cfg.method.sparsify else ""
    wrote = "\n".join(f"wrote {p}" for p in [out, *res.get("masks", [])])
    emit(res, as_json, f"{cfg.method.name}: merged {c['total']:,} parameters{kept}\n{wrote}")
