"""The demo report: overlap and groups, the GaLLoP score map, accuracy and forgetting per method.

Reads the result files `sparsemerge demo` leaves in its run folder (summary.json, the groups file,
criteria.json); computes nothing itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from .forget import accuracy_figure, forget_figure
from .gallop import gallop_figures
from .overlap import overlap_figures
from .page import write_report


def write_demo_report(run: str | Path) -> Path:
    run = Path(run)
    summary = json.loads((run / "summary.json").read_text())
    sections = overlap_figures(json.loads(Path(summary["groups_file"]).read_text()))[:3]
    sections += gallop_figures(json.loads((run / "criteria.json").read_text()))[:2]
    doc = {
        "vanilla": {"accuracy": summary["vanilla"]},
        "runs": {
            k: v | {"trained": v["trained"] if isinstance(v["trained"], str) else "+".join(v["trained"])}
            for k, v in summary["metrics"].items()
        },
        "warnings": [],
    }
    sections += [
        ("Accuracy per task", "vanilla = the built-in base model", accuracy_figure(doc)),
        ("Forgetting per method", "", forget_figure(doc)),
    ]
    return write_report(run / "report.html", "mergekit-sparse demo", sections)
