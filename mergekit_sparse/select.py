"""Exact top-k over a stream of score tensors, with memory independent of model size.

Every "top x %" of the project (core regions, GaLLoP and its baselines) goes through here.

The global selector is a radix select on the float32 bit patterns. A float32 `x` maps to
an int32 key that orders exactly like `x` (flip the magnitude bits of negatives). Then:

  pass 1  histogram of the key's high 16 bits over every tensor   -> bucket b holding the k-th
  pass 2  histogram of the low 16 bits inside bucket b            -> the exact threshold key T
  pass 3  emit masks: key > T, plus the first `ties` keys == T in (sorted name, flat index) order

Memory is two 65,536-bin histograms plus temporaries of one chunk. Tensors are visited in
scope order (sorted names) in pass 3, which is what makes the tie rule hold globally.
"""

from __future__ import annotations

import torch

from .errors import NonFiniteError, OptionError

CHUNK = 1 << 22          # elements per chunk: bounds temporaries to a few tens of MB
BINS = 1 << 16


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordering exactly like the float32 values of `x` (flattened); -0.0 equals +0.0."""
    bits = (x.reshape(-1).float() + 0.0).view(torch.int32)          # + 0.0 turns -0.0 into +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_to_float(key: int) -> float:
    k = torch.tensor([key], dtype=torch.int32)
    return float((k ^ ((k >> 31) & 0x7FFFFFFF)).view(torch.float32)[0])


def _chunks(x: torch.Tensor):
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK]


def _check_finite(scores: torch.Tensor, name: str) -> None:
    if not torch.isfinite(scores).all():
        raise NonFiniteError(f"tensor '{name}': scores contain NaN/Inf; an input holds NaN/Inf values")


def k_for(percent: float, total: int, *, what: str = "p") -> int:
    """k = floor(percent * total / 100), with a clear error when it is 0 or percent is out of range."""
    if not (0 < percent <= 100):
        raise OptionError(f"--{what} {percent} is out of range; give a percentage in (0, 100], e.g. --{what} 1")
    k = int(percent * total // 100)
    if k == 0:
        smallest = 100.0 / total
        raise OptionError(f"--{what} {percent} selects no parameter of the {total} in scope; "
                          f"the smallest usable value is {smallest:.3g}")
    return k


class GlobalTopK:
    """Exact top-k across all tensors in scope, fed one tensor at a time over three passes.

    Call `observe(name, scores)` for every tensor in pass 1, `next_pass()`, again in pass 2,
    `next_pass()`, then `select(name, scores)` in scope order in pass 3, which returns the
    boolean mask of that tensor. `threshold` is the k-th largest score.
    """

    passes = 3

    def __init__(self, k: int, total: int):
        if not 0 < k <= total:
            raise OptionError(f"cannot select {k} of {total} parameters")
        self.k, self.total = k, total
        self.stage = 1
        self.hist = torch.zeros(BINS, dtype=torch.int64)
        self.bucket = -1
        self.threshold_key = 0
        self.ties_left = 0
        self.selected = 0

    @property
    def everything(self) -> bool:
        return self.k == self.total

    def observe(self, name: str, scores: torch.Tensor) -> None:
        if self.stage == 1:
            _check_finite(scores, name)
        if self.everything:
            return
        for chunk in _chunks(scores):
            key = float_keys(chunk)
            if self.stage == 1:
                self.hist += torch.bincount((key >> 16) + BINS // 2, minlength=BINS)
            else:
                low = key[((key >> 16) + BINS // 2) == self.bucket] & 0xFFFF
                self.hist += torch.bincount(low, minlength=BINS)

    def next_pass(self) -> None:
        if self.everything:
            self.stage += 1
            return
        # walk bins from the top until the running count reaches what is still needed
        need = self.k if self.stage == 1 else self.k - self.above
        above_in_bins = torch.flip(self.hist, [0]).cumsum(0)           # count in bins >= flipped position
        pos = int(torch.searchsorted(above_in_bins, torch.tensor(need)))
        b = BINS - 1 - pos
        greater = int(above_in_bins[pos - 1]) if pos > 0 else 0
        if self.stage == 1:
            self.bucket, self.above = b, greater
        else:
            self.threshold_key = ((self.bucket - BINS // 2) << 16) | b
            self.above += greater
            self.ties_left = self.k - self.above
        self.hist = torch.zeros(BINS, dtype=torch.int64)
        self.stage += 1

    @property
    def threshold(self) -> float:
        if self.everything:
            return float("-inf")
        return key_to_float(self.threshold_key)

    def select(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """Pass 3: the boolean mask of one tensor (same shape as `scores`)."""
        assert self.stage == 3, "select() comes after two observe passes"
        if self.everything:
            self.selected += scores.numel()
            return torch.ones(scores.shape, dtype=torch.bool)
        parts = []
        for chunk in _chunks(scores):
            key = float_keys(chunk)
            mask = key > self.threshold_key
            if self.ties_left > 0:
                eq = key == self.threshold_key
                mask |= eq & (eq.cumsum(0, dtype=torch.int32) <= self.ties_left)
                self.ties_left -= min(self.ties_left, int(eq.sum()))
            parts.append(mask)
        mask = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.selected += int(mask.sum())
        return mask.view(scores.shape)


def topk_mask(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Exact top-k of one in-memory tensor with ties by flat index ascending: (mask, threshold)."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool), float("inf")
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool), float("-inf")
    key = float_keys(scores)
    t = int(torch.kthvalue(key, n - k + 1).values)                 # k-th largest
    mask = key > t
    eq = key == t
    mask |= eq & (eq.cumsum(0, dtype=torch.int32) <= k - int(mask.sum()))
    return mask.view(scores.shape), key_to_float(t)
