"""`sparsemerge demo`: both pipelines on the built-in model and tasks, one summary.

The run folder gets `summary.json` and `criteria.json`, the result files the demo report
(`mergekit_sparse.reports.demo`) reads; the library itself never draws.
"""

from __future__ import annotations

from pathlib import Path

from ..storage import atomic
from .config import validate
from .run import render_summary, run_pipeline

DEMO_TASKS = {t: "builtin" for t in ("caesar", "dsort", "sub", "map")}


def demo_configs(fast: bool = False) -> list[dict]:
    """The CPI-FT and GaLLoP configs of the demo (`fast`: a smoke-test size for CI)."""
    small = {"steps": 6, "batch_size": 8} if fast else {}
    common = {
        "base": "builtin",
        "tasks": DEMO_TASKS,
        "seed": 0,
        "data": {"train": 64, "test": 8} if fast else {"train": 400, "test": 40},
        "eval": {"limit": 8 if fast else 40, "batch_size": 40},
        "probe": {"steps": 150, "lr": 3e-3, "batch_size": 16} | small,
    }
    cpi = common | {
        "kind": "cpi-ft",
        "core": {"p": 5.0},
        "overlap": {"tau": 0.1, "order": "random"},
        "retrain": {"steps": 60, "lr": 1e-3, "per_task": 100} | small,
    }
    gal = common | {
        "kind": "gallop",
        "gallop": {"rho": 5.0, "criterion": "gallop", "fraction": 0.25, "steps": 150, "lr": 3e-3} | small,
    }
    return [validate(cpi, base_dir=Path.cwd()), validate(gal, base_dir=Path.cwd())]


def run_demo(out: Path, *, fast: bool = False, log=print) -> dict:
    out = Path(out)
    cpi_cfg, gal_cfg = demo_configs(fast)
    # one run folder: the GaLLoP pipeline finds data, the vanilla evaluation and the full fine-tunes
    # (its baseline) already done by the CPI-FT pipeline with the same settings, and skips them
    log("== CPI-FT: probe fine-tunes, cores, overlap, fusion, staged retraining")
    cpi = run_pipeline(cpi_cfg, out, log=log)
    log("== GaLLoP: gradients, sparse masks, sparse training")
    gal = run_pipeline(gal_cfg, out, log=log)
    metrics = {**cpi["metrics"], **{k: v for k, v in gal["metrics"].items() if not k.startswith("full-ft")}}
    summary = {"vanilla": cpi["vanilla"], "ood_tasks": cpi["ood_tasks"], "metrics": metrics, "groups": cpi["groups"]}
    summary |= {"settings": cpi["settings"] | gal["settings"], "inputs": cpi["inputs"], "task_specs": cpi["task_specs"]}
    summary["groups_file"] = cpi["groups_file"]
    write_criteria(out, cpi)
    atomic.write_json(out / "summary.json", summary)
    return summary | {"text": render_summary(summary)}


def write_criteria(out: Path, cpi: dict) -> Path:
    """The GaLLoP score map of the first task under every criterion (for the demo report): `criteria.json`."""
    from ..analysis.gallop import CRITERIA, select_sparse
    from ..storage.checkpoint import Checkpoint
    from ..storage.scope import align

    first = next(iter(DEMO_TASKS))
    base = Checkpoint.open(_builtin())
    grads = Checkpoint.open(out / "gallop" / first / "grads.safetensors")
    res = select_sparse(
        base, grads, align([base, grads]), rho=5.0, criteria=list(CRITERIA), main="gallop", out=None, sample_size=20000
    )
    return atomic.write_json(out / "criteria.json", {"task": first, "rho": 5.0, **res.to_json(), "sample": res.sample})


def _builtin() -> Path:
    from ..builtin import builtin_model

    return builtin_model()
