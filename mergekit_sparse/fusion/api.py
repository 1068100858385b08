"""Glue for `sparsemerge fuse`: open inputs, validate options, call `fusion.fuse`, describe the result."""

from __future__ import annotations

from pathlib import Path

from ..storage import dtypes
from ..storage.checkpoint import Checkpoint, task_labels
from ..errors import OptionError
from .driver import fuse
from ..storage.masks import MaskSet
from ..storage.scope import align
from ..storage.writer import parse_size


def run_fuse(tasks: list[str], *, base: str | None, percent: float, per_tensor: bool, masks: list[str],
             out: Path | None, omega: float | None, weights: str | None, conflict: str, onto: str | None,
             dtype: str | None, shard_size: str | None, check: bool, include=(), exclude=(),
             allow_pickle: bool = False, force: bool = False, progress: bool = False) -> dict:
    labels = task_labels(tasks)
    task_cks = [Checkpoint.open(t, allow_pickle=allow_pickle) for t in tasks]
    base_ck = Checkpoint.open(base, allow_pickle=allow_pickle) if base else None
    if onto is None:
        onto_ck, onto_idx = task_cks[-1], len(task_cks) - 1
    else:
        onto_ck = Checkpoint.open(onto, allow_pickle=allow_pickle)
        same = [i for i, c in enumerate(task_cks) if c.path.resolve() == onto_ck.path.resolve()]
        onto_idx = same[0] if same else None
    n_models = len(task_cks) + (onto_idx is None)
    if n_models < 2:
        raise OptionError("fuse needs at least two models: give two or more tasks, or --onto a separate model")
    w = None
    if omega is not None:
        if n_models != 2:
            raise OptionError(f"--omega is for two models; with {n_models} use --weights")
        w = [omega, 1 - omega] if onto_idx == 1 else ([1 - omega, omega] if onto_idx == 0 else [omega, 1 - omega])
    elif weights:
        try:
            w = [float(x) for x in weights.split(",")]
        except ValueError:
            raise OptionError(f"--weights {weights!r} must be comma-separated numbers, e.g. 1,1,2") from None
    mask_sets = None
    if masks:
        if len(masks) != len(task_cks):
            raise OptionError(f"--masks needs one mask file per task: {len(task_cks)} tasks, {len(masks)} masks")
        mask_sets = [MaskSet.load(m) for m in masks]
    cks = [c for c in [base_ck, onto_ck] if c is not None] + task_cks
    scope = align(cks, include=include, exclude=exclude)
    folder = onto_ck.folder is not None
    out = Path(out) if out else Path("fused" if folder else "fused.safetensors")
    if not folder and out.suffix != ".safetensors":
        raise OptionError(f"output {out} should end in .safetensors (the fusion base is a single file)")
    settings = {"tasks": [c.sources() for c in task_cks], "base": base_ck.sources() if base_ck else None,
                "onto": onto_ck.sources(), "p": None if masks else percent,
                "core_scope": "per-tensor" if per_tensor else "global", "masks": list(masks), "weights": w,
                "omega": omega, "conflict": conflict, "dtype": dtype, "include": list(include),
                "exclude": list(exclude), "scope": scope.to_json()}
    report = fuse(task_cks, labels, onto=onto_ck, onto_is_task=onto_idx, scope=scope, out=out, base=base_ck,
                  masks=mask_sets, percent=percent, per_tensor=per_tensor, weights=w, conflict=conflict,
                  dtype=dtypes.code_of(dtype) if dtype else None,
                  shard_bytes=parse_size(shard_size) if shard_size else None, force=force, progress=progress,
                  check=check, settings=settings)
    return {"output": str(out), "settings": settings, "counts": report.to_json(),
            "checked": bool(check and folder)}
