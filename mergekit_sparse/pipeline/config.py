"""Pipeline configuration: defaults, and validation that lists every problem at once.

A config is YAML or JSON. Top-level keys and their sections (all optional but `tasks`):

    kind: cpi-ft | gallop           which pipeline
    base: builtin | PATH            the pretrained model folder
    output: PATH                    the run folder (the CLI's -o overrides it)
    seed: INT
    tasks: {NAME: builtin | {train: PATH, test: PATH}}     the fine-tuning tasks
    ood_tasks: [NAME, ...]          builtin tasks evaluated for forgetting (default: the pretraining mix)
    data: {train: INT, test: INT}   sizes of generated builtin tasks
    probe: TRAIN                    per-task full fine-tunes (CPI-FT stage 1; the full-FT baseline)
    core: {p: FLOAT, scope: global | per-tensor}
    overlap: {tau: FLOAT, order: random | input | least-overlap}
    fuse: {omega: FLOAT, conflict: max-delta | last | mean}
    retrain: TRAIN + {per_task: INT}
    gallop: TRAIN + {rho: FLOAT, criterion: gallop | saft | pafi | random, fraction: FLOAT}
    eval: {limit: INT, batch_size: INT}
  where TRAIN = {steps: INT, lr: FLOAT, batch_size: INT, warmup: INT, weight_decay: FLOAT,
                 optimizer: adamw | sgd, momentum: FLOAT in [0, 1) (sgd only)}
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import DataError

TRAIN = {"steps": (int, 1, None), "lr": (float, 0, None), "batch_size": (int, 1, None), "warmup": (int, 0, None),
         "weight_decay": (float, 0, None), "optimizer": ("adamw", "sgd"), "momentum": (float, None, None)}
TRAIN_DEFAULTS = {"warmup": 10, "weight_decay": 0.0, "optimizer": "adamw", "momentum": 0.9}
SCHEMA = {
    "kind": ("cpi-ft", "gallop"),
    "base": str, "output": str, "seed": (int, None, None),
    "tasks": dict, "ood_tasks": list,
    "data": {"train": (int, 1, None), "test": (int, 1, None)},
    "probe": TRAIN,
    "core": {"p": (float, 0, 100), "scope": ("global", "per-tensor")},
    "overlap": {"tau": (float, 0, 1), "order": ("random", "input", "least-overlap"), "seed": (int, None, None)},
    "fuse": {"omega": (float, 0, 1), "conflict": ("max-delta", "last", "mean")},
    "retrain": {**TRAIN, "per_task": (int, 1, None)},
    "gallop": {**TRAIN, "rho": (float, 0, 100), "criterion": ("gallop", "saft", "pafi", "random"),
               "fraction": (float, 0, 1)},
    "eval": {"limit": (int, 1, None), "batch_size": (int, 1, None)},
}
DEFAULTS = {
    "kind": "cpi-ft", "base": "builtin", "output": "run", "seed": 0, "tasks": {}, "ood_tasks": None,
    "data": {"train": 400, "test": 40},
    "probe": {**TRAIN_DEFAULTS, "steps": 150, "lr": 3e-3, "batch_size": 16},
    "core": {"p": 5.0, "scope": "global"},
    "overlap": {"tau": 0.1, "order": "random", "seed": 0},
    "fuse": {"omega": 0.5, "conflict": "max-delta"},
    "retrain": {**TRAIN_DEFAULTS, "steps": 60, "lr": 1e-3, "batch_size": 16, "warmup": 5, "per_task": 100},
    "gallop": {**TRAIN_DEFAULTS, "steps": 150, "lr": 3e-3, "batch_size": 16, "rho": 5.0, "criterion": "gallop",
               "fraction": 0.25},
    "eval": {"limit": 40, "batch_size": 40},
}


def _check(value, spec, where: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return
        for k, v in value.items():
            if k not in spec:
                problems.append(f"{where}.{k}: unknown key (known: {', '.join(spec)})")
            else:
                _check(v, spec[k], f"{where}.{k}", problems)
    elif isinstance(spec, tuple) and spec and isinstance(spec[0], str):
        if value not in spec:
            problems.append(f"{where}: {value!r} is not one of {', '.join(spec)}")
    elif isinstance(spec, tuple):
        typ, lo, hi = spec
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) if typ is float else \
            isinstance(value, int) and not isinstance(value, bool)
        if not ok_type:
            problems.append(f"{where}: expected {'a number' if typ is float else 'an integer'}, got {value!r}")
        elif (lo is not None and (value <= lo if typ is float else value < lo)) or (hi is not None and value > hi):
            rng = f"({lo}, {hi}]" if typ is float else f">= {lo}"
            problems.append(f"{where}: {value} is out of range {rng}")
    elif not isinstance(value, spec):
        problems.append(f"{where}: expected {spec.__name__}, got {type(value).__name__}")


def validate(raw: dict, *, base_dir: Path) -> dict:
    """Merge `raw` over the defaults and check everything; raise one DataError listing every problem."""
    from ..builtin.tasks import ALL_TASKS, PRETRAIN_TASKS
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise DataError("config: expected a mapping at the top level")
    _check(raw, SCHEMA, "config", problems)
    cfg = copy.deepcopy(DEFAULTS)
    for k, v in raw.items():
        if isinstance(cfg.get(k), dict) and isinstance(v, dict) and k != "tasks":
            cfg[k].update(v)
        else:
            cfg[k] = v
    for section in ("probe", "retrain", "gallop"):
        mom = cfg[section].get("momentum")
        if isinstance(mom, (int, float)) and not 0 <= mom < 1:
            problems.append(f"config.{section}.momentum: {mom!r} is out of range [0, 1)")
    tasks = cfg.get("tasks")
    if isinstance(tasks, dict):
        if len(tasks) < (2 if cfg["kind"] == "cpi-ft" else 1):
            problems.append(f"config.tasks: {cfg['kind']} needs at least {2 if cfg['kind'] == 'cpi-ft' else 1} tasks")
        for name, spec in tasks.items():
            if spec == "builtin":
                if name not in ALL_TASKS:
                    problems.append(f"config.tasks.{name}: no builtin task of that name (builtin: {', '.join(ALL_TASKS)})")
            elif isinstance(spec, dict) and set(spec) == {"train", "test"}:
                for part in ("train", "test"):
                    if not isinstance(spec[part], str) or not (base_dir / spec[part]).is_file():
                        problems.append(f"config.tasks.{name}.{part}: file {spec[part]!r} not found")
            else:
                problems.append(f"config.tasks.{name}: expected 'builtin' or {{train: PATH, test: PATH}}")
    ood = cfg.get("ood_tasks")
    if ood is None:
        cfg["ood_tasks"] = [t for t in PRETRAIN_TASKS if t not in (tasks or {})]
    elif isinstance(ood, list):
        for t in ood:
            if t not in ALL_TASKS:
                problems.append(f"config.ood_tasks: {t!r} is not a builtin task")
    if isinstance(cfg.get("base"), str) and cfg["base"] != "builtin" and not (base_dir / cfg["base"] / "config.json").is_file():
        problems.append(f"config.base: {cfg['base']!r} is not a model folder (no config.json)")
    if problems:
        raise DataError("invalid pipeline config:\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - YAML and JSON raise different types
        raise DataError(f"{path}: cannot parse the config ({str(e).splitlines()[0]})") from None
    return validate(raw or {}, base_dir=path.parent)
