"""The `forget` document: metrics for every run and sequential pair, from accuracy-table files."""

from __future__ import annotations

from ..errors import OptionError
from .metrics import load_accuracy_table, mean, run_metrics, sequential


def forget_report(vanilla_path: str, runs: dict[str, str], seqs: dict[str, str], *, metric=None) -> dict:
    """runs: name -> "TABLE:TASK" or "TABLE:TASK_A,TASK_B" (a run trained on several tasks: fused, CPI-FT,
    multi-task; METHODS §8); seqs: "A:B" -> "AFTER_A,AFTER_B"."""
    vanilla = load_accuracy_table(vanilla_path, metric=metric)
    doc = {"vanilla": {"path": vanilla_path, "accuracy": vanilla}, "runs": {}, "sequential": {}, "warnings": []}
    for name, spec in runs.items():
        table_path, sep, trained = spec.rpartition(":")
        tasks = [t.strip() for t in trained.split(",")]
        if not sep or not table_path or not all(tasks):
            raise OptionError(
                f"--run {name}={spec!r} should look like NAME=TABLE.json:TRAINED_TASK (or :TASK_A,TASK_B for a "
                "run trained on several tasks)"
            )
        table = load_accuracy_table(table_path, metric=metric)
        r = run_metrics(vanilla, table, tasks[0] if len(tasks) == 1 else tasks)
        r["accuracy"] = table
        r["path"] = table_path
        if "warning" in r:
            doc["warnings"].append(f"{name}: {r['warning']}")
        doc["runs"][name] = r
    for pair, spec in seqs.items():
        a, sep, b = pair.partition(":")
        paths = spec.split(",")
        if not sep or len(paths) != 2:
            raise OptionError(f"--seq {pair}={spec!r} should look like A:B=AFTER_A.json,AFTER_B.json")
        after_a, after_b = (load_accuracy_table(p, metric=metric) for p in paths)
        for t in (a, b):
            if t not in after_a or t not in after_b:
                raise OptionError(f"--seq {pair}: task '{t}' is missing from {paths[0]} or {paths[1]}")
        doc["sequential"][f"{a}→{b}"] = sequential(after_a, after_b, a, b)
    ratios = [r["forget_ratio"] for r in doc["runs"].values() if r["forget_ratio"] is not None]
    doc["mean_forget_ratio"] = mean(ratios)
    return doc
