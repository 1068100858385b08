"""`sparsemerge eval` and `sparsemerge forget`."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sparse.settings import EvalSettings
from mergekit_sparse.storage import atomic

from .main import cli, emit, force_option, json_option, plotly_option, progress_enabled, spec_option


def parse_pairs(values, what: str, sep: str = "=") -> dict[str, str]:
    from mergekit_sparse.errors import OptionError

    out = {}
    for v in values:
        name, s, rest = v.partition(sep)
        if not s or not name or not rest:
            raise OptionError(f"{what} {v!r} should look like NAME{sep}VALUE")
        if name in out:
            raise OptionError(f"{what}: the name '{name}' is given twice")
        out[name] = rest
    return out


@cli.command("eval")
@click.option("--model", required=True, help="HF model folder (with tokenizer).")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A task: JSONL of {prompt, response} (exact match) or {prompt, choices, answer} (repeatable).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("acc.json"),
    show_default=True,
    help="The accuracy table.",
)
@spec_option(EvalSettings, "batch_size")
@spec_option(EvalSettings, "limit", help="Only the first N examples of each task.")
@click.option("--max-new-tokens", type=click.IntRange(1), help="Default: longest target + 2.")
@click.option("--strip/--no-strip", default=True, show_default=True, help="Strip whitespace before comparing.")
@click.option("--case-sensitive/--case-insensitive", default=True, show_default=True)
@click.option("--outputs", "save_outputs", is_flag=True, help="Keep every example's output in the table file.")
@force_option
@json_option
def eval_(model, tasks, out, batch_size, limit, max_new_tokens, strip, case_sensitive, save_outputs, force, as_json):
    """Accuracy of MODEL on each task: greedy exact match, or multiple choice by log-likelihood.

    \b
    Example:
      sparsemerge eval --model fused/ --task math=math_test.jsonl --task code=code_test.jsonl -o acc.json
    """
    from mergekit_sparse.evaluation.accuracy import evaluate
    from mergekit_sparse.storage.writer import check_output

    task_map = parse_pairs(tasks, "--task")
    check_output(out, [Path(model), *map(Path, task_map.values())], force=force)
    table = evaluate(
        model,
        task_map,
        batch_size=batch_size,
        limit=limit,
        strip=strip,
        case=case_sensitive,
        max_new_tokens=max_new_tokens,
        progress=progress_enabled(),
    )
    if not save_outputs:
        for res in table["tasks"].values():
            res.pop("outputs")
    atomic.write_json(out, table)
    lines = [f"{'task':<16} {'accuracy':>9} {'n':>6} {'empty':>6}"]
    lines += [f"{t:<16} {r['accuracy']:>9.4f} {r['n']:>6} {r['empty']:>6}" for t, r in table["tasks"].items()]
    lines.append(f"wrote {out}")
    brief = {
        "model": table["model"],
        "output": str(out),
        "tasks": {t: {k: v for k, v in r.items() if k != "outputs"} for t, r in table["tasks"].items()},
    }
    emit(brief, as_json, "\n".join(lines))


@cli.command()
@click.option("--vanilla", required=True, help="Accuracy table of the model before fine-tuning.")
@click.option(
    "--run",
    "runs",
    multiple=True,
    metavar="NAME=TABLE:TASK",
    help="A fine-tuned run: its accuracy table and the task it was trained on, or the tasks of a run trained "
    "on several (TABLE:TASK_A,TASK_B; fused and CPI-FT models) (repeatable).",
)
@click.option(
    "--seq",
    "seqs",
    multiple=True,
    metavar="A:B=AFTER_A,AFTER_B",
    help="Sequential forgetting A→B: tables after training on A, then after B (repeatable).",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="[TASK=]NAME",
    help="lm-eval results: the metric to read (e.g. acc,none), for all tasks or per task.",
)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), help="Write metrics JSON.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a report.")
@plotly_option
@force_option
@json_option
def forget(vanilla, runs, seqs, metrics, out, html_out, plotly_mode, force, as_json):
    """Forget ratio, collapse rate and sequential forgetting from accuracy tables (METHODS §8).

    Tables are `sparsemerge eval` outputs or lm-evaluation-harness results JSON files.

    \b
    Example:
      sparsemerge forget --vanilla base_acc.json --run full=full_acc.json:math --run gallop=g_acc.json:math
      sparsemerge forget --vanilla base_acc.json --run fused=fused_acc.json:math,code
    """
    from mergekit_sparse.errors import OptionError
    from mergekit_sparse.evaluation.forget import forget_report
    from mergekit_sparse.storage.writer import check_output

    if not runs and not seqs:
        raise OptionError("give at least one --run NAME=TABLE:TASK or --seq A:B=AFTER_A,AFTER_B")
    tables = [vanilla] + [s.rpartition(":")[0] for s in parse_pairs(runs, "--run").values()]
    tables += [t for s in parse_pairs(seqs, "--seq").values() for t in s.split(",")]
    if out or html_out:
        main_out, *rest = [p for p in (out, html_out) if p]
        check_output(main_out, [Path(t) for t in tables if t], force=force, side_files=rest)
    metric: dict | str | None = None
    for m in metrics:
        if "=" in m:
            metric = (metric if isinstance(metric, dict) else {}) | parse_pairs([m], "--metric")
        else:
            metric = m
    doc = forget_report(vanilla, parse_pairs(runs, "--run"), parse_pairs(seqs, "--seq"), metric=metric)
    for w in doc["warnings"]:
        click.echo(f"warning: {w}", err=True)
    files = {out: atomic.dumps(doc) + "\n"} if out else {}
    if html_out:  # the metrics file and its report are one output
        from mergekit_sparse.reports.forget import forget_report_html

        files[html_out] = forget_report_html(doc, plotly=plotly_mode)
    atomic.write_texts(files, force=force)
    lines = [f"{'run':<16} {'trained':<12} {'ID acc':>7} {'OOD acc':>8} {'forget':>7} {'collapse':>9}"]
    for name, r in doc["runs"].items():
        fr = "n/a" if r["forget_ratio"] is None else f"{r['forget_ratio']:.3f}"
        lines.append(
            f"{name:<16} {_names(r['trained']):<12} {r['id_accuracy']:>7.3f} {r['ood_accuracy'] or 0:>8.3f} "
            f"{fr:>7} {r['collapse_rate']:>6.2f} ({r['collapse_count']})"
        )
    for name, s in doc["sequential"].items():
        lines.append(f"{name}: ΔA = {s['delta_A']:+.3f}, ΔB = {s['delta_B']:+.3f}")
    if doc["runs"]:
        lines.append(f"mean forget ratio: {doc['mean_forget_ratio']}")
    emit(doc, as_json, "\n".join(lines))


def _names(trained) -> str:
    return trained if isinstance(trained, str) else ",".join(trained)
