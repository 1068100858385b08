"""Property tests (hypothesis): selection, Jaccard, SLERP, mask packing, metrics."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_select_core import naive_topk, run_global

from mergekit_sparse.analysis.overlap import jaccard_matrix
from mergekit_sparse.evaluation.metrics import collapse, forget_ratio
from mergekit_sparse.fusion.maths import slerp
from mergekit_sparse.selection.topk import topk_mask
from mergekit_sparse.storage.masks import pack, unpack

SETTINGS = settings(max_examples=60, deadline=None)
values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e-30, 3e38, -3e38, 0.5])  # few values: many ties
score_lists = st.lists(st.one_of(values, st.floats(-1e6, 1e6, allow_nan=False, width=32)), min_size=1, max_size=60)


@SETTINGS
@given(st.lists(score_lists, min_size=1, max_size=4), st.floats(0.01, 1.0))
def test_exact_k_selection_for_arbitrary_scores_with_ties(lists, frac):
    scores = {f"t{i}": torch.tensor(v, dtype=torch.float32) for i, v in enumerate(lists)}
    total = sum(len(v) for v in lists)
    k = max(1, int(frac * total))
    got = run_global(scores, k)
    want = naive_topk(scores, k)
    assert sum(int(m.sum()) for m in got.values()) == k
    for n in scores:
        assert torch.equal(got[n], want[n])


@SETTINGS
@given(score_lists, st.integers(0, 80))
def test_single_tensor_topk_selects_exactly_k(v, k):
    x = torch.tensor(v, dtype=torch.float32)
    mask, t, ties, picks = topk_mask(x, k)
    assert int(mask.sum()) == min(k, len(v))
    if 0 < k < len(v):  # everything above the threshold, and `picks` of its `ties` entries
        assert bool((x[~mask] <= t).all()) and bool((x[mask] >= t).all())
        assert ties == int((x == t).sum()) and picks == int((x[mask] == t).sum())


@SETTINGS
@given(st.lists(st.lists(st.booleans(), min_size=20, max_size=20), min_size=2, max_size=5))
def test_jaccard_is_symmetric_in_unit_interval_with_ones_on_the_diagonal(rows):
    m = np.array(rows, dtype=bool)
    inter = (m[:, None, :] & m[None, :, :]).sum(-1)
    j = jaccard_matrix(inter, np.diag(inter).copy())
    assert np.allclose(j, j.T) and (j >= 0).all() and (j <= 1).all()
    for i in range(len(rows)):
        assert j[i, i] == (1.0 if m[i].any() else 0.0)


@SETTINGS
@given(st.integers(1, 40), st.integers(0, 10_000), st.floats(0, 1))
def test_slerp_endpoints_and_norm_bounds(n, seed, t):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    # on the sphere the result's norm lies between the two norms (equal norms: equal norm)
    an, bn = a / a.norm(), b / b.norm()
    out = slerp(an, bn, t)
    if abs(float(an @ bn)) <= 0.9995:
        assert math.isclose(float(out.norm()), 1.0, rel_tol=1e-4)


@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.integers(0, 1000))
def test_mask_pack_unpack_round_trips_for_arbitrary_shapes(shape, seed):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert torch.equal(unpack(pack(mask), tuple(shape)), mask)


acc = st.floats(0, 1)


@SETTINGS
@given(st.dictionaries(st.sampled_from("abcdef"), st.tuples(acc, acc), min_size=2))
def test_metrics_stay_in_range(table):
    vanilla = {t: v for t, (v, _) in table.items()}
    run = {t: r for t, (_, r) in table.items()}
    trained = next(iter(table))
    fr = forget_ratio(vanilla, run, trained)
    assert fr is None or 0 <= fr <= 1
    rate, count = collapse(run, trained)
    assert 0 <= rate <= 1 and 0 <= count <= len(table) - 1
