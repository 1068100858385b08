"""`sparsemerge merge`'s engine: the sparse merge family (METHODS §10) streamed tensor by tensor through
the same driver as the CPI-FT fusion (`driver.StreamJob`, `CheckpointWriter`).

Per tensor, at `scope: tensor`:
- methods that rank |τₜ| (TIES' trim, Breadcrumbs' window) first read each task's whole τₜ once, in
  float32, and keep only its selection as packed bits (n/8 bytes per task): the exact top-k with the §2
  tie hash (`selection.topk.topk_bits`);
- then the output chunk by chunk: each task's τ chunk, its kept entries (the packed bits, or DARE's hash
  drop), the rescale, and the combination (`methods.combine`), written as θ⁰ + τ_merged.
Anonymous memory: one tensor's float32 |τ| (its bits are the sort keys), its bool selection, plus per task its packed bits and a chunk,
whatever the number of tensors.

At `scope: global` each model's selection is a `selection.cuts.Cut` (threshold and hash cut over every
tensor in scope), found before the merge pass in a sample and one or two passes over its |τ|; the merge
pass applies it chunk by chunk, so nothing of a tensor's size is held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import OptionError
from ..selection.keys import CHUNK
from ..selection.passes import chunk_ranges, nonfinite_error
from ..selection.topk import topk_bits
from ..storage import atomic, dtypes
from ..storage.checkpoint import Checkpoint
from ..storage.masks import MaskWriter
from ..storage.scope import Scope
from ..storage.writer import CheckpointWriter, check_output
from .driver import StreamJob, _check_f16_range, fusion_workers
from .maths import slerp_coefficients
from .methods import Method, combine, dare_keep, keep_window, rescale_factor, row_window, stitch, tall_masks


@dataclass
class TensorParams:
    """The parameters of one tensor, resolved from the config (filters, layer gradients): per model
    `weight`, `density`, `gamma`; shared `normalize`, `lambda`, `rescale` (None, "l1", "inverse")."""

    weight: list[float]
    density: list[float]
    gamma: list[float]
    normalize: bool
    lam: float
    rescale: str | None
    t: float | None = None  # slerp
    tall_lambda: list[float] = field(default_factory=list)  # tall, consensus: per model
    consensus_k: int = 2
    retrieve: int = 0  # tall: the model retrieved


@dataclass
class MergeReport:
    method: str
    models: list[str]
    kept: dict[str, int] = field(default_factory=dict)  # per model: entries of τ kept by the sparsification
    total: int = 0  # entries in scope
    copied_tensors: list[str] = field(default_factory=list)
    tie_picks: dict[str, int] = field(default_factory=dict)  # per model: kept entries chosen among ties

    def to_json(self) -> dict:
        return dict(self.__dict__)


class MergeJob(StreamJob):
    def __init__(
        self,
        method: Method,
        base: Checkpoint,
        models: list[Checkpoint],
        labels: list[str],
        params: Callable[[str], TensorParams],
        *,
        ranks: dict[str, int],
        semantics: str,
        seed: int,
        tie_seed: int,
        cuts: list | None = None,
        mask_writers: list | None = None,
        selection: str = "tensor",
    ):
        super().__init__()
        self.method, self.base, self.models, self.labels, self.params = method, base, models, labels, params
        self.ranks, self.semantics, self.seed, self.tie_seed = ranks, semantics, seed, tie_seed
        self.cuts = cuts  # scope global: per model (Cut of the top (γ+)density or None, Cut of the top γ or None)
        self.mask_writers = mask_writers  # --save-masks: per model the MaskWriter of its kept entries
        self.selection = selection  # the config's scope: tensor, global or row (Breadcrumbs per row)
        self.reference = base
        self.report = MergeReport(method.name, labels, kept={x: 0 for x in labels}, tie_picks={x: 0 for x in labels})

    def _f32(self, ck: Checkpoint, name: str, s: int, e: int, slot) -> np.ndarray:
        raw = ck.array(name).reshape(-1)
        return dtypes.to_float32(raw[s:e], ck.infos[name].code, self.bufs.get(slot, e - s))

    def _magnitude(self, ck: Checkpoint, name: str, n: int) -> np.ndarray:
        """|τ| of one whole tensor in float32, built chunk by chunk into one buffer (its only full-size array)."""
        mag = self.bufs.get("tau", n)
        for s, e in chunk_ranges(n):
            part = np.subtract(self._f32(ck, name, s, e, "a"), self._f32(self.base, name, s, e, "b"), out=mag[s:e])
            np.abs(part, out=part)  # +0.0 for -0.0 too: the bits are the sort keys (topk_bits' nonneg)
            if not np.isfinite(part.max()):  # the max of |τ| is NaN or Inf when any entry is
                raise nonfinite_error(name, [self.base, ck])
        return mag

    def _selections(self, name: str, n: int, tp: TensorParams) -> tuple[list, list[float]]:
        """Per model: packed kept bits (None: keep all; DARE: decided per chunk) and the rescale factor."""
        m, kept, factors = self.method, [], []
        for i, ck in enumerate(self.models):
            bits, before, after = None, 0.0, 0.0
            need_l1 = tp.rescale == "l1" and m.sparsify is not None
            window = keep_window(m, n, tp.density[i], tp.gamma[i]) if m.sparsify in ("magnitude", "outliers") else None
            shape = self.base.infos[name].shape
            cols = int(shape[-1]) if len(shape) else 1
            if self.selection == "row" and m.sparsify == "outliers":
                window = keep_window(m, cols, tp.density[i], tp.gamma[i])  # the same window in every row
            if self.cuts is not None and m.sparsify in ("magnitude", "outliers"):
                pass  # scope global: the cuts decide each chunk in the merge pass
            elif window is not None or (need_l1 and m.sparsify != "random"):
                mag = self._magnitude(ck, name, n)
                if window is not None and self.selection == "row" and m.sparsify == "outliers":
                    lo, hi = window
                    rows, sel = n // max(cols, 1), np.empty(n, dtype=bool)
                    step = max(1, CHUNK // max(cols, 1))  # rows per block: bounded scratch for the sort
                    grid = mag.reshape(rows, cols)
                    for r in range(0, rows, step):
                        part = row_window(
                            grid[r : r + step], lo, hi, seed=self.tie_seed, rank=self.ranks[name], start=r * cols
                        )
                        sel[r * cols : (r + step) * cols] = part.reshape(-1)
                    bits = np.packbits(sel)
                    if need_l1:
                        before, after = float(mag.sum(dtype=np.float64)), float(mag[sel].sum(dtype=np.float64))
                elif window is not None:
                    lo, hi = window
                    sel, _, _, picks = topk_bits(mag, hi, rank=self.ranks[name], seed=self.tie_seed, nonneg=True)
                    if lo > 0:
                        drop, _, _, _ = topk_bits(mag, lo, rank=self.ranks[name], seed=self.tie_seed, nonneg=True)
                        sel &= ~drop
                    with self.lock:
                        self.report.tie_picks[self.labels[i]] += picks
                    bits = np.packbits(sel)
                    if need_l1:
                        before, after = float(mag.sum(dtype=np.float64)), float(mag[sel].sum(dtype=np.float64))
                elif need_l1:
                    before = after = float(mag.sum(dtype=np.float64))
            elif need_l1:  # DARE with the l1 rescale: both norms, chunk by chunk; the drop kept as bits
                parts = []
                for s, e in chunk_ranges(n):
                    tau = np.abs(self._f32(ck, name, s, e, "a") - self._f32(self.base, name, s, e, "b"))
                    keep = dare_keep(self.seed, i, self.ranks[name], s, e, tp.density[i])
                    before += float(tau.sum(dtype=np.float64))
                    after += float(tau[keep].sum(dtype=np.float64))
                    parts.append(np.packbits(keep))
                bits = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
            if self.mask_writers is not None and m.sparsify in ("magnitude", "outliers") and self.cuts is None:
                saved = bits if bits is not None else np.packbits(np.ones(n, dtype=bool))
                self.mask_writers[i].write_packed_at(name, saved)
            kept.append(bits)
            kind = tp.rescale if m.sparsify is not None else None
            factors.append(rescale_factor(kind, tp.density[i], before, after))
        return kept, factors

    def _cut_keep(self, cut: tuple, tau: np.ndarray, rank: int, start: int) -> np.ndarray:
        """Scope global: the chunk's entries in the model's top (γ+)density and not in its top γ."""
        keys = np.abs(tau, out=self.bufs.get("keys", tau.size)[: tau.size]).view(np.int32)
        hi, lo = cut
        keep = hi.keep(keys, rank, start) if hi is not None else np.ones(tau.size, dtype=bool)
        if lo is not None:
            keep &= ~lo.keep(keys, rank, start)
        return keep

    def _slerp(self, name: str, n: int, t: float):
        """SLERP from the base (t = 0) to the one model (t = 1), as mergekit's: the angle from the float64
        norms and dot product of the whole tensors (one pass), then c₀·θᵇ + c₁·θ¹ chunk by chunk."""
        other = self.models[0]
        sq0 = sq1 = dot = 0.0
        for s, e in chunk_ranges(n):
            a = self._f32(self.base, name, s, e, "base").astype(np.float64)
            b = self._f32(other, name, s, e, ("v", 0)).astype(np.float64)
            sq0, sq1, dot = sq0 + float(a @ a), sq1 + float(b @ b), dot + float(a @ b)
        c0, c1, _ = slerp_coefficients(math.sqrt(sq0), math.sqrt(sq1), dot, t)
        for s, e in chunk_ranges(n):
            a, b = self._f32(self.base, name, s, e, "base"), self._f32(other, name, s, e, ("v", 0))
            out = np.multiply(a, np.float32(c0), out=a)
            out += np.float32(c1) * b
            yield out

    def tensor(self, name: str, out_code: str):
        n = int(np.prod(self.base.infos[name].shape, dtype=np.int64))
        tp = self.params(name)
        m = self.method
        if m.name == "slerp":
            with self.lock:
                self.report.total += n
            for out in self._slerp(name, n, tp.t):
                if not np.isfinite(out).all():
                    raise nonfinite_error(name, [self.base, *self.models])
                if out_code == "F16":
                    _check_f16_range(name, out)
                yield out if out_code == "F32" else dtypes.from_float32(out, out_code, finite=True)
            return
        kept, factors = (
            self._selections(name, n, tp) if m.delta else ([None] * len(self.models), [1.0] * len(self.models))
        )
        with self.lock:
            self.report.total += n
        tall = m.name in ("tall", "consensus")
        cuts = self.cuts if m.sparsify in ("magnitude", "outliers") else None
        save = self.mask_writers is not None and (tall or cuts is not None)
        packed: list[list[np.ndarray]] = [[] for _ in self.models]  # masks to save, chunk by chunk
        for s, e in chunk_ranges(n):
            b = self._f32(self.base, name, s, e, "base") if m.delta else None
            taus, keeps = [], []
            for i, ck in enumerate(self.models):
                v = self._f32(ck, name, s, e, ("v", i))
                if not m.delta:
                    taus.append(v)
                    continue
                tau = np.subtract(v, b, out=v)
                if kept[i] is not None:  # chunks start at multiples of 8 entries; 0/1 bytes are bools
                    keep = np.unpackbits(kept[i][s // 8 : (e + 7) // 8], count=e - s).view(bool)
                elif m.sparsify == "random":
                    keep = dare_keep(self.seed, i, self.ranks[name], s, e, tp.density[i])
                elif cuts is not None and cuts[i] != (None, None):
                    keep = self._cut_keep(cuts[i], tau, self.ranks[name], s)
                else:
                    keep = None
                if cuts is not None and save:
                    packed[i].append(
                        np.packbits(keep) if keep is not None else np.full((e - s + 7) // 8, 255, np.uint8)
                    )
                keeps.append(keep)
                if keep is not None:
                    np.multiply(tau, keep, out=tau)  # -0.0 for a negative τ dropped: the same sums
                with self.lock:
                    self.report.kept[self.labels[i]] += e - s if keep is None else int(np.count_nonzero(keep))
                if factors[i] != 1.0:
                    tau *= np.float32(factors[i])
                taus.append(tau)
            if tall:
                mtl, masks = tall_masks(taus, tp.tall_lambda)
                if m.name == "tall":
                    on = masks[tp.retrieve]
                else:
                    on = np.add.reduce([x.astype(np.uint8) for x in masks], dtype=np.int32) >= tp.consensus_k
                mixed = np.where(on, mtl, np.float32(0))
                if m.name == "consensus" and tp.lam != 1:
                    mixed *= np.float32(tp.lam)
                if self.mask_writers is not None:
                    for i, x in enumerate(masks):
                        packed[i].append(np.packbits(x))  # chunks are multiples of 8 entries
            elif m.name == "localize_stitch":
                kept = [np.ones(e - s, dtype=bool) if k is None else k for k in keeps]
                mixed = stitch(taus, kept)
                if tp.lam != 1:
                    mixed *= np.float32(tp.lam)
            else:
                mixed = combine(
                    taus,
                    tp.weight,
                    consensus=m.consensus,
                    normalize=tp.normalize,
                    lam=tp.lam if m.delta else 1.0,
                    semantics=self.semantics,
                )
            out = mixed if b is None else np.add(b, mixed, out=mixed)
            if not (np.isfinite(out.min()) and np.isfinite(out.max())):  # NaN propagates through both
                raise nonfinite_error(name, [self.base, *self.models])
            if out_code == "F32":
                yield out
            else:
                if out_code == "F16":
                    _check_f16_range(name, out)
                yield dtypes.from_float32(out, out_code, finite=True)
        if save:
            for w, parts in zip(self.mask_writers, packed):
                w.write_packed_at(name, np.concatenate(parts) if parts else np.zeros(0, np.uint8))


def merge_models(
    method: Method,
    base: Checkpoint,
    models: list[Checkpoint],
    labels: list[str],
    params: Callable[[str], TensorParams],
    *,
    scope: Scope,
    out: Path,
    semantics: str = "mergekit",
    seed: int = 0,
    tie_seed: int = 0,
    dtype: str | None = None,
    shard_bytes: int | None = None,
    force: bool = False,
    progress: bool = False,
    settings=None,
    metadata=None,
    card=None,
    extra_files: dict[str, str] | None = None,
    selection: str = "tensor",
    save_masks: Path | None = None,
) -> MergeReport:
    """Merge `models` onto `base` (θ⁰; for `linear` only the layout and the out-of-scope tensors) into `out`
    (an HF folder when the base is one, else a .safetensors file with `OUT.merge.json` beside it).

    `selection` is the config's `scope`: `tensor` ranks |τ| inside each tensor, `global` over every tensor
    in scope at once (exact, METHODS §2: a sample and one or two passes over each model's |τ| find its
    threshold and hash cut, which decide every chunk in the merge pass; no mask is stored). `save_masks` writes each model's kept entries (TIES trim,
    Breadcrumbs window) as `<label>.mask.safetensors` there, committed with the merged model."""
    inputs = [base.path] + [c.path for c in models]
    folder = base.folder is not None
    side = [] if folder else [Path(f"{out}.merge.json")]
    ranking = method.sparsify in ("magnitude", "outliers")
    savable = ranking or method.name in ("tall", "consensus")
    mask_paths = [Path(save_masks) / f"{x}.mask.safetensors" for x in labels] if save_masks else []
    check_output(out, inputs, force=force, side_files=side + mask_paths)
    if not models:
        raise OptionError("the config merges no model: list them under `models:`")
    if save_masks and not savable:
        raise OptionError(
            f"--save-masks: {method.name} keeps no ranked selection to save (TIES, Breadcrumbs, TALL, consensus "
            "and localize-stitch do; DARE's drop is a hash of the position, the same for any model)"
        )
    code = dtypes.code_of(dtype) if dtype else None
    plan = [(n, code if (code and i.is_float) else i.code, i.shape) for n, i in sorted(base.infos.items())]
    writers: list = []
    try:
        cuts = None
        if selection == "global" and ranking and scope.names:
            cuts, picks = _global_cuts(method, base, models, params(scope.names[0]), scope, tie_seed, fusion_workers())
        if save_masks:
            Path(save_masks).mkdir(parents=True, exist_ok=True)
            meta = {
                "criterion": f"merge:{method.name}",
                "scope": selection,
                "tie_seed": tie_seed,
                "total": scope.numel(),
            }
            writers = [
                MaskWriter(path, scope.shapes, {**meta, "task": x}, force=force, inputs=inputs)
                for path, x in zip(mask_paths, labels)
            ]
        job = MergeJob(
            method,
            base,
            models,
            labels,
            params,
            ranks=scope.ranks,
            semantics=semantics,
            seed=seed,
            tie_seed=tie_seed,
            cuts=cuts,
            mask_writers=writers or None,
            selection=selection,
        )
        if cuts is not None:
            job.report.tie_picks = dict(zip(labels, picks))
        _merge_into(
            job,
            out,
            plan,
            scope,
            writers,
            progress=progress,
            settings=settings,
            metadata=metadata,
            card=card,
            extra_files=extra_files,
            shard_bytes=shard_bytes,
            inputs=inputs,
            force=force,
            config_dtype=code,
        )
    except BaseException:
        for w in writers:
            w.discard()
        raise
    return job.report


def _global_cuts(method, base, models, tp: TensorParams, scope: Scope, tie_seed: int, workers: int):
    """Scope global: per model the `Cut` of its top ⌊density·N⌋ |τ| over all N entries in scope (Breadcrumbs:
    of the top ⌊(γ+density)·N⌋, and of the top ⌊γ·N⌋ dropped from it), by `selection.cuts.top_k_cut`: a
    sample and one or two passes over |τ| per cut, nothing of the model's size held; models side by side
    when there are several workers."""
    from concurrent.futures import ThreadPoolExecutor

    from ..selection.cuts import top_k_cut

    total = scope.numel()
    jobs = []  # (model index, which, k)
    for i in range(len(models)):
        d, g = tp.density[i], tp.gamma[i] if method.sparsify == "outliers" else 0.0
        if d >= 1 and g <= 0:
            continue
        hi, lo = min(total, int((g + d) * total)), int(g * total)
        if hi <= lo:
            raise OptionError(f"density {d} selects no parameter of the {total} in scope (scope: global)")
        if hi < total:
            jobs.append((i, 0, hi))
        if lo > 0:
            jobs.append((i, 1, lo))

    def one(job):
        i, _, k = job
        chunks, sample = _abs_tau_stream(base, models[i], scope)
        return top_k_cut(chunks, sample, k, total, seed=tie_seed)

    with ThreadPoolExecutor(max(1, min(workers, len(jobs) or 1))) as pool:
        found = list(pool.map(one, jobs))
    out = [[None, None] for _ in models]
    for (i, which, _), cut in zip(jobs, found):
        out[i][which] = cut
    return [tuple(x) for x in out], [0 if c is None else c.picks for c, _ in out]


def _abs_tau_stream(base: Checkpoint, ck: Checkpoint, scope: Scope):
    """(chunks, sample) of |τ| = |θ − θ⁰| in float32 for `selection.cuts`: its int32 keys chunk by chunk over
    every tensor in scope (`core`'s reader, `delta_chunks`: reused buffers, consumers copy what they keep),
    and every step-th of them."""
    from ..analysis.cores import delta_chunks

    names = scope.names

    def chunks():
        read = delta_chunks(base, [ck])
        for name in names:
            rank = scope.ranks[name]
            for s, (a,) in read(name, chunk_ranges(int(np.prod(scope.shapes[name], dtype=np.int64)))):
                if not np.isfinite(a.max()):
                    raise nonfinite_error(name, [base, ck])
                yield rank, s, a.view(np.int32)

    def sample(step: int) -> np.ndarray:
        parts = []
        for name in names:
            v, b = ck.array(name).reshape(-1)[::step], base.array(name).reshape(-1)[::step]
            a = dtypes.to_float32(v, ck.infos[name].code) - dtypes.to_float32(b, base.infos[name].code)
            parts.append(np.abs(a, out=a).view(np.int32))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    return chunks, sample


def _merge_into(
    job: MergeJob,
    out: Path,
    plan,
    scope: Scope,
    writers: list,
    *,
    progress,
    settings,
    metadata,
    card,
    extra_files,
    **writer_args,
) -> None:
    """The merge pass into a CheckpointWriter; the saved masks (finished here) are committed with it."""
    workers = fusion_workers()
    base = job.base
    with CheckpointWriter(
        out,
        plan,
        folder=base.folder is not None,
        metadata=metadata,  # a callable is called at commit: the fingerprints are hashed during the pass
        reference=base.folder,
        any_order=workers > 1,
        **writer_args,
    ) as writer:
        job.run(writer, plan, scope, workers=workers, progress=progress)
        for w in writers:
            w.update_meta(base=base.sources(), sources=[base.sources()])
        writer.together += [w.finish() for w in writers]
        done = settings() if callable(settings) else settings
        record = atomic.dumps({"settings": done or {}, "counts": job.report.to_json()})
        if base.folder is not None:
            writer.add_file("merge.json", record)
            for fname, text in (extra_files or {}).items():
                writer.add_file(fname, text)
            if card:
                writer.add_file("README.md", card() if callable(card) else card)
        else:
            writer.add_side_file(Path(f"{out}.merge.json"), record)
