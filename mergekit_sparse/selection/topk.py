"""Exact top-k over a stream of score tensors, with memory independent of model size.

Every "top x %" of the project (core regions, GaLLoP and its baselines) goes through here.
Scores arrive as float32 chunks of each tensor (numpy arrays, or CPU torch tensors), tensors in
scope order (sorted names), chunks in flat order; ties are broken by (sorted name, flat index),
exactly as a stable sort of the concatenation would. The selection is numpy, so the core and
fuse commands never load torch; only the masks `select` returns are torch tensors.

`TopK` (the default) needs one full pass to find the threshold:

  sample  a seeded ~2 % of every tensor, in 4096-entry blocks (touches few pages), each sampled
          score weighted by the share of its tensor it stands for: a window [lo, hi] around the
          weighted estimate of the k-th largest, as wide as the spread of the sampled blocks says
  count   every score: the count above hi, and the candidates in [lo, hi] with their positions
  select  score > hi, plus the first k − count candidates in (score desc, name, index) order;
          the core command even writes `score > hi` during the count pass and patches the bits.

When the window misses (a pathological distribution, or more candidates than CANDIDATE_CAP,
as with huge numbers of tied scores), it falls back to `RadixTopK`, an exact radix select on the
float32 bit patterns: a histogram of the high 16 bits, then of the low 16 bits in the threshold
bucket, then selection. Either way the result is exact; only the number of passes differs.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import numpy as np

from ..errors import NonFiniteError, OptionError
from .keys import BINS, CHUNK, _chunks, _np, _torch, float_keys, key_to_float
from .passes import Pass

if TYPE_CHECKING:
    from ..storage.scope import Scope

CANDIDATE_CAP = 1 << 24  # at most ~16 M candidates (16 bytes each) before falling back to radix
WINDOW_SLACK = 0.002  # the window's half-width is at least this share of all scores


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
    """Exact top-k by radix select on float bit patterns, over three passes (see the module doc).

    Call `observe(name, scores)` for every chunk in pass 1, `next_pass()`, again in pass 2,
    `next_pass()`, then `select(name, scores)` chunk by chunk in scope order in pass 3, which
    returns the boolean mask of that chunk. `threshold` is the k-th largest score.
    """

    passes = 3

    def __init__(self, k: int, total: int):
        if not 0 < k <= total:
            raise OptionError(f"cannot select {k} of {total} parameters")
        self.k, self.total = k, total
        self.stage = 1
        self.hist = np.zeros(BINS, dtype=np.int64)
        self.bucket = -1
        self.threshold_key = 0
        self.ties_left = 0
        self.selected = 0

    @property
    def everything(self) -> bool:
        return self.k == self.total

    def observe(self, name: str, scores) -> None:
        if self.stage == 1:
            _check_finite(scores, name)
        if self.everything:
            return
        for chunk in _chunks(scores):
            key = float_keys(chunk)
            if self.stage == 1:
                self.hist += np.bincount((key >> 16) + BINS // 2, minlength=BINS)
            else:
                low = key[((key >> 16) + BINS // 2) == self.bucket] & 0xFFFF
                self.hist += np.bincount(low, minlength=BINS)

    def next_pass(self) -> None:
        if self.everything:
            self.stage += 1
            return
        # walk bins from the top until the running count reaches what is still needed
        need = self.k if self.stage == 1 else self.k - self.above
        above_in_bins = self.hist[::-1].cumsum()  # count in bins >= flipped position
        pos = int(np.searchsorted(above_in_bins, need))
        b = BINS - 1 - pos
        greater = int(above_in_bins[pos - 1]) if pos > 0 else 0
        if self.stage == 1:
            self.bucket, self.above = b, greater
        else:
            self.threshold_key = ((self.bucket - BINS // 2) << 16) | b
            self.above += greater
            self.ties_left = self.k - self.above
        self.hist = np.zeros(BINS, dtype=np.int64)
        self.stage += 1

    @property
    def threshold(self) -> float:
        if self.everything:
            return float("-inf")
        return key_to_float(self.threshold_key)

    def select(self, name: str, scores):
        """Pass 3: the boolean mask of one tensor (a torch tensor of the shape of `scores`)."""
        if self.stage != 3:
            raise RuntimeError("RadixTopK.select() before its two observe passes; this is a bug")
        shape = tuple(scores.shape)
        if self.everything:
            self.selected += math.prod(shape)
            return _torch(np.ones(shape, dtype=bool))
        parts = []
        for chunk in _chunks(scores):
            key = float_keys(chunk)
            mask = key > self.threshold_key
            if self.ties_left > 0:
                eq = key == self.threshold_key
                mask |= eq & (eq.cumsum(dtype=np.int64) <= self.ties_left)
                self.ties_left -= min(self.ties_left, int(eq.sum()))
            parts.append(mask)
        mask = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, dtype=bool)
        self.selected += int(mask.sum())
        return _torch(mask.reshape(shape))


def topk_mask(scores, k: int) -> tuple:
    """Exact top-k of one in-memory tensor with ties by flat index ascending: (torch mask, threshold)."""
    shape = tuple(scores.shape)
    n = math.prod(shape)
    if k <= 0:
        return _torch(np.zeros(shape, dtype=bool)), float("inf")
    if k >= n:
        return _torch(np.ones(shape, dtype=bool)), float("-inf")
    key = float_keys(scores)
    t = int(np.partition(key, n - k)[n - k])  # k-th largest
    mask = key > t
    eq = key == t
    mask |= eq & (eq.cumsum(dtype=np.int64) <= k - int(mask.sum()))
    return _torch(mask.reshape(shape)), key_to_float(t)


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
    """

    def __init__(self, k: int, total: int):
        if not 0 < k <= total:
            raise OptionError(f"cannot select {k} of {total} parameters")
        self.k, self.total = k, total
        self._phase = "sample"
        self.sample_values = np.zeros(0, dtype=np.float32)  # kept for quantile summaries
        self.samples: list[np.ndarray] = []
        self.sample_meta: list[tuple[int, float, int]] = []  # (tensor index, weight, blocks) per observed sample
        self._sample_tensors: dict[str, int] = {}
        self.lo = self.hi = 0.0
        self.above = 0
        # candidates live in a few large arrays grown by doubling (many small kept tensors between
        # large temporaries would fragment the heap)
        self.cand_vals = np.empty(0, dtype=np.float32)
        self.cand_pos = np.empty(0, dtype=np.int64)
        self.cand_tensor = np.empty(0, dtype=np.int32)
        self.n_cand = 0
        self.order: dict[str, int] = {}
        self.extra: dict[str, np.ndarray] = {}  # name -> sorted flat positions of chosen candidates
        self.radix: RadixTopK | None = None
        self._local = threading.local()  # per-thread scratch for `count`
        self._lock = threading.Lock()  # `count` may be called from several threads
        self._sure = None
        self.full_passes = 0  # full passes over the data (the sample pass aside)
        self.threshold = float("-inf")
        self.selected = 0

    @property
    def everything(self) -> bool:
        return self.k == self.total

    def wants(self) -> Pass | None:
        if self._phase == "sample":
            return Pass.SAMPLE
        if self._phase == "count":
            return Pass.COUNT
        if self._phase in ("radix1", "radix2"):
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
            self.radix.observe(name, scores)

    def count(self, name: str, start: int, scores, finite: bool = False) -> np.ndarray:
        """The count pass's work on one chunk; returns its sure positions (score > hi), ascending, in the
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
        above = vals > self.hi
        sure = idx[above]
        keep = ~above
        with self._lock:
            self.above += sure.size
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
                self.radix = RadixTopK(self.k, self.total)
                self._phase = "radix1"
        elif self._phase == "radix1":
            self.radix.next_pass()
            self._phase = "radix2"
        elif self._phase == "radix2":
            self.radix.next_pass()
            self.threshold = self.radix.threshold
            self._phase = "radix"

    def _window(self) -> None:
        """Bracket the k-th largest score from the sample: [lo, hi] around the weighted estimate.

        Every sampled score stands for `weight` scores of its tensor (1 for a tensor sampled whole,
        n / sampled for block-sampled ones), so tensors sampled at different rates do not bias the
        estimate. The half-width is 8 standard deviations of the estimated count above the
        threshold (a stratified cluster-sample variance from the spread of the per-block counts
        within each tensor), and at least WINDOW_SLACK of all scores: a cluster of large scores
        that no sampled block hit is invisible to the variance (the benchmark's planted rows are
        one: 12 % of one tensor, missed by all 5 of its sampled blocks), so the floor is what keeps
        such a window from missing. A miss is caught after the count pass (radix fallback).
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
        jh = int(np.searchsorted(cw, k - delta))
        jl = int(np.searchsorted(cw, k + delta))
        self.hi = float(v[top[jh]]) if k - delta > 0 else float("inf")
        self.lo = float(v[top[jl]]) if jl < R else float("-inf")
        # room for the candidates the sample predicts (in [lo, hi]), so the count pass rarely regrows: untouched
        # room costs address space only (large numpy arrays are mapped lazily), a regrowth copies everything
        desc = -v[top]
        ge_lo, gt_hi = (
            int(np.searchsorted(desc, -x, side=side)) for x, side in ((self.lo, "right"), (self.hi, "left"))
        )
        expect = (cw[ge_lo - 1] if ge_lo else 0.0) - (cw[gt_hi - 1] if gt_hi else 0.0)
        self._grow(int(min(1.25 * expect, CANDIDATE_CAP)))

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
        # the need-th largest value, then ties at it taken in (tensor, position) order
        t = np.partition(vals, n - need)[n - need]
        above = vals > t
        eq = np.flatnonzero(vals == t)
        # ties by (name, position); tensor ids follow the scan order, which need not be sorted by name
        by_id = sorted(self.order, key=self.order.get)
        name_rank = np.empty(len(by_id), dtype=np.int64)
        name_rank[sorted(range(len(by_id)), key=by_id.__getitem__)] = np.arange(len(by_id))
        ties = eq[np.lexsort((pos[eq], name_rank[tens[eq]]))][: need - int(above.sum())]
        above[ties] = True
        chosen = np.flatnonzero(above)  # in scan order: a tensor's positions ascending
        self.threshold = float(t)
        names = {i: n for n, i in self.order.items()}
        chosen_t, chosen_p = tens[chosen], pos[chosen]
        if np.any(chosen_t[1:] < chosen_t[:-1]):  # tensors counted at once by several threads: group them
            o = np.argsort(chosen_t.astype(np.int16) if len(self.order) < 1 << 15 else chosen_t, kind="stable")
            chosen_t, chosen_p = chosen_t[o], chosen_p[o]
        cuts = np.flatnonzero(chosen_t[1:] != chosen_t[:-1]) + 1
        for part_t, part_p in zip(np.split(chosen_t, cuts), np.split(chosen_p, cuts)):
            if part_t.size:
                self.extra[names[int(part_t[0])]] = part_p
        self._phase = "window"
        return True

    def sure_positions(self) -> np.ndarray:
        """The count pass's sure part of the chunk just observed (score > hi), as ascending positions
        in the chunk; `extra` later holds the chosen candidates."""
        return self._sure

    def preliminary(self, n: int) -> np.ndarray:
        """`sure_positions` as a boolean mask of the n-entry chunk (scratch, valid until the next `observe`)."""
        mask = self._np_bool(n, "preliminary")
        mask[:] = False
        mask[self._sure] = True
        return mask

    def select(self, name: str, start: int, scores):
        """The chunk's mask (a torch bool tensor) once every pass is done."""
        import torch

        scores = _torch(scores)
        if self._phase == "done":
            self.selected += scores.numel()
            return torch.ones(scores.shape, dtype=torch.bool)
        if self._phase == "radix":
            mask = self.radix.select(name, scores)
            self.selected = self.radix.selected
            return mask
        mask = scores > self.hi
        pos = self.extra.get(name)
        if pos is not None:
            a, b = np.searchsorted(pos, [start, start + scores.numel()])
            if b > a:
                mask[torch.from_numpy(pos[a:b] - start)] = True
        self.selected += int(mask.sum())
        return mask


class PerTensorTopK:
    """For `per-tensor` scope: ⌊p·n/100⌋ inside each tensor, in one pass over whole tensors."""

    def __init__(self, percent: float, scope: Scope):
        k_for(percent, scope.numel(), what="p")  # validates the range
        self.percent = percent
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

    def select(self, name: str, start: int, scores):
        """`scores` must be the whole tensor (start 0); returns its torch bool mask."""
        mask, t = topk_mask(scores, int(self.percent * len(scores.reshape(-1)) // 100))
        self.thresholds[name] = t
        self.selected += int(mask.sum())
        return mask


def make_selector(percent: float, scope: Scope, *, per_tensor: bool = False) -> TopK | PerTensorTopK:
    """The selector of the top `percent` % of the scope's scores: global (TopK) or inside each tensor."""
    if per_tensor:
        return PerTensorTopK(percent, scope)
    total = scope.numel()
    return TopK(k_for(percent, total, what="p"), total)
