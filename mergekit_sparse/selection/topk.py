"""Exact top-k over a stream of score tensors, with memory independent of model size.

Every "top x %" of the project (core regions, GaLLoP and its baselines) goes through here.
Scores arrive as float32 chunks of each tensor (numpy arrays, or CPU torch tensors), tensors in
scope order (sorted names), chunks in flat order. Ties at the threshold follow METHODS §2: among
the entries equal to the threshold, those with the smallest seeded position hash
(`keys.tie_hash`, of the tensor's rank and the flat index) are taken, so no tensor is favoured and
the result does not depend on the scan order. Entries are ordered by the composite key
(score, hash) — score descending, hash ascending — which is a total order; only entries whose score
equals a window bound are ever hashed. The selection is numpy, so the core and fuse commands never
load torch; only the masks `select` returns are torch tensors.

`TopK` (the default) needs one full pass to find the threshold:

  sample  a seeded ~2 % of every tensor, in 4096-entry blocks (touches few pages), each sampled
          score weighted by the share of its tensor it stands for: a window [lo, hi] of composite
          keys around the weighted estimate of the k-th largest, as wide as the spread of the
          sampled blocks says. A bound that falls inside a run of equal scores (bf16 fine-tunes
          have few distinct |Δ|: millions of entries tie) is a (score, hash) pair: the hash is
          uniform, so the share of the run above the bound is estimated like any count, and the
          window stays narrow however many entries tie.
  count   every score: the count above hi, and the candidates in [lo, hi] with their positions
  select  everything above hi, plus the first k − count candidates in composite order; the core
          command writes the sure part during the count pass and patches the chosen candidates.

When the window misses (a pathological distribution, or more candidates than CANDIDATE_CAP), it
falls back to `RadixTopK`, an exact radix select on the float32 bit patterns: a histogram of the
high 16 bits, then of the low 16 bits in the threshold bucket, then (when only part of the
threshold's entries is taken) a pass over their hashes, then selection. Either way the result is
exact; only the number of passes differs.

Every selector also reports the tie statistics of METHODS §2: `ties` (entries equal to the
threshold), `tie_picks` (how many of the k were chosen among them) and `above_strict` (entries
strictly above it; p_strict = 100 · above_strict / total).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import numpy as np

from ..errors import NonFiniteError, OptionError
from ..storage.masks import ascending
from .keys import (
    BINS,
    CHUNK,
    _chunks,
    _np,
    _torch,
    float_keys,
    key_to_float,
    kth_largest_key,
    smallest_hashes,
    tie_hash,
)
from .passes import Pass

if TYPE_CHECKING:
    from ..storage.scope import Scope

CANDIDATE_CAP = 1 << 24  # at most ~16 M candidates (16 bytes each) before falling back to radix
WINDOW_SLACK = 0.002  # the window's half-width is at least this share of all scores
ALL = 1 << 64  # a hash bound above every hash: the whole run of equal scores is on that side


def _check_finite(scores, name: str) -> None:
    if not np.isfinite(_np(scores)).all():
        raise NonFiniteError(f"tensor '{name}': scores contain NaN/Inf; an input holds NaN/Inf values")


def k_for(percent: float, total: int, *, what: str = "p") -> int:
    """k = floor(percent * total / 100), with a clear error when it is 0 or percent is out of range."""
    if not (0 < percent <= 100):
        raise OptionError(f"--{what} {percent} is out of range; give a percentage in (0, 100], e.g. --{what} 1")
    k = int(percent * total // 100)
    if k == 0:
        smallest = 100.0 / total
        raise OptionError(
            f"--{what} {percent} selects no parameter of the {total} in scope; "
            f"the smallest usable value is {smallest:.3g}"
        )
    return k


class RadixTopK:
    """Exact top-k by radix select on float bit patterns (see the module doc).

    Pass 1 and 2: `observe(name, start, scores)` for every chunk, then `next_pass()`; when only part of
    the threshold's entries is taken, a third observe pass reads their hashes (`wants_hash_pass`);
    then `select(name, start, scores)` chunk by chunk returns the boolean mask of that chunk.
    `threshold` is the k-th largest score. `ranks` maps tensor names to their §2 rank.
    """

    def __init__(self, k: int, total: int, *, ranks: dict[str, int], seed: int = 0):
        if not 0 < k <= total:
            raise OptionError(f"cannot select {k} of {total} parameters")
        self.k, self.total, self.ranks, self.seed = k, total, ranks, seed
        self.stage = 1
        self.hist = np.zeros(BINS, dtype=np.int64)
        self.bucket = -1
        self.threshold_key = 0
        self.ties = self.tie_picks = self.above = 0
        self.hash_cut = ALL  # threshold entries with a hash below this are taken
        self.selected = 0

    @property
    def everything(self) -> bool:
        return self.k == self.total

    @property
    def wants_hash_pass(self) -> bool:
        return self.stage == 3

    def observe(self, name: str, start: int, scores) -> None:
        if self.stage == 1:
            _check_finite(scores, name)
        if self.everything:
            return
        offset = start
        for chunk in _chunks(scores):
            key = float_keys(chunk)
            if self.stage == 1:
                self.hist += np.bincount((key >> 16) + BINS // 2, minlength=BINS)
            elif self.stage == 2:
                low = key[((key >> 16) + BINS // 2) == self.bucket] & 0xFFFF
                self.hist += np.bincount(low, minlength=BINS)
            else:
                h = tie_hash(self.seed, self.ranks[name], np.flatnonzero(key == self.threshold_key) + offset)
                self._below += int(np.count_nonzero(h < np.uint64(self._lo_h)))
                inside = h[(h >= np.uint64(self._lo_h)) & (h <= np.uint64(self._hi_h))]
                self._inside.append(inside)
            offset += key.size

    def next_pass(self) -> None:
        if self.everything:
            self.stage = 4
            return
        if self.stage == 3:
            self._finish_hash_pass()
            return
        # walk bins from the top until the running count reaches what is still needed
        need = self.k if self.stage == 1 else self.k - self.above
        above_in_bins = self.hist[::-1].cumsum()  # count in bins >= flipped position
        pos = int(np.searchsorted(above_in_bins, need))
        b = BINS - 1 - pos
        greater = int(above_in_bins[pos - 1]) if pos > 0 else 0
        if self.stage == 1:
            self.bucket, self.above = b, greater
            self.stage = 2
        else:
            self.threshold_key = ((self.bucket - BINS // 2) << 16) | b
            self.above += greater
            self.ties = int(self.hist[b])
            self.tie_picks = self.k - self.above
            self.stage = 3 if self.tie_picks < self.ties else 4
            if self.stage == 3:
                self._hash_window(widen=1.0)
        self.hist = np.zeros(BINS, dtype=np.int64)

    def _hash_window(self, widen: float) -> None:
        """Hashes are uniform: the cut h* with tie_picks of the ties below it lies near q·2^64."""
        n, r = self.ties, self.tie_picks
        q = r / n
        eps = widen * (8 * math.sqrt(n * q * (1 - q)) + 64) / n
        self._lo_h = max(0, int((q - eps) * ALL))
        self._hi_h = min(ALL - 1, int((q + eps) * ALL))
        self._below, self._inside = 0, []

    def _finish_hash_pass(self) -> None:
        inside = np.concatenate(self._inside) if self._inside else np.zeros(0, dtype=np.uint64)
        need = self.tie_picks - self._below
        if 0 < need <= inside.size:
            self.hash_cut = int(np.partition(inside, need - 1)[need - 1]) + 1
            self.stage = 4
        elif need == 0:
            self.hash_cut = self._lo_h
            self.stage = 4
        else:  # the hash window missed (astronomically rare): read the hashes again, wider
            self._hash_window(widen=64.0 if self._hi_h - self._lo_h < ALL // 2 else ALL)

    @property
    def threshold(self) -> float:
        if self.everything:
            return float("-inf")
        return key_to_float(self.threshold_key)

    def select(self, name: str, start: int, scores):
        """The boolean mask of one chunk (a torch tensor of the shape of `scores`)."""
        if self.stage != 4:
            raise RuntimeError("RadixTopK.select() before its observe passes; this is a bug")
        shape = tuple(scores.shape)
        if self.everything:
            self.selected += math.prod(shape)
            return _torch(np.ones(shape, dtype=bool))
        parts, offset = [], start
        for chunk in _chunks(scores):
            key = float_keys(chunk)
            mask = key > self.threshold_key
            eq = np.flatnonzero(key == self.threshold_key)
            if eq.size:
                if self.hash_cut >= ALL:
                    mask[eq] = True
                else:
                    h = tie_hash(self.seed, self.ranks[name], eq + offset)
                    mask[eq[h < np.uint64(self.hash_cut)]] = True
            parts.append(mask)
            offset += key.size
        mask = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, dtype=bool)
        self.selected += int(mask.sum())
        return _torch(mask.reshape(shape))

    @property
    def above_strict(self) -> int:
        return self.above


def _by_tensor(tensor_ids: np.ndarray):
    """(tensor id, indices into `tensor_ids` of that tensor) for every id present: one stable sort,
    not a scan per tensor (a model has hundreds of tensors, a selection millions of entries)."""
    if not tensor_ids.size:
        return
    order = np.argsort(tensor_ids, kind="stable")
    ids = tensor_ids[order]
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    for part in np.split(order, cuts):
        yield int(tensor_ids[part[0]]), part


def topk_mask(scores, k: int, *, rank: int = 0, seed: int = 0) -> tuple:
    """Exact top-k of one in-memory tensor (of §2 rank `rank`), ties by the §2 hash:
    (torch mask, threshold, entries equal to the threshold, of them chosen)."""
    mask, t, ties, picks = topk_bits(scores, k, rank=rank, seed=seed)
    return _torch(mask.reshape(tuple(scores.shape))), t, ties, picks


def topk_bits(scores, k: int, *, rank: int = 0, seed: int = 0, nonneg: bool = False) -> tuple:
    """`topk_mask` in numpy (flat bool mask): for callers that never load torch (the merge methods).

    Beside `scores` it allocates one int32 key array and the bool mask; `nonneg` says the scores are a
    float32 numpy array of values >= +0.0 (an |x|, never -0.0), whose bits are their keys: viewed, not
    copied."""
    n = math.prod(tuple(scores.shape))
    if k <= 0:
        return np.zeros(n, dtype=bool), float("inf"), 0, 0
    if k >= n:
        return np.ones(n, dtype=bool), float("-inf"), 0, 0
    if nonneg:
        key = scores.reshape(-1).view(np.int32)
    else:
        key, flat = np.empty(n, dtype=np.int32), scores.reshape(-1)
        for start in range(0, n, CHUNK):
            key[start : start + CHUNK] = float_keys(flat[start : start + CHUNK])  # numpy or torch, any float dtype
    t = kth_largest_key(key, k)
    mask, eq = np.empty(n, dtype=bool), []
    for s in range(0, n, CHUNK):
        c = key[s : s + CHUNK]
        np.greater(c, t, out=mask[s : s + CHUNK])
        eq.append(np.flatnonzero(c == t) + s)
    eq = np.concatenate(eq)
    r = k - int(np.count_nonzero(mask))
    if r == eq.size:
        mask[eq] = True
    else:
        mask[eq[smallest_hashes(tie_hash(seed, rank, eq), r)]] = True
    return mask, key_to_float(t), int(eq.size), r


def _largest(v: np.ndarray, r: int) -> np.ndarray:
    """Indices of every entry of `v` at or above some value, at least the r largest, by value descending.

    The value comes from a 1-in-16 subsample (with margin), which costs far less than partitioning all
    of `v`; argpartition is the fallback should the subsample's guess hold too few."""
    m = len(v)
    if r >= m:
        top = np.arange(m)
    else:
        sub = v[::16]
        q = max(0, len(sub) - 2 * (r // 16) - 64)
        top = np.flatnonzero(v >= np.partition(sub, q)[q])
        if len(top) < r:
            top = np.argpartition(v, m - r)[m - r :]
    return top[np.argsort(-v[top], kind="stable")]


class TopK:
    """Exact global top-k with a sampled window and one counting pass (radix fallback).

    A `passes.CountingSelector`: while `wants()` is a `Pass`, feed `observe(name, start, scores)` for
    the ranges of that pass, then `end_pass()`; once `wants()` is None, either `chosen()` completes the
    counting pass's sure positions, or `select(name, start, scores)` returns each chunk's mask.
    `ranks` gives each tensor's §2 rank (`Scope.ranks`), `seed` the tie seed.

    The window is two composite bounds (value, hash cut): an entry (x, h) is above a bound (v, H)
    when x > v, or x == v and h < H (H = ALL: the whole run of v is above; 0: none of it).
    """

    def __init__(self, k: int, total: int, *, ranks: dict[str, int], seed: int = 0):
        if not 0 < k <= total:
            raise OptionError(f"cannot select {k} of {total} parameters")
        self.k, self.total, self.ranks, self.seed = k, total, ranks, seed
        self._phase = "sample"
        self.sample_values = np.zeros(0, dtype=np.float32)  # kept for quantile summaries
        self.samples: list[np.ndarray] = []
        self.sample_meta: list[tuple[int, float, int]] = []  # (tensor index, weight, blocks) per observed sample
        self._sample_tensors: dict[str, int] = {}
        self.lo = self.hi = 0.0  # the bounds' values
        self.lo_cut = self.hi_cut = ALL  # and their hash cuts
        self.above = 0
        self._hi_eq_sure = 0  # sure entries equal to hi (taken by their hash)
        self._lo_eq_out = 0  # entries equal to lo left out by their hash
        # candidates live in a few large arrays grown by doubling (many small kept tensors between
        # large temporaries would fragment the heap)
        self.cand_vals = np.empty(0, dtype=np.float32)
        self.cand_pos = np.empty(0, dtype=np.int64)
        self.cand_tensor = np.empty(0, dtype=np.int32)
        self.n_cand = 0
        self.order: dict[str, int] = {}
        self.extra: dict[str, np.ndarray] = {}  # name -> sorted flat positions of chosen candidates
        self.tie_extra: dict[str, np.ndarray] = {}  # the chosen candidates equal to the threshold
        self.ties_at_hi = False
        self.radix: RadixTopK | None = None
        self._local = threading.local()  # per-thread scratch for `count`
        self._lock = threading.Lock()  # `count` may be called from several threads
        self._sure = None
        self.full_passes = 0  # full passes over the data (the sample pass aside)
        self.threshold = float("-inf")
        self.ties = self.tie_picks = self.above_strict = 0
        self.selected = 0

    @property
    def everything(self) -> bool:
        return self.k == self.total

    def wants(self) -> Pass | None:
        if self._phase == "sample":
            return Pass.SAMPLE
        if self._phase == "count":
            return Pass.COUNT
        if self._phase in ("radix1", "radix2", "radix3"):
            return Pass.FULL
        return None

    def chosen(self) -> dict[str, np.ndarray] | None:
        return self.extra if self._phase == "window" else None

    def _np_bool(self, n: int, slot: str = "ge") -> np.ndarray:
        """Reused per-thread bool scratch (no per-chunk allocation: keeps the heap from fragmenting)."""
        b = getattr(self._local, slot, None)
        if b is None or b.size < n:
            b = np.empty(max(n, CHUNK), dtype=bool)
            setattr(self._local, slot, b)
        return b[:n]

    def observe(self, name: str, start: int, scores, weight: float = 1.0, blocks: int = 1) -> None:
        """Sample pass only: `weight` is how many scores of the tensor each sampled score stands for, and
        `scores` may be `blocks` equal-size sample blocks of one tensor, concatenated."""
        if self._phase == "sample":
            scores = _np(scores)
            _check_finite(scores, name)
            self.samples.append(np.array(scores, dtype=np.float32))
            t = self._sample_tensors.setdefault(name, len(self._sample_tensors))
            self.sample_meta.append((t, weight, blocks))
        elif self._phase == "count":
            self._sure = self.count(name, start, scores)
        else:
            self.radix.observe(name, start, scores)

    def _cut(self, name: str, start: int, idx: np.ndarray, cut: int) -> np.ndarray:
        """Which of the chunk positions `idx` (all holding a bound's value) lie above that bound's hash cut."""
        if cut >= ALL:
            return np.ones(idx.size, dtype=bool)
        if cut <= 0:
            return np.zeros(idx.size, dtype=bool)
        return tie_hash(self.seed, self.ranks[name], idx + start) < np.uint64(cut)

    def count(self, name: str, start: int, scores, finite: bool = False) -> np.ndarray:
        """The count pass's work on one chunk; returns its sure positions (above hi), ascending, in the
        chunk. Thread-safe: workers may count different tensors at once (each tensor's chunks in order).
        `finite`: the caller has made sure the scores hold no NaN (it checked the inputs more cheaply)."""
        sn = _np(scores)
        if not finite:
            with np.errstate(over="ignore", invalid="ignore"):
                total = float(np.add.reduce(sn))
            if not math.isfinite(total):  # NaN/Inf make the sum so (or a finite sum overflowed)
                _check_finite(sn, name)
        # one comparison over the chunk; the few entries >= lo (sure + candidates) are split after.
        # numpy here: its single-threaded compare and flatnonzero beat torch's two-threaded ones 2-3x
        idx = np.flatnonzero(np.greater_equal(sn, self.lo, out=self._np_bool(sn.size)))
        vals = sn[idx]
        if self.hi == self.lo and self.hi_cut < ALL:  # both bounds inside one run: the tie-heavy case
            return self._count_in_run(name, start, idx, vals)
        above = vals > self.hi
        hi_eq_sure = lo_eq_out = 0
        run_hi = np.flatnonzero(vals == self.hi) if self.hi_cut > 0 else np.zeros(0, dtype=np.int64)
        if self.hi_cut >= ALL:  # the whole run of hi is sure
            sure_hi = run_hi
        elif run_hi.size:  # the run's hash decides sure or candidate
            sure_hi = run_hi[tie_hash(self.seed, self.ranks[name], idx[run_hi] + start) < np.uint64(self.hi_cut)]
        else:
            sure_hi = run_hi
        above[sure_hi] = True
        hi_eq_sure = sure_hi.size
        keep = ~above
        if self.lo_cut < ALL and self.lo < self.hi:  # the run of lo: its hash decides candidate or out
            run_lo = np.flatnonzero(vals == self.lo)
            if run_lo.size:
                out = run_lo[tie_hash(self.seed, self.ranks[name], idx[run_lo] + start) >= np.uint64(self.lo_cut)]
                keep[out] = False
                lo_eq_out = out.size
        sure = idx[above]
        self._local.sure_tie = idx[sure_hi]  # sure entries at hi: tie picks if hi is the threshold
        with self._lock:
            self.above += sure.size
            self._hi_eq_sure += hi_eq_sure
            self._lo_eq_out += lo_eq_out
            if self.n_cand > CANDIDATE_CAP:
                return sure
            c = int(np.count_nonzero(keep))
            if c and self.n_cand + c <= CANDIDATE_CAP:
                t = self.order.setdefault(name, len(self.order))
                self._grow(self.n_cand + c)
                a, b = self.n_cand, self.n_cand + c
                self.cand_vals[a:b] = vals[keep]
                self.cand_pos[a:b] = idx[keep] + start
                self.cand_tensor[a:b] = t
            self.n_cand += c
        return sure

    def _count_in_run(self, name: str, start: int, idx: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """`count` when both window bounds lie in the run of one value (millions of entries tie at the
        threshold): entries above the run are sure; the run is hashed once and split by the two hash
        cuts into sure, candidates and out, without a boolean array per class over the whole run."""
        above = vals > self.hi
        run = np.flatnonzero(vals == self.hi)
        h = tie_hash(self.seed, self.ranks[name], idx[run] + start)
        up = h < np.uint64(self.hi_cut)
        inside = ~up & (h < np.uint64(self.lo_cut)) if self.lo_cut < ALL else ~up
        sure_run, cand = run[up], run[inside]
        above[sure_run] = True
        sure = idx[above]
        self._local.sure_tie = idx[sure_run]
        with self._lock:
            self.above += sure.size
            self._hi_eq_sure += sure_run.size
            self._lo_eq_out += run.size - sure_run.size - cand.size
            if self.n_cand > CANDIDATE_CAP:
                return sure
            c = cand.size
            if c and self.n_cand + c <= CANDIDATE_CAP:
                t = self.order.setdefault(name, len(self.order))
                self._grow(self.n_cand + c)
                a, b = self.n_cand, self.n_cand + c
                self.cand_vals[a:b] = self.hi
                self.cand_pos[a:b] = idx[cand] + start
                self.cand_tensor[a:b] = t
            self.n_cand += c
        return sure

    def _grow(self, n: int) -> None:
        if n <= self.cand_vals.size:
            return
        cap = max(n, 2 * self.cand_vals.size, 1 << 16)
        for key in ("cand_vals", "cand_pos", "cand_tensor"):
            old = getattr(self, key)
            new = np.empty(cap, dtype=old.dtype)
            new[: self.n_cand] = old[: self.n_cand]
            setattr(self, key, new)

    def end_pass(self) -> None:
        if self._phase != "sample":
            self.full_passes += 1
        if self._phase == "sample":
            self._window()
            self._phase = "count" if self.k < self.total else "done"
        elif self._phase == "count":
            self._scratch, self._sure, self._local = {}, None, threading.local()
            if not self._resolve():
                self.radix = RadixTopK(self.k, self.total, ranks=self.ranks, seed=self.seed)
                self._phase = "radix1"
        elif self._phase in ("radix1", "radix2", "radix3"):
            self.radix.next_pass()
            if self.radix.wants_hash_pass:
                self._phase = "radix3"
            elif self._phase == "radix1":
                self._phase = "radix2"
            else:
                self.threshold = self.radix.threshold
                self.ties, self.tie_picks = self.radix.ties, self.radix.tie_picks
                self.above_strict = self.radix.above_strict
                self._phase = "radix"

    def _window(self) -> None:
        """Bracket the k-th largest composite key from the sample: [lo, hi] around the weighted estimate.

        Every sampled score stands for `weight` scores of its tensor (1 for a tensor sampled whole,
        n / sampled for block-sampled ones), so tensors sampled at different rates do not bias the
        estimate. The half-width is 8 standard deviations of the estimated count above the
        threshold (a stratified cluster-sample variance from the spread of the per-block counts
        within each tensor), and at least WINDOW_SLACK of all scores: a cluster of large scores
        that no sampled block hit is invisible to the variance (the benchmark's planted rows are
        one: 12 % of one tensor, missed by all 5 of its sampled blocks), so the floor is what keeps
        such a window from missing. A bound inside a run of equal scores gets the hash cut that
        leaves the estimated share of the run above it. A miss is caught after the count pass
        (radix fallback).
        """
        samples, meta = self.samples, self.sample_meta
        self.samples, self.sample_meta = [], []
        v = np.concatenate(samples) if samples else np.zeros(0, dtype=np.float32)
        self.sample_values = v  # (unsorted) kept for quantile summaries
        m = v.size
        if m == 0:
            self.hi, self.lo = float("inf"), float("-inf")
            return
        per = np.array([b for _, _, b in meta], dtype=np.int64)  # blocks of each observed sample
        sizes = np.repeat(np.array([x.size // b for x, (_, _, b) in zip(samples, meta)], dtype=np.int64), per)
        w_block = np.repeat(np.array([w for _, w, _ in meta], dtype=np.float64), per)
        tensor_of = np.repeat(np.array([t for t, _, _ in meta], dtype=np.int64), per)
        ends = np.cumsum(sizes)  # where each block ends in v
        k = self.k
        R = min(m, int(2 * k * m / max(float(w_block @ sizes), 1.0)) + 4096)
        while True:
            top = _largest(v, R)
            R = len(top)
            cw = np.cumsum(w_block[np.searchsorted(ends, top, side="right")])  # estimated count at or above each
            j = min(int(np.searchsorted(cw, k)), R - 1)
            t_hat = v[top[j]]
            delta = (
                max(8 * self._count_std(v, ends, w_block, tensor_of, t_hat), WINDOW_SLACK * self.total)
                + 16 * w_block.max()
            )
            if cw[-1] >= k + delta or R == m:
                break
            R = min(m, 2 * R)
        desc = -v[top]  # ascending

        def bound(rank: float) -> tuple[float, int]:
            """The composite key with an estimated `rank` entries above it."""
            j = min(int(np.searchsorted(cw, rank)), R - 1)
            val = float(v[top[j]])
            a = int(np.searchsorted(desc, -val, side="left"))  # every sampled score > val is in `top`
            above = float(cw[a - 1]) if a else 0.0
            at = np.flatnonzero(v == val)
            run = float(w_block[np.searchsorted(ends, at, side="right")].sum())  # estimated size of val's run
            share = min(1.0, max(0.0, (rank - above) / run))
            return val, min(ALL, int(share * ALL))

        if k - delta > 0:
            self.hi, self.hi_cut = bound(k - delta)
        else:
            self.hi, self.hi_cut = float("inf"), ALL
        if int(np.searchsorted(cw, k + delta)) < R:
            self.lo, self.lo_cut = bound(k + delta)
        else:
            self.lo, self.lo_cut = float("-inf"), ALL
        # room for the candidates the sample predicts, so the count pass rarely regrows: untouched room
        # costs address space only (large numpy arrays are mapped lazily), a regrowth copies everything
        self._grow(int(min(1.25 * 2 * delta, CANDIDATE_CAP)))

    @staticmethod
    def _count_std(v, ends, w_block, tensor_of, t_hat) -> float:
        """Standard deviation of the estimated number of scores >= t_hat (blocks sampled per tensor;
        `ends[b]` is where block b ends in `v`)."""
        at = np.flatnonzero(v >= t_hat)  # few: the sample's top
        c = np.bincount(np.searchsorted(ends, at, side="right"), minlength=len(ends)).astype(np.float64)
        sampled = w_block > 1
        if not sampled.any():
            return 0.0  # every tensor read whole: exact
        c, w, t = c[sampled], w_block[sampled], tensor_of[sampled]
        _, t = np.unique(t, return_inverse=True)
        nb = np.bincount(t).astype(np.float64)
        mean = np.bincount(t, weights=c) / nb
        ss = np.bincount(t, weights=(c - mean[t]) ** 2)
        wt = np.bincount(t, weights=w) / nb  # one weight per tensor
        var = np.where(
            nb > 1, wt**2 * nb * ss / np.maximum(nb - 1, 1), wt**2 * (np.bincount(t, weights=c) + 1)
        )  # one block: Poisson, pessimistic
        return float(np.sqrt(var.sum()))

    def _resolve(self) -> bool:
        need = self.k - self.above
        n = self.n_cand
        vals, pos, tens = self.cand_vals[:n], self.cand_pos[:n], self.cand_tensor[:n]
        self.cand_vals = self.cand_pos = self.cand_tensor = np.empty(0)
        if n > CANDIDATE_CAP or need <= 0 or need > n:
            return False
        names = {i: name for name, i in self.order.items()}
        # the need-th largest value (by its key: np.partition's introselect crawls over the few distinct
        # values of a bf16 fine-tune's |Δ|), then the entries equal to it taken by their hash (METHODS §2)
        t = np.float32(key_to_float(kth_largest_key(float_keys(vals), need)))
        chosen_mask = vals > t
        eq = np.flatnonzero(vals == t)
        r = need - int(np.count_nonzero(chosen_mask))
        if r < eq.size:
            h = np.empty(eq.size, dtype=np.uint64)
            for tid, at in _by_tensor(tens[eq]):
                h[at] = tie_hash(self.seed, self.ranks[names[tid]], pos[eq[at]])
            chosen_mask[eq[smallest_hashes(h, r)]] = True
        else:
            chosen_mask[eq] = True
        t = float(t)
        self.threshold = t
        hi_run = self._hi_eq_sure if t == self.hi else 0
        self.ties = int(eq.size) + hi_run + (self._lo_eq_out if t == self.lo else 0)
        self.above_strict = self.above - hi_run + int(np.count_nonzero(vals > t))
        self.tie_picks = self.k - self.above_strict
        self.ties_at_hi = t == self.hi  # the sure entries equal to hi are tie picks too
        picked = np.flatnonzero(chosen_mask & (vals == t))
        for tid, at in _by_tensor(tens[picked]):
            self.tie_extra[names[tid]] = ascending(pos[picked[at]])
        chosen = np.flatnonzero(chosen_mask)  # in scan order: a tensor's chunks arrive in order
        for tid, at in _by_tensor(tens[chosen]):
            self.extra[names[tid]] = ascending(pos[chosen[at]])
        self._phase = "window"
        return True

    def above_hi(self, name: str, positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Which entries (flat `positions` of `name`, their `scores`) the counting pass took as sure."""
        sure = scores > self.hi
        if self.hi_cut > 0:
            at = np.flatnonzero(scores == self.hi)
            if at.size:
                sure[at[self._cut(name, 0, positions[at], self.hi_cut)]] = True
        return sure

    def sure_positions(self) -> np.ndarray:
        """The count pass's sure part of the chunk just observed (above hi), as ascending positions
        in the chunk; `extra` later holds the chosen candidates."""
        return self._sure

    def preliminary_ties(self, n: int) -> np.ndarray:
        """The sure entries of the chunk just observed that equal hi, as a boolean mask (scratch): the
        tie picks among the sure ones should hi turn out to be the threshold (`ties_at_hi`)."""
        mask = self._np_bool(n, "preliminary_ties")
        mask[:] = False
        mask[self._local.sure_tie] = True
        return mask

    def preliminary(self, n: int) -> np.ndarray:
        """`sure_positions` as a boolean mask of the n-entry chunk (scratch, valid until the next `observe`)."""
        mask = self._np_bool(n, "preliminary")
        mask[:] = False
        mask[self._sure] = True
        return mask

    def select(self, name: str, start: int, scores):
        """The chunk's mask (a torch bool tensor) once every pass is done."""
        import torch

        if self._phase == "done":
            self.selected += math.prod(tuple(scores.shape))
            return torch.ones(tuple(scores.shape), dtype=torch.bool)
        if self._phase == "radix":
            mask = self.radix.select(name, start, scores)
            self.selected = self.radix.selected
            return mask
        sn = _np(scores).reshape(-1)
        mask = sn > self.hi
        if 0 < self.hi_cut:
            at = np.flatnonzero(sn == self.hi)
            if at.size:
                mask[at[self._cut(name, start, at, self.hi_cut)]] = True
        pos = self.extra.get(name)
        if pos is not None:
            a, b = np.searchsorted(pos, [start, start + sn.size])
            if b > a:
                mask[pos[a:b] - start] = True
        self.selected += int(mask.sum())
        return _torch(mask.reshape(tuple(scores.shape)))


class PerTensorTopK:
    """For `per-tensor` scope: ⌊p·n/100⌋ inside each tensor, in one pass over whole tensors (ties by
    the §2 hash with the tensor's rank, as in global scope)."""

    def __init__(self, percent: float, scope: Scope, *, seed: int = 0):
        k_for(percent, scope.numel(), what="p")  # validates the range
        self.percent, self.ranks, self.seed = percent, scope.ranks, seed
        self.k = sum(int(percent * scope.numel(n) // 100) for n in scope.names)
        if self.k == 0:
            biggest = max(scope.numel(n) for n in scope.names)
            raise OptionError(
                f"--p {percent} selects no parameter in any tensor with --scope per-tensor; "
                f"the smallest usable value is {100 / biggest:.3g}"
            )
        self.selected = 0
        self.full_passes = 0  # the caller's one pass selects (no counting pass)
        self.sample_values = np.zeros(0, dtype=np.float32)
        self.thresholds: dict[str, float] = {}
        self.ties = self.tie_picks = 0

    def wants(self) -> None:
        return None

    def observe(self, name: str, start: int, scores, weight: float = 1.0, blocks: int = 1) -> None:
        raise RuntimeError("PerTensorTopK needs no pass before select(); this is a bug")

    def end_pass(self) -> None:
        pass

    def chosen(self) -> None:
        return None

    @property
    def threshold(self) -> float:
        return min(self.thresholds.values(), default=float("nan"))

    @property
    def above_strict(self) -> int:
        return self.selected - self.tie_picks

    def select(self, name: str, start: int, scores):
        """`scores` must be the whole tensor (start 0); returns its torch bool mask."""
        k = int(self.percent * len(scores.reshape(-1)) // 100)
        mask, t, ties, picks = topk_mask(scores, k, rank=self.ranks[name], seed=self.seed)
        self.thresholds[name] = t
        self.ties += ties
        self.tie_picks += picks
        self.selected += int(mask.sum())
        return mask


def make_selector(percent: float, scope: Scope, *, per_tensor: bool = False, seed: int = 0) -> TopK | PerTensorTopK:
    """The selector of the top `percent` % of the scope's scores: global (TopK) or inside each tensor;
    `seed` is the tie seed (METHODS §2)."""
    if per_tensor:
        return PerTensorTopK(percent, scope, seed=seed)
    total = scope.numel()
    return TopK(k_for(percent, total, what="p"), total, ranks=scope.ranks, seed=seed)


TIE_WARN_SHARE = 0.1  # warn when more than this share of a selection was chosen among ties (METHODS §2)


def tie_summary(sel, total: int, *, seed: int, what: str = "p") -> dict:
    """METHODS §2's report of a finished selection: threshold, entries tied at it, how many of the k
    were chosen among them, p_strict (the largest percentage that needs no tie rule), and a warning
    when more than 10 % of k came from the tie rule."""
    k = sel.k
    p_strict = 100.0 * sel.above_strict / total if total else 0.0
    doc = {
        "threshold": sel.threshold,
        "ties": int(sel.ties),
        "tie_picks": int(sel.tie_picks),
        "p_strict": p_strict,
        "tie_seed": seed,
        "tie_rule": "hash",
    }
    if k and sel.tie_picks > TIE_WARN_SHARE * k:
        doc["warning"] = (
            f"{sel.tie_picks:,} of the {k:,} selected entries ({sel.tie_picks / k:.0%}) were chosen "
            f"among {sel.ties:,} entries tied at the threshold {sel.threshold:.4g} by the tie hash "
            f"(--tie-seed {seed}); --{what} {p_strict:.3g} or less selects without ties"
        )
    return doc
