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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import OptionError
from ..selection.passes import chunk_ranges, nonfinite_error
from ..selection.topk import topk_bits
from ..storage import atomic, dtypes
from ..storage.checkpoint import Checkpoint
from ..storage.scope import Scope
from ..storage.writer import CheckpointWriter, check_output
from .driver import StreamJob, _check_f16_range, fusion_workers
from .methods import Method, combine, dare_keep, keep_window, rescale_factor


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
    ):
        super().__init__()
        self.method, self.base, self.models, self.labels, self.params = method, base, models, labels, params
        self.ranks, self.semantics, self.seed, self.tie_seed = ranks, semantics, seed, tie_seed
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
            if not np.isfinite(part).all():
                raise nonfinite_error(name, [self.base, ck])
        return mag

    def _selections(self, name: str, n: int, tp: TensorParams) -> tuple[list, list[float]]:
        """Per model: packed kept bits (None: keep all; DARE: decided per chunk) and the rescale factor."""
        m, kept, factors = self.method, [], []
        for i, ck in enumerate(self.models):
            bits, before, after = None, 0.0, 0.0
            need_l1 = tp.rescale == "l1" and m.sparsify is not None
            window = keep_window(m, n, tp.density[i], tp.gamma[i]) if m.sparsify in ("magnitude", "outliers") else None
            if window is not None or (need_l1 and m.sparsify != "random"):
                mag = self._magnitude(ck, name, n)
                if window is not None:
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
            elif need_l1:  # DARE with the l1 rescale: both norms, chunk by chunk
                for s, e in chunk_ranges(n):
                    tau = np.abs(self._f32(ck, name, s, e, "a") - self._f32(self.base, name, s, e, "b"))
                    keep = dare_keep(self.seed, i, self.ranks[name], s, e, tp.density[i])
                    before += float(tau.sum(dtype=np.float64))
                    after += float(tau[keep].sum(dtype=np.float64))
            kept.append(bits)
            kind = tp.rescale if m.sparsify is not None else None
            factors.append(rescale_factor(kind, tp.density[i], before, after))
        return kept, factors

    def tensor(self, name: str, out_code: str):
        n = int(np.prod(self.base.infos[name].shape, dtype=np.int64))
        tp = self.params(name)
        m = self.method
        kept, factors = (
            self._selections(name, n, tp) if m.delta else ([None] * len(self.models), [1.0] * len(self.models))
        )
        with self.lock:
            self.report.total += n
        for s, e in chunk_ranges(n):
            b = self._f32(self.base, name, s, e, "base") if m.delta else None
            taus = []
            for i, ck in enumerate(self.models):
                v = self._f32(ck, name, s, e, ("v", i))
                if not m.delta:
                    taus.append(v)
                    continue
                tau = np.subtract(v, b, out=v)
                if m.sparsify == "random":
                    keep = dare_keep(self.seed, i, self.ranks[name], s, e, tp.density[i])
                elif kept[i] is not None:
                    keep = np.unpackbits(kept[i][s // 8 : (e + 7) // 8], count=e - s + s % 8)[s % 8 :].astype(bool)
                else:
                    keep = None
                if keep is not None:
                    tau[~keep] = 0
                with self.lock:
                    self.report.kept[self.labels[i]] += e - s if keep is None else int(np.count_nonzero(keep))
                if factors[i] != 1.0:
                    tau *= np.float32(factors[i])
                taus.append(tau)
            mixed = combine(
                taus,
                tp.weight,
                consensus=m.consensus,
                normalize=tp.normalize,
                lam=tp.lam if m.delta else 1.0,
                semantics=self.semantics,
            )
            out = mixed if b is None else np.add(b, mixed, out=mixed)
            if not np.isfinite(out).all():
                raise nonfinite_error(name, [self.base, *self.models])
            if out_code == "F32":
                yield out
            else:
                if out_code == "F16":
                    _check_f16_range(name, out)
                yield dtypes.from_float32(out, out_code, finite=True)


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
) -> MergeReport:
    """Merge `models` onto `base` (θ⁰; for `linear` only the layout and the out-of-scope tensors) into `out`
    (an HF folder when the base is one, else a .safetensors file with `OUT.merge.json` beside it)."""
    inputs = [base.path] + [c.path for c in models]
    folder = base.folder is not None
    side = [] if folder else [Path(f"{out}.merge.json")]
    check_output(out, inputs, force=force, side_files=side)
    if not models:
        raise OptionError("the config merges no model: list them under `models:`")
    code = dtypes.code_of(dtype) if dtype else None
    plan = [(n, code if (code and i.is_float) else i.code, i.shape) for n, i in sorted(base.infos.items())]
    job = MergeJob(
        method, base, models, labels, params, ranks=scope.ranks, semantics=semantics, seed=seed, tie_seed=tie_seed
    )
    workers = fusion_workers()
    with CheckpointWriter(
        out,
        plan,
        folder=folder,
        shard_bytes=shard_bytes,
        metadata=metadata() if callable(metadata) else metadata,
        reference=base.folder,
        inputs=inputs,
        force=force,
        config_dtype=code,
        any_order=workers > 1,
    ) as writer:
        job.run(writer, plan, scope, workers=workers, progress=progress)
        done = settings() if callable(settings) else settings
        record = atomic.dumps({"settings": done or {}, "counts": job.report.to_json()})
        if folder:
            writer.add_file("merge.json", record)
            for fname, text in (extra_files or {}).items():
                writer.add_file(fname, text)
            if card:
                writer.add_file("README.md", card() if callable(card) else card)
        else:
            writer.add_side_file(Path(f"{out}.merge.json"), record)
    return job.report
