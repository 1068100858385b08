"""The integer order of float32 values, and what it gives: key histograms and their quantiles.

A key is the int32 whose order is exactly the order of the float32 values (-0.0 equals +0.0); the
selectors compare keys, and the 65,536-bin histogram of their high 16 bits gives quantiles (exact
bucket, ~0.4 % relative width).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import OptionError

CHUNK = 1 << 19  # elements per chunk (2 MB of float32): measured fastest of 2^16..2^20 for fuse and core
BINS = 1 << 16
SAMPLE = 1 << 12  # entries sampled to bracket a k-th largest key or r-th smallest hash (±4σ of its rank)
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _torch(x):
    """`x` as a torch tensor (numpy arrays are shared, not copied)."""
    import torch

    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _np(x) -> np.ndarray:
    """`x` as a numpy array (CPU torch tensors are shared, not copied)."""
    if isinstance(x, np.ndarray):
        return x
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def float_keys(x) -> np.ndarray:
    """int32 keys (numpy) ordering exactly like the float32 values of `x` (flattened); -0.0 equals +0.0."""
    if not isinstance(x, np.ndarray):
        x = x.float()  # torch: bf16 and friends have no numpy view
    bits = (np.asarray(_np(x), dtype=np.float32).reshape(-1) + np.float32(0.0)).view(np.int32)  # -0.0 -> +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_to_float(key: int) -> float:
    k = np.array([key], dtype=np.int32)
    return float((k ^ ((k >> 31) & 0x7FFFFFFF)).view(np.float32)[0])


def _chunks(x):
    flat = _np(x).reshape(-1)
    for start in range(0, flat.size, CHUNK):
        yield flat[start : start + CHUNK]


def key_histogram(scores) -> np.ndarray:
    """Counts of the scores (numpy or torch) per high 16 bits of their keys."""
    hist = np.zeros(BINS, dtype=np.int64)
    for chunk in _chunks(scores):
        hist += np.bincount((float_keys(chunk) >> 16) + BINS // 2, minlength=BINS)
    return hist


def hist_quantiles(hist, qs=QUANTILES) -> dict[str, float]:
    """Lower edge of the bin holding each quantile (values agree with the exact ones to ~3 digits)."""
    hist = np.asarray(hist)
    total = int(hist.sum())
    if total == 0:
        return {}
    cum = hist.cumsum()
    out = {}
    for q in qs:
        b = int(np.searchsorted(cum, max(1, int(q * total))))
        out[f"q{q:g}"] = key_to_float((b - BINS // 2) << 16)
    out["max"] = key_to_float(((int(np.flatnonzero(hist)[-1]) - BINS // 2) << 16) | 0xFFFF)
    return out


# The tie rule (METHODS §2): among entries whose score equals the threshold, those with the smallest
# splitmix64 hash of (seed, tensor rank r, flat index j) are taken. Only the threshold's entries are
# ever hashed. All arithmetic is uint64 (numpy wraps it mod 2^64).
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
MAX_RANK = 1 << 24
MAX_INDEX = 1 << 40
HASH_BLOCK = 1 << 16  # hashed in cache-sized blocks: ten uint64 ops each stay in L2


def hash_offset(seed: int, rank: int) -> int:
    """(s + 1)·0x9E3779B97F4A7C15 + (r << 40) mod 2^64: the part of x that does not depend on j."""
    if not 0 <= rank < MAX_RANK:
        raise OptionError(f"tensor rank {rank} is out of the tie hash's range (fewer than 2^24 tensors)")
    if seed < 0:
        raise OptionError(f"--tie-seed {seed} must be a non-negative integer")
    return ((seed + 1) * _GOLDEN + (rank << 40)) % (1 << 64)


def tie_hash(seed: int, rank: int, positions, out: np.ndarray | None = None) -> np.ndarray:
    """The §2 hash h of flat indices `positions` (any integer array) of the tensor of rank `rank`."""
    pos = np.asarray(positions).reshape(-1)
    if pos.size and (int(pos.max()) >= MAX_INDEX or int(pos.min()) < 0):
        raise OptionError(f"flat index {int(pos.max())} is out of the tie hash's range (tensors below 2^40 entries)")
    off = np.uint64(hash_offset(seed, rank))
    h = out if out is not None else np.empty(pos.size, dtype=np.uint64)
    t = np.empty(min(pos.size, HASH_BLOCK), dtype=np.uint64)
    for a in range(0, pos.size, HASH_BLOCK):
        x = h[a : a + HASH_BLOCK]
        np.add(pos[a : a + HASH_BLOCK].astype(np.uint64, copy=False), off, out=x)  # x
        _mix(x, t[: x.size])
    return h


def tie_hash_range(seed: int, rank: int, start: int, end: int) -> np.ndarray:
    """`tie_hash` of the flat indices start, start + 1, …, end - 1 (no index array is built)."""
    if not 0 <= start <= end <= MAX_INDEX:
        raise OptionError(f"flat index {end - 1} is out of the tie hash's range (tensors below 2^40 entries)")
    off = hash_offset(seed, rank)
    h = np.empty(end - start, dtype=np.uint64)
    t = np.empty(min(h.size, HASH_BLOCK), dtype=np.uint64)
    for a in range(0, h.size, HASH_BLOCK):
        x = h[a : a + HASH_BLOCK]
        np.add(_IOTA[: x.size], np.uint64((off + start + a) % (1 << 64)), out=x)  # wraps as uint64 does
        _mix(x, t[: x.size])
    return h


_IOTA = np.arange(HASH_BLOCK, dtype=np.uint64)


def _mix(x: np.ndarray, s: np.ndarray) -> None:
    """splitmix64's finaliser on uint64 `x`, in place (`s`: scratch of x's size)."""
    np.right_shift(x, np.uint64(30), out=s)
    np.bitwise_xor(x, s, out=x)
    np.multiply(x, _MIX1, out=x)
    np.right_shift(x, np.uint64(27), out=s)
    np.bitwise_xor(x, s, out=x)
    np.multiply(x, _MIX2, out=x)
    np.right_shift(x, np.uint64(31), out=s)
    np.bitwise_xor(x, s, out=x)


def smallest_hashes(hashes: np.ndarray, r: int) -> np.ndarray:
    """Indices of the r smallest of distinct `hashes` (any order).

    Many hashes (a bf16 fine-tune's threshold ties millions of entries) are bracketed first: the hashes
    are uniform, so a sample places the r-th smallest between two cuts; those below the lower cut are
    taken and only those between the cuts are partitioned. A bracket that misses falls back to one
    partition of everything."""
    m = hashes.size
    if r <= 0:
        return np.zeros(0, dtype=np.int64)
    if r >= m:
        return np.arange(m)
    if m >= 8 * SAMPLE:
        sample = np.sort(hashes[:: m // SAMPLE])
        s = sample.size
        q = r * s / m  # the r-th smallest's expected place in the sample
        d = 4 * math.sqrt(q * (1 - q / s)) + 8
        lo, hi = sample[max(0, math.floor(q - d))], sample[min(s - 1, math.ceil(q + d))]
        sure = np.flatnonzero(hashes < lo)
        between = np.flatnonzero((hashes >= lo) & (hashes <= hi))
        need = r - sure.size
        if need == 0:
            return sure
        if 0 < need <= between.size:
            return np.concatenate([sure, between[np.argpartition(hashes[between], need - 1)[:need]]])
    return np.argpartition(hashes, r - 1)[:r]


def kth_largest_key(key: np.ndarray, k: int) -> int:
    """The k-th largest of int32 `key` (1 <= k <= key.size), exactly, allocating nothing of the size of `key`.

    A large `key` is first bracketed from a strided sample: one pass counts the keys above the bracket and
    at or above its floor, which proves the k-th largest inside it (or, a bracket of one value, equal to
    it: a bf16 fine-tune's |Δ| has few distinct values, so the k-th sits in a long run of equal keys); the
    radix select then runs on the bracket's keys only. A bracket the sample got wrong costs that pass, and
    the radix select runs on everything (`_kth_radix`)."""
    if key.size >= 8 * SAMPLE:
        t = _kth_bracketed(key, k)
        if t is not None:
            return t
    return _kth_radix(key, k)


def bracket(sample: np.ndarray, k: int, n: int) -> tuple[int, int, int]:
    """(lo, hi, guess) around the k-th largest of n keys from a sorted (ascending) sample of them: ±4σ of
    the sampled rank, and the point estimate (often inside the long run of equal keys that holds the k-th)."""
    m = sample.size
    q = k * m / n  # the k-th largest's expected rank from the top of the sample
    d = 4 * math.sqrt(max(q * (1 - q / m), 0.0)) + 8
    hi = int(sample[m - min(m, max(1, math.floor(q - d)))])
    lo = int(sample[m - min(m, math.ceil(q + d))])
    return lo, hi, int(sample[m - min(m, max(1, round(q)))])


def _kth_bracketed(key: np.ndarray, k: int) -> int | None:
    n = key.size
    lo, hi, guess = bracket(np.sort(key[:: n // max(SAMPLE, n >> 8)]), k, n)  # a larger tensor, a larger sample
    above = at_least = guess_above = guess_at_least = 0
    for start in range(0, n, CHUNK):
        c = key[start : start + CHUNK]
        above += int(np.count_nonzero(c > hi))
        at_least += int(np.count_nonzero(c >= lo))
        if lo < hi:
            guess_above += int(np.count_nonzero(c > guess))
            guess_at_least += int(np.count_nonzero(c >= guess))
    if not above < k <= at_least:
        return None  # the k-th largest is outside [lo, hi]
    if lo == hi:
        return lo
    if guess_above < k <= guess_at_least:
        return guess
    inside = [c[(c >= lo) & (c <= hi)] for c in (key[s : s + CHUNK] for s in range(0, n, CHUNK))]
    return _kth_radix(np.concatenate(inside), k - above)  # [lo, hi] holds the k-th: the (k - above)-th there


def _kth_radix(key: np.ndarray, k: int) -> int:
    """The k-th largest of int32 `key` (`radix_select` over its chunks)."""
    return radix_select(lambda: (key[s : s + CHUNK] for s in range(0, key.size, CHUNK)), k)[0]


def radix_select(chunks, k: int) -> tuple[int, int, int]:
    """(t, keys above t, keys equal to t) for t the k-th largest of the int32 keys that `chunks()` yields
    (called twice: one pass per 16-bit radix histogram). O(n), insensitive to duplicates (np.partition's
    introselect takes seconds on the few distinct values of a bf16 fine-tune's |Δ|), and chunked."""
    counts = np.zeros(BINS, dtype=np.int64)
    for c in chunks():
        counts += np.bincount((c >> 16) + BINS // 2, minlength=BINS)
    from_top = np.cumsum(counts[::-1])
    i = int(np.searchsorted(from_top, k))  # the bucket holding the k-th largest, counted from the top
    high = BINS - 1 - i - BINS // 2  # its high 16 bits, signed
    above = int(from_top[i - 1]) if i else 0
    low = np.zeros(BINS, dtype=np.int64)
    for c in chunks():
        low += np.bincount(c[(c >> 16) == high] & 0xFFFF, minlength=BINS)
    from_top_low = np.cumsum(low[::-1])
    j = int(np.searchsorted(from_top_low, k - above))
    t = (high << 16) | (BINS - 1 - j)
    return t, above + (int(from_top_low[j - 1]) if j else 0), int(low[BINS - 1 - j])
