"""The fusion's maths as pure functions (METHODS §5): numbers and arrays in, numbers and arrays out.

SLERP and its coefficients (mergekit's semantics: float32, lerp when |cos| > 0.9995), the fold
weights t_m = w_m / (w_base + Σ w so far), the fold of several models as one linear combination
from their Gram matrix, and the resolution of positions that lie in several tasks' cores.
No files, no checkpoints: the driver (`driver`) reads, calls these, and writes.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import OptionError
from ..selection.keys import _np

EPS = 1e-8
DOT_THRESHOLD = 0.9995
POLICIES = ("max-delta", "last", "mean")


def slerp_coefficients(
    norm0: float, norm1: float, dot: float, t: float, dot_threshold: float = DOT_THRESHOLD
) -> tuple[float, float, bool]:
    """(c0, c1, linear) such that SLERP(v0, v1, t) = c0·v0 + c1·v1, from ‖v0‖, ‖v1‖ and ⟨v0, v1⟩.

    Norms below EPS leave the vector unnormalised, as mergekit's `normalize` does.
    """
    d = dot / ((norm0 if norm0 > EPS else 1.0) * (norm1 if norm1 > EPS else 1.0))
    if abs(d) > dot_threshold:  # nearly colinear: lerp
        return 1.0 - t, t, True
    omega = math.acos(max(-1.0, min(1.0, d)))
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s, False


def slerp(v0, v1, t: float, *, dot_threshold: float = DOT_THRESHOLD):
    """Spherical interpolation of two same-shape torch tensors, computed in float32, cast to v0's dtype."""
    import torch

    a, b = v0.reshape(-1).float(), v1.reshape(-1).float()  # (n,)
    c0, c1, _ = slerp_coefficients(float(a.norm()), float(b.norm()), float(torch.dot(a, b)), t, dot_threshold)
    return (c0 * a + c1 * b).view(v0.shape).to(v0.dtype)


def fold_weights(weights: list[float]) -> list[float]:
    """t for each fold: weights[0] is the fusion base's, t_m = w_m / (w_0 + ... + w_m)."""
    out, acc = [], weights[0]
    for w in weights[1:]:
        acc += w
        out.append(w / acc if acc > 0 else 0.0)
    return out


class CoreScratch:
    """Position-indexed scratch for `resolve_cores`, grown on demand and left clean after every call
    (so a chunk's resolution touches only its core positions, never the whole chunk)."""

    def __init__(self):
        self.n = 0
        self.member = np.zeros(0, dtype=np.int64)

    def members(self, n: int, tasks: int) -> np.ndarray:
        """Zeroed per-position task bit sets for `tasks` tasks (uint8 when they fit: fewer cache misses)."""
        dtype = np.uint8 if tasks <= 8 else np.int64
        if n > self.n or self.member.dtype != dtype:
            self.n = max(n, self.n)
            self.member = np.zeros(self.n, dtype=dtype)
        return self.member


MAX_TASKS = 63  # task membership is a bit set in one int64 per position


def resolve_cores(
    out: np.ndarray,
    idx: list,
    values: list,
    deltas: list | None,
    policy: str,
    scratch: CoreScratch | None = None,
    tie_hash=None,
) -> tuple[list[int], dict[tuple[int, int], int], int]:
    """Write the tasks' cores into `out` (float32, in place), resolving positions in several cores.

    `idx[i]` are the distinct positions of task i's core in `out`, `values[i]` / `deltas[i]` the
    task's value and |Δ| there (numpy arrays or torch tensors). `policy`: `max-delta` (largest |Δ| wins;
    when m tasks share the largest, `tie_hash(positions)` — the METHODS §2 hash of those positions of
    `out` — picks number h mod m of them in task order; without it the first wins), `last` (the later task wins) or `mean` (the mean of the covering tasks' values,
    summed in task order). Returns (positions won per task, positions shared per task pair,
    positions covered). Cost is in the core positions only: the chunk itself is never scanned.
    Every core is written in task order (what `last` means); only the positions several cores
    share (few, as a rule) are then resolved again under the policy.
    """
    T = len(idx)
    if T > MAX_TASKS:
        raise OptionError(f"fusion takes at most {MAX_TASKS} task models at once, got {T}")
    ix = [_np(i) for i in idx]
    vals = [_np(v) for v in values]
    member = (scratch or CoreScratch()).members(len(out), T)
    bit = [member.dtype.type(1 << i) for i in range(T)]
    for i, x in enumerate(ix):
        member[x] |= bit[i]
    seen = [member[x] for x in ix]  # each task's view of who else covers
    for x in ix:
        member[x] = 0
    for x, v in zip(ix, vals):
        out[x] = v
    pairs = {(i, j): int(np.count_nonzero(seen[i] & bit[j])) for i in range(T) for j in range(i + 1, T)}
    lower = [member.dtype.type((1 << i) - 1) for i in range(T)]
    covered = sum(int(np.count_nonzero(m & lower[i] == 0)) for i, m in enumerate(seen))  # first coverer
    shared = [np.flatnonzero(m != bit[i]) for i, m in enumerate(seen)]  # where another core lies too
    if policy == "last":
        later = [member.dtype.type(((1 << T) - 1) & ~((1 << (i + 1)) - 1)) for i in range(T)]
        won = [len(x) - int(np.count_nonzero(m[s] & later[i])) for i, (x, m, s) in enumerate(zip(ix, seen, shared))]
        return won, pairs, covered
    # the shared positions alone: a dense local index, then the policy over the tasks in order
    sx = [x[s] for x, s in zip(ix, shared)]
    pos = np.unique(np.concatenate(sx)) if T > 1 else sx[0]
    local = [np.searchsorted(pos, x) for x in sx]
    if policy == "mean":
        acc = np.zeros(len(pos), dtype=np.float32)
        cnt = np.zeros(len(pos), dtype=np.float32)
        for li, v, s in zip(local, vals, shared):
            acc[li] += v[s]
            cnt[li] += 1
        out[pos] = acc / cnt
        won = [len(x) for x in ix]
    else:
        best = np.full(len(pos), -1.0, dtype=np.float32)
        winner = np.full(len(pos), -1, dtype=np.int64)
        value = np.empty(len(pos), dtype=np.float32)
        ds = [_np(deltas[i])[s] for i, s in enumerate(shared)]
        for i, (li, v, s, d) in enumerate(zip(local, vals, shared, ds)):
            take = d > best[li]
            li = li[take]
            best[li], value[li], winner[li] = d[take], v[s][take], i
        if tie_hash is not None:  # METHODS §5: m tasks share the largest |Δ|: number h mod m of them wins
            ties = np.zeros(len(pos), dtype=np.int64)
            at_best = [d == best[li] for li, d in zip(local, ds)]
            for li, eq in zip(local, at_best):
                ties[li[eq]] += 1
            tied = np.flatnonzero(ties > 1)
            if tied.size:
                pick = np.full(len(pos), -1, dtype=np.int64)
                pick[tied] = (tie_hash(pos[tied]) % ties[tied].astype(np.uint64)).astype(np.int64)
                seen = np.zeros(len(pos), dtype=np.int64)
                for i, (li, v, s, eq) in enumerate(zip(local, vals, shared, at_best)):
                    li_eq, v_eq = li[eq], v[s][eq]
                    win = pick[li_eq] == seen[li_eq]
                    value[li_eq[win]], winner[li_eq[win]] = v_eq[win], i
                    seen[li_eq] += 1
        out[pos] = value
        won = [len(x) - len(s) + int(np.count_nonzero(winner == i)) for i, (x, s) in enumerate(zip(ix, shared))]
    return won, pairs, covered


def fold_coefficients(gram: list[list[float]], t_values: list[float]) -> tuple[list[float], list[bool]]:
    """SLERP fold of models 1..M-1 into model 0 as one linear combination Σ a_i θ_i.

    `gram[i][j]` = ⟨θ_i, θ_j⟩. Each fold's SLERP only needs ‖result‖, ‖θ_m‖ and ⟨result, θ_m⟩, and the
    running result is linear in the inputs, so those come from the Gram matrix: the whole fold is
    known before any output value is computed, and the output is then made chunk by chunk.
    """
    a = [1.0] + [0.0] * (len(gram) - 1)
    linear = []
    for m, t in enumerate(t_values, start=1):
        dot = sum(a[i] * gram[i][m] for i in range(len(a)))
        sq0 = sum(a[i] * a[j] * gram[i][j] for i in range(len(a)) for j in range(len(a)))
        c0, c1, lin = slerp_coefficients(math.sqrt(max(sq0, 0.0)), math.sqrt(gram[m][m]), dot, t)
        a = [c0 * x for x in a]
        a[m] += c1
        linear.append(lin)
    return a, linear
