"""`sparsemerge run`: the CPI-FT pipeline (and the GaLLoP one) end to end, from a config.

Every stage writes into the run folder and records, in `.stages/NAME.json`, a key made of its
settings and the keys of the stages it reads, and the sha256 of its outputs. On a rerun a stage
is skipped when its key is unchanged and its outputs are still there with the same hashes, so an
interrupted run resumes where it stopped and a changed setting redoes exactly what depends on it.

CPI-FT:  data → vanilla eval → probe fine-tunes (stage 1) → cores → overlap/groups (stage 2)
         → fusion (stage 3) → staged retraining (stage 4) → evaluation → forgetting metrics
GaLLoP:  data → vanilla eval → full fine-tunes (baseline) → per task: gradients → mask →
         sparse training → evaluation → forgetting metrics
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..builtin import builtin_model
from ..builtin.tasks import jsonl, split
from ..storage import atomic
from .config import TRAIN_KEYS

TIE_RULE = "hash"  # in the stage keys: masks made under the old name-order rule are recomputed


def _sha_path(p: Path) -> str:
    from ..storage.checkpoint import sha256_file

    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + sha256_file(f).encode())
    return h.hexdigest()


def _inputs(cfg: dict) -> list[Path]:
    """The files a run reads from outside its folder: the base and the user's task files."""
    paths = [] if cfg.get("base", "builtin") == "builtin" else [Path(cfg["base"])]
    for spec in cfg.get("tasks", {}).values():
        if isinstance(spec, dict):
            paths += [Path(spec["train"]), Path(spec["test"])]
    return paths + [Path(p) for p in cfg.get("ood_files", {}).values()]


def check_run_folder(root: Path, inputs: list[Path]) -> None:
    """A run folder is new, empty, or a run folder already (it has `.stages/`): never a folder of the user's
    own files, which a run would overwrite (summary.json, report.html), nor an input or inside one."""
    from ..errors import OutputError
    from ..storage.writer import check_output

    if root.exists() and not root.is_dir():
        raise OutputError(f"run folder {root} is a file; choose a folder")
    check_output(root, inputs, force=True)
    if root.is_dir() and not (root / ".stages").is_dir() and any(root.iterdir()):
        raise OutputError(
            f"{root} holds files and is not a run folder (no .stages/); a run would overwrite them: choose a new "
            "or empty folder"
        )


class Run:
    """The run folder and its stage records."""

    def __init__(self, root: Path, cfg: dict, *, log: Callable[[str], None] = print):
        self.root, self.cfg, self.log = Path(root), cfg, log
        check_run_folder(self.root, _inputs(cfg))
        self.keys: dict[str, str] = {}
        self.done: list[tuple[str, str]] = []  # (stage, "ran" | "skipped")
        (self.root / ".stages").mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, settings: dict, needs: list[str], outputs: list[Path], fn: Callable[[], None]) -> None:
        key = hashlib.sha256(
            json.dumps(
                {"settings": settings, "needs": [self.keys[n] for n in needs]}, sort_keys=True, default=str
            ).encode()
        ).hexdigest()
        self.keys[name] = key
        marker = self.root / ".stages" / f"{name}.json"
        if marker.is_file():
            rec = json.loads(marker.read_text())
            if rec.get("key") == key and all(
                Path(p).exists() and _sha_path(Path(p)) == h for p, h in rec["outputs"].items()
            ):
                self.done.append((name, "skipped"))
                self.log(f"[skip] {name} (done earlier, inputs and settings unchanged)")
                return
            marker.unlink()
        for p in outputs:  # stale or partial outputs of this stage
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        self.log(f"[run]  {name}")
        fn()
        rec = {"key": key, "settings": settings, "outputs": {str(p): _sha_path(p) for p in outputs}}
        atomic.write_json(marker, rec)
        self.done.append((name, "ran"))


def _train_cfg(section: dict, seed: int):
    """The TrainConfig of a training section (every TrainConfig key is a config key; `clip: 0` is off)."""
    from ..settings import TrainConfig

    cfg = {k: section[k] for k in TRAIN_KEYS}
    cfg["clip"] = cfg["clip"] or None
    return TrainConfig(**cfg, seed=seed)


def _data_stage(run: Run, base: Path) -> tuple[dict, dict]:
    cfg = run.cfg
    train_paths, test_paths = {}, {}
    d = run.root / "data"
    eval_names = list(cfg["tasks"]) + [t for t in cfg["ood_tasks"] if t not in cfg["tasks"]]
    outputs = []
    for t in eval_names:
        spec = cfg["tasks"].get(t, "builtin")
        if t in cfg.get("ood_files", {}):  # the user's own OOD task: a test file only
            test_paths[t] = Path(cfg["ood_files"][t])
        elif spec == "builtin":
            train_paths[t], test_paths[t] = d / f"{t}.train.jsonl", d / f"{t}.test.jsonl"
            outputs += [train_paths[t], test_paths[t]]
        else:
            train_paths[t], test_paths[t] = Path(spec["train"]), Path(spec["test"])

    def make():
        for t in eval_names:
            if cfg["tasks"].get(t, "builtin") == "builtin" and t not in cfg.get("ood_files", {}):
                tr, te = split(t, n_train=cfg["data"]["train"], n_test=cfg["data"]["test"], seed=cfg["seed"])
                atomic.write_text(train_paths[t], jsonl(tr))
                atomic.write_text(test_paths[t], jsonl(te))

    user_hashes = {t: _sha_path(p) for t, p in test_paths.items() if p not in outputs}
    user_hashes |= {f"{t}.train": _sha_path(p) for t, p in train_paths.items() if p not in outputs}
    run.stage(
        "data",
        {
            "data": cfg["data"],
            "seed": cfg["seed"],
            "tasks": eval_names,
            "user_files": user_hashes,
            "base": _sha_path(base),
        },
        [],
        outputs,
        make,
    )
    return train_paths, test_paths


def _eval_stage(run: Run, name: str, model: Path, needs: list[str], tests: dict) -> Path:
    from ..evaluation.accuracy import evaluate

    out = run.root / "eval" / f"{name}.json"

    def make():
        table = evaluate(
            str(model),
            {t: str(p) for t, p in tests.items()},
            limit=run.cfg["eval"]["limit"],
            batch_size=run.cfg["eval"]["batch_size"],
        )
        for res in table["tasks"].values():
            res.pop("outputs")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out, table)

    run.stage(f"eval-{name}", {"eval": run.cfg["eval"]}, needs, [out], make)
    return out


def _accuracy(path: Path) -> dict[str, float]:
    from ..evaluation.metrics import load_accuracy_table

    return load_accuracy_table(path)


def run_pipeline(cfg: dict, root: Path, *, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the configured pipeline in `root`; returns the summary (also root/summary.json)."""
    run = Run(root, cfg, log=log)
    base = builtin_model() if cfg["base"] == "builtin" else Path(cfg["base"])
    trains, tests = _data_stage(run, base)
    vanilla = _eval_stage(run, "vanilla", base, ["data"], tests)
    summary = {"kind": cfg["kind"], "tasks": list(cfg["tasks"]), "ood_tasks": cfg["ood_tasks"], "runs": {}}
    summary |= _provenance(cfg, base)
    probes = _probes(run, base, trains, tests)
    for t, (_, acc) in probes.items():
        summary["runs"][f"full-ft:{t}"] = {"trained": t, "accuracy": str(acc)}
    if cfg["kind"] == "cpi-ft":
        summary |= _cpi_ft(run, base, trains, tests, probes)
    else:
        summary |= _gallop(run, base, trains, tests)
    summary |= _metrics(run, vanilla, summary)
    summary["stages"] = run.done
    atomic.write_json(run.root / "summary.json", summary)
    return summary


def _provenance(cfg: dict, base: Path) -> dict:
    """What the run read and how (for its report and for a reader of summary.json): the resolved config, the
    base's path and content fingerprint, and the task specs."""
    from ..storage.checkpoint import Checkpoint

    return {
        "settings": {cfg["kind"]: cfg},
        "inputs": {"base": Checkpoint.open(base).sources()},
        "task_specs": {t: str(spec) if not isinstance(spec, dict) else spec for t, spec in cfg["tasks"].items()},
    }


def _probes(run: Run, base: Path, trains: dict, tests: dict) -> dict:
    """Per-task full fine-tunes from the base (CPI-FT stage 1; also the full-FT baseline)."""
    from ..training.staged import run_train

    out = {}
    for i, t in enumerate(run.cfg["tasks"]):
        folder = run.root / "probe" / t
        cfg = _train_cfg(run.cfg["probe"], run.cfg["seed"] + i)
        run.stage(
            f"probe-{t}",
            {"probe": run.cfg["probe"], "seed": cfg.seed},
            ["data"],
            [folder],
            lambda folder=folder, cfg=cfg, t=t: run_train(str(base), str(trains[t]), folder, cfg=cfg),
        )
        out[t] = (folder, _eval_stage(run, f"probe-{t}", folder, [f"probe-{t}"], tests))
    return out


def _cpi_ft(run: Run, base: Path, trains: dict, tests: dict, probes: dict) -> dict:
    from ..analysis.cores import compute_cores, core_json
    from ..analysis.overlap import compute_overlap, group_tasks, groups_document
    from ..storage.checkpoint import Checkpoint
    from ..storage.masks import MaskSet
    from ..storage.scope import align
    from ..training.staged import retrain

    cfg, root, tasks = run.cfg, run.root, list(run.cfg["tasks"])
    cores = root / "cores"
    probe_stages = [f"probe-{t}" for t in tasks]

    def make_cores():
        b, cks = Checkpoint.open(base), [Checkpoint.open(probes[t][0]) for t in tasks]
        scope = align([b, *cks])
        compute_cores(
            b,
            cks,
            scope,
            percent=cfg["core"]["p"],
            out_dir=cores,
            labels=tasks,
            per_tensor=cfg["core"]["scope"] == "per-tensor",
            tie_seed=cfg["core"]["tie_seed"],
            side_files=lambda summ: {cores / "core.json": core_json(summ, cfg["core"], scope)},
        )

    run.stage("cores", {**cfg["core"], "tie_rule": TIE_RULE}, probe_stages, [cores], make_cores)

    groups_path = root / "groups.json"

    def make_groups():
        res = compute_overlap([MaskSet.load(cores / f"{t}.mask.safetensors") for t in tasks], tasks)
        o = cfg["overlap"]
        groups = group_tasks(res.matrix, tasks, tau=o["tau"], order=o["order"], seed=o["seed"])
        doc = groups_document(res, groups, tau=o["tau"], order=o["order"], seed=o["seed"], settings=o)
        atomic.write_json(groups_path, doc)

    run.stage("overlap", cfg["overlap"], ["cores"], [groups_path], make_groups)

    fused = root / "fused"

    def make_fused():
        from ..fusion.api import fuse_checkpoints

        fuse_checkpoints(
            [str(probes[t][0]) for t in tasks],
            labels=tasks,
            out=fused,
            base=str(base),
            masks=[str(cores / f"{t}.mask.safetensors") for t in tasks],
            conflict=cfg["fuse"]["conflict"],
            check=True,
            omega=cfg["fuse"]["omega"] if len(tasks) == 2 else None,
            tie_seed=cfg["core"]["tie_seed"],
        )

    run.stage("fuse", cfg["fuse"], ["cores"] + probe_stages, [fused], make_fused)
    fused_acc = _eval_stage(run, "fused", fused, ["fuse"], tests)

    retrained = root / "retrained"

    def make_retrain():
        r = cfg["retrain"]
        retrain(
            str(fused),
            str(groups_path),
            str(cores),
            {t: str(trains[t]) for t in tasks},
            retrained,
            cfg=_train_cfg(r, cfg["seed"]),
            per_task=r["per_task"],
        )

    run.stage("retrain", cfg["retrain"], ["fuse", "overlap"], [retrained], make_retrain)
    final = json.loads((retrained / "retrain.json").read_text())["final_model"]
    final_acc = _eval_stage(run, "cpi-ft", Path(final), ["retrain"], tests)
    groups = json.loads(groups_path.read_text())["groups"]
    return {
        "groups": groups,
        "groups_file": str(groups_path),
        "fused": str(fused),
        "final_model": final,
        "multi": {
            "fused": {"trained": tasks, "accuracy": str(fused_acc)},
            "cpi-ft": {"trained": tasks, "accuracy": str(final_acc)},
        },
    }


def _gallop(run: Run, base: Path, trains: dict, tests: dict) -> dict:
    from ..analysis.gallop import select_sparse
    from ..storage.checkpoint import Checkpoint
    from ..storage.scope import align
    from ..training.gradients import compute_gradients
    from ..training.staged import run_train

    cfg, root = run.cfg, run.root
    g = cfg["gallop"]
    runs = {}
    for i, t in enumerate(cfg["tasks"]):
        d = root / "gallop" / t
        grads, mask, model = d / "grads.safetensors", d / "mask.safetensors", d / "model"

        def make_grads(grads=grads, t=t):
            grads.parent.mkdir(parents=True, exist_ok=True)
            compute_gradients(str(base), str(trains[t]), grads, fraction=g["fraction"], seed=cfg["seed"])

        run.stage(f"gradients-{t}", {"fraction": g["fraction"], "seed": cfg["seed"]}, ["data"], [grads], make_grads)

        def make_mask(grads=grads, mask=mask):
            p, gr = Checkpoint.open(base), Checkpoint.open(grads)
            select_sparse(
                p,
                gr,
                align([p, gr]),
                rho=g["rho"],
                criteria=[g["criterion"]],
                main=g["criterion"],
                out=mask,
                seed=cfg["seed"],
                tie_seed=g["tie_seed"],
            )

        run.stage(
            f"mask-{t}",
            {"rho": g["rho"], "criterion": g["criterion"], "tie_seed": g["tie_seed"], "tie_rule": TIE_RULE},
            [f"gradients-{t}"],
            [mask],
            make_mask,
        )
        tc = _train_cfg(g, cfg["seed"] + i)
        run.stage(
            f"sparse-{t}",
            {k: g[k] for k in TRAIN_KEYS},
            [f"mask-{t}"],
            [model],
            lambda model=model, mask=mask, t=t, tc=tc: run_train(
                str(base), str(trains[t]), model, cfg=tc, mask=str(mask)
            ),
        )
        runs[f"{g['criterion']}:{t}"] = {
            "trained": t,
            "accuracy": str(_eval_stage(run, f"gallop-{t}", model, [f"sparse-{t}"], tests)),
        }
    return {"multi": {}, "sparse_runs": runs}


def _metrics(run: Run, vanilla: Path, summary: dict) -> dict:
    from ..evaluation.metrics import run_metrics

    van = _accuracy(vanilla)
    rows = {}
    every = {**summary["runs"], **summary.get("sparse_runs", {}), **summary.get("multi", {})}
    for name, r in every.items():
        table = _accuracy(Path(r["accuracy"]))
        rows[name] = run_metrics(van, table, r["trained"]) | {"accuracy": table}
    return {"vanilla": van, "metrics": rows}


def render_summary(summary: dict) -> str:
    lines = [
        f"{'run':<22} {'ID acc':>7} {'OOD acc':>8} {'forget':>7} {'collapse':>9}",
        f"{'vanilla':<22} {'':>7} {sum(summary['vanilla'][t] for t in summary['ood_tasks']) / max(1, len(summary['ood_tasks'])):>8.3f}",
    ]
    for name, m in summary["metrics"].items():
        fr = "n/a" if m["forget_ratio"] is None else f"{m['forget_ratio']:.3f}"
        lines.append(
            f"{name:<22} {m['id_accuracy']:>7.3f} {m['ood_accuracy'] or 0:>8.3f} {fr:>7} "
            f"{m['collapse_rate']:>6.2f} ({m['collapse_count']})"
        )
    if "groups" in summary:
        lines.append("groups (stage order): " + " | ".join(", ".join(g) for g in summary["groups"]))
    return "\n".join(lines)
