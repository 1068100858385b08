"""Quantiles from the selector's 65,536-bin key histogram (exact bucket, ~0.4 % relative width)."""

from __future__ import annotations

import numpy as np

from .topk import BINS, key_to_float

QUANTILES = (0.5, 0.9, 0.99, 0.999)


def key_histogram(scores) -> np.ndarray:
    """Counts of the scores (numpy or torch) per high 16 bits of their keys."""
    from .topk import _chunks, float_keys
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
