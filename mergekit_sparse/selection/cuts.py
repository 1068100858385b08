"""Exact global top-k as a rule, not as stored masks: `top_k_cut` finds the threshold value and the
hash cut of METHODS §2 over a stream of scores that can be read again, in a few passes that hold
nothing of the size of the model; `Cut.keep` then decides any chunk's entries on the fly.

The top k by the §2 order (score descending, equal scores by the smallest seeded position hash) is
every entry whose score exceeds t, plus the entries equal to t whose hash lies below a cut: (t, cut)
says it all. The passes:

  sample  every `step`-th score of each tensor (the caller reads only those): a bracket [lo, hi] of
          ±4σ of the sampled rank around the k-th largest, and its point estimate, the guess
  count   every score: how many exceed hi, reach lo, exceed and reach the guess; the scores inside
          the bracket are kept (values only, at most CANDIDATES of them). A bf16 fine-tune's |Δ| has
          few distinct values: the k-th sits in a long run of equal scores, and the guess is that run
          (t found); otherwise the kept values give t; a bracket the sample got wrong, or too wide to
          keep, costs two radix passes (16-bit histograms) over the bracket
  ties    only when t's run is split: the hashes of the run's entries are uniform, so the cut is
          bracketed by its binomial spread around r / run · 2⁶⁴ and found among the few hashes inside
          (a histogram pass of the hashes' top 16 bits if the bracket misses)

Scores are int32 keys of nonnegative float32 values (their bits: an |x| is never -0.0 after np.abs),
passed as `chunks()`, an iterator of (tensor rank, flat start, keys) over the whole scope, once per
pass, and `sample(step)`, the keys at flat indices 0, step, 2·step, … of every tensor, concatenated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import OptionError
from .keys import BINS, bracket, radix_select, tie_hash

ALL = 1 << 64  # a hash cut above every hash: the whole run of t is taken
SAMPLE = 1 << 20  # scores sampled over the whole scope
CANDIDATES = 1 << 23  # bracket values kept by the count pass (4 bytes each)

Chunks = Callable[[], Iterable[tuple[int, int, np.ndarray]]]


@dataclass(frozen=True)
class Cut:
    """The top k: scores above `key` (an int32 key), and those equal to it whose §2 hash is below
    `hash_cut` (ALL: all of them). `ties` entries equal the threshold, `picks` of them are taken,
    `above` exceed it."""

    key: int
    hash_cut: int
    seed: int
    k: int
    above: int
    ties: int

    @property
    def picks(self) -> int:
        return self.k - self.above

    @property
    def threshold(self) -> float:
        return float(np.array([self.key], dtype=np.int32).view(np.float32)[0])

    def keep(self, keys: np.ndarray, rank: int, start: int) -> np.ndarray:
        """Which entries of one chunk (keys at flat indices start, start + 1, … of the tensor of `rank`)
        are in the top k."""
        sel = keys > self.key
        if self.picks:
            eq = np.flatnonzero(keys == self.key)
            if self.hash_cut < ALL and eq.size:
                eq = eq[tie_hash(self.seed, rank, eq + start) < np.uint64(self.hash_cut)]
            sel[eq] = True
        return sel


def top_k_cut(chunks: Chunks, sample: Callable[[int], np.ndarray], k: int, total: int, *, seed: int = 0) -> Cut:
    """The `Cut` of the k largest of `total` scores (1 <= k <= total), exactly."""
    if not 0 < k <= total:
        raise OptionError(f"cannot select {k} of {total} parameters")
    step = max(1, total // SAMPLE)
    s = np.sort(sample(step))
    lo, hi, guess = bracket(s, k, total)
    inside = int(np.searchsorted(s, hi, side="right") - np.searchsorted(s, lo, side="left"))
    keep_values = inside * step * 2 <= CANDIDATES  # twice the sample's estimate of the bracket's keys
    c = _count(chunks, lo, hi, guess, keep_values)
    if c["guess_above"] < k <= c["guess_at_least"]:
        t, above, eq = guess, c["guess_above"], c["guess_at_least"] - c["guess_above"]
    elif c["above"] < k <= c["at_least"] and c["values"] is not None:
        vals = c["values"]
        t = radix_select(lambda: [vals], k - c["above"])[0] if vals.size else lo
        above, eq = c["above"] + int(np.count_nonzero(vals > t)), int(np.count_nonzero(vals == t))
    elif c["above"] < k <= c["at_least"]:  # too many bracket values to keep: the radix over the bracket
        t, above, eq = radix_select(lambda: (x[(x >= lo) & (x <= hi)] for _, _, x in chunks()), k - c["above"])
        above += c["above"]
    else:  # the bracket missed: the radix select over everything
        t, above, eq = radix_select(lambda: (x for _, _, x in chunks()), k)
    r = k - above
    cut = ALL if r == eq else _hash_cut(chunks, t, r, eq, seed)
    return Cut(key=t, hash_cut=cut, seed=seed, k=k, above=above, ties=eq)


def _count(chunks: Chunks, lo: int, hi: int, guess: int, keep_values: bool) -> dict:
    out = {"above": 0, "at_least": 0, "guess_above": 0, "guess_at_least": 0}
    values: list[np.ndarray] | None = [] if keep_values else None
    kept = 0
    for _, _, c in chunks():
        out["above"] += int(np.count_nonzero(c > hi))
        out["at_least"] += int(np.count_nonzero(c >= lo))
        out["guess_above"] += int(np.count_nonzero(c > guess))
        out["guess_at_least"] += int(np.count_nonzero(c >= guess))
        if values is not None and lo < hi:
            v = c[(c >= lo) & (c <= hi)]
            kept += v.size
            if kept > CANDIDATES:  # the sample underestimated the bracket: radix passes instead
                values = None
            else:
                values.append(v)
    if values is not None and lo == hi:
        values = []
    out["values"] = None if values is None else (np.concatenate(values) if values else np.zeros(0, np.int32))
    return out


def _eq_hashes(chunks: Chunks, t: int, seed: int) -> Iterator[np.ndarray]:
    for rank, start, c in chunks():
        eq = np.flatnonzero(c == t)
        if eq.size:
            yield tie_hash(seed, rank, eq + start)


def _hash_spread(eq: int, p: float) -> float:
    """How far (in entries) the hash bracket reaches either side of r: the count below a cut is binomial."""
    return 8 * math.sqrt(eq * p * (1 - p)) + 64


def _hash_cut(chunks: Chunks, t: int, r: int, eq: int, seed: int) -> int:
    """The cut below which exactly r of the `eq` entries equal to t have their hash (0 < r < eq)."""
    p = r / eq
    spread = _hash_spread(eq, p)
    lo, hi = (min(ALL - 1, max(0, int((r + x) / eq * 2.0**64))) for x in (-spread, spread))
    below, near = 0, []
    for h in _eq_hashes(chunks, t, seed):
        below += int(np.count_nonzero(h < np.uint64(lo)))
        near.append(h[(h >= np.uint64(lo)) & (h <= np.uint64(hi))])
    near_all = np.sort(np.concatenate(near)) if near else np.zeros(0, np.uint64)
    if not below < r <= below + near_all.size:  # the bracket missed: a histogram of the top 16 bits
        counts = np.zeros(BINS, dtype=np.int64)
        for h in _eq_hashes(chunks, t, seed):
            counts += np.bincount((h >> np.uint64(48)).astype(np.intp), minlength=BINS)
        cum = np.cumsum(counts)
        b = int(np.searchsorted(cum, r))
        below = int(cum[b - 1]) if b else 0
        near = [h[(h >> np.uint64(48)) == np.uint64(b)] for h in _eq_hashes(chunks, t, seed)]
        near_all = np.sort(np.concatenate(near))
    return int(near_all[r - below - 1]) + 1
