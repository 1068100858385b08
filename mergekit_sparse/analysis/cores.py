"""Core regions (CPI-FT stage 1, METHODS §2): the exact top-p % of |θ_task − θ_base|.

Passes over the checkpoints (each reads the base and every task, tensor by tensor, in chunks):
  global scope      a sampling pass (~2 % of each tensor, in blocks) and one full pass that counts,
                    collects the candidates near the threshold and writes the sure bits; the chosen
                    candidates are then patched into the mask files. Should the sampled window
                    miss, two radix passes and a selection pass follow (see `select`).
  per-tensor scope  one pass (each tensor selects inside itself, in memory)
Several tasks share every pass, so the base is read once per pass whatever the task count.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..selection.keys import hist_quantiles, key_histogram
from ..selection.passes import Buffers, chunk_ranges, nonfinite_error, run_passes
from ..selection.topk import make_selector, tie_summary
from ..storage import atomic, dtypes
from ..storage.checkpoint import Checkpoint
from ..storage.masks import TIE_PREFIX, MaskWriter, pack
from ..storage.scope import Scope
from .names import layer_key, sorted_layers


def delta_chunks(base: Checkpoint, tasks: list[Checkpoint], *, lazy: bool = False):
    """chunks(name, ranges) -> (start, [|θ_task − θ_base| for each task]) per range, float32 numpy arrays
    (read lazily). The yielded arrays are scratch buffers, valid until the next chunk: consumers copy
    what they keep. `lazy`: full-pass chunks give each task's |Δ| as a callable instead, so the worker
    that counts a task also converts it (`run_passes` calls them; the base is converted once a chunk)."""
    bufs = Buffers()

    def delta(t: Checkpoint, i: int, name: str, s: int, e: int, w0: np.ndarray) -> np.ndarray:
        d = t.float32(name, s, e, out=bufs.get(i + 1, e - s))
        return np.abs(np.subtract(d, w0, out=d), out=d)

    def chunks(name: str, ranges, gather: bool = False):
        if gather:  # every range at once, concatenated (few ops for many sample blocks)
            w0 = _gather(base, name, ranges)
            out = []
            for t in tasks:
                d = _gather(t, name, ranges)
                out.append(np.abs(np.subtract(d, w0, out=d), out=d))
            yield ranges[0][0], out
            return
        for s, e in ranges:
            w0 = base.float32(name, s, e, out=bufs.get(0, e - s))
            if lazy:
                yield s, [functools.partial(delta, t, i, name, s, e, w0) for i, t in enumerate(tasks)]
            else:
                yield s, [delta(t, i, name, s, e, w0) for i, t in enumerate(tasks)]  # (e - s,) each

    return chunks


def _gather(ckpt: Checkpoint, name: str, ranges) -> np.ndarray:
    """The ranges of a flat tensor, concatenated, as a new float32 array (callers work in place)."""
    raw = ckpt.array(name).reshape(-1)
    code = ckpt.infos[name].code
    if len(ranges) == 1:
        s, e = ranges[0]
        return dtypes.to_float32(raw[s:e], code)
    size = ranges[0][1] - ranges[0][0]
    starts = np.array([s for s, _ in ranges], dtype=np.int64)
    if all(e - s == size for s, e in ranges) and not (starts % size).any():  # aligned blocks
        picked = raw[: raw.size // size * size].reshape(-1, size)[starts // size]
    else:
        picked = np.concatenate([raw[s:e] for s, e in ranges])
    return dtypes.to_float32(picked.reshape(-1), code)


def prepare_selectors(
    base: Checkpoint,
    tasks: list[Checkpoint],
    scope: Scope,
    *,
    percent: float,
    per_tensor: bool = False,
    progress: bool = False,
    desc: str = "core",
    sample_only: bool = False,
    selectors: list | None = None,
    tie_seed: int = 0,
) -> list:
    """Selectors that have seen every pass they need; `select(name, start, delta_chunk)` emits masks.
    With `sample_only` they stop before their first full pass (the caller then makes the count pass
    itself, as fusion does); passing those `selectors` back in finishes their remaining passes."""
    if selectors is None:
        selectors = [make_selector(percent, scope, per_tensor=per_tensor, seed=tie_seed) for _ in tasks]
    run_passes(
        selectors,
        scope,
        delta_chunks(base, tasks, lazy=True),
        sources=[[base, t] for t in tasks],
        progress=progress,
        desc=desc,
        sample_only=sample_only,
        gathers=True,
    )
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
    full_passes: int = 1
    ties: dict = field(default_factory=dict)  # METHODS §2: threshold, ties, tie_picks, p_strict, tie seed

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "source": self.source,
            "mask": self.mask_path,
            "selected": self.selected,
            "total": self.total,
            "share": self.selected / self.total,
            "threshold": self.threshold,
            "full_passes": self.full_passes,
            "ties": self.ties,
            "delta_quantiles": self.delta_quantiles,
            "per_layer_share": self.per_layer,
            "per_tensor": self.per_tensor,
        }


def compute_cores(
    base: Checkpoint,
    tasks: list[Checkpoint],
    scope: Scope,
    *,
    percent: float,
    out_dir: Path,
    labels: list[str],
    per_tensor: bool = False,
    force: bool = False,
    progress: bool = False,
    tie_seed: int = 0,
    side_files=None,
) -> list[CoreSummary]:
    """Write `<label>.mask.safetensors` per task into `out_dir` and return their summaries; `side_files`
    (summaries -> {path: text}, e.g. core.json) are committed together with the masks."""
    selectors = [make_selector(percent, scope, per_tensor=per_tensor, seed=tie_seed) for _ in tasks]
    meta_common = {
        "criterion": "delta",
        "tie_seed": tie_seed,
        "percent": percent,
        "scope": "per-tensor" if per_tensor else "global",
        "base": {"path": str(base.path)},  # the content fingerprints are filled in at commit (METHODS §3)
        "total": scope.numel(),
    }
    for ck in (base, *tasks):  # hashed on a second thread while the passes read the same pages
        ck.start_fingerprint()

    def open_writers():
        return [
            MaskWriter(
                out_dir / f"{label}.mask.safetensors",
                scope.shapes,
                {**meta_common, "task": label, "selected": sel.k, "sources": [{"path": str(t.path)}]},
                force=force,
                inputs=[base.path, t.path],
                tie_bits=True,
            )
            for sel, t, label in zip(selectors, tasks, labels)
        ]

    counts = [dict() for _ in tasks]  # name -> selected
    hists = [np.zeros(1 << 16, dtype=np.int64) for _ in tasks]
    writers: list[MaskWriter] = []
    try:
        if per_tensor:
            writers = open_writers()
            for name in tqdm(scope.names, desc="core", disable=not progress, leave=False):
                ((_, deltas),) = delta_chunks(base, tasks)(name, [(0, scope.numel(name))])
                for i, (sel, d) in enumerate(zip(selectors, deltas)):
                    if not np.isfinite(d).all():
                        raise nonfinite_error(name, [base, tasks[i]])
                    mask = sel.select(name, 0, d)
                    hists[i] += key_histogram(d)
                    writers[i].write(name, mask.view(scope.shapes[name]))
                    writers[i].write_ties_packed(name, pack(mask.numpy().reshape(-1) & (d == sel.thresholds[name])))
                    counts[i][name] = int(mask.sum())
        else:
            writers = open_writers()
            pending: list[list[np.ndarray]] = [[] for _ in tasks]
            pending_ties: list[list[np.ndarray]] = [[] for _ in tasks]

            def emit(i, name, start, sel, m, n):  # the count pass writes the sure bits
                pending[i].append(pack(sel.preliminary(m)))  # packs a copy: the mask is a scratch buffer
                pending_ties[i].append(pack(sel.preliminary_ties(m)))
                counts[i][name] = counts[i].get(name, 0) + len(sel.sure_positions())
                if start + m == n:
                    writers[i].write_packed(name, np.concatenate(pending[i]))
                    writers[i].write_ties_packed(name, np.concatenate(pending_ties[i]))
                    pending[i], pending_ties[i] = [], []

            run_passes(
                selectors,
                scope,
                delta_chunks(base, tasks, lazy=True),
                sources=[[base, t] for t in tasks],
                progress=progress,
                desc="core",
                emit=emit,
                gathers=True,
            )
            if all(sel.chosen() is not None for sel in selectors):
                for i, sel in enumerate(selectors):
                    for name, pos in sel.chosen().items():
                        writers[i].set_bits(name, pos)
                        counts[i][name] += len(pos)
                    if not sel.ties_at_hi:  # the sure entries at hi were above the threshold after all
                        writers[i].clear_ties()
                    for name, pos in sel.tie_extra.items():
                        writers[i].set_bits(TIE_PREFIX + name, pos)
                    sel.selected = sel.k
            else:  # a window missed (or p = 100): one selection pass
                import torch

                for w in writers:
                    w.discard()
                writers, counts = open_writers(), [dict() for _ in tasks]
                for name in tqdm(scope.names, desc="core: select", disable=not progress, leave=False):
                    parts, tie_parts = [[] for _ in tasks], [[] for _ in tasks]
                    for start, deltas in delta_chunks(base, tasks)(name, chunk_ranges(scope.numel(name))):
                        for i, (sel, d) in enumerate(zip(selectors, deltas)):
                            parts[i].append(sel.select(name, start, d))
                            tie_parts[i].append(parts[i][-1].numpy() & (d == sel.threshold))
                    for i in range(len(tasks)):
                        mask = torch.cat(parts[i])
                        writers[i].write(name, mask.view(scope.shapes[name]))
                        writers[i].write_ties_packed(name, pack(np.concatenate(tie_parts[i])))
                        counts[i][name] = int(mask.sum())
            for i, sel in enumerate(selectors):
                if sel.sample_values.size:
                    hists[i] += key_histogram(sel.sample_values)
        for w, sel in zip(writers, selectors):
            ties = {k: v for k, v in tie_summary(sel, scope.numel(), seed=tie_seed).items() if k != "warning"}
            w.update_meta(threshold=sel.threshold, selected=sel.k, ties=ties)
        for w, t in zip(writers, tasks):
            w.update_meta(base=base.sources(), sources=[base.sources(), t.sources()])
        finished = [w.finish() for w in writers]
    except BaseException:
        for w in writers:
            w.discard()
        raise
    layer_sizes: dict[str, int] = defaultdict(int)
    for name in scope.names:
        layer_sizes[layer_key(name)] += scope.numel(name)
    out = []
    for i, (sel, task, label) in enumerate(zip(selectors, tasks, labels)):
        total_sel = sum(counts[i].values())
        if total_sel != sel.k:
            raise RuntimeError(f"core of {label}: selected {total_sel} instead of k = {sel.k}; this is a bug")
        per_layer = defaultdict(int)
        for name, c in counts[i].items():
            per_layer[layer_key(name)] += c
        out.append(
            CoreSummary(
                task=label,
                source=str(task.path),
                selected=total_sel,
                total=scope.numel(),
                threshold=sel.threshold,
                per_tensor={n: {"selected": counts[i].get(n, 0), "numel": scope.numel(n)} for n in scope.names},
                per_layer=sorted_layers({k: per_layer[k] / layer_sizes[k] for k in layer_sizes}),
                delta_quantiles=hist_quantiles(hists[i]),
                mask_path=str(out_dir / f"{label}.mask.safetensors"),
                full_passes=sel.full_passes + (0 if sel.chosen() is not None else 1),
                ties=tie_summary(sel, scope.numel(), seed=tie_seed),
            )
        )
    sides: list[atomic.AtomicPath] = []
    try:  # the masks and the side files (core.json) are one output: a kill leaves all or none
        for path, text in (side_files(out) if side_files else {}).items():
            sides.append(atomic.staged_text(path, text, force=force))
        atomic.commit_together(finished + sides)
    except BaseException:
        for item in finished + sides:
            item.discard()
        raise
    return out


def core_json(summaries: list[CoreSummary], settings: dict, scope: Scope) -> str:
    """The text of core.json."""
    warnings = [f"{s.task}: {s.ties['warning']}" for s in summaries if s.ties.get("warning")]
    data = {
        "settings": settings,
        "scope": scope.to_json(),
        "tasks": [s.to_json() for s in summaries],
        "warnings": warnings,
    }
    return atomic.dumps(data) + "\n"
