"""The METHODS §2 tie rule on data that ties the way real bf16 fine-tunes do.

A bf16 fine-tune moves most weights by a few bf16 steps or not at all, so |Δ| takes few distinct
values and millions of entries share the threshold. The fixture below has that structure at a
size CI can afford: bf16 weights of real magnitudes (N(0, 0.02)), 55 % of the entries unchanged,
the rest moved by 1–3 bf16 steps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_select_core import naive_core, naive_hash

from mergekit_sparse.analysis.cores import compute_cores, prepare_selectors
from mergekit_sparse.cli.main import cli
from mergekit_sparse.fusion.maths import resolve_cores
from mergekit_sparse.selection.keys import tie_hash
from mergekit_sparse.storage.checkpoint import Checkpoint
from mergekit_sparse.storage.masks import MaskSet, unpack
from mergekit_sparse.storage.scope import align

SHAPES = {
    "model.embed_tokens.weight": (3000, 64),
    **{f"model.layers.{i}.self_attn.q_proj.weight": (64, 64) for i in range(3)},
    **{f"model.layers.{i}.mlp.up_proj.weight": (256, 64) for i in range(3)},
    **{f"model.layers.{i}.input_layernorm.weight": (64,) for i in range(3)},
}


def bf16_steps(base: torch.Tensor, g: torch.Generator, moved: float = 0.45) -> torch.Tensor:
    """`base` (bf16) with a share `moved` of its entries moved by ±1..3 bf16 steps (Adam-like updates)."""
    bits = base.view(torch.int16).to(torch.int32)
    steps = torch.randint(1, 4, base.shape, generator=g, dtype=torch.int32)
    sign = torch.randint(0, 2, base.shape, generator=g, dtype=torch.int32) * 2 - 1
    move = torch.rand(base.shape, generator=g) < moved
    # steps move the magnitude (sign kept, never through zero into the NaN patterns, never past the largest finite)
    mag = (bits & 0x7FFF) + torch.where(move, steps * sign, 0)
    mag = mag.clamp(0, 0x7F7F)
    return ((bits & 0x8000) | mag).to(torch.int16).view(torch.bfloat16)


@pytest.fixture(scope="module")
def tie_heavy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tie_heavy")
    g = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=g)).bfloat16() for n, s in SHAPES.items()}
    base["model.rotary.inv_freq_steps"] = torch.arange(8)  # an integer buffer: copied, never ranked
    tasks = [{n: bf16_steps(t, g) if t.is_floating_point() else t for n, t in base.items()} for _ in range(2)]
    out = {"base": root / "base.safetensors", "tasks": [root / f"t{i}.safetensors" for i in range(2)]}
    save_file(base, out["base"])
    for path, sd in zip(out["tasks"], tasks):
        save_file(sd, path)
    out["fp32"] = [root / "base32.safetensors", *[root / f"t{i}_32.safetensors" for i in range(2)]]
    for path, sd in zip(out["fp32"], [base, *tasks]):
        save_file({n: t.float() if t.is_floating_point() else t for n, t in sd.items()}, path)
    return out


def _load(paths):
    base, *tasks = (load_file(p) for p in paths)
    return base, tasks


def test_the_fixture_ties_like_a_bf16_fine_tune(tie_heavy):
    base, (t0, _) = _load([tie_heavy["base"], *tie_heavy["tasks"]])
    d = torch.cat([(t0[n].float() - base[n].float()).abs().reshape(-1) for n in SHAPES])
    assert 0.5 < float((d == 0).float().mean()) < 0.6
    assert len(torch.unique(d)) < 0.01 * d.numel()  # few distinct |Δ|: a threshold ties massively


@pytest.mark.parametrize("files", ["bf16", "fp32"])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("percent", [1.0, 5.0])
def test_cores_equal_the_hash_oracle_on_tie_heavy_data(tie_heavy, tmp_path, files, per_tensor, percent):
    paths = [tie_heavy["base"], *tie_heavy["tasks"]] if files == "bf16" else tie_heavy["fp32"]
    base_sd, task_sds = _load(paths)
    base, *cks = (Checkpoint.open(p) for p in paths)
    scope = align([base, *cks])
    summaries = compute_cores(
        base, cks, scope, percent=percent, out_dir=tmp_path, labels=["t0", "t1"], per_tensor=per_tensor
    )
    for s, sd in zip(summaries, task_sds):
        want = naive_core(base_sd, sd, scope.names, percent, per_tensor, scope.ranks)
        got = MaskSet.load(s.mask_path)
        assert all(torch.equal(got.bool(n), want[n]) for n in scope.names)
        if not per_tensor:
            assert s.full_passes == 1  # the window held although the threshold's run is huge
            d = torch.cat([(sd[n].float() - base_sd[n].float()).abs().reshape(-1) for n in scope.names])
            t = s.threshold
            assert s.ties["ties"] == int((d == t).sum()) > 0.1 * s.selected
            assert s.ties["tie_picks"] == s.selected - int((d > t).sum())
            assert s.ties["p_strict"] == pytest.approx(100 * int((d > t).sum()) / d.numel())
            assert ("warning" in s.ties) == (s.ties["tie_picks"] > 0.1 * s.selected)


def test_the_window_never_stores_the_threshold_run(tie_heavy):
    """Ties spread over the hash, so the candidates of the counting pass are a thin slice of the run."""
    base, *cks = (Checkpoint.open(p) for p in [tie_heavy["base"], *tie_heavy["tasks"]])
    scope = align([base, *cks])
    sels = prepare_selectors(base, cks, scope, percent=5.0)
    for sel in sels:
        assert sel.chosen() is not None and sel.full_passes == 1
        assert sel.hi == sel.lo == sel.threshold and 0 < sel.hi_cut < sel.lo_cut  # both bounds inside the run
        assert sel.ties > 10_000 and sel.n_cand < 0.25 * sel.ties


def test_tie_picks_are_spread_over_tensors_as_the_hypergeometric_law_says(tie_heavy, tmp_path):
    """Under the hash rule each tied entry is equally likely to be picked: the picks in a tensor follow
    the hypergeometric law (within 4 σ for every tensor expecting at least 1,000 picks)."""
    paths = [tie_heavy["base"], *tie_heavy["tasks"]]
    base_sd, (sd, _) = _load(paths)
    base, *cks = (Checkpoint.open(p) for p in paths)
    scope = align([base, *cks])
    (s, _) = compute_cores(base, cks, scope, percent=5.0, out_dir=tmp_path, labels=["t0", "t1"])
    mask = MaskSet.load(s.mask_path)
    t, picks, N = s.threshold, s.ties["tie_picks"], s.ties["ties"]
    checked = 0
    for n in scope.names:
        d = (sd[n].float() - base_sd[n].float()).abs()
        tied = d == t
        n_t = int(tied.sum())
        got = int((mask.bool(n) & tied).sum())
        mean = picks * n_t / N
        sd_ = math.sqrt(picks * (n_t / N) * (1 - n_t / N) * (N - picks) / (N - 1))
        if mean >= 1000:
            checked += 1
            assert abs(got - mean) <= 4 * sd_, (n, got, mean, sd_)
    assert checked >= 1


def test_the_tie_seed_changes_only_the_picks_among_ties(tie_heavy, tmp_path):
    paths = [tie_heavy["base"], *tie_heavy["tasks"]]
    base, *cks = (Checkpoint.open(p) for p in paths)
    scope = align([base, *cks])
    a = compute_cores(base, cks[:1], scope, percent=1.0, out_dir=tmp_path / "s0", labels=["t0"])[0]
    b = compute_cores(base, cks[:1], scope, percent=1.0, out_dir=tmp_path / "s7", labels=["t0"], tie_seed=7)[0]
    ma, mb = MaskSet.load(a.mask_path), MaskSet.load(b.mask_path)
    assert mb.meta["tie_seed"] == 7 and a.threshold == b.threshold and a.ties["ties"] == b.ties["ties"]
    same = sum(int((ma.bool(n) & mb.bool(n)).sum()) for n in scope.names)
    strict = a.selected - a.ties["tie_picks"]
    assert strict <= same < a.selected  # the strict part is shared, the tie picks differ


def test_core_warns_when_ties_fill_the_core(tie_heavy, tmp_path):
    r = CliRunner().invoke(
        cli, ["core", "--base", str(tie_heavy["base"]), *map(str, tie_heavy["tasks"]), "--p", "1", "-o", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert "warning: t0:" in r.output and "tied at the threshold" in r.output and "--p " in r.output
    doc = json.loads((tmp_path / "core.json").read_text())
    assert len(doc["warnings"]) == 2 and doc["tasks"][0]["ties"]["tie_rule"] == "hash"


def test_tie_hash_matches_the_reference_vectors_and_a_plain_python_oracle():
    for (s, r, j), want in {
        (0, 0, 0): 0xE220A8397B1DCDAF,
        (0, 1, 5): 0x486E851C593533BA,
        (7, 3, 123456789): 0x2A5F81D3E3F5D5CE,
    }.items():
        assert int(tie_hash(s, r, np.array([j]))[0]) == want == naive_hash(s, r, j)
    j = np.arange(0, 200_000, 7)  # across the hashing blocks
    h = tie_hash(3, 11, j)
    assert all(int(h[i]) == naive_hash(3, 11, int(j[i])) for i in range(0, j.size, 997))


def test_max_delta_conflicts_with_equal_delta_go_to_the_hashed_task():
    """METHODS §5: m tasks share the largest |Δ| at a position: number h mod m of them (in task order) wins."""
    n = 64
    out = np.zeros(n, dtype=np.float32)
    idx = [np.arange(n), np.arange(n), np.arange(0, n, 2)]
    values = [np.full(n, 1.0, np.float32), np.full(n, 2.0, np.float32), np.full(n // 2, 3.0, np.float32)]
    deltas = [np.full(n, 0.5, np.float32), np.full(n, 0.5, np.float32), np.full(n // 2, 0.5, np.float32)]

    def h(local):
        return tie_hash(5, 2, local + 1000)

    won, pairs, covered = resolve_cores(out, idx, values, deltas, "max-delta", tie_hash=h)
    for p in range(n):
        tied = [0, 1, 2] if p % 2 == 0 else [0, 1]
        winner = tied[naive_hash(5, 2, p + 1000) % len(tied)]
        assert out[p] == values[winner][0], p
    assert sum(won) == n and covered == n
    out2 = np.zeros(n, dtype=np.float32)
    resolve_cores(out2, idx, values, deltas, "max-delta")  # without a hash: the first task wins
    assert (out2 == 1.0).all()


def test_fused_output_with_equal_deltas_follows_the_hash_rule(tmp_path):
    """Two tasks that moved the same entries by the same |Δ|: the conflict winner per position is the
    hashed one, in the fused file (cores computed on the fly)."""
    base = {"w": torch.zeros(4, 16)}
    a, b = {"w": torch.zeros(4, 16)}, {"w": torch.zeros(4, 16)}
    a["w"][0] = 1.0
    b["w"][0] = -1.0  # |Δ| 1 for both on row 0: every core position is a conflict with equal |Δ|
    for name, sd in (("base", base), ("a", a), ("b", b)):
        save_file(sd, tmp_path / f"{name}.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "fuse",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            "--base",
            str(tmp_path / "base.safetensors"),
            "--p",
            "25",
            "--tie-seed",
            "3",
            "-o",
            str(tmp_path / "f.safetensors"),
        ],
    )
    assert r.exit_code == 0, r.output
    fused = load_file(tmp_path / "f.safetensors")["w"][0]
    for j in range(16):
        want = (1.0, -1.0)[naive_hash(3, 0, j) % 2]
        assert float(fused[j]) == want, j
    doc = json.loads((tmp_path / "f.safetensors.fuse.json").read_text())
    assert doc["counts"]["tie_seed"] == 3 and doc["counts"]["ties"]["a"]["ties"] == 16


def test_overlap_reports_s_over_the_strict_cores_from_the_tie_bits(tie_heavy, tmp_path):
    """METHODS §4: mask files say which entries the tie rule picked; S over the strict cores (Δ > threshold)
    equals the naive Jaccard of those sets."""
    paths = [tie_heavy["base"], *tie_heavy["tasks"]]
    base_sd, task_sds = _load(paths)
    base, *cks = (Checkpoint.open(p) for p in paths)
    scope = align([base, *cks])
    summaries = compute_cores(base, cks, scope, percent=5.0, out_dir=tmp_path / "cores", labels=["t0", "t1"])
    masks = [MaskSet.load(s.mask_path) for s in summaries]
    for m, s, sd in zip(masks, summaries, task_sds):  # the tie bits are the core's entries at the threshold
        for n in scope.names:
            d = (sd[n].float() - base_sd[n].float()).abs()
            assert torch.equal(unpack(m.tie_packed(n), m.shapes[n]), m.bool(n) & (d == s.threshold)), n
    r = CliRunner().invoke(cli, ["overlap", *[s.mask_path for s in summaries], "-o", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "g.json").read_text())
    strict = [
        torch.cat([((sd[n].float() - base_sd[n].float()).abs() > s.threshold).reshape(-1) for n in scope.names])
        for s, sd in zip(summaries, task_sds)
    ]
    inter, union = int((strict[0] & strict[1]).sum()), int((strict[0] | strict[1]).sum())
    assert doc["strict"]["matrix"][0][1] == pytest.approx(inter / union, abs=1e-6)
    assert doc["strict"]["sizes"] == [int(x.sum()) for x in strict] != doc["sizes"]
    assert "S over the strict cores" in r.output


def test_kth_largest_key_equals_a_sort_on_wide_narrow_and_duplicate_heavy_keys():
    """The radix select behind every in-memory top-k (`topk_bits`): exact, whatever the duplicates."""
    from mergekit_sparse.selection.keys import kth_largest_key

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 5000))
        if trial % 3 == 0:  # the whole int32 range
            x = rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int64).astype(np.int32)
        elif trial % 3 == 1:  # a few values, many duplicates, in the high bits (a bf16 fine-tune's |Δ|)
            x = rng.integers(-5, 5, n).astype(np.int32) * (1 << int(rng.integers(0, 20)))
        else:  # across one 16-bit bucket boundary
            x = rng.integers(0, 70000, n).astype(np.int32)
        k = int(rng.integers(1, n + 1))
        assert kth_largest_key(x, k) == np.sort(x)[n - k], (trial, n, k)


@pytest.mark.parametrize("kind", ["continuous", "bf16-runs", "two-values", "adversarial"])
def test_the_sampled_bracket_of_large_keys_gives_the_exact_kth_largest(kind, monkeypatch):
    """Large inputs go through the sampled bracket (`_kth_bracketed`): its three outcomes (the guess, the
    bracket's candidates, the radix fallback) each give exactly what a sort gives."""
    from mergekit_sparse.selection import keys

    paths = []
    radix = keys._kth_radix
    monkeypatch.setattr(keys, "_kth_radix", lambda key, k: paths.append(key.size) or radix(key, k))
    rng = np.random.default_rng(1)
    n = 1 << 17
    if kind == "continuous":  # the guess misses: the bracket's candidates are a few % of the keys
        x = np.abs(rng.standard_normal(n)).astype(np.float32).view(np.int32)
    elif kind == "bf16-runs":  # |Δ| of a bf16 fine-tune: few values, the k-th inside a long run
        x = (rng.integers(0, 6, n).astype(np.float32) * np.float32(2**-10)).view(np.int32)
    elif kind == "two-values":
        x = np.where(rng.random(n) < 0.7, 0, 5).astype(np.int32)
    else:  # zero at every sampled position (the stride), larger everywhere else: the bracket misses
        x = rng.integers(1, 1000, n).astype(np.int32)
        x[:: n // keys.SAMPLE] = 0
    for k in (1, 7, n // 5, n // 2, n - 3, n):
        paths.clear()
        assert keys.kth_largest_key(x, k) == np.sort(x)[n - k], (kind, k)
        if kind == "adversarial" and k < n // 2:
            assert paths == [n]  # the fallback ran on everything
        if kind == "continuous" and k == n // 5:
            assert paths and paths[0] < n // 10  # only the bracket's keys were ranked


def test_smallest_hashes_of_many_ties_equals_a_full_sort():
    from mergekit_sparse.selection.keys import smallest_hashes, tie_hash

    h = tie_hash(3, 11, np.arange(1 << 17))
    for r in (1, 100, 5000, (1 << 17) // 3, (1 << 17) - 1):
        got = np.sort(smallest_hashes(h, r))
        assert np.array_equal(got, np.sort(np.argsort(h)[:r])), r


def test_tie_hash_of_a_range_equals_the_hash_of_its_indices():
    """DARE's drop and the row windows hash whole ranges without an index array; the offset wraps mod 2⁶⁴."""
    from mergekit_sparse.errors import OptionError
    from mergekit_sparse.selection.keys import HASH_BLOCK, MAX_INDEX, tie_hash_range

    for seed, rank, start, end in [
        (0, 0, 0, 10),
        (3, 7, 5, 3 * HASH_BLOCK + 17),
        (2**63, 9, MAX_INDEX - 70, MAX_INDEX),
    ]:
        want = tie_hash(seed, rank, np.arange(start, end))
        assert np.array_equal(tie_hash_range(seed, rank, start, end), want), (seed, rank, start)
    with pytest.raises(OptionError):
        tie_hash_range(0, 0, MAX_INDEX - 1, MAX_INDEX + 1)
