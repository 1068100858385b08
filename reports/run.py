"""The report of a pipeline run (`sparsemerge run`) and of the demo: what was run with which settings, the
summary table, accuracy per task and run, the ID–OOD (Pareto) view, forgetting, and the CPI-FT overlap
(and, for the demo, the GaLLoP score map).

Reads the run's result files (summary.json, the groups file, criteria.json); computes nothing itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from .forget import forget_sections, trained_list
from .gallop import gallop_figures
from .overlap import overlap_figures
from .page import esc, report_html, short_fingerprint

HEADLINE = {  # the settings the header shows; the whole resolved config sits below them
    "cpi-ft": [("core", "p"), ("core", "scope"), ("overlap", "tau"), ("fuse", "conflict"), ("retrain", "steps")],
    "gallop": [("gallop", "rho"), ("gallop", "criterion"), ("gallop", "steps")],
}


def forget_doc(summary: dict) -> dict:
    """The run summary as the forget document the figures read."""
    return {"vanilla": {"accuracy": summary["vanilla"]}, "runs": summary["metrics"], "warnings": []}


def _settings(configs: dict) -> dict:
    out = {}
    for kind, cfg in configs.items():
        out[f"{kind}: seed"] = cfg.get("seed")
        out[f"{kind}: probe steps"] = (cfg.get("probe") or {}).get("steps")
        for section, key in HEADLINE.get(kind, []):
            out[f"{kind}: {section}.{key}"] = (cfg.get(section) or {}).get(key)
    return out


def run_header(summary: dict) -> dict:
    configs = summary.get("settings") or {}
    tasks = list(summary["vanilla"])
    trained = sorted({t for m in summary["metrics"].values() for t in trained_list(m)})
    base = (summary.get("inputs") or {}).get("base") or {}
    inputs = [
        {"input": "base model", "path": base.get("path", ""), "fingerprint": short_fingerprint(base.get("fingerprint"))}
    ]
    inputs += [
        {
            "input": f"task {t}",
            "path": spec if isinstance(spec, str) else "; ".join(f"{k}: {v}" for k, v in spec.items()),
            "fingerprint": "",
        }
        for t, spec in (summary.get("task_specs") or {}).items()
    ]
    details = "".join(
        f"<details><summary>{esc(kind)} config, as resolved</summary><pre>{esc(json.dumps(cfg, indent=2, default=str))}</pre></details>"
        for kind, cfg in configs.items()
    )
    return {
        "compared": f"{len(summary['metrics'])} runs ({', '.join(configs) or 'pipeline'}) fine-tuned on "
        f"{', '.join(trained)} and evaluated on {len(tasks)} tasks ({', '.join(tasks)}); the vanilla model is the base.",
        "settings": _settings(configs),
        "inputs": inputs,
        "details": details,
    }


def run_report_html(
    summary: dict, *, title: str, groups: dict | None = None, criteria: dict | None = None, plotly: str = "inline"
) -> str:
    sections = forget_sections(forget_doc(summary))
    if "groups" in summary and summary["groups"]:
        stages = " | ".join(", ".join(g) for g in summary["groups"])
        sections.insert(
            1, ("CPI-FT groups", "The task groups of the staged retraining, in stage order.", f"<p>{esc(stages)}</p>")
        )
    if groups is not None:
        sections += overlap_figures(groups)[:3]
    if criteria is not None:
        sections += gallop_figures(criteria)[:2]
    return report_html(title, sections, header=run_header(summary), plotly=plotly)


def write_run_report(folder: str | Path, *, title: str = "mergekit-sparse run", plotly: str = "inline") -> Path:
    """`folder`/report.html from the run's summary.json (and its groups file and criteria.json when there)."""
    from mergekit_sparse.storage import atomic

    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    groups = json.loads(Path(summary["groups_file"]).read_text()) if summary.get("groups_file") else None
    crit_path = folder / "criteria.json"
    criteria = json.loads(crit_path.read_text()) if crit_path.is_file() else None
    return atomic.write_text(
        folder / "report.html", run_report_html(summary, title=title, groups=groups, criteria=criteria, plotly=plotly)
    )
