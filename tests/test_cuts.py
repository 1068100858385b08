"""`selection.cuts`: the global top-k as a (threshold, hash cut) rule, against a naive sort of every
entry by the §2 order, on each of its paths (the guess, the bracket's values, the radix passes, the
hash bracket and its histogram fallback)."""

from __future__ import annotations

import numpy as np
import pytest

from mergekit_sparse.selection import cuts
from mergekit_sparse.selection.keys import tie_hash


def stream(tensors: list[np.ndarray], chunk: int = 1000):
    """(chunks, sample) over float32 score tensors (ranks 0, 1, …), as `top_k_cut` takes them."""
    keys = [t.reshape(-1).view(np.int32) for t in tensors]

    def chunks():
        for rank, k in enumerate(keys):
            for s in range(0, k.size, chunk):
                yield rank, s, k[s : s + chunk].copy()  # a fresh buffer, as the real reader reuses its own

    def sample(step):
        return np.concatenate([k[::step] for k in keys])

    return chunks, sample


def oracle(tensors: list[np.ndarray], k: int, seed: int) -> list[np.ndarray]:
    """The top k by (score descending, hash ascending), as one bool mask per tensor."""
    vals = np.concatenate([t.reshape(-1) for t in tensors])
    hashes = np.concatenate([tie_hash(seed, r, np.arange(t.size)) for r, t in enumerate(tensors)])
    order = np.lexsort((hashes, -vals))[:k]
    flat = np.zeros(vals.size, dtype=bool)
    flat[order] = True
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.size])
        at += t.size
    return out


def chosen(cut: cuts.Cut, tensors: list[np.ndarray], chunk: int = 1000) -> list[np.ndarray]:
    out = []
    for rank, t in enumerate(tensors):
        k = t.reshape(-1).view(np.int32)
        out.append(np.concatenate([cut.keep(k[s : s + chunk], rank, s) for s in range(0, k.size, chunk)]))
    return out


def scores(kind: str, rng) -> list[np.ndarray]:
    sizes = [30_000, 7, 120_000, 513, 60_000]
    if kind == "continuous":
        return [np.abs(rng.standard_normal(n)).astype(np.float32) for n in sizes]
    if kind == "bf16":  # |Δ| of a bf16 fine-tune: most entries 0, a few distinct values, long runs
        return [(rng.integers(0, 5, n) * (rng.random(n) < 0.5)).astype(np.float32) * np.float32(2**-10) for n in sizes]
    return [np.full(n, 0.5, dtype=np.float32) for n in sizes]  # one value: every pick is a tie


@pytest.mark.parametrize("kind", ["continuous", "bf16", "constant"])
@pytest.mark.parametrize("share", [1e-4, 0.01, 0.2, 0.5, 0.97, 1.0])
def test_the_cut_selects_exactly_the_sorted_top_k(kind, share, monkeypatch):
    monkeypatch.setattr(cuts, "SAMPLE", 1 << 12)  # a sample far smaller than the data, as on a real model
    rng = np.random.default_rng(int(share * 1000) + len(kind))
    t = scores(kind, rng)
    total = sum(x.size for x in t)
    k = max(1, int(share * total))
    cut = cuts.top_k_cut(*stream(t), k, total, seed=5)
    got, want = chosen(cut, t), oracle(t, k, 5)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)), (kind, share)
    assert sum(int(a.sum()) for a in got) == k == cut.above + cut.picks
    assert cut.ties == sum(int((x == cut.threshold).sum()) for x in t)


def test_each_fallback_path_still_selects_exactly(monkeypatch):
    """The guess and bracket forced to miss (radix passes over everything), the bracket's values over the
    cap (radix passes over the bracket), the hash bracket forced to miss (the histogram of hashes)."""
    monkeypatch.setattr(cuts, "SAMPLE", 1 << 12)  # a sample far smaller than the data
    rng = np.random.default_rng(0)
    seen = []  # keys each radix select ranked
    radix = cuts.radix_select
    monkeypatch.setattr(cuts, "radix_select", lambda ch, k: seen.append(sum(c.size for c in ch())) or radix(ch, k))

    # continuous scores (the guess misses) with the bracket's values over the cap: the radix over the bracket
    t = scores("continuous", rng)
    total = sum(x.size for x in t)
    k = int(0.3 * total)
    monkeypatch.setattr(cuts, "CANDIDATES", 10)
    cut = cuts.top_k_cut(*stream(t), k, total, seed=1)
    assert len(seen) == 1 and 0 < seen[0] < total // 10
    assert all(np.array_equal(a, b) for a, b in zip(chosen(cut, t), oracle(t, k, 1)))

    # a sample that lies (all zeros): the bracket misses, the radix runs over every key
    t = scores("bf16", rng)
    total = sum(x.size for x in t)
    k = int(0.3 * total)
    want = oracle(t, k, 1)
    seen.clear()
    cut = cuts.top_k_cut(stream(t)[0], lambda step: np.zeros(100, np.int32), k, total, seed=1)
    assert seen == [total]
    assert all(np.array_equal(a, b) for a, b in zip(chosen(cut, t), want))

    # the hash bracket misses (a spread that points the wrong way): the histogram of hashes decides
    monkeypatch.setattr(cuts, "_hash_spread", lambda eq, p: -(eq / 4))
    cut = cuts.top_k_cut(*stream(t), k, total, seed=1)
    assert 0 < cut.picks < cut.ties
    assert all(np.array_equal(a, b) for a, b in zip(chosen(cut, t), want))


def test_out_of_range_k_is_an_option_error():
    from mergekit_sparse.errors import OptionError

    t = [np.ones(10, np.float32)]
    with pytest.raises(OptionError):
        cuts.top_k_cut(*stream(t), 0, 10)
    with pytest.raises(OptionError):
        cuts.top_k_cut(*stream(t), 11, 10)
