"""Fusion (CPI-FT stage 3, METHODS §5): SLERP of whole tensors, then every task's core overwritten.

Pure maths first (`slerp`, `slerp_coefficients`, `overwrite_cores`), then the streaming driver.
The driver keeps one float32 output buffer per tensor and reads inputs in chunks from the
memory-mapped files, so anonymous memory stays near one float32 copy of the largest tensor.

Passes: with cores computed on the fly from `--base/--p`, a sampling pass and a counting pass
(base + tasks; see `select`) and the fusion pass; with mask files, the fusion pass only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .core import PerTensorTopK, prepare_selectors
from .errors import NonFiniteError, OptionError
from .masks import MaskSet
from .scope import Scope
from .select import chunk_ranges
from .writer import CheckpointWriter, check_output

EPS = 1e-8
DOT_THRESHOLD = 0.9995
POLICIES = ("max-delta", "last", "mean")


def slerp_coefficients(norm0: float, norm1: float, dot: float, t: float,
                       dot_threshold: float = DOT_THRESHOLD) -> tuple[float, float, bool]:
    """(c0, c1, linear) such that SLERP(v0, v1, t) = c0·v0 + c1·v1, from ‖v0‖, ‖v1‖ and ⟨v0, v1⟩.

    Norms below EPS leave the vector unnormalised, as mergekit's `normalize` does.
    """
    d = dot / ((norm0 if norm0 > EPS else 1.0) * (norm1 if norm1 > EPS else 1.0))
    if abs(d) > dot_threshold:                                    # nearly colinear: lerp
        return 1.0 - t, t, True
    omega = math.acos(max(-1.0, min(1.0, d)))
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s, False


def slerp(v0: Tensor, v1: Tensor, t: float, *, dot_threshold: float = DOT_THRESHOLD) -> Tensor:
    """Spherical interpolation of two same-shape tensors, computed in float32, cast to v0's dtype."""
    a, b = v0.reshape(-1).float(), v1.reshape(-1).float()                 # (n,)
    c0, c1, _ = slerp_coefficients(float(a.norm()), float(b.norm()), float(torch.dot(a, b)), t, dot_threshold)
    return (c0 * a + c1 * b).view(v0.shape).to(v0.dtype)


def fold_weights(weights: list[float]) -> list[float]:
    """t for each fold: weights[0] is the fusion base's, t_m = w_m / (w_0 + ... + w_m)."""
    out, acc = [], weights[0]
    for w in weights[1:]:
        acc += w
        out.append(w / acc if acc > 0 else 0.0)
    return out


def overwrite_cores(out: Tensor, values: list[Tensor], masks: list[Tensor], deltas: list[Tensor] | None,
                    policy: str) -> tuple[list[int], Tensor]:
    """Write each task's core positions into `out` (float32, in place); returns (won per task, covered count).

    Positions in several cores are resolved by `policy`: `max-delta` (largest |Δ| wins, first task
    on a tie), `last` (the later task wins) or `mean` (the mean of the covering tasks' values).
    """
    covered = torch.zeros(out.shape, dtype=torch.int32)
    won = [0] * len(values)
    if policy == "mean":
        acc = torch.zeros_like(out)
        for v, m in zip(values, masks):
            acc += torch.where(m, v, 0.0)
            covered += m
        hit = covered > 0
        out[hit] = acc[hit] / covered[hit]
        return [int(m.sum()) for m in masks], covered
    best = torch.full(out.shape, -1.0) if policy == "max-delta" else None
    winner = torch.full(out.shape, -1, dtype=torch.int64)
    for i, (v, m) in enumerate(zip(values, masks)):
        covered += m
        take = m & (deltas[i] > best) if policy == "max-delta" else m
        out[take] = v[take]
        winner[take] = i
        if best is not None:
            best[take] = deltas[i][take]
    for i in range(len(values)):
        won[i] = int((winner == i).sum())
    return won, covered


@dataclass
class FuseReport:
    """What a fusion did, for fuse.json."""

    tasks: list[str]
    onto: str
    t_values: list[float]
    overwritten: dict[str, int] = field(default_factory=dict)
    conflicts: dict[str, int] = field(default_factory=dict)
    interpolated: int = 0
    core_positions: int = 0
    linear_tensors: list[str] = field(default_factory=list)
    copied_tensors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def fuse(tasks: list[Checkpoint], labels: list[str], *, onto: Checkpoint, onto_is_task: int | None,
         scope: Scope, out: Path, base: Checkpoint | None = None, masks: list[MaskSet] | None = None,
         percent: float | None = None, per_tensor: bool = False, weights: list[float] | None = None,
         conflict: str = "max-delta", dtype: torch.dtype | None = None, shard_bytes: int | None = None,
         force: bool = False, metadata: dict[str, str] | None = None, progress: bool = False,
         check: bool = False, settings: dict | None = None) -> FuseReport:
    """Fuse `tasks` onto `onto` and stream the result to `out` (file or HF folder, like `onto`).

    `onto_is_task` is the index of `onto` in `tasks` when the fusion base is a task model.
    Core masks come from `masks` (one per task) or are computed from `base` and `percent`.
    `weights` has one entry per task (plus one for an external `onto`, last); default equal.
    `check` loads a folder output with transformers before it is renamed into place. A folder
    output gets `fuse.json` (settings and counts); a file output gets `<out>.fuse.json` beside it.
    """
    if conflict not in POLICIES:
        raise OptionError(f"--conflict {conflict!r} is not one of {', '.join(POLICIES)}")
    if conflict == "max-delta" and base is None:
        raise OptionError("--conflict max-delta needs the pretrained model to measure |Δ|: give --base BASE, "
                          "or choose --conflict last or --conflict mean")
    inputs = [c.path for c in tasks] + [onto.path] + ([base.path] if base else [])
    check_output(out, inputs, force=force)                # fail before any pass, not after
    others = [i for i in range(len(tasks)) if i != onto_is_task]
    n_w = len(tasks) + (0 if onto_is_task is not None else 1)
    weights = list(weights) if weights else [1.0] * n_w
    if len(weights) != n_w or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise OptionError(f"--weights needs {n_w} non-negative numbers (one per task"
                          + ("" if onto_is_task is not None else ", then one for --onto") + f"), got {weights}")
    w_onto = weights[onto_is_task] if onto_is_task is not None else weights[-1]
    t_values = fold_weights([w_onto] + [weights[i] for i in others])
    if masks is not None:
        for m, label in zip(masks, labels):
            m.check_fits(scope.shapes, f"the models being fused (task {label})")
        selectors = None
    else:
        selectors = prepare_selectors(base, tasks, scope, percent=percent, per_tensor=per_tensor,
                                      progress=progress, desc="fuse")
    report = FuseReport(tasks=labels, onto=str(onto.path), t_values=t_values)
    report.overwritten = {label: 0 for label in labels}
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    conflicts = {p: 0 for p in pairs}
    plan = [(n, dtype if (dtype is not None and i.is_float) else i.dtype, i.shape) for n, i in onto.infos.items()]
    folder = onto.folder is not None
    validate = None
    if check and folder:
        from .sanity import check_model_folder
        validate = check_model_folder
    with CheckpointWriter(out, plan, folder=folder, shard_bytes=shard_bytes, metadata=metadata,
                          reference=onto.folder, inputs=inputs, force=force, config_dtype=dtype,
                          validate=validate) as writer:
        for name, out_dtype, shape in tqdm(plan, desc="fuse", disable=not progress, leave=False):
            if name not in scope.shapes:
                report.copied_tensors.append(name)
                writer.write(name, onto.tensor(name).to(out_dtype))
                continue
            writer.write_chunks(name, _fuse_tensor(name, tasks, others, onto, t_values, base, masks, selectors,
                                                   conflict, report, conflicts, out_dtype))
        report.conflicts = {f"{labels[i]}~{labels[j]}": c for (i, j), c in conflicts.items()}
        record = json.dumps({"settings": settings or {}, "counts": report.to_json()}, indent=2)
        if folder:
            writer.add_file("fuse.json", record)
    if not folder:
        Path(f"{out}.fuse.json").write_text(record)
    return report


def fold_coefficients(gram: list[list[float]], t_values: list[float]) -> tuple[list[float], list[bool]]:
    """SLERP fold of models 1..M-1 into model 0 as one linear combination Σ a_i θ_i.

    `gram[i][j]` = ⟨θ_i, θ_j⟩. Each fold's SLERP only needs ‖result‖, ‖θ_m‖ and ⟨result, θ_m⟩, and the
    running result is linear in the inputs, so those come from the Gram matrix: the whole fold is
    known before any output value is computed, and the output is then made chunk by chunk.
    """
    a = [1.0] + [0.0] * (len(gram) - 1)
    linear = []
    for m, t in enumerate(t_values, start=1):
        dot = sum(a[i] * gram[i][m] for i in range(len(a)))
        sq0 = sum(a[i] * a[j] * gram[i][j] for i in range(len(a)) for j in range(len(a)))
        c0, c1, lin = slerp_coefficients(math.sqrt(max(sq0, 0.0)), math.sqrt(gram[m][m]), dot, t)
        a = [c0 * x for x in a]
        a[m] += c1
        linear.append(lin)
    return a, linear


def _fuse_tensor(name, tasks, others, onto, t_values, base, masks, selectors, conflict, report, conflicts, out_dtype):
    """Yield the fused tensor chunk by chunk (already cast): SLERP fold, then core overwrite.

    Two sweeps over the (memory-mapped) inputs: the Gram matrix of the models, then the output.
    """
    models = [onto.tensor(name).reshape(-1)] + [tasks[i].tensor(name).reshape(-1) for i in others]
    n = models[0].numel()
    M = len(models)
    gram = [[0.0] * M for _ in range(M)]
    for s, e in chunk_ranges(n):
        v = [m[s:e].float() for m in models]
        for i in range(M):
            for j in range(i, M):
                gram[i][j] += float(torch.dot(v[i], v[j]))
    for i in range(M):
        for j in range(i):
            gram[i][j] = gram[j][i]
    coeffs, linear = fold_coefficients(gram, t_values)
    if any(linear) and name not in report.linear_tensors:
        report.linear_tensors.append(name)
    full_masks = None
    if selectors is not None and isinstance(selectors[0], PerTensorTopK):   # needs whole tensors
        w0 = base.tensor(name).reshape(-1).float()
        full_masks = [sel.select(name, 0, (t.tensor(name).reshape(-1).float() - w0).abs()) for sel, t in
                      zip(selectors, tasks)]
    raw = [t.tensor(name).reshape(-1) for t in tasks]
    packed = [m.bool(name).reshape(-1) for m in masks] if masks is not None else None
    w0_raw = base.tensor(name).reshape(-1) if base is not None else None
    # the models of the fold are the tasks (and the fusion base, when it is not one of them): convert
    # each input chunk once and use it for both the fold and the core overwrite
    onto_task = next((i for i in range(len(tasks)) if i not in others), None)
    for s, e in chunk_ranges(n):
        values = [r[s:e].float() for r in raw]
        onto_chunk = values[onto_task] if onto_task is not None else models[0][s:e].float()
        fused = onto_chunk * coeffs[0]                                                  # (e - s,)
        for a, i in zip(coeffs[1:], others):
            fused.add_(values[i], alpha=a)
        w0 = w0_raw[s:e].float() if w0_raw is not None else None
        deltas = [(v - w0).abs() for v in values] if w0 is not None else None
        if packed is not None:
            chunk_masks = [m[s:e] for m in packed]
        elif full_masks is not None:
            chunk_masks = [m[s:e] for m in full_masks]
        else:
            chunk_masks = [sel.select(name, s, d) for sel, d in zip(selectors, deltas)]
        won, covered = overwrite_cores(fused, values, chunk_masks, deltas, conflict)
        for i, w in enumerate(won):
            report.overwritten[report.tasks[i]] += w
        for (i, j) in conflicts:
            conflicts[(i, j)] += int((chunk_masks[i] & chunk_masks[j]).sum())
        report.core_positions += int((covered > 0).sum())
        report.interpolated += int((covered == 0).sum())
        if not torch.isfinite(fused).all():
            raise NonFiniteError(f"fused tensor '{name}' holds NaN/Inf; an input holds NaN/Inf values there "
                                 "(check the inputs with `sparsemerge inspect`)")
        yield fused.to(out_dtype)
