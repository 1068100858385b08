"""`sparsemerge train` and `sparsemerge retrain`."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_sparse.settings import RetrainSettings

from .eval_cmd import parse_pairs
from .main import cli, emit, force_option, json_option, progress_enabled, spec_option

TRAIN_FLAGS = (
    "steps",
    "lr",
    "batch_size",
    "grad_accum",
    "warmup",
    "schedule",
    "weight_decay",
    "optimizer",
    "momentum",
    "clip",
    "eval_every",
    "eval_fraction",
    "max_len",
    "save_every",
    "seed",
)


def train_options(f):
    """Every TrainConfig setting as an option (declared once in mergekit_sparse.settings)."""
    from mergekit_sparse.settings import TrainConfig

    for name in reversed(TRAIN_FLAGS):
        f = spec_option(TrainConfig, name)(f)
    return f


def make_config(kw: dict):
    from mergekit_sparse.settings import TrainConfig

    cfg = {k: kw.pop(k) for k in TRAIN_FLAGS}
    cfg["clip"] = cfg["clip"] or None
    return TrainConfig(**cfg)


@cli.command("train")
@click.option("--model", required=True, help="HF model folder (with tokenizer) to start from.")
@click.option("--data", required=True, help="Task JSONL: {prompt, response} or {text} per line.")
@click.option("--mask", help="Train only the entries this mask selects (e.g. from `sparsemerge gallop`).")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@train_options
@force_option
@json_option
def train_cmd(model, data, mask, out, force, as_json, **kw):
    """Fine-tune MODEL on DATA: fully, or only the entries of --mask (every other entry stays bit-identical).

    Runs unchanged under `torchrun --nproc-per-node N` (DDP; gloo on CPU, nccl on GPU).

    \b
    Example:
      sparsemerge train --model base/ --data math.jsonl --mask gallop.mask.safetensors --steps 200 -o runs/math
    """
    from mergekit_sparse.training.staged import run_train

    summary = run_train(model, data, out, cfg=make_config(kw), mask=mask, force=force, progress=progress_enabled())
    f = summary["final"]
    emit(
        summary | {"output": str(out)},
        as_json,
        f"trained {f.get('step')} steps, final loss {f.get('loss', float('nan')):.4f}, "
        f"{summary['trainable']:,} trainable entries -> {out}",
    )


@cli.command()
@click.option("--model", required=True, help="The fused model (HF folder) to retrain.")
@click.option("--groups", required=True, help="groups.json from `sparsemerge overlap` (stage order).")
@click.option("--masks", "masks_dir", required=True, help="Folder with <task>.mask.safetensors core masks.")
@click.option("--data", "data", multiple=True, required=True, metavar="TASK=PATH", help="Training data per task.")
@spec_option(RetrainSettings, "per_task")
@click.option(
    "--fraction", type=click.FloatRange(0, 1, min_open=True), help="Or: this share of the smallest task, per task."
)
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@train_options
@force_option
@json_option
def retrain(model, groups, masks_dir, data, per_task, fraction, out, force, as_json, **kw):
    """Staged retraining: stage k trains group k with the cores of all earlier groups frozen (CPI-FT stage 4).

    Each finished stage is saved as OUT/stage-k; a rerun resumes after the last finished stage.

    \b
    Example:
      sparsemerge retrain --model fused/ --groups groups.json --masks cores/ \\
          --data math=math.jsonl --data code=code.jsonl --per-task 200 --steps 100 -o retrained/
    """
    from mergekit_sparse.training.staged import retrain as run

    doc = run(
        model,
        groups,
        masks_dir,
        parse_pairs(data, "--data"),
        out,
        cfg=make_config(kw),
        per_task=per_task,
        fraction=fraction,
        force=force,
        progress=progress_enabled(),
    )
    lines = [
        f"stage {s['stage']}: {', '.join(s['group'])}"
        + (
            " (done earlier, skipped)"
            if s.get("skipped")
            else f" — {s['examples']} examples, {s['frozen_parameters']:,} frozen, final loss {s['final'].get('loss', 0):.4f}"
        )
        for s in doc["stages"]
    ]
    lines.append(f"final model: {doc['final_model']}")
    emit(doc, as_json, "\n".join(lines))
