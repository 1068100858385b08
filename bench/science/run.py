"""Do the papers' qualitative claims hold on the built-in model? Methods compared on the same tasks and seeds.

    .venv/bin/python bench/science/run.py [--seeds 0 1 2] [--lrs 1e-3 3e-3 1e-2] [--out bench/out/science]
                                          [--optimizer adamw|sgd] [--momentum 0.9] [--a dsort --b map] [--base DIR]

Single-task methods, trained on task A from the built-in base, each swept over learning rates
(every training uses AdamW, or SGD with momentum with `--optimizer sgd`):
  full       full fine-tuning
  gallop-1   GaLLoP mask, ρ = 1 %          gallop-5   ρ = 5 %
  saft-5     SAFT mask (largest |g|), 5 %  random-5   random mask, 5 %
Two-task methods on A and B:
  seq-full   full fine-tuning A, then B (A→B)
  multi-full full fine-tuning on the A+B mixture
  cpi-ft     probes A and B (the full runs), cores p = 5 %, fusion, staged retraining (METHODS §5-§6)

For every run: per-task accuracy (exact match, 40 test examples per task), ID accuracy (the trained
task(s)), OOD accuracy (every other task of the suite), forget ratio and collapse rate (METHODS §8);
for seq-full and cpi-ft the sequential table (ΔA, ΔB). Writes results.json, a report (accuracy vs
forgetting with each method's Pareto front) and prints mean ± std over seeds and a matched-ID table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mergekit_sparse.builtin import builtin_model  # noqa: E402
from mergekit_sparse.builtin.tasks import PRETRAIN_TASKS, jsonl, split  # noqa: E402
from mergekit_sparse.evaluation.accuracy import evaluate  # noqa: E402
from mergekit_sparse.evaluation.metrics import run_metrics, sequential  # noqa: E402
from mergekit_sparse.storage import atomic  # noqa: E402

SINGLE = ("full", "gallop-1", "gallop-5", "saft-5", "random-5")
STEPS, BATCH = 150, 16
OPTIMIZER = {"optimizer": "adamw", "momentum": 0.9}  # every training of a run; set by --optimizer/--momentum


def data(out: Path, tasks, seed: int) -> tuple[dict, dict]:
    trains, tests = {}, {}
    for t in tasks:
        tr, te = split(t, n_train=400, n_test=40, seed=seed)
        trains[t] = atomic.write_text(out / "data" / f"{t}.train.jsonl", jsonl(tr))
        tests[t] = atomic.write_text(out / "data" / f"{t}.test.jsonl", jsonl(te))
    return trains, tests


def acc(model: Path, tests: dict, cache: Path) -> dict[str, float]:
    if cache.is_file():
        return json.loads(cache.read_text())
    table = evaluate(str(model), {t: str(p) for t, p in tests.items()}, limit=40, batch_size=40)
    res = {t: r["accuracy"] for t, r in table["tasks"].items()}
    atomic.write_text(cache, json.dumps(res))  # a killed run leaves the old cache or none, never half of one
    return res


def train_run(
    model: Path, data_path: Path | list, out: Path, *, lr: float, seed: int, mask: Path | None = None
) -> Path:
    from mergekit_sparse.storage.masks import MaskSet
    from mergekit_sparse.training.data import read_jsonl
    from mergekit_sparse.training.models import load_model
    from mergekit_sparse.training.staged import model_masks
    from mergekit_sparse.training.trainer import TrainConfig, train

    if (out / "model.safetensors").is_file():
        return out
    paths = data_path if isinstance(data_path, list) else [data_path]
    records = [r for p in paths for r in read_jsonl(p)]
    m, tok = load_model(model, dtype=torch.float32)
    masks = model_masks(m, MaskSet.load(mask), model) if mask else None
    cfg = TrainConfig(steps=STEPS * len(paths), lr=lr, batch_size=BATCH, warmup=10, seed=seed, max_len=48, **OPTIMIZER)
    train(m, tok, records, cfg=cfg, masks=masks, out=out, reference=Path(model), force=True)
    return out


def mask_for(method: str, base: Path, train_path: Path, out: Path, seed: int, *, fraction: float = 0.25) -> Path:
    from mergekit_sparse.analysis.gallop import select_sparse
    from mergekit_sparse.storage.checkpoint import Checkpoint
    from mergekit_sparse.storage.scope import align
    from mergekit_sparse.training.gradients import compute_gradients

    crit, rho = method.split("-")
    grads = out / "grads.safetensors"
    if not grads.is_file():
        compute_gradients(str(base), str(train_path), grads, fraction=fraction, seed=seed)
    mask = out / f"{method}.mask.safetensors"
    if not mask.is_file():
        p, g = Checkpoint.open(base), Checkpoint.open(grads)
        select_sparse(p, g, align([p, g]), rho=float(rho), criteria=[crit], main=crit, out=mask, seed=seed)
    return mask


def cpi_ft(
    base: Path,
    probe_a: Path,
    probe_b: Path,
    trains: dict,
    a: str,
    b: str,
    out: Path,
    *,
    lr: float,
    seed: int,
    percent: float = 5.0,
    retrain_cfg=None,
) -> Path:
    """Cores at `percent` of the probes, overlap groups (τ = 0.1), fusion into out/fused, staged retraining
    (`retrain_cfg`, default 60 steps at lr / 3) into out/retrained; returns the final model."""
    from mergekit_sparse.analysis.cores import compute_cores
    from mergekit_sparse.analysis.overlap import compute_overlap, group_tasks, groups_document
    from mergekit_sparse.fusion.driver import fuse
    from mergekit_sparse.storage.checkpoint import Checkpoint
    from mergekit_sparse.storage.masks import MaskSet
    from mergekit_sparse.storage.scope import align
    from mergekit_sparse.training.staged import retrain
    from mergekit_sparse.training.trainer import TrainConfig

    final = out / "retrained"
    if (final / "retrain.json").is_file():
        return Path(json.loads((final / "retrain.json").read_text())["final_model"])
    out.mkdir(parents=True, exist_ok=True)
    bk, ck = Checkpoint.open(base), [Checkpoint.open(probe_a), Checkpoint.open(probe_b)]
    scope = align([bk, *ck])
    compute_cores(bk, ck, scope, percent=percent, out_dir=out / "cores", labels=[a, b], force=True)
    masks = [MaskSet.load(out / "cores" / f"{t}.mask.safetensors") for t in (a, b)]
    res = compute_overlap(masks, [a, b])
    groups = group_tasks(res.matrix, [a, b], tau=0.1, order="input")
    atomic.write_text(
        out / "groups.json", json.dumps(groups_document(res, groups, tau=0.1, order="input", seed=0, settings={}))
    )
    fuse(ck, [a, b], onto=ck[-1], onto_is_task=1, scope=scope, out=out / "fused", base=bk, masks=masks, force=True)
    doc = retrain(
        str(out / "fused"),
        str(out / "groups.json"),
        str(out / "cores"),
        {t: str(trains[t]) for t in (a, b)},
        final,
        cfg=retrain_cfg
        or TrainConfig(steps=60, lr=lr / 3, batch_size=BATCH, warmup=5, seed=seed, max_len=48, **OPTIMIZER),
        per_task=100,
    )
    return Path(doc["final_model"])


def provenance(threads: int) -> dict:
    """What produced a results file: the commit (and whether the tree had changes), versions, threads."""
    import platform
    import subprocess

    import numpy
    import transformers

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
        },
        "threads": threads,
    }


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (ID accuracy, OOD accuracy), sorted by ID."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--a", default="dsort")
    ap.add_argument("--b", default="map")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "science")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", type=Path, help="another base model folder (default: the built-in one)")
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="for every training of the run")
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    args = ap.parse_args()
    OPTIMIZER.update(optimizer=args.optimizer, momentum=args.momentum)
    torch.set_num_threads(args.threads)
    a, b = args.a, args.b
    suite = [a, b] + [t for t in ("caesar", "sub") if t not in (a, b)] + list(PRETRAIN_TASKS)
    base = args.base or builtin_model()
    rows = []
    t0 = time.time()
    for seed in args.seeds:
        sd = args.out / f"seed{seed}"
        trains, tests = data(sd, suite, seed)
        vanilla = acc(base, tests, sd / "vanilla.acc.json")
        for lr in args.lrs:
            d = sd / f"lr{lr:g}"
            d.mkdir(parents=True, exist_ok=True)

            def record(method, model, trained, extra=None):
                table = acc(model, tests, d / f"{method}.acc.json")
                m = run_metrics(vanilla, table, trained)
                rows.append({"method": method, "seed": seed, "lr": lr, **m, "accuracy": table, **(extra or {})})
                print(
                    f"[{time.time() - t0:6.0f}s] seed {seed} lr {lr:g} {method:<10} ID {m['id_accuracy']:.3f} "
                    f"OOD {m['ood_accuracy']:.3f} forget {m['forget_ratio']}",
                    flush=True,
                )
                return table

            full_a = train_run(base, trains[a], d / "full-A", lr=lr, seed=seed)
            acc_a = record("full", full_a, a)
            for method in SINGLE[1:]:
                mask = mask_for(method, base, trains[a], sd / "masks", seed)
                record(method, train_run(base, trains[a], d / method, lr=lr, seed=seed, mask=mask), a)
            seq = train_run(full_a, trains[b], d / "seq-AB", lr=lr, seed=seed)
            seq_acc = acc(seq, tests, d / "seq-full.acc.json")
            record("seq-full", seq, [a, b], {"sequential": sequential(acc_a, seq_acc, a, b)})
            record("multi-full", train_run(base, [trains[a], trains[b]], d / "multi", lr=lr, seed=seed), [a, b])
            full_b = train_run(base, trains[b], d / "full-B", lr=lr, seed=seed)
            final = cpi_ft(base, full_a, full_b, trains, a, b, d / "cpi", lr=lr, seed=seed)
            cpi_acc = acc(final, tests, d / "cpi-ft.acc.json")
            record("cpi-ft", final, [a, b], {"sequential": sequential(acc_a, cpi_acc, a, b)})
    atomic.write_text(
        args.out / "results.json",
        json.dumps(
            {"a": a, "b": b, "suite": suite, **OPTIMIZER, "provenance": provenance(args.threads), "rows": rows},
            indent=2,
        ),
    )
    print(summarise(rows, a, b))
    write_report(rows, args.out / "report.html")


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"


def summarise(rows: list[dict], a: str, b: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lrs = sorted({r["lr"] for r in rows})
    lines = [
        f"tasks: A = {a}, B = {b}; mean ± std over seeds {sorted({r['seed'] for r in rows})}",
        "",
        "| method | lr | ID acc | OOD acc | forget ratio | collapse rate | ΔA | ΔB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        for lr in lrs:
            rs = [r for r in rows if r["method"] == m and r["lr"] == lr]
            seq = [r.get("sequential") for r in rs if r.get("sequential")]
            lines.append(
                f"| {m} | {lr:g} | {_ms(r['id_accuracy'] for r in rs)} | {_ms(r['ood_accuracy'] for r in rs)} | "
                f"{_ms(r['forget_ratio'] for r in rs)} | {_ms(r['collapse_rate'] for r in rs)} | "
                f"{_ms(s['delta_A'] for s in seq) if seq else ''} | {_ms(s['delta_B'] for s in seq) if seq else ''} |"
            )
    single = [r for r in rows if r["method"] in SINGLE]
    target = statistics.median(r["id_accuracy"] for r in single) if single else 0
    lines += [
        "",
        f"Single-task methods at matched ID accuracy (the run of each method closest to the median "
        f"ID accuracy {target:.3f}, per seed, then averaged):",
        "",
        "| method | ID acc | OOD acc | forget ratio | collapse rate |",
        "|---|---|---|---|---|",
    ]
    for m in SINGLE:
        picks = []
        for seed in sorted({r["seed"] for r in rows}):
            rs = [r for r in single if r["method"] == m and r["seed"] == seed]
            if rs:
                picks.append(min(rs, key=lambda r: abs(r["id_accuracy"] - target)))
        if picks:
            lines.append(
                f"| {m} | {_ms(r['id_accuracy'] for r in picks)} | {_ms(r['ood_accuracy'] for r in picks)} | "
                f"{_ms(r['forget_ratio'] for r in picks)} | {_ms(r['collapse_rate'] for r in picks)} |"
            )
    return "\n".join(lines)


def write_report(
    rows: list[dict],
    path: Path,
    *,
    group=lambda r: r["method"],
    label=lambda r: f"{r['method']} lr {r['lr']:g} seed {r['seed']}",
    title: str = "ID accuracy vs OOD accuracy (up and right is better); lines: Pareto fronts",
    page: str = "bench/science: accuracy vs forgetting",
    xaxis: str = "ID accuracy",
    yaxis: str = "OOD accuracy",
) -> None:
    """The Pareto view: one colour per `group` of rows (its points and its Pareto front)."""
    import plotly.graph_objects as go

    from mergekit_sparse.reports.page import write_report as write

    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for i, name in enumerate(dict.fromkeys(group(r) for r in rows)):
        rs = [r for r in rows if group(r) == name]
        pts = [(r["id_accuracy"], r["ood_accuracy"]) for r in rs]
        color = palette[i % len(palette)]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                mode="markers",
                name=name,
                marker={"color": color, "size": 8, "opacity": 0.6},
                text=[label(r) for r in rs],
                hoverinfo="text+x+y",
            )
        )
        front = pareto(pts)
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in front], y=[p[1] for p in front], mode="lines", showlegend=False, line={"color": color}
            )
        )
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=600)
    write(path, page, [("Accuracy vs forgetting", "", fig)])


if __name__ == "__main__":
    main()
