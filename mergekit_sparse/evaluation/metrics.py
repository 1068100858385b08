"""Forgetting metrics (METHODS §8): forget ratio, collapse rate, sequential forgetting, ID/OOD.

Accuracy tables are {task: accuracy in [0, 1]}. They come from `sparsemerge eval` files or from
lm-evaluation-harness results files (`results[task][metric]`), read by `load_accuracy_table`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DataError, OptionError

LM_EVAL_DEFAULT_METRICS = (
    "acc,none",
    "exact_match,none",
    "exact_match,strict-match",
    "acc_norm,none",
    "exact_match,flexible-extract",
    "acc",
    "exact_match",
)


def ood_tasks(table: dict[str, float], trained: str | list[str]) -> list[str]:
    """Every task but the trained one(s) (a multi-task run passes the list of its tasks)."""
    trained = [trained] if isinstance(trained, str) else list(trained)
    return [t for t in table if t not in trained]


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def forget_ratio(vanilla: dict[str, float], run: dict[str, float], trained: str) -> float | None:
    """max(0, (Acc_OOD_vanilla − Acc_OOD_run) / Acc_OOD_vanilla); None when Acc_OOD_vanilla = 0."""
    ood = ood_tasks(vanilla, trained)
    v = mean(vanilla[t] for t in ood)
    r = mean(run[t] for t in ood)
    if not v:
        return None
    return max(0.0, (v - r) / v)


def collapse(run: dict[str, float], trained: str) -> tuple[float, int]:
    """(rate, count): OOD tasks whose accuracy floors to 0 % (below 1 %), over N − 1."""
    ood = ood_tasks(run, trained)
    count = sum(math.floor(100 * run[t]) == 0 for t in ood)
    return (count / len(ood) if ood else 0.0), count


def sequential(acc_after_a: dict[str, float], acc_after_b: dict[str, float], a: str, b: str) -> dict[str, float]:
    """A then B: ΔA = acc_A after B − acc_A after A; ΔB = acc_B after B − acc_B before B (= after A)."""
    return {"delta_A": acc_after_b[a] - acc_after_a[a], "delta_B": acc_after_b[b] - acc_after_a[b]}


def run_metrics(vanilla: dict[str, float], run: dict[str, float], trained: str | list[str]) -> dict:
    """Everything about one run, with the warning METHODS asks for when the ratio is undefined.

    `trained` is the run's task, or the list of tasks of a multi-task run (ID = their mean).
    """
    missing = [t for t in vanilla if t not in run]
    trained_list = [trained] if isinstance(trained, str) else list(trained)
    for t in trained_list:
        if t not in vanilla:
            raise OptionError(f"trained task '{t}' is not in the vanilla table (tasks: {', '.join(vanilla)})")
    if missing:
        raise DataError(f"the run's table lacks task(s) {', '.join(missing)} that the vanilla table has")
    fr = forget_ratio(vanilla, run, trained)
    rate, count = collapse({t: run[t] for t in vanilla}, trained)
    ood = ood_tasks(vanilla, trained)
    out = {
        "trained": trained,
        "id_accuracy": mean(run[t] for t in trained_list),
        "ood_accuracy": mean(run[t] for t in ood),
        "vanilla_ood_accuracy": mean(vanilla[t] for t in ood),
        "forget_ratio": fr,
        "collapse_rate": rate,
        "collapse_count": count,
        "ood_tasks": len(ood),
    }
    if fr is None:
        out["warning"] = "forget ratio undefined: the vanilla model's OOD accuracy is 0"
    return out


def load_accuracy_table(path: str | Path, *, metric: dict[str, str] | str | None = None) -> dict[str, float]:
    """{task: accuracy} from a `sparsemerge eval` file or an lm-evaluation-harness results file.

    For lm-eval files `metric` picks the key (e.g. "acc,none") per task (dict) or for all tasks;
    by default the first of LM_EVAL_DEFAULT_METRICS that the task reports.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))  # too deep: RecursionError, caught
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: cannot read an accuracy table ({type(e).__name__})") from None
    if isinstance(doc, dict) and isinstance(doc.get("tasks"), dict):  # ours
        table = {}
        for t, v in doc["tasks"].items():
            if isinstance(v, dict) and "accuracy" not in v:
                raise DataError(f"{path}: task '{t}' has no 'accuracy' (expected `sparsemerge eval` output)")
            table[t] = v["accuracy"] if isinstance(v, dict) else v
    elif isinstance(doc, dict) and isinstance(doc.get("results"), dict):  # lm-eval
        table = {}
        for task, res in doc["results"].items():
            if not isinstance(res, dict):
                raise DataError(f"{path}: results['{task}'] is {type(res).__name__}, not a mapping of metrics")
            want = metric.get(task) if isinstance(metric, dict) else metric
            keys = [want] if want else [k for k in LM_EVAL_DEFAULT_METRICS if k in res]
            if not keys or keys[0] not in res:
                have = ", ".join(k for k in res if not k.endswith("_stderr") and "stderr" not in k and k != "alias")
                raise DataError(
                    f"{path}: task '{task}' has no metric {want or 'of ' + '/'.join(LM_EVAL_DEFAULT_METRICS)}"
                    f"; it has: {have}. Choose one with --metric {task}=NAME"
                )
            table[task] = res[keys[0]]
    else:
        raise DataError(
            f"{path}: not an accuracy table (expected `sparsemerge eval` output with 'tasks', "
            "or an lm-evaluation-harness results file with 'results')"
        )
    for t, v in table.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise DataError(f"{path}: accuracy of '{t}' is {v!r}; expected a number in [0, 1]")
    return {t: float(v) for t, v in table.items()}
