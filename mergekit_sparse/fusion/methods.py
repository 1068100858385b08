"""The sparse merge family's maths (METHODS §10), on float32 numpy chunks: which entries of each task
vector τₜ = θᵗ − θ⁰ are kept (magnitude top-k, DARE's hash drop, Breadcrumbs' rank window), their
rescaling, and the combination (weighted sum, TIES sign election and disjoint mean).

The streaming driver (`merge.MergeJob`) calls these tensor by tensor and chunk by chunk; nothing here
reads files. `semantics: mergekit` reproduces mergekit 0.1.5 (weighted sign election, weight divisor,
‖τ‖₁-matching rescale); `semantics: reference` follows the papers and PEFT (unweighted election, count
divisor, 1/density rescale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..selection.keys import tie_hash_range

SEMANTICS = ("mergekit", "reference")
RESCALES = ("l1", "inverse")  # plus None: no rescale


@dataclass(frozen=True)
class Method:
    """One method of the family: how it sparsifies, whether it elects signs, its defaults."""

    name: str
    sparsify: str | None  # None, "magnitude" (top-k |τ|), "random" (DARE), "outliers" (Breadcrumbs)
    consensus: bool  # TIES sign election and disjoint merge
    normalize: bool  # default of `normalize`
    rescale: bool  # default of `rescale` (DARE: true)
    delta: bool = True  # works on task vectors against base_model (linear: on the weights themselves)
    params: tuple[str, ...] = ("weight",)


METHODS = {
    m.name: m
    for m in (
        Method("linear", None, False, True, False, delta=False),
        Method("task_arithmetic", None, False, False, False),
        Method("ties", "magnitude", True, True, False, params=("weight", "density")),
        Method("dare_linear", "random", False, False, True, params=("weight", "density")),
        Method("dare_ties", "random", True, False, True, params=("weight", "density")),
        Method("breadcrumbs", "outliers", False, False, False, params=("weight", "density", "gamma")),
        Method("breadcrumbs_ties", "outliers", True, False, False, params=("weight", "density", "gamma")),
        # base_model is the t = 0 endpoint, the one other model t = 1 (as `fuse`'s SLERP, without cores)
        Method("slerp", None, False, False, False, delta=False, params=("t",)),
        # TALL masks mₜ = 1[|τₜ| > λₜ·|τ_MTL − τₜ|]: `tall` retrieves one task, `consensus` keeps τ_MTL where
        # at least consensus_k masks agree; localize-stitch averages each τₜ over its top-density entries
        Method("tall", None, False, False, False, params=("tall_lambda",)),
        Method("consensus", None, False, False, False, params=("tall_lambda",)),
        Method("localize_stitch", "magnitude", False, False, False, params=("density",)),
        # the `fuse` pipeline (§5): cores at p % of |τ|, SLERP of the rest onto the last model, cores written
        Method("cpi_ft", None, False, False, False, params=("weight",)),
    )
}
PLANNED: tuple[str, ...] = ()  # METHODS §10 methods not in this release
DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "lambda": 1.0, "tall_lambda": 0.4, "consensus_k": 2}
TOP_ONLY = {
    "consensus": ("consensus_k",),
    "tall": ("retrieve",),
    "cpi_ft": ("p", "conflict"),
}  # method-specific top-level parameters


def row_window(mag: np.ndarray, lo: int, hi: int, *, seed: int, rank: int, start: int) -> np.ndarray:
    """Breadcrumbs at `scope: row`: in each row of `mag` (rows × cols, |τ| of consecutive rows of one
    tensor whose first entry has flat index `start`), the entries of ranks [lo, hi) by |τ| descending, equal
    values ordered by the smallest §2 hash (exact, as the tensor-scope top-k)."""
    h = tie_hash_range(seed, rank, start, start + mag.size).reshape(mag.shape)
    order = np.lexsort((h, -mag), axis=-1)[:, lo:hi]  # per row: largest first, ties by the hash
    sel = np.zeros(mag.shape, dtype=bool)
    np.put_along_axis(sel, order, True, axis=-1)
    return sel


def tall_masks(taus: list[np.ndarray], lambdas: list[float]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(τ_MTL = Σₜ τₜ, the TALL masks mₜ = 1[|τₜ| > λₜ·|τ_MTL − τₜ|]) of one chunk (Wang et al.)."""
    mtl = taus[0].copy()
    for t in taus[1:]:
        mtl += t
    return mtl, [np.abs(t) > np.float32(lam) * np.abs(mtl - t) for t, lam in zip(taus, lambdas)]


def stitch(taus: list[np.ndarray], kept: list[np.ndarray]) -> np.ndarray:
    """Localize-and-stitch (dataless): Σₜ (γₜ / Σᵤ γᵤ) ⊙ τₜ, 0 where no mask holds (the τₜ are zero
    outside their γₜ already)."""
    total = taus[0].copy()
    count = kept[0].astype(np.float32)
    for t, k in zip(taus[1:], kept[1:]):
        total += t
        count += k
    count += count == 0  # no mask holds: 0 / 1
    return np.divide(total, count, out=total)


def keep_window(method: Method, n: int, density: float, gamma: float) -> tuple[int, int] | None:
    """The ranks (from the largest |τ|, 0-based, [lo, hi)) a magnitude or Breadcrumbs sparsification keeps in
    a tensor of n entries; None keeps everything. As mergekit 0.1.5: magnitude keeps max(1, ⌊density·n⌋);
    Breadcrumbs drops the top ⌊γ·n⌋ and keeps the next ⌊density·n⌋ (fewer dropped from the top when both
    do not fit; a tensor with ⌊γ·n⌋ = 0 drops nothing from the top), density ≥ 1 keeps all."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return (0, 0)
    if method.sparsify == "magnitude":
        return (0, max(1, int(density * n)))
    target, n_top = int(density * n), int(gamma * n)
    lo = min(n_top, n - target)
    return (lo, lo + target)


def dare_keep(seed: int, task: int, rank: int, start: int, end: int, density: float) -> np.ndarray:
    """DARE's drop (METHODS §10): entry j of task t is kept iff h < ⌊density·2⁶⁴⌋, h the §2 hash with seed
    s + 1 + t: deterministic, independent of threads and chunking, independent across tasks."""
    if density >= 1:
        return np.ones(end - start, dtype=bool)
    if density <= 0:
        return np.zeros(end - start, dtype=bool)
    limit = np.uint64(int(density * 2.0**64))  # exact: scaling by a power of two
    return tie_hash_range(seed + 1 + task, rank, start, end) < limit


def rescale_factor(kind: str | None, density: float, before: float, after: float, eps: float = 1e-7) -> float:
    """The factor kept entries are multiplied by: `l1` makes ‖τ̂‖₁ = ‖τ‖₁ (mergekit; nothing when either
    norm is below eps), `inverse` is 1/density (the DARE paper, PEFT)."""
    if kind == "l1":
        return 1.0 if before < eps or after < eps else before / after
    if kind == "inverse":
        return 1.0 / density if 0 < density < 1 else 1.0
    return 1.0


def combine(
    taus: list[np.ndarray],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    semantics: str,
) -> np.ndarray:
    """τ_merged for one chunk from the (sparsified, rescaled) task vectors.

    Without consensus: Σ wₜτₜ, divided by Σ wₜ when `normalize` (a divisor near 0 counts as 1). With
    consensus (TIES): elect γ = sign(Σ wₜτₜ) (mergekit) or sign(Σ τₜ) (reference), ≥ 0 → +1; keep task t
    where sign τₜ = γ (zeros never agree); Σ over the agreeing tasks, divided by their Σ wₜ (mergekit) or
    their count (reference) when `normalize`, a zero divisor counting as 1. Then × λ.
    """
    weighted = [t if w == 1 else t * np.float32(w) for t, w in zip(taus, weights)]  # τ·1 is τ, bit for bit
    if not consensus:
        mixed = weighted[0].copy()
        for x in weighted[1:]:
            mixed += x
        divisor = float(np.float32(sum(np.float32(w) for w in weights)))
        if normalize:
            mixed /= np.float32(1.0 if abs(divisor) < 1e-8 else divisor)
    else:
        # γ is kept as its sign bit: x·γ is x with that bit flipped (exact), and x agrees when x·γ > 0, i.e. when
        # the bits of x·γ are a positive int32. The agreeing entries' sum is γ·Σ max(x·γ, 0), which adds the same
        # values in the same order as Σ where(agree, x, 0); max(v, 0) is v's bits with a negative v zeroed.
        elect = weighted if semantics == "mergekit" else taus
        total = np.add(elect[0], elect[1]) if len(elect) > 1 else elect[0].copy()
        for x in elect[2:]:
            total += x
        total += np.float32(0)  # -0.0 -> +0.0: a zero sum elects +1
        sign = np.bitwise_and(total.view(np.int32), np.int32(-(2**31)), out=total.view(np.int32))
        mixed, aligned, low = np.zeros_like(total), np.empty_like(sign), np.empty_like(sign)
        counts = semantics != "mergekit" or all(w == 1 for w in weights)  # the divisor is a count
        count = np.zeros(total.shape, dtype=np.uint8 if len(taus) < 256 else np.uint32) if counts else None
        divisor = None if counts else np.zeros_like(total)
        for x, t, w in zip(weighted, taus, weights):
            np.bitwise_xor(x.view(np.int32), sign, out=aligned)  # x·γ
            if x is t or semantics == "mergekit":
                agree = aligned > 0
                np.right_shift(aligned, 31, out=low)
                np.invert(low, out=low)
                np.bitwise_and(aligned, low, out=aligned)  # max(x·γ, 0)
            else:  # the reference elects on unweighted signs (τ·γ > 0); w < 0 makes x·γ negative there
                agree = np.bitwise_xor(t.view(np.int32), sign) > 0
                np.multiply(aligned.view(np.float32), agree, out=aligned.view(np.float32))
            mixed += aligned.view(np.float32)
            if counts:
                np.add(count, agree, out=count)
            else:
                divisor += agree * np.float32(w)
        np.bitwise_xor(mixed.view(np.int32), sign, out=mixed.view(np.int32))  # × γ
        mixed += np.float32(0)  # -0.0 -> +0.0, as the definition's sum from +0.0 gives
        if normalize:
            if counts:
                np.bitwise_or(count, count == 0, out=count)  # a zero count divides by 1
                mixed /= count
            else:
                divisor += divisor == 0
                mixed /= divisor
    if lam != 1:
        mixed *= np.float32(lam)
    return mixed
