"""The selector protocol and the driver that feeds selectors, pass by pass.

A selector finds an exact top-k over a stream of score chunks. It says which pass it wants next
(`Pass`), observes the chunks of that pass, and is told when the pass ends; once it wants nothing
more, it selects chunk by chunk (or, after a counting pass, hands over the few positions it chose
inside its window). `run_passes` is the one driver of these passes for cores, GaLLoP and fusion:
the chunks come from a callable the caller builds (deltas, GaLLoP scores, ...), so every
selection reads its inputs the same way and several selectors share every pass.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm.auto import tqdm

from ..errors import NonFiniteError
from .keys import CHUNK

if TYPE_CHECKING:
    from ..storage.checkpoint import Checkpoint
    from ..storage.scope import Scope

MAX_WORKERS = 4
PARALLEL_SELECTORS = 3  # selectors observe a chunk on several threads from this many on
BLOCK = 4096  # sample block (entries)
SAMPLE_CAP = 1 << 22  # at most ~4 M sampled scores


def workers() -> int:
    """Threads to work with: the count asked for (torch's, when torch is loaded; else OMP_NUM_THREADS,
    else the CPUs available), at most MAX_WORKERS. Each worker runs single-threaded numpy (which
    releases the GIL), so the process uses as many cores as a multi-threaded library would."""
    if "torch" in sys.modules:
        n = sys.modules["torch"].get_num_threads()
    else:
        try:
            n = int(os.environ.get("OMP_NUM_THREADS", ""))
        except ValueError:
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, n))


def chunk_ranges(n: int, size: int = CHUNK) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def sample_ranges(name: str, n: int, total: int) -> list[tuple[int, int]]:
    """Seeded sample blocks of one tensor: all of a small tensor, else ~fraction·n entries in blocks."""
    import zlib

    frac = min(0.02, SAMPLE_CAP / max(1, total))
    if n <= 64 * BLOCK:
        return [(0, n)]
    blocks = n // BLOCK
    count = max(1, min(blocks, round(frac * n / BLOCK)))
    g = np.random.default_rng(zlib.crc32(name.encode()))
    picks = np.sort(g.permutation(blocks)[:count]).tolist()
    return [(b * BLOCK, (b + 1) * BLOCK) for b in picks]


class Pass(Enum):
    """What a selector wants to see next."""

    SAMPLE = "sample"  # a seeded ~2 % of every tensor, in blocks (`sample_ranges`), weighted
    COUNT = "count"  # every score: the counting pass (sure positions known per chunk)
    FULL = "full"  # every score again: a fallback pass (radix histograms)


class Selector(Protocol):
    """An exact top-k selector (TopK, PerTensorTopK). `k` entries are selected, `threshold` is the
    k-th largest score once known, `selected` counts what `select` returned, `full_passes` counts the
    full passes it has seen (the sampling pass aside) and `sample_values` holds the sampled scores."""

    k: int
    threshold: float
    selected: int
    full_passes: int
    sample_values: np.ndarray

    def wants(self) -> Pass | None:
        """The pass to feed next, or None once the selector can select."""

    def observe(self, name: str, start: int, scores, weight: float = 1.0, blocks: int = 1) -> None:
        """One chunk of the current pass (`weight`, `blocks`: for the sampling pass)."""

    def end_pass(self) -> None:
        """The current pass has seen every chunk."""

    def chosen(self) -> dict[str, np.ndarray] | None:
        """After a counting pass that settled the selection: the positions chosen inside the window per
        tensor (sorted flat indices), which with the pass's sure positions are the whole selection.
        None when the selection is made by `select` instead."""

    def select(self, name: str, start: int, scores):
        """The boolean mask (torch) of one chunk, chunks in scope order, once `wants()` is None."""


class CountingSelector(Selector, Protocol):
    """A selector that asks for `Pass.COUNT` also says, per chunk of that pass, what is surely selected
    (every score above `hi`)."""

    hi: float

    def count(self, name: str, start: int, scores, finite: bool = False) -> np.ndarray:
        """Observe a chunk of the counting pass; its sure positions (ascending, in the chunk)."""

    def sure_positions(self) -> np.ndarray:
        """The sure positions of the chunk just observed."""

    def preliminary(self, n: int) -> np.ndarray:
        """`sure_positions` as a boolean mask of the n-entry chunk (scratch)."""


class Buffers:
    """Reused numpy scratch buffers (float32 unless asked): streaming allocates nothing per chunk, so
    glibc's heap cannot fragment and grow (freeing and re-allocating 16 MB chunks does exactly that)."""

    def __init__(self):
        self._bufs: dict[object, np.ndarray] = {}

    def get(self, slot, n: int, dtype=np.float32) -> np.ndarray:
        b = self._bufs.get(slot)
        if b is None or b.size < n or b.dtype != dtype:
            b = self._bufs[slot] = np.empty(max(n, CHUNK), dtype=dtype)
        return b[:n]


def nonfinite_error(
    name: str, ckpts: list[Checkpoint], overflow: str = "the difference of two checkpoints overflows float32 (Inf)"
) -> NonFiniteError:
    """The error naming the first of `ckpts` whose tensor holds NaN/Inf (`overflow` says what else it was)."""
    for c in ckpts:
        if not c.infos[name].is_float:
            continue
        if not np.isfinite(c.float32(name)).all():
            return NonFiniteError(
                f"tensor '{name}' in {c.path} holds NaN/Inf values; fix or re-export that "
                "checkpoint (NaN/Inf would poison every selection and merge)"
            )
    return NonFiniteError(f"tensor '{name}': {overflow}")


def run_passes(
    selectors: list[Selector],
    scope: Scope,
    chunks,
    *,
    sources: list[list[Checkpoint]],
    progress: bool = False,
    desc: str = "select",
    emit=None,
    sample_only: bool = False,
    gathers: bool = False,
) -> None:
    """Feed the selectors until each can select (with `sample_only`, until one wants a full pass).

    `chunks(name, ranges)` yields (start, [scores for each selector]) per range; with `gathers`, it
    also takes `gather=True` and yields every range of the sampling pass at once, concatenated.
    `sources[i]` are the checkpoints behind selector i (named in a NaN error); `emit(i, name, start,
    selector, chunk_len, n)` follows each chunk of the count pass (the selector holds its sure bits).
    In full passes, selectors observe a chunk on `workers()` threads at once (each selector and its
    `emit(i, …)` stay on one thread per chunk; chunks still arrive in scope order)."""
    # several selectors share each chunk; with three or more, one thread each pays off (real model, 3 tasks,
    # 2 threads: 6.9 s -> 5.7 s); with two, the hand-offs cost what they save (0.49 B synthetic: 4.6 s at
    # 1 thread, 5.5-6.1 s on two), so two selectors stay on one thread
    threads = min(workers(), len(selectors)) if len(selectors) >= PARALLEL_SELECTORS else 1
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        _feed_passes(selectors, scope, chunks, sources, progress, desc, emit, sample_only, gathers, pool)
    finally:
        if pool is not None:
            pool.shutdown()


def _feed_passes(selectors, scope, chunks, sources, progress, desc, emit, sample_only, gathers, pool) -> None:
    p = 0
    while kinds := {s.wants() for s in selectors} - {None}:
        p += 1
        full = bool(kinds - {Pass.SAMPLE})
        if full and sample_only:
            return
        for name in tqdm(scope.names, desc=f"{desc}: pass {p}", disable=not progress, leave=False):
            n = scope.numel(name)
            ranges = chunk_ranges(n) if full else sample_ranges(name, n, scope.numel())
            weight = {} if full else {"weight": n / sum(e - s for s, e in ranges)}  # scores per sampled score
            items = chunks(name, ranges)
            if not full and gathers:  # the sample blocks of a tensor in one go
                items, weight = chunks(name, ranges, gather=True), {**weight, "blocks": len(ranges)}
            for start, scores in items:

                def feed(i, start=start, scores=scores, n=n, name=name, weight=weight):
                    sel, sc = selectors[i], scores[i]
                    if callable(sc):  # computed by the worker that consumes it (`delta_chunks(lazy=True)`)
                        sc = sc()
                    counting = sel.wants() is Pass.COUNT
                    try:
                        sel.observe(name, start, sc, **weight)
                    except NonFiniteError:
                        raise nonfinite_error(name, sources[i]) from None
                    if emit is not None and counting:
                        emit(i, name, start, sel, len(sc), n)

                busy = [i for i, sel in enumerate(selectors) if sel.wants() is not None]
                if pool is not None and full and len(busy) > 1:  # selectors are independent: one per worker
                    list(pool.map(feed, busy))
                else:
                    for i in busy:
                        feed(i)
        for sel in selectors:
            sel.end_pass()
