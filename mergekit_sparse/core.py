"""Core regions (CPI-FT stage 1, METHODS §2): the exact top-p % of |θ_task − θ_base|.

Passes over the checkpoints (each pass reads the base and every task once, one tensor at a time):
  global scope      3 passes (radix select: histogram, threshold bucket, emit masks)
  per-tensor scope  1 pass   (each tensor selects inside itself, in memory)
Several tasks share the passes, so the base is read once per pass whatever the task count.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .errors import NonFiniteError, OptionError
from .masks import MaskWriter
from .names import layer_key
from .scope import Scope
from .select import GlobalTopK, k_for, topk_mask
from .stats import hist_quantiles, key_histogram


class PerTensorTopK:
    """Same interface as GlobalTopK, for `per-tensor` scope: ⌊p·n/100⌋ inside each tensor, one pass."""

    passes = 1

    def __init__(self, percent: float, scope: Scope):
        k_for(percent, scope.numel(), what="p")            # validates the range
        self.percent = percent
        self.k = sum(int(percent * scope.numel(n) // 100) for n in scope.names)
        if self.k == 0:
            biggest = max(scope.numel(n) for n in scope.names)
            raise OptionError(f"--p {percent} selects no parameter in any tensor with --scope per-tensor; "
                              f"the smallest usable value is {100 / biggest:.3g}")
        self.selected = 0
        self.thresholds: dict[str, float] = {}

    def observe(self, name, scores) -> None:  # nothing to learn before selecting
        pass

    def next_pass(self) -> None:
        pass

    @property
    def threshold(self) -> float:
        return min(self.thresholds.values(), default=float("nan"))

    def select(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        mask, t = topk_mask(scores, int(self.percent * scores.numel() // 100))
        self.thresholds[name] = t
        self.selected += int(mask.sum())
        return mask


def make_selector(percent: float, scope: Scope, *, per_tensor: bool = False):
    if per_tensor:
        return PerTensorTopK(percent, scope)
    total = scope.numel()
    return GlobalTopK(k_for(percent, total, what="p"), total)


def abs_delta(base_f32: torch.Tensor, task: Checkpoint, name: str) -> torch.Tensor:
    """|θ_task − θ_base| for one tensor, float32, flattened (one new buffer)."""
    d = task.tensor(name).reshape(-1).to(torch.float32, copy=True)
    return d.sub_(base_f32).abs_()


def _nonfinite(name: str, ckpts: list[Checkpoint]) -> NonFiniteError:
    for c in ckpts:
        if not torch.isfinite(c.tensor(name).float()).all():
            return NonFiniteError(f"tensor '{name}' in {c.path} holds NaN/Inf values; fix or re-export that "
                                  "checkpoint (NaN/Inf would poison every selection and merge)")
    return NonFiniteError(f"tensor '{name}': the difference of two checkpoints overflows float32 (Inf)")


def prepare_selectors(base: Checkpoint, tasks: list[Checkpoint], scope: Scope, *, percent: float,
                      per_tensor: bool = False, progress: bool = False, desc: str = "core") -> list:
    """Run every pass but the last; returns selectors whose `select(name, delta)` emits masks."""
    selectors = [make_selector(percent, scope, per_tensor=per_tensor) for _ in tasks]
    passes = selectors[0].passes
    for p in range(passes - 1):
        for name in tqdm(scope.names, desc=f"{desc}: pass {p + 1}/{passes}", disable=not progress, leave=False):
            w0 = base.tensor(name).reshape(-1).float()
            for sel, task in zip(selectors, tasks):
                d = abs_delta(w0, task, name)
                if p == 0 and not torch.isfinite(d).all():
                    raise _nonfinite(name, [base, task])
                sel.observe(name, d)
        for sel in selectors:
            sel.next_pass()
    return selectors


@dataclass
class CoreSummary:
    """What one task's core region looks like."""

    task: str
    source: str
    selected: int
    total: int
    threshold: float
    per_tensor: dict[str, dict] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)
    delta_quantiles: dict[str, float] = field(default_factory=dict)
    mask_path: str | None = None

    def to_json(self) -> dict:
        return {"task": self.task, "source": self.source, "mask": self.mask_path, "selected": self.selected,
                "total": self.total, "share": self.selected / self.total, "threshold": self.threshold,
                "delta_quantiles": self.delta_quantiles, "per_layer_share": self.per_layer,
                "per_tensor": self.per_tensor}


def compute_cores(base: Checkpoint, tasks: list[Checkpoint], scope: Scope, *, percent: float,
                  out_dir: Path, labels: list[str], per_tensor: bool = False, force: bool = False,
                  progress: bool = False) -> list[CoreSummary]:
    """Write `<label>.mask.safetensors` per task into `out_dir` and return their summaries."""
    selectors = prepare_selectors(base, tasks, scope, percent=percent, per_tensor=per_tensor,
                                  progress=progress)
    meta_common = {"criterion": "delta", "percent": percent, "scope": "per-tensor" if per_tensor else "global",
                   "base": base.sources(), "total": scope.numel()}
    writers = []
    try:
        for sel, task, label in zip(selectors, tasks, labels):
            meta = {**meta_common, "task": label, "selected": sel.k, "threshold": sel.threshold,
                    "sources": [base.sources(), task.sources()]}
            writers.append(MaskWriter(out_dir / f"{label}.mask.safetensors", scope.shapes, meta, force=force,
                                      inputs=[base.path, task.path]))
        counts = [defaultdict(int) for _ in tasks]
        hists = [torch.zeros(1 << 16, dtype=torch.int64) for _ in tasks]
        per_tensor_counts: list[dict] = [{} for _ in tasks]
        for name in tqdm(scope.names, desc=f"core: pass {selectors[0].passes}/{selectors[0].passes}",
                         disable=not progress, leave=False):
            w0 = base.tensor(name).reshape(-1).float()
            for i, (sel, task, w) in enumerate(zip(selectors, tasks, writers)):
                d = abs_delta(w0, task, name)
                if sel.passes == 1 and not torch.isfinite(d).all():
                    raise _nonfinite(name, [base, task])
                mask = sel.select(name, d)
                hists[i] += key_histogram(d)
                w.write(name, mask.view(scope.shapes[name]))
                c = int(mask.sum())
                per_tensor_counts[i][name] = {"selected": c, "numel": d.numel()}
                counts[i][layer_key(name)] += c
        for w in writers:
            w.__exit__(None, None, None)
    except BaseException as e:
        for w in writers:
            w.__exit__(type(e), e, None)
        raise
    layer_sizes: dict[str, int] = defaultdict(int)
    for name in scope.names:
        layer_sizes[layer_key(name)] += scope.numel(name)
    out = []
    for i, (sel, task, label) in enumerate(zip(selectors, tasks, labels)):
        assert sel.selected == sel.k, "selector emitted a count other than k"
        out.append(CoreSummary(
            task=label, source=str(task.path), selected=sel.selected, total=scope.numel(),
            threshold=sel.threshold, per_tensor=per_tensor_counts[i],
            per_layer={k: counts[i][k] / layer_sizes[k] for k in layer_sizes},
            delta_quantiles=hist_quantiles(hists[i]), mask_path=str(out_dir / f"{label}.mask.safetensors")))
    return out


def write_core_json(path: Path, summaries: list[CoreSummary], settings: dict, scope: Scope) -> None:
    data = {"settings": settings, "scope": scope.to_json(), "tasks": [s.to_json() for s in summaries]}
    path.write_text(json.dumps(data, indent=2))
