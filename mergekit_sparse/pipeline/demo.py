"""`sparsemerge demo`: both pipelines on the built-in model and tasks, one summary, one report."""

from __future__ import annotations

import json
from pathlib import Path

from .config import validate
from .run import render_summary, run_pipeline

DEMO_TASKS = {t: "builtin" for t in ("caesar", "dsort", "sub", "map")}


def demo_configs(fast: bool = False) -> list[dict]:
    """The CPI-FT and GaLLoP configs of the demo (`fast`: a smoke-test size for CI)."""
    small = {"steps": 6, "batch_size": 8} if fast else {}
    common = {"base": "builtin", "tasks": DEMO_TASKS, "seed": 0,
              "data": {"train": 64, "test": 8} if fast else {"train": 400, "test": 40},
              "eval": {"limit": 8 if fast else 40, "batch_size": 40},
              "probe": {"steps": 150, "lr": 3e-3, "batch_size": 16} | small}
    cpi = common | {"kind": "cpi-ft", "core": {"p": 5.0}, "overlap": {"tau": 0.1, "order": "random"},
                    "retrain": {"steps": 60, "lr": 1e-3, "per_task": 100} | small}
    gal = common | {"kind": "gallop", "gallop": {"rho": 5.0, "criterion": "gallop", "fraction": 0.25, "steps": 150,
                                                   "lr": 3e-3} | small}
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report = write_demo_report(out, cpi, gal, summary)
    return summary | {"report": str(report), "text": render_summary(summary)}


def write_demo_report(out: Path, cpi: dict, gal: dict, summary: dict) -> Path:
    """Overlap and groups, the GaLLoP score map of the first task, accuracy and forgetting per method."""
    from mergekit_sparse.reports.forget import accuracy_figure, forget_figure
    from mergekit_sparse.reports.gallop import gallop_figures
    from mergekit_sparse.reports.html import write_report
    from mergekit_sparse.reports.overlap import overlap_figures

    from ..storage.checkpoint import Checkpoint
    from ..analysis.gallop import CRITERIA, select_sparse
    from ..storage.scope import align
    sections = overlap_figures(json.loads(Path(cpi["groups_file"]).read_text()))[:3]
    first = next(iter(DEMO_TASKS))
    base = Checkpoint.open(_builtin())
    grads = Checkpoint.open(out / "gallop" / first / "grads.safetensors")
    res = select_sparse(base, grads, align([base, grads]), rho=5.0, criteria=list(CRITERIA), main="gallop", out=None,
                        sample_size=20000)
    sections += gallop_figures({"rho": 5.0, **res.to_json(), "sample": res.sample})[:2]
    doc = {"vanilla": {"accuracy": summary["vanilla"]},
           "runs": {k: v | {"trained": v["trained"] if isinstance(v["trained"], str) else "+".join(v["trained"])}
                    for k, v in summary["metrics"].items()}, "warnings": []}
    sections += [("Accuracy per task", "vanilla = the built-in base model", accuracy_figure(doc)),
                 ("Forgetting per method", "", forget_figure(doc))]
    return write_report(out / "report.html", "mergekit-sparse demo", sections)


def _builtin() -> Path:
    from ..builtin import builtin_model
    return builtin_model()
