"""`fuse_checkpoints`: the one entry point of a fusion, for the CLI and the pipeline alike.

It opens the inputs, validates every option in one place (before any tensor is read), builds the
settings record, and runs the streaming driver. Callers print or store what it returns.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import MismatchError, OptionError
from ..storage import dtypes
from ..storage.base import BASE_KEY, record_for, resolve_base
from ..storage.checkpoint import Checkpoint, split_task_spec, split_task_specs
from ..storage.masks import MaskSet
from ..storage.modelcard import write_card
from ..storage.scope import align
from ..storage.writer import parse_size
from .driver import fuse
from .maths import POLICIES


def _weights(omega: float | None, weights, n_models: int, onto_idx: int | None) -> list[float] | None:
    """The fold weights from --omega (two models) or --weights, validated."""
    if omega is not None and weights:
        raise OptionError("give either --omega (two models) or --weights, not both")
    if omega is not None:
        if not (isinstance(omega, (int, float)) and math.isfinite(omega) and 0 <= omega <= 1):
            raise OptionError(f"--omega {omega!r} is out of range; give a number in [0, 1], e.g. --omega 0.5")
        if n_models != 2:
            raise OptionError(f"--omega is for two models; with {n_models} use --weights")
        # SLERP(θ_b, θ_a, ω): the fusion base weighs 1 − ω, the other model ω
        return [1 - omega, omega] if onto_idx == 0 else [omega, 1 - omega]
    if not weights:
        return None
    if isinstance(weights, str):
        try:
            weights = [float(x) for x in weights.split(",")]
        except ValueError:
            raise OptionError(f"--weights {weights!r} must be comma-separated numbers, e.g. 1,1,2") from None
    w = [float(x) for x in weights]
    if not all(math.isfinite(x) for x in w):
        raise OptionError(f"--weights {weights!r} must be finite numbers")
    return w


def _check_masks_match(mask_sets: list[MaskSet], task_cks: list[Checkpoint], labels: list[str]) -> None:
    """Each core mask must be the one its task's checkpoint was cored from (METHODS §3: its recorded task
    fingerprint), so masks given in another order than the tasks are an error, not a silent swap."""
    recorded = []
    for m in mask_sets:
        src = m.meta.get("sources")
        ok = m.meta.get("criterion") == "delta" and isinstance(src, list) and len(src) == 2
        recorded.append(src[1].get("fingerprint") if ok and isinstance(src[1], dict) else None)
    if not any(recorded):
        return  # masks written before fingerprints, or not cores: nothing to match them by
    prints = [c.content_fingerprint() for c in task_cks]
    for i, (m, fp) in enumerate(zip(mask_sets, recorded)):
        if fp is None or fp == prints[i]:
            continue
        other = next((j for j, p in enumerate(prints) if p == fp), None)
        if other is not None:
            raise MismatchError(
                f"mask {m.path} was made for task {labels[other]} ({task_cks[other].path}) but is given for task "
                f"{labels[i]} ({task_cks[i].path}); give --masks in the order of the tasks"
            )
        raise MismatchError(
            f"mask {m.path} was made from {m.meta['sources'][1].get('path')}, not from task {labels[i]} "
            f"({task_cks[i].path}, whose content differs); recompute the cores with `sparsemerge core`"
        )


def fuse_checkpoints(
    tasks: list[str],
    *,
    out: str | Path | None = None,
    base: str | None = None,
    percent: float = 1.0,
    per_tensor: bool = False,
    masks: list[str] = (),
    omega: float | None = None,
    weights=None,
    conflict: str = "max-delta",
    onto: str | None = None,
    dtype: str | None = None,
    shard_size: str | None = None,
    check: bool = True,
    include=(),
    exclude=(),
    labels: list[str] | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    progress: bool = False,
    tie_seed: int = 0,
) -> dict:
    """Fuse the task checkpoints (SLERP of whole tensors, then every task's core written back).

    Cores come from `masks` (one mask file per task) or from `base` and `percent` (computed on the
    fly). The fusion base is `onto`, by default the last task. `weights` is a list or a
    comma-separated string (one per task, then one for a separate `onto`); `omega` is the two-model
    shorthand SLERP(θ_b, θ_a, ω). Returns {"output", "settings", "counts", "checked"}.
    """
    if conflict not in POLICIES:
        raise OptionError(f"--conflict {conflict!r} is not one of {', '.join(POLICIES)}")
    if not masks and not (isinstance(percent, (int, float)) and math.isfinite(percent) and 0 < percent <= 100):
        raise OptionError(f"--p {percent!r} is out of range; give a percentage in (0, 100], e.g. --p 1")
    names, paths = split_task_specs(tasks)
    if masks and len(masks) != len(paths):
        raise OptionError(f"--masks needs one mask file per task: {len(paths)} tasks, {len(masks)} masks")
    labels = list(labels) if labels else names
    masks = [split_task_spec(m)[1] for m in masks]
    task_cks = [Checkpoint.open(t, allow_pickle=allow_pickle) for t in paths]
    base_ck, base_how = Checkpoint.open(base, allow_pickle=allow_pickle) if base else None, None
    if base_ck is not None or not masks or conflict == "max-delta":  # cores or |Δ| need θ⁰ (METHODS §9)
        base_ck, base_how = resolve_base(
            task_cks,
            base_ck,
            force=force,
            allow_pickle=allow_pickle,
            hint=" (cores = top --p % of |Δ|), or give --masks M1 M2 ... from `sparsemerge core`",
        )
    if onto is None:
        onto_ck, onto_idx = task_cks[-1], len(task_cks) - 1
    else:
        onto_ck = Checkpoint.open(onto, allow_pickle=allow_pickle)
        same = [i for i, c in enumerate(task_cks) if c.path.resolve() == onto_ck.path.resolve()]
        onto_idx = same[0] if same else None
        if same:
            onto_ck = task_cks[onto_idx]  # one checkpoint, read (and fingerprinted) once
    n_models = len(task_cks) + (onto_idx is None)
    if n_models < 2:
        raise OptionError("fuse needs at least two models: give two or more tasks, or --onto a separate model")
    w = _weights(omega, weights, n_models, onto_idx)
    mask_sets = None
    if masks:
        if len(masks) != len(task_cks):
            raise OptionError(f"--masks needs one mask file per task: {len(task_cks)} tasks, {len(masks)} masks")
        mask_sets = [MaskSet.load(m) for m in masks]
        _check_masks_match(mask_sets, task_cks, labels)
    cks = [c for c in [base_ck, onto_ck] if c is not None] + task_cks
    scope = align(cks, include=include, exclude=exclude)
    folder = onto_ck.folder is not None
    out = Path(out) if out else Path("fused" if folder else "fused.safetensors")
    if not folder and out.suffix != ".safetensors":
        raise OptionError(f"output {out} should end in .safetensors (the fusion base is a single file)")
    for ck in {c.path.resolve(): c for c in cks}.values():  # hashed on second threads while the passes read the pages
        ck.start_fingerprint()
    settings = {
        "base_found": base_how,
        "p": None if masks else percent,
        "core_scope": "per-tensor" if per_tensor else "global",
        "masks": [str(m) for m in masks],
        "weights": w,
        "omega": omega,
        "conflict": conflict,
        "dtype": dtype,
        "include": list(include),
        "exclude": list(exclude),
        "scope": scope.to_json(),
        "tie_seed": tie_seed,
    }
    provenance: dict = {}

    def full_settings() -> dict:  # the inputs' content fingerprints, known once hashed (METHODS §3)
        if not provenance:
            provenance.update(
                tasks=[c.sources() for c in task_cks],
                base=base_ck.sources() if base_ck else None,
                onto=onto_ck.sources(),
            )
        return {**provenance, **settings}

    record: dict = {}

    def base_record() -> dict:  # METHODS §9, once the base's fingerprint (hashed meanwhile) is known
        if not record:
            record.update(record_for(base_ck, out, spec=base))
        return record

    card_settings = {k: settings[k] for k in ("p", "core_scope", "weights", "omega", "conflict", "tie_seed")}
    report = fuse(
        task_cks,
        labels,
        onto=onto_ck,
        onto_is_task=onto_idx,
        scope=scope,
        out=out,
        base=base_ck,
        masks=mask_sets,
        percent=percent,
        per_tensor=per_tensor,
        weights=w,
        conflict=conflict,
        dtype=dtypes.code_of(dtype) if dtype else None,
        shard_bytes=parse_size(shard_size) if shard_size else None,
        force=force,
        progress=progress,
        check=check,
        settings=full_settings,
        tie_seed=tie_seed,
        metadata=base_record if base_ck is not None else None,
        card=lambda: write_card(
            base_record()[BASE_KEY] if base_ck is not None else None,
            "CPI-FT fusion",
            card_settings | {"tasks": labels, "masks": list(masks)},
        ),
    )
    return {
        "output": str(out),
        "settings": full_settings(),
        "counts": report.to_json(),
        "checked": bool(check and folder),
    }
