"""Fusion (CPI-FT stage 3, METHODS §5): SLERP of whole tensors, then every task's core overwritten.

The pure maths (`slerp`, `fold_coefficients`, `resolve_cores`) live in `maths`; this is the streaming driver.
The driver reads inputs in chunks from the memory-mapped files and writes the output chunk by
chunk; a tensor's fold models are kept in float32 only while they fit in CACHE_BYTES, so
anonymous memory stays bounded whatever the model size. The driver is numpy throughout (see
`dtypes`): a fusion never imports torch, whose start-up alone was a quarter of a 1 B-parameter
fusion on one thread (only `--check`, FP8 inputs, per-tensor cores and the rare radix fallback
load it).

Passes over the inputs: with mask files or `--scope per-tensor`, one (the fusion pass). With
global cores computed on the fly from `--base/--p`, a sampling pass over ~2 % of the data and
one full pass: the fusion pass is also the selection's counting pass, writing every entry that is
surely in a core (|Δ| above the sampled window) at once; the candidates chosen inside the window
once the pass has counted everything are then patched into the output file before it is renamed
into place. Should the window miss (see `select`), the selection finishes with its radix passes
and a second fusion pass writes the output.

Workers: with mask files or the counting pass, tensors do not depend on each other, so as many
workers as threads are asked for (`fusion_workers`, at most MAX_WORKERS) fuse tensors at once,
largest first, each single-threaded with its own scratch, writing its tensors in place
(`CheckpointWriter` in `any_order` mode); counts are summed under a lock. The output does not
depend on the worker count.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..analysis.cores import prepare_selectors
from ..errors import NonFiniteError, OptionError
from ..selection.keys import tie_hash
from ..selection.passes import Buffers, Pass, chunk_ranges, nonfinite_error, workers
from ..selection.topk import PerTensorTopK, tie_summary
from ..storage import atomic, dtypes
from ..storage.checkpoint import Checkpoint
from ..storage.masks import MaskSet
from ..storage.scope import Scope
from ..storage.writer import CheckpointWriter, check_output
from .maths import POLICIES, CoreScratch, fold_coefficients, fold_weights, resolve_cores


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
    full_passes: int = 1  # over the inputs; the sampling pass (~2 %) aside
    ties: dict = field(default_factory=dict)  # task -> METHODS §2 tie report of its core (cores computed here)
    tie_seed: int = 0  # of the cores' ties and of max-delta conflicts with equal |Δ|

    def to_json(self) -> dict:
        return dict(self.__dict__)


def fuse(
    tasks: list[Checkpoint],
    labels: list[str],
    *,
    onto: Checkpoint,
    onto_is_task: int | None,
    scope: Scope,
    out: Path,
    base: Checkpoint | None = None,
    masks: list[MaskSet] | None = None,
    percent: float | None = None,
    per_tensor: bool = False,
    weights: list[float] | None = None,
    conflict: str = "max-delta",
    dtype=None,
    shard_bytes: int | None = None,
    force: bool = False,
    metadata=None,  # a dict, or a callable called at commit (see CheckpointWriter)
    progress: bool = False,
    check: bool = False,
    settings: dict | None = None,
    tie_seed: int = 0,
    card: str | None = None,
) -> FuseReport:
    """Fuse `tasks` onto `onto` and stream the result to `out` (file or HF folder, like `onto`).

    `onto_is_task` is the index of `onto` in `tasks` when the fusion base is a task model.
    Core masks come from `masks` (one per task) or are computed from `base` and `percent`.
    `weights` has one entry per task (plus one for an external `onto`, last); default equal. `dtype`
    (a safetensors code such as "BF16", or a torch dtype) casts the floating tensors of the output.
    `check` loads a folder output with transformers before it is renamed into place. `tie_seed` seeds
    the METHODS §2 hash: of the cores' threshold ties, and of `max-delta` conflicts with equal |Δ|. A folder
    output gets `fuse.json` (settings and counts); a file output gets `<out>.fuse.json` beside it.
    """
    if conflict not in POLICIES:
        raise OptionError(f"--conflict {conflict!r} is not one of {', '.join(POLICIES)}")
    if conflict == "max-delta" and base is None:
        raise OptionError(
            "--conflict max-delta needs the pretrained model to measure |Δ|: give --base BASE, "
            "or choose --conflict last or --conflict mean"
        )
    inputs = [c.path for c in tasks] + [onto.path] + ([base.path] if base else [])
    side = [] if onto.folder is not None else [Path(f"{out}.fuse.json")]
    check_output(out, inputs, force=force, side_files=side)  # fail before any pass, not after
    others = [i for i in range(len(tasks)) if i != onto_is_task]
    n_w = len(tasks) + (0 if onto_is_task is not None else 1)
    weights = list(weights) if weights else [1.0] * n_w
    if len(weights) != n_w or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise OptionError(
            f"--weights needs {n_w} non-negative numbers (one per task"
            + ("" if onto_is_task is not None else ", then one for --onto")
            + f"), got {weights}"
        )
    w_onto = weights[onto_is_task] if onto_is_task is not None else weights[-1]
    t_values = fold_weights([w_onto] + [weights[i] for i in others])
    selectors = None
    if masks is not None:
        for m, label in zip(masks, labels):
            m.check_fits(scope.shapes, f"the models being fused (task {label})")
    else:
        selectors = prepare_selectors(
            base,
            tasks,
            scope,
            percent=percent,
            per_tensor=per_tensor,
            progress=progress,
            desc="fuse",
            sample_only=True,
            tie_seed=tie_seed,
        )
    job = _Fusion(tasks, labels, others, onto, base, t_values, conflict, masks, selectors)
    job.tie_seed, job.ranks = tie_seed, scope.ranks
    # tensors in sorted name order, the scope's order (ties are broken by position hashes, in any order)
    dtype = dtypes.code_of(dtype) if dtype is not None else None
    plan = [
        (n, dtype if (dtype is not None and i.is_float) else i.code, i.shape) for n, i in sorted(onto.infos.items())
    ]
    folder = onto.folder is not None
    validate = None
    if check and folder:
        from ..evaluation.sanity import check_model_folder

        validate = check_model_folder

    def write(counting: bool) -> FuseReport:
        job.start(counting)
        # tensors are independent when cores come from mask files or the counting pass, so several
        # workers may fuse at once (the fallback's selection pass stays on one worker)
        workers = fusion_workers() if counting or masks is not None else 1
        with CheckpointWriter(
            out,
            plan,
            folder=folder,
            shard_bytes=shard_bytes,
            metadata=metadata,  # a callable is called at commit: the fingerprints are hashed during the pass
            reference=onto.folder,
            inputs=inputs,
            force=force,
            config_dtype=dtype,
            validate=validate,
            any_order=workers > 1,
        ) as writer:
            job.run(writer, plan, scope, workers=workers, progress=progress)
            if counting:
                job.finish_counting(writer, {n: d for n, d, _ in plan})
            if selectors is not None:  # the cores' tie report (METHODS §2), per task
                job.report.ties = {
                    label: tie_summary(sel, scope.numel(), seed=tie_seed) for label, sel in zip(labels, selectors)
                }
            job.report.tie_seed = tie_seed
            done = settings() if callable(settings) else settings
            record = atomic.dumps({"settings": done or {}, "counts": job.report.to_json()})
            if folder:
                writer.add_file("fuse.json", record)
                if card:
                    writer.add_file("README.md", card() if callable(card) else card)
            else:  # committed with the fused file as one: a kill leaves both or neither
                writer.add_side_file(Path(f"{out}.fuse.json"), record)
        return job.report

    # global cores computed on the fly: the fusion pass is also the selectors' counting pass, and the
    # candidates they choose afterwards are patched into the output (one full pass over the inputs)
    if selectors is not None and all(s.wants() is Pass.COUNT for s in selectors):
        try:
            return write(counting=True)
        except _WindowMissed:  # rare: finish the selection, then fuse in a second pass
            prepare_selectors(base, tasks, scope, percent=percent, progress=progress, desc="fuse", selectors=selectors)
    elif selectors is not None:
        prepare_selectors(base, tasks, scope, percent=percent, progress=progress, desc="fuse", selectors=selectors)
    return write(counting=False)


def _union(sets: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The ascending union P of ascending position arrays, and for each array which entries of P it holds
    (a stable sort of the concatenation merges the sorted runs in linear time; no searches)."""
    cat = np.concatenate(sets)
    if len(sets) == 1:
        return cat, [np.ones(len(cat), dtype=bool)]
    order = np.argsort(cat, kind="stable")
    srt = cat[order]
    first = np.empty(len(srt), dtype=bool)
    first[:1] = True
    np.not_equal(srt[1:], srt[:-1], out=first[1:])
    slot = np.cumsum(first) - 1  # each sorted entry's index in P
    owner = np.searchsorted(np.cumsum([len(x) for x in sets]), order, side="right")
    held = [np.zeros(int(slot[-1]) + 1 if len(slot) else 0, dtype=bool) for _ in sets]
    for i, h in enumerate(held):
        h[slot[owner == i]] = True
    return srt[first], held


def fusion_workers() -> int:
    """Tensors fused at once (`selection.passes.workers`)."""
    return workers()


class _WindowMissed(Exception):
    """A selector's sampled window missed the threshold during the fusion pass (see `select`)."""


GRAM_BLOCK = 1 << 18  # entries per Gram-matrix step: measured fastest of 2^15..2^19 and whole tensors
CACHE_BYTES = 256 << 20  # a tensor whose fold models fit in this much float32 is converted once, not twice


F16_OVERFLOW = 65520.0  # float16 rounds |x| >= 65520 to Inf


def _check_f16_range(name: str, values: np.ndarray) -> None:
    if values.size and float(np.max(np.abs(values))) >= F16_OVERFLOW:
        raise OptionError(
            f"--dtype float16 would turn values of '{name}' (|x| up to {float(np.max(np.abs(values))):.4g}) into Inf "
            "(float16 ends at 65504); use --dtype bfloat16 or float32"
        )


class StreamJob:
    """What every streaming merge shares (fusion and `merge`'s methods): per-worker scratch, the tensor loop
    over the output plan (tensors out of scope copied from the output's reference model, the others
    streamed chunk by chunk from `tensor(name, out_code)`), several workers taking the largest tensors
    first. A subclass gives `tensor`, `reference` (the model out-of-scope tensors come from), `report`
    (with `copied_tensors`) and `finish_run`."""

    reference: Checkpoint

    def __init__(self):
        self.lock = threading.Lock()  # guards the counts when several workers fuse at once
        self.local = threading.local()  # per-worker scratch
        self.cache_bytes, self.workers = CACHE_BYTES, 1

    @property
    def bufs(self) -> Buffers:
        if not hasattr(self.local, "bufs"):
            self.local.bufs = Buffers()
        return self.local.bufs

    def tensor(self, name: str, out_code: str):
        raise NotImplementedError

    def finish_run(self) -> None:
        pass

    def run(self, writer: CheckpointWriter, plan: list, scope: Scope, *, workers: int, progress: bool) -> None:
        """Write every tensor of `plan`: in plan order with one worker; with several, each worker takes the
        largest tensor left (so the last ones to finish are small) and keeps at most its share of
        CACHE_BYTES."""
        bar = tqdm(total=len(plan), desc=type(self).__name__.strip("_").lower(), disable=not progress, leave=False)

        def one(name: str, out_code: str) -> None:
            if name not in scope.shapes:
                with self.lock:
                    self.report.copied_tensors.append(name)
                raw, code = self.reference.array(name), self.reference.infos[name].code
                if out_code == "F16" and dtypes.is_float(code) and code != "F16":
                    _check_f16_range(name, dtypes.to_float32(raw.reshape(-1), code))
                writer.write(name, dtypes.convert(raw, code, out_code))
            else:
                writer.write_chunks(name, self.tensor(name, out_code))
            with self.lock:
                bar.update()

        self.workers, self.cache_bytes = workers, CACHE_BYTES // workers
        try:
            items = plan if workers == 1 else sorted(plan, key=lambda e: -math.prod(e[2]))
            self._each(items, lambda e: one(e[0], e[1]))
        finally:
            bar.close()
            self.cache_bytes = CACHE_BYTES
            self.report.copied_tensors.sort()
            self.finish_run()

    def _each(self, items: list, fn) -> None:
        """fn(item) for every item, in order with one worker; with several, each worker takes the next item
        left (numpy releases the GIL in its array loops, so workers run in parallel). The first error stops
        the workers and is raised."""
        if self.workers == 1:
            for item in items:
                fn(item)
            return
        todo, stop = iter(items), threading.Event()

        def work() -> None:
            while not stop.is_set():
                with self.lock:
                    item = next(todo, None)
                if item is None:
                    return
                try:
                    fn(item)
                except BaseException:
                    stop.set()
                    raise

        with ThreadPoolExecutor(self.workers, thread_name_prefix="fuse") as pool:
            futures = [pool.submit(work) for _ in range(self.workers)]
            try:
                for f in futures:
                    f.result()
            finally:
                stop.set()


class _Fusion(StreamJob):
    """The streaming fusion of one output, tensor by tensor (state shared by the chunks and the patching).

    Per tensor: the Gram matrix of the fold models (the fusion base and the other tasks), then the
    output chunk by chunk: the SLERP fold as a linear combination, then every task's core written
    over it. Models of small enough tensors are converted to float32 once and kept for both sweeps.
    """

    def __init__(self, tasks, labels, others, onto, base, t_values, conflict, masks, selectors):
        super().__init__()
        self.tasks, self.labels, self.others, self.onto, self.base = tasks, labels, others, onto, base
        self.t_values, self.conflict, self.masks, self.selectors = t_values, conflict, masks, selectors
        self.onto_task = next((i for i in range(len(tasks)) if i not in others), None)
        self.reference = onto

    @property
    def scratch(self) -> CoreScratch:
        if not hasattr(self.local, "scratch"):
            self.local.scratch = CoreScratch()
        return self.local.scratch

    def finish_run(self) -> None:
        self.report.linear_tensors.sort()
        self._publish_pairs()

    def start(self, counting: bool) -> None:
        self.counting = counting
        earlier = 0 if counting or self.selectors is None else max(s.full_passes for s in self.selectors)
        self.report = FuseReport(
            tasks=self.labels, onto=str(self.onto.path), t_values=self.t_values, full_passes=earlier + 1
        )
        self.report.overwritten = {label: 0 for label in self.labels}
        self.pairs = {(i, j): 0 for i in range(len(self.tasks)) for j in range(i + 1, len(self.tasks))}
        self._publish_pairs()

    def _publish_pairs(self) -> None:
        self.report.conflicts = {f"{self.labels[i]}~{self.labels[j]}": c for (i, j), c in self.pairs.items()}

    def _count(self, won: list[int], pairs: dict, covered: int, sign: int = 1) -> None:
        with self.lock:
            for i, w in enumerate(won):
                self.report.overwritten[self.labels[i]] += sign * w
            for key, c in pairs.items():
                self.pairs[key] += sign * c
            self.report.core_positions += sign * covered
            self.report.interpolated -= sign * covered

    def tensor(self, name: str, out_code: str):
        """Yield the fused tensor chunk by chunk as storage of `out_code` (the yielded chunk is reused scratch)."""
        tasks, base, bufs = self.tasks, self.base, self.bufs
        fold_ck = [self.onto] + [tasks[i] for i in self.others]
        fold_raw = [c.array(name).reshape(-1) for c in fold_ck]
        fold_codes = [c.infos[name].code for c in fold_ck]
        n, M = fold_raw[0].size, len(fold_raw)
        kept = M * n * 4 <= self.cache_bytes
        gram = [[0.0] * M for _ in range(M)]
        for s, e in chunk_ranges(n, GRAM_BLOCK):  # converted and multiplied while still in cache
            v = [
                dtypes.to_float32(r[s:e], c, bufs.get(("fold", i), n)[s:e] if kept else bufs.get(("fold", i), e - s))
                for i, (r, c) in enumerate(zip(fold_raw, fold_codes))
            ]
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught below
                for i in range(M):
                    for j in range(i, M):
                        gram[i][j] += float(np.dot(v[i], v[j]))
        for i in range(M):
            for j in range(i):
                gram[i][j] = gram[j][i]
        if not all(math.isfinite(x) for row in gram for x in row):
            raise nonfinite_error(
                name, fold_ck, overflow="values too large to fuse in float32 (their squares sum past 3.4e38)"
            )
        # a finite Gram matrix bounds every fold model (and so every task model: all are folded), their SLERP
        # coefficients and the fused values: no NaN/Inf can appear below but through the base's |Δ|
        coeffs, linear = fold_coefficients(gram, self.t_values)
        if any(linear):
            with self.lock:
                if name not in self.report.linear_tensors:
                    self.report.linear_tensors.append(name)
        fold_of_task = {i: 1 + k for k, i in enumerate(self.others)}
        if self.onto_task is not None:
            fold_of_task[self.onto_task] = 0
        cores = self._cores(name)
        # |Δ| per chunk only where something reads it: the selection, or max-delta conflicts
        streamed = self.selectors is not None and not isinstance(self.selectors[0], PerTensorTopK)
        need_deltas = base is not None and (streamed or self.conflict == "max-delta")
        if need_deltas:
            w0_raw, w0_code = base.array(name).reshape(-1), base.infos[name].code
        out_storage = dtypes.storage(out_code)
        with self.lock:
            self.report.interpolated += n
        for s, e in chunk_ranges(n):
            m = e - s
            if kept:
                fold = [bufs.get(("fold", i), n)[s:e] for i in range(M)]
            else:
                fold = [
                    dtypes.to_float32(r[s:e], c, bufs.get(("fold", i), m))
                    for i, (r, c) in enumerate(zip(fold_raw, fold_codes))
                ]
            values = [fold[fold_of_task[i]] for i in range(len(tasks))]
            fused = np.multiply(fold[0], coeffs[0], out=bufs.get(0, m))  # (m,)
            for a, v in zip(coeffs[1:], fold[1:]):
                np.add(fused, np.multiply(v, a, out=bufs.get(2, m)), out=fused)
            deltas = None
            if need_deltas:
                w0 = dtypes.to_float32(w0_raw[s:e], w0_code, bufs.get(1, m))
                with np.errstate(over="ignore", invalid="ignore"):
                    finite = math.isfinite(float(np.dot(w0, w0))) or np.isfinite(w0).all()
                if not finite:
                    raise nonfinite_error(name, [base])
                deltas = [bufs.get(("delta", i), m) for i in range(len(values))]
                for v, d in zip(values, deltas):
                    np.abs(np.subtract(v, w0, out=d), out=d)
            idx = cores(s, e, deltas)
            won, pairs, covered = resolve_cores(
                fused,
                idx,
                [v[i] for v, i in zip(values, idx)],
                [d[i] for d, i in zip(deltas, idx)] if deltas is not None else None,
                self.conflict,
                self.scratch,
                tie_hash=lambda local, s=s: tie_hash(self.tie_seed, self.ranks[name], local + s),
            )
            self._count(won, pairs, covered)
            if out_code == "F32":
                yield fused
            else:
                if out_code == "F16":
                    _check_f16_range(name, fused)
                yield dtypes.from_float32(
                    fused,
                    out_code,
                    bufs.get(("out", out_code), m, out_storage),
                    scratch=bufs.get("bits", m, np.uint32),
                    finite=True,
                )

    def _cores(self, name):
        """cores(s, e, deltas) -> each task's core positions inside the chunk [s, e)."""
        # positions from boolean masks with numpy: its flatnonzero is 2-3x torch's nonzero (see select.TopK.count)
        if self.masks is not None:
            full = [m.bits(name).reshape(-1) for m in self.masks]
            return lambda s, e, deltas: [np.flatnonzero(f[s:e]) for f in full]
        sels = self.selectors
        if isinstance(sels[0], PerTensorTopK):  # needs whole tensors
            w0 = self.base.float32(name)
            full = [
                sel.select(name, 0, np.abs(t.float32(name) - w0)).numpy().reshape(-1)
                for sel, t in zip(sels, self.tasks)
            ]
            return lambda s, e, deltas: [np.flatnonzero(f[s:e]) for f in full]
        if not self.counting:
            return lambda s, e, deltas: [np.flatnonzero(sel.select(name, s, d).numpy()) for sel, d in zip(sels, deltas)]

        def count(s, e, deltas):
            out = []
            for i, (sel, d) in enumerate(zip(sels, deltas)):
                try:
                    out.append(sel.count(name, s, d, finite=True))  # inputs checked in `tensor`
                except NonFiniteError:
                    raise nonfinite_error(name, [self.base, self.tasks[i]]) from None
            return out

        return count

    def finish_counting(self, writer: CheckpointWriter, codes: dict[str, str]) -> None:
        """After the counting pass: let the selectors choose among their candidates, then rewrite the
        output where a chosen candidate changes what the cores write (counts corrected likewise)."""
        sels = self.selectors
        for sel in sels:
            sel.end_pass()
        chosen_by = [sel.chosen() for sel in sels]
        if any(c is None for c in chosen_by):
            raise _WindowMissed()
        empty = np.zeros(0, dtype=np.int64)
        names = sorted(
            {name for c in chosen_by for name in c},  # the largest first
            key=lambda n: -sum(len(c.get(n, empty)) for c in chosen_by),
        )

        def at(ckpt: Checkpoint, name: str, positions: np.ndarray) -> np.ndarray:
            return dtypes.to_float32(ckpt.array(name).reshape(-1)[positions], ckpt.infos[name].code)

        def patch(name: str) -> None:
            P, chosen = _union([c.get(name, empty) for c in chosen_by])
            w0 = at(self.base, name, P)
            values = [at(t, name, P) for t in self.tasks]
            deltas = [np.abs(v - w0) for v in values]
            sure = [sel.above_hi(name, P, d) for d, sel in zip(deltas, sels)]
            final = [s | c for s, c in zip(sure, chosen)]
            value = np.empty(len(P), dtype=np.float32)  # every position of P is in a final core
            for sign, masks in ((-1, sure), (1, final)):
                idx = [np.flatnonzero(m) for m in masks]
                won, pairs, covered = resolve_cores(
                    value,
                    idx,
                    [v[i] for v, i in zip(values, idx)],
                    [d[i] for d, i in zip(deltas, idx)],
                    self.conflict,
                    self.scratch,
                    tie_hash=lambda local: tie_hash(self.tie_seed, self.ranks[name], P[local]),
                )
                self._count(won, pairs, covered, sign)
            writer.patch(name, P, dtypes.from_float32(value, codes[name], finite=True))

        self._each(names, patch)
        for sel in sels:
            sel.selected = sel.k
        self._publish_pairs()
