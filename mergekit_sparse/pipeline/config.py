"""Pipeline configuration: defaults, and validation that lists every problem at once.

A config is YAML or JSON. Top-level keys and their sections (all optional but `tasks`):

    kind: cpi-ft | gallop           which pipeline
    base: builtin | PATH            the pretrained model folder
    output: PATH                    the run folder (the CLI's -o overrides it)
    seed: INT
    tasks: {NAME: builtin | {train: PATH, test: PATH}}     the fine-tuning tasks
    ood_tasks: [NAME, ...] | {NAME: builtin | {test: PATH}}
                                    tasks evaluated for forgetting only (default: the builtin pretraining
                                    mix with the builtin base; none with your own base, where the suite
                                    is your tasks: each run's OOD tasks are the others, METHODS §8)
    data: {train: INT, test: INT}   sizes of generated builtin tasks
    probe: TRAIN                    per-task full fine-tunes (CPI-FT stage 1; the full-FT baseline)
    core: {p: FLOAT, scope: global | per-tensor}
    overlap: {tau: FLOAT, order: random | input | least-overlap}
    fuse: {omega: FLOAT, conflict: max-delta | last | mean}
    retrain: TRAIN + {per_task: INT}
    gallop: TRAIN + {rho: FLOAT, criterion: gallop | saft | pafi | random, fraction: FLOAT}
    eval: {limit: INT, batch_size: INT}
  where TRAIN = every setting of `settings.TrainConfig` but `seed` (steps, lr, batch_size, grad_accum,
  warmup, schedule, weight_decay, optimizer, momentum, clip, eval_every, eval_fraction, max_len,
  save_every). Keys, ranges and messages come from the declarations in `mergekit_sparse.settings`,
  the ones the CLI's options use; only the defaults below are the pipeline's own.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import DataError
from ..settings import (
    CoreSettings,
    DataSettings,
    EvalSettings,
    FuseSettings,
    GallopSettings,
    OverlapSettings,
    RetrainSettings,
    Spec,
    TrainConfig,
    defaults,
    specs,
)
from ..storage.checkpoint import is_safe_name

TRAIN_KEYS = tuple(n for n in specs(TrainConfig) if n not in ("seed", "sparse_below"))  # seed: the run's
SECTIONS: dict[str, dict[str, Spec]] = {
    "data": specs(DataSettings),
    "probe": {k: specs(TrainConfig)[k] for k in TRAIN_KEYS},
    "core": specs(CoreSettings),
    "overlap": specs(OverlapSettings),
    "fuse": specs(FuseSettings),
    "retrain": {**{k: specs(TrainConfig)[k] for k in TRAIN_KEYS}, **specs(RetrainSettings)},
    "gallop": {**{k: specs(TrainConfig)[k] for k in TRAIN_KEYS}, **specs(GallopSettings)},
    "eval": specs(EvalSettings),
}
TOP = {
    "kind": Spec(str, choices=("cpi-ft", "gallop")),
    "base": Spec(str),
    "output": Spec(str),
    "seed": Spec(int),
    "tasks": dict,
    "ood_tasks": (list, dict),
}
_TRAIN = {k: defaults(TrainConfig)[k] for k in TRAIN_KEYS}
# the pipeline's own defaults where they differ from the commands' (declared ranges are never overridden)
DEFAULTS = {
    "kind": "cpi-ft",
    "base": "builtin",
    "output": "run",
    "seed": 0,
    "tasks": {},
    "ood_tasks": None,
    "data": defaults(DataSettings),
    "probe": {**_TRAIN, "steps": 150, "lr": 3e-3, "batch_size": 16, "warmup": 10, "max_len": 48},
    "core": {**defaults(CoreSettings), "p": 5.0},
    "overlap": defaults(OverlapSettings),
    "fuse": defaults(FuseSettings),
    "retrain": {**_TRAIN, "steps": 60, "lr": 1e-3, "batch_size": 16, "warmup": 5, "max_len": 48, "per_task": 100},
    "gallop": {
        **_TRAIN,
        "steps": 150,
        "lr": 3e-3,
        "batch_size": 16,
        "warmup": 10,
        "max_len": 48,
        **defaults(GallopSettings),
        "rho": 5.0,
        "fraction": 0.25,
    },
    "eval": {**defaults(EvalSettings), "limit": 40, "batch_size": 40},
}


def _check(raw: dict, problems: list[str]) -> None:
    for key, value in raw.items():
        where = f"config.{key}"
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
                continue
            for k, v in value.items():
                spec = SECTIONS[key].get(k)
                if spec is None:
                    problems.append(f"{where}.{k}: unknown key (known: {', '.join(SECTIONS[key])})")
                elif why := spec.problem(v):
                    problems.append(f"{where}.{k}: {why}")
        elif key in TOP:
            spec = TOP[key]
            if isinstance(spec, Spec):
                if why := spec.problem(value):
                    problems.append(f"{where}: {why}")
            elif value is not None and not isinstance(value, spec):
                problems.append(
                    f"{where}: expected a {'mapping' if spec is dict else 'list or mapping'}, "
                    f"got {type(value).__name__}"
                )
        else:
            problems.append(f"{where}: unknown key (known: {', '.join([*TOP, *SECTIONS])})")


def validate(raw: dict, *, base_dir: Path) -> dict:
    """Merge `raw` over the defaults and check everything; raise one DataError listing every problem."""
    from ..builtin.tasks import ALL_TASKS, PRETRAIN_TASKS

    problems: list[str] = []
    if not isinstance(raw, dict):
        raise DataError("config: expected a mapping at the top level")
    _check(raw, problems)
    cfg = copy.deepcopy(DEFAULTS)
    for k, v in raw.items():
        if isinstance(cfg.get(k), dict) and isinstance(v, dict) and k != "tasks":
            cfg[k].update(v)
        else:
            cfg[k] = v
    for section in ("probe", "retrain", "gallop"):
        b, g = cfg[section].get("batch_size"), cfg[section].get("grad_accum")
        if isinstance(b, int) and isinstance(g, int) and g > 0 and b % g:
            problems.append(f"config.{section}.batch_size: {b} must be a multiple of grad_accum {g}")
    tasks = cfg.get("tasks")
    if isinstance(tasks, dict):
        if len(tasks) < (2 if cfg["kind"] == "cpi-ft" else 1):
            problems.append(f"config.tasks: {cfg['kind']} needs at least {2 if cfg['kind'] == 'cpi-ft' else 1} tasks")
        for name, spec in tasks.items():
            if not is_safe_name(name):
                problems.append(
                    f"config.tasks: {name!r} is not a valid task name (it names folders in the run folder): use "
                    "letters, digits and . _ + - only, no path separators or '..'"
                )
                continue
            if spec == "builtin":
                if name not in ALL_TASKS:
                    problems.append(
                        f"config.tasks.{name}: no builtin task of that name (builtin: {', '.join(ALL_TASKS)})"
                    )
            elif isinstance(spec, dict) and set(spec) == {"train", "test"}:
                if name in ALL_TASKS:
                    problems.append(
                        f"config.tasks.{name}: {name!r} is the name of a builtin task; give your task another "
                        f"name (e.g. my_{name}) so results cannot be mixed up"
                    )
                for part in ("train", "test"):
                    if not isinstance(spec[part], str) or not (base_dir / spec[part]).is_file():
                        problems.append(f"config.tasks.{name}.{part}: file {spec[part]!r} not found")
                    else:  # relative paths are the config folder's, where they were checked
                        spec[part] = str(base_dir / spec[part])
            else:
                problems.append(f"config.tasks.{name}: expected 'builtin' or {{train: PATH, test: PATH}}")
    ood = cfg.get("ood_tasks")
    cfg["ood_files"] = {}
    if ood is None:
        own_base = isinstance(cfg.get("base"), str) and cfg["base"] != "builtin"
        cfg["ood_tasks"] = [] if own_base else [t for t in PRETRAIN_TASKS if t not in (tasks or {})]
    elif isinstance(ood, (list, dict)):
        entries = ood.items() if isinstance(ood, dict) else ((t, "builtin") for t in ood)
        names = []
        for t, spec in entries:
            if not is_safe_name(t):
                problems.append(f"config.ood_tasks: {t!r} is not a valid task name (letters, digits and . _ + - only)")
            elif spec == "builtin":
                if t not in ALL_TASKS:
                    problems.append(
                        f"config.ood_tasks: {t!r} is not a builtin task (builtin: {', '.join(ALL_TASKS)}); "
                        "give your own as {name: {test: PATH}}"
                    )
                names.append(t)
            elif isinstance(spec, dict) and set(spec) == {"test"} and isinstance(spec["test"], str):
                if t in ALL_TASKS:
                    problems.append(f"config.ood_tasks.{t}: the name of a builtin task; name your task otherwise")
                elif isinstance(tasks, dict) and t in tasks:
                    problems.append(f"config.ood_tasks.{t}: already a fine-tuning task (it is OOD for the others)")
                elif not (base_dir / spec["test"]).is_file():
                    problems.append(f"config.ood_tasks.{t}.test: file {spec['test']!r} not found")
                else:
                    cfg["ood_files"][t] = str(base_dir / spec["test"])
                names.append(t)
            else:
                problems.append(f"config.ood_tasks.{t}: expected 'builtin' or {{test: PATH}}")
        cfg["ood_tasks"] = names
    if isinstance(cfg.get("base"), str) and cfg["base"] != "builtin":
        if not (base_dir / cfg["base"] / "config.json").is_file():
            problems.append(f"config.base: {cfg['base']!r} is not a model folder (no config.json)")
        else:
            cfg["base"] = str(base_dir / cfg["base"])
    if problems:
        raise DataError("invalid pipeline config:\n  " + "\n  ".join(problems))
    return cfg


def _yaml_loader():
    """PyYAML's safe loader, reading floats as YAML 1.2 does: `2e-3` and `1e4` are numbers (YAML 1.1,
    PyYAML's default, reads them as strings because they lack a dot)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def load_yaml(text: str):
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # after YAML aliases are expanded: plain anchors pass, an alias bomb does not


def expanded_size(doc, budget: int = MAX_CONFIG_NODES) -> int:
    """Nodes of `doc` counted as if every alias were copied out (what validating or printing it walks),
    stopping once past `budget`."""
    count, stack = 0, [doc]
    while stack and count <= budget:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    data = path.read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise DataError(f"{path}: {len(data)} bytes is too large for a pipeline config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {e.start}); save the config as UTF-8") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            raw = load_yaml(text)
        else:
            raw = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: nested deeper than Python can parse; a config is a few levels deep") from None
    except Exception as e:  # noqa: BLE001 - YAML and JSON raise different types
        mark = getattr(e, "problem_mark", None)
        where = (
            f"{path}:{mark.line + 1}" if mark is not None else f"{path}:{e.lineno}" if hasattr(e, "lineno") else path
        )
        reason = getattr(e, "problem", None) or getattr(e, "msg", None) or str(e).splitlines()[0]
        raise DataError(f"{where}: cannot parse the config ({str(reason)[:200]})") from None
    if expanded_size(raw) > MAX_CONFIG_NODES:
        raise DataError(
            f"{path}: the config expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases repeated inside "
            "each other); write the values out"
        )
    return validate(raw or {}, base_dir=path.parent.absolute())
