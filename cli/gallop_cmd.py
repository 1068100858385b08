"""`sparsemerge gradients` and `sparsemerge gallop`."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sparse.settings import GallopSettings, TrainConfig
from mergekit_sparse.storage import atomic

from .main import cli, emit, force_option, json_option, plotly_option, progress_enabled, scope_options, spec_option


@cli.command()
@click.option("--model", required=True, help="HF model folder (with tokenizer) to take gradients at.")
@click.option("--data", required=True, help="Task JSONL: {prompt, response} or {text} per line.")
@spec_option(GallopSettings, "fraction")
@click.option("--seed", type=int, default=0, show_default=True)
@spec_option(TrainConfig, "batch_size", help="Examples per forward pass.")
@spec_option(TrainConfig, "max_len", default=256)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Gradient file (float32 safetensors with metadata).",
)
@force_option
@json_option
def gradients(model, data, fraction, seed, batch_size, max_len, out, force, as_json):
    """Mean gradient of the task loss at MODEL over a seeded subset of DATA (GaLLoP's signal).

    \b
    Example:
      sparsemerge gradients --model base/ --data math.jsonl --fraction 0.1 -o grads.safetensors
    """
    from mergekit_sparse.training.gradients import compute_gradients

    meta = compute_gradients(
        model,
        data,
        out,
        fraction=fraction,
        seed=seed,
        batch_size=batch_size,
        max_len=max_len,
        force=force,
        progress=progress_enabled(),
    )
    emit(meta | {"output": str(out)}, as_json, f"mean gradient over {meta['examples']} examples -> {out}")


@cli.command()
@click.option("--params", required=True, help="The model whose parameters are scored (θ).")
@click.option("--grads", required=True, help="Gradient file from `sparsemerge gradients`.")
@spec_option(GallopSettings, "rho")
@spec_option(GallopSettings, "criterion")
@spec_option(GallopSettings, "tie_seed")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random criterion.")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("gallop.mask.safetensors"),
    show_default=True,
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Report comparing all four criteria (one offline HTML file).",
)
@click.option(
    "--sample",
    type=click.IntRange(100),
    default=20000,
    show_default=True,
    help="Entries sampled for the report's density plot.",
)
@click.option(
    "--force-grads",
    is_flag=True,
    help="Use a --grads file that `sparsemerge gradients` did not write (no gradient metadata).",
)
@plotly_option
@scope_options
@force_option
@json_option
def gallop(
    params,
    grads,
    rho,
    criterion,
    tie_seed,
    seed,
    out,
    html_out,
    plotly_mode,
    sample,
    force_grads,
    include,
    exclude,
    force,
    as_json,
):
    """Select the sparse trainable set: exact top-ρ % of the GaLLoP score |g| / (|θ| + ε) (or a baseline).

    \b
    Example:
      sparsemerge gallop --params base/ --grads grads.safetensors --rho 1 --html gallop.html
    """
    from mergekit_sparse.analysis.gallop import CRITERIA, check_gradients_fit, select_sparse
    from mergekit_sparse.errors import OptionError
    from mergekit_sparse.storage.checkpoint import Checkpoint
    from mergekit_sparse.storage.scope import align
    from mergekit_sparse.storage.writer import check_output

    p_ck, g_ck = Checkpoint.open(params).start_fingerprint(), Checkpoint.open(grads).start_fingerprint()
    if g_ck.metadata.get("kind") != "mean_gradient" and not force_grads:
        raise OptionError(
            f"{grads} has no gradient metadata (kind: mean_gradient): it looks like a model, not gradients from "
            "`sparsemerge gradients`; pass --force-grads to use it anyway"
        )
    scope = align([p_ck, g_ck], include=include, exclude=exclude)
    summary_path = Path(f"{out}".removesuffix(".mask.safetensors").removesuffix(".safetensors") + ".json")
    sides = [summary_path] + ([html_out] if html_out else [])
    check_output(out, [p_ck.path, *p_ck.files, g_ck.path], force=force, side_files=sides)
    done: dict = {}

    def summary(res) -> dict:  # OUT.json, committed with the mask as one output (built once)
        if not done:
            warning = check_gradients_fit(p_ck, g_ck)
            done.update(rho=rho, main=criterion, mask=str(out), warning=warning, **res.to_json())
            done["inputs"] = {"params": p_ck.sources(), "grads": g_ck.sources()}
        return done

    def side_files(res) -> dict:  # the summary and the report, committed with the mask as one output
        files = {summary_path: atomic.dumps(summary(res)) + "\n"}
        if html_out:
            from mergekit_sparse.reports.gallop import gallop_report_html

            files[html_out] = gallop_report_html(summary(res) | {"sample": res.sample}, plotly=plotly_mode)
        return files

    criteria = list(CRITERIA) if html_out else [criterion]
    if criterion in criteria:
        criteria.remove(criterion)
    criteria.insert(0, criterion)
    res = select_sparse(
        p_ck,
        g_ck,
        scope,
        rho=rho,
        criteria=criteria,
        main=criterion,
        out=out,
        seed=seed,
        sample_size=sample if html_out else 0,
        force=force,
        progress=progress_enabled(),
        sources=lambda: {"params": p_ck.sources(), "grads": g_ck.sources()},
        tie_seed=tie_seed,
        side_files=side_files,
    )
    doc = summary(res)
    if doc["warning"]:  # (checked after the passes, which hashed the parameters meanwhile)
        click.echo(doc["warning"], err=True)
    tie_warning = res.summaries[criterion].ties.get("warning")
    if tie_warning:
        click.echo(f"warning: {tie_warning}", err=True)
    s = res.summaries[criterion]
    text = (
        f"{criterion}: selected {s.selected:,} of {s.total:,} ({rho} %), threshold {s.threshold:.4g}\n"
        f"wrote {out} and {summary_path}" + (f" and {html_out}" if html_out else "")
    )
    emit({k: v for k, v in doc.items()} | {"summary": str(summary_path)}, as_json, text)
