"""Exact top-k selection and core regions against naive in-memory oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_sparse.analysis.cores import compute_cores
from mergekit_sparse.cli.main import cli
from mergekit_sparse.errors import OptionError
from mergekit_sparse.selection import passes
from mergekit_sparse.selection import topk as select
from mergekit_sparse.selection.keys import tie_hash
from mergekit_sparse.selection.passes import Pass
from mergekit_sparse.storage.checkpoint import Checkpoint
from mergekit_sparse.storage.masks import MaskSet
from mergekit_sparse.storage.scope import align


def naive_hash(seed: int, rank: int, j: int) -> int:
    """METHODS §2's hash in plain Python integers (the oracle of `keys.tie_hash`)."""
    m = (1 << 64) - 1
    x = ((seed + 1) * 0x9E3779B97F4A7C15 + (rank << 40) + j) & m
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def naive_topk(scores: dict[str, torch.Tensor], k: int, ranks: dict | None = None, seed: int = 0):
    """Oracle: every entry of every tensor sorted by (score descending, METHODS §2 hash ascending), first k."""
    names = sorted(scores)
    ranks = ranks or {n: i for i, n in enumerate(names)}
    flat = torch.cat([scores[n].reshape(-1).float() for n in names]).numpy()
    h = np.concatenate([tie_hash(seed, ranks[n], np.arange(scores[n].numel())) for n in names])
    order = np.lexsort((h, -flat.astype(np.float64)))[:k]
    chosen = torch.zeros(flat.size, dtype=torch.bool)
    chosen[torch.from_numpy(order)] = True
    out, start = {}, 0
    for n in names:
        out[n] = chosen[start : start + scores[n].numel()].view(scores[n].shape)
        start += scores[n].numel()
    return out


def run_global(scores: dict[str, torch.Tensor], k: int, chunk: int = 97) -> dict[str, torch.Tensor]:
    """Drive TopK through its passes as the drivers do (sample blocks, then chunks in scope order)."""
    total = sum(s.numel() for s in scores.values())
    sel = select.TopK(k, total, ranks={n: i for i, n in enumerate(sorted(scores))})
    flat = {n: scores[n].reshape(-1).float() for n in scores}
    while kind := sel.wants():
        for n in sorted(flat):
            ranges = (
                passes.chunk_ranges(flat[n].numel(), chunk)
                if kind is not Pass.SAMPLE
                else passes.sample_ranges(n, flat[n].numel(), total)
            )
            weight = {} if kind is not Pass.SAMPLE else {"weight": flat[n].numel() / sum(e - s for s, e in ranges)}
            for s, e in ranges:
                sel.observe(n, s, flat[n][s:e], **weight)
        sel.end_pass()
    run_global.window = sel.chosen() is not None
    out = {
        n: torch.cat([sel.select(n, s, flat[n][s:e]) for s, e in passes.chunk_ranges(flat[n].numel(), chunk)]).view(
            scores[n].shape
        )
        for n in sorted(flat)
    }
    assert sel.selected == k
    return out


def run_radix(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    total = sum(s.numel() for s in scores.values())
    sel = select.RadixTopK(k, total, ranks={n: i for i, n in enumerate(sorted(scores))})
    while sel.stage < 4:  # two histogram passes, then the threshold's hashes when only some are taken
        for n in sorted(scores):
            sel.observe(n, 0, scores[n].reshape(-1).float())
        sel.next_pass()
    out = {n: sel.select(n, 0, scores[n].reshape(-1).float()).view(scores[n].shape) for n in sorted(scores)}
    assert sel.selected == k
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("frac", [0.001, 0.1, 0.5, 1.0])
def test_global_topk_equals_naive_with_planted_ties(seed, frac):
    g = torch.Generator().manual_seed(seed)
    scores = {
        "z": torch.randn(50, 40, generator=g).abs(),
        "a": torch.randn(333, generator=g).abs(),
        "m": torch.randint(0, 4, (30, 30), generator=g).float(),
    }  # many ties
    scores["a"][::7] = 2.0  # ties at a value in range
    scores["z"][0, :5] = 2.0
    k = max(1, int(frac * sum(s.numel() for s in scores.values())))
    want = naive_topk(scores, k)
    for got in (run_global(scores, k), run_radix(scores, k)):
        for n in scores:
            assert torch.equal(got[n], want[n]), n


def test_window_falls_back_to_radix_when_candidates_overflow(monkeypatch):
    monkeypatch.setattr(select, "CANDIDATE_CAP", 10)
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 3, (500,), generator=g).float(), "b": torch.randn(300, generator=g).abs()}
    for k in (1, 77, 400, 800):
        got, want = run_global(scores, k), naive_topk(scores, k)
        assert all(torch.equal(got[n], want[n]) for n in scores)


def test_window_breaks_ties_by_hash_whatever_the_scan_order():
    """Fusion's counting pass scans tensors in its own order; ties still go by the §2 hash."""
    scores = {"b": torch.ones(40), "a": torch.ones(40), "c": torch.linspace(2, 3, 40)}
    sel = select.TopK(50, 120, ranks={"a": 0, "b": 1, "c": 2})
    while kind := sel.wants():
        for n in ("c", "b", "a"):  # not sorted
            ranges = [(0, 40)] if kind is not Pass.SAMPLE else passes.sample_ranges(n, 40, 120)
            for s, e in ranges:
                sel.observe(n, s, scores[n][s:e])
        sel.end_pass()
    assert sel.chosen() is not None  # settled by the window
    got = {n: sel.select(n, 0, scores[n]) for n in ("c", "b", "a")}
    want = naive_topk(scores, 50)
    assert all(torch.equal(got[n], want[n]) for n in scores)
    assert 0 < int(got["a"].sum()) < 10 and int(got["a"].sum() + got["b"].sum()) == 10  # spread, not by name
    assert (sel.ties, sel.tie_picks, sel.above_strict) == (80, 10, 40)


def test_large_tensor_uses_sampled_window_and_is_exact():
    g = torch.Generator().manual_seed(1)
    scores = {"big": torch.randn(300_000, generator=g).abs(), "small": torch.randn(1000, generator=g)}
    sel_k = 3010
    got, want = run_global(scores, sel_k, chunk=65_536), naive_topk(scores, sel_k)
    assert all(torch.equal(got[n], want[n]) for n in scores)


def test_window_weights_tensors_sampled_at_different_rates():
    """Small tensors are read whole, big ones in sampled blocks: an unweighted sample would put the
    threshold among the small tensors' large scores and miss; the weighted window holds it."""
    g = torch.Generator().manual_seed(2)
    scores = {
        "big": torch.rand(2_000_000, generator=g),
        **{f"s{i}": 5 + torch.rand(5000, generator=g) for i in range(3)},
    }  # 15 k huge scores
    k = 20_000  # 15 k small-tensor + 5 k from "big"
    got, want = run_global(scores, k), naive_topk(scores, k)
    assert all(torch.equal(got[n], want[n]) for n in scores)
    assert run_global.window  # one full pass, no radix fallback


def test_window_widens_for_blocks_of_different_scales():
    """Scores clustered by block (rows of different scale): the spread of the sampled blocks widens the
    window enough to keep the threshold inside it."""
    g = torch.Generator().manual_seed(3)
    rows = torch.rand(500, 4096, generator=g) * (1 + 3 * torch.rand(500, 1, generator=g))  # per-row scales 1..4
    scores = {"w": rows.reshape(-1)}
    k = 20_480  # 1 %
    got, want = run_global(scores, k), naive_topk(scores, k)
    assert torch.equal(got["w"], want["w"]) and run_global.window


def test_global_topk_handles_negative_scores_and_all_zero():
    scores = {"a": -torch.arange(10.0), "b": torch.zeros(10)}
    assert torch.equal(
        torch.cat([run_global(scores, 12)[n] for n in "ab"]), torch.cat([naive_topk(scores, 12)[n] for n in "ab"])
    )
    zeros = {"a": torch.zeros(7), "b": torch.zeros(5)}
    got, want = run_global(zeros, 9), naive_topk(zeros, 9)
    assert all(torch.equal(got[n], want[n]) for n in zeros) and int(got["a"].sum() + got["b"].sum()) == 9


def test_nan_scores_are_an_error_naming_the_tensor():
    sel = select.TopK(1, 3, ranks={"w": 0})
    with pytest.raises(Exception, match="tensor 'w'"):
        sel.observe("w", 0, torch.tensor([1.0, float("nan"), 0.0]))


def test_topk_mask_single_tensor_tie_rule():
    """Three entries tie at 3.0 and two are taken: those with the smallest hash of (rank, index)."""
    for rank in range(4):
        mask, t, ties, picks = select.topk_mask(torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5]), 2, rank=rank)
        h = {j: naive_hash(0, rank, j) for j in (1, 2, 3)}
        want = sorted(h, key=h.get)[:2]
        assert [j for j, x in enumerate(mask.tolist()) if x] == sorted(want) and t == 3.0 and (ties, picks) == (3, 2)


def test_k_for_gives_smallest_usable_p():
    with pytest.raises(
        OptionError, match=r"selects no parameter of the 1000 in scope; the smallest usable value is 0.1"
    ):
        select.k_for(0.05, 1000)
    with pytest.raises(OptionError, match="out of range"):
        select.k_for(120, 1000)
    assert select.k_for(100, 1000) == 1000


def naive_core(base: dict, task: dict, names, percent, per_tensor, ranks: dict | None = None, seed: int = 0):
    deltas = {n: (task[n].float() - base[n].float()).abs() for n in names}
    ranks = ranks or {n: i for i, n in enumerate(sorted(names))}
    if per_tensor:
        return {n: naive_topk({n: d}, int(percent * d.numel() // 100), ranks, seed)[n] for n, d in deltas.items()}
    return naive_topk(deltas, int(percent * sum(d.numel() for d in deltas.values()) // 100), ranks, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_core_masks_equal_naive_oracle(tiny_base, tmp_path, dtype, per_tensor):
    base_sd = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(tiny_base / "model.safetensors").items()
    }
    save_file(base_sd, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(3)
    tasks = []
    for i in range(2):
        sd = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base_sd.items()}
        sd["model.norm.weight"] = base_sd["model.norm.weight"].clone()  # all-zero deltas: ties
        save_file(sd, tmp_path / f"t{i}.safetensors")
        tasks.append(sd)
    base = Checkpoint.open(tmp_path / "base.safetensors")
    cks = [Checkpoint.open(tmp_path / f"t{i}.safetensors") for i in range(2)]
    scope = align([base, *cks])
    summaries = compute_cores(
        base, cks, scope, percent=7.5, out_dir=tmp_path / "cores", labels=["t0", "t1"], per_tensor=per_tensor
    )
    for i, s in enumerate(summaries):
        want = naive_core(base_sd, tasks[i], scope.names, 7.5, per_tensor, scope.ranks)
        masks = MaskSet.load(s.mask_path)
        masks.check_fits(scope.shapes, "base")
        for n in scope.names:
            assert torch.equal(masks.bool(n), want[n]), n
        assert s.selected == sum(int(w.sum()) for w in want.values()) == masks.count()


def test_core_cli_on_planted_files(planted, tmp_path):
    out = tmp_path / "cores"
    r = CliRunner().invoke(
        cli,
        [
            "core",
            "--base",
            str(planted["base"]),
            str(planted["a"]),
            str(planted["b"]),
            "--p",
            "25",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [t["selected"] for t in data["tasks"]] == [3, 3]  # 25 % of 12 float params
    a = MaskSet.load(out / "a.mask.safetensors")
    assert a.bool("b.w")[0, :2].all() and a.bool("a.w")[1, 1]  # the planted moves, by eye
    b = MaskSet.load(out / "b.mask.safetensors")
    assert b.bool("a.w")[1, 1] and int(b.bool("a.w").sum() + b.bool("b.w").sum()) == 3
    # then 2 of the 11 zero deltas (ranks: a.w 0, b.w 1; n.steps is not floating): smallest hashes
    zeros = [(naive_hash(0, r, j), n, j) for n, r in (("a.w", 0), ("b.w", 1)) for j in range(6) if (n, j) != ("a.w", 4)]
    for _, n, j in sorted(zeros)[:2]:
        assert b.bool(n).reshape(-1)[j], (n, j)
    assert (
        b.tie_rule == "hash"
        and b.meta["tie_seed"] == 0
        and b.meta["ties"]["ties"] == 11
        and b.meta["ties"]["tie_picks"] == 2
    )
    meta = a.meta
    assert meta["criterion"] == "delta" and meta["percent"] == 25 and meta["selected"] == 3
    assert meta["threshold"] == 3.0 and len(meta["sources"]) == 2
    core_json = json.loads((out / "core.json").read_text())
    assert core_json["settings"]["p"] == 25 and core_json["scope"]["copied"] == ["n.steps"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--p", "0"], "Invalid value for '--p'"),
        (["--p", "abc"], "Invalid value for '--p'"),
        (["--p", "1"], "smallest usable value is 8.33"),
    ],
)
def test_core_cli_rejects_bad_p(planted, tmp_path, args, message):
    r = CliRunner().invoke(
        cli, ["core", "--base", str(planted["base"]), str(planted["a"]), *args, "-o", str(tmp_path / "o")]
    )
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "o" / "a.mask.safetensors").exists()


def test_core_cli_nan_is_an_error_naming_tensor_and_file(planted, tmp_path):
    sd = load_file(planted["a"])
    sd["b.w"][1, 1] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "core",
            "--base",
            str(planted["base"]),
            str(tmp_path / "nan.safetensors"),
            "--p",
            "50",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 1 and "tensor 'b.w' in" in r.output and "nan.safetensors holds NaN/Inf" in r.output
    assert not (tmp_path / "o" / "nan.mask.safetensors").exists()


def test_core_cli_mismatch_and_existing_output(planted, tmp_path):
    save_file({"a.w": torch.ones(2, 3)}, tmp_path / "short.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "core",
            "--base",
            str(planted["base"]),
            str(tmp_path / "short.safetensors"),
            "--p",
            "50",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 1 and "tensor 'b.w' is in" in r.output and "missing from" in r.output
    args = ["core", "--base", str(planted["base"]), str(planted["a"]), "--p", "50", "-o", str(tmp_path / "o2")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "already exists; pass --force" in r.output
    assert CliRunner().invoke(cli, args + ["--force"]).exit_code == 0


def test_mask_for_another_model_does_not_fit(planted, tiny_base, tmp_path):
    CliRunner().invoke(
        cli, ["core", "--base", str(planted["base"]), str(planted["a"]), "--p", "50", "-o", str(tmp_path / "o")]
    )
    m = MaskSet.load(tmp_path / "o" / "a.mask.safetensors")
    scope = align([Checkpoint.open(tiny_base)])
    with pytest.raises(Exception, match="does not fit .* made for another model"):
        m.check_fits(scope.shapes, tiny_base)


def test_empty_tensors_are_copied_not_selected(tmp_path):
    base = {"w": torch.zeros(4, 4), "empty": torch.zeros(0, 3)}
    task = {"w": torch.arange(16.0).view(4, 4), "empty": torch.zeros(0, 3)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(task, tmp_path / "t.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "core",
            "--base",
            str(tmp_path / "base.safetensors"),
            str(tmp_path / "t.safetensors"),
            "--p",
            "25",
            "-o",
            str(tmp_path / "cores"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    m = MaskSet.load(tmp_path / "cores" / "t.mask.safetensors")
    assert m.names == ["w"] and m.bool("w").view(-1)[-4:].all() and m.count() == 4


@pytest.mark.parametrize("threads", [False, True])
def test_counting_tensors_at_once_selects_what_counting_in_order_does(threads):
    """Fusion's workers count different tensors at once, so their chunks' candidates interleave; the
    selection is still the exact top-k, ties by the §2 hash."""
    import threading

    g = torch.Generator().manual_seed(4)
    scores = {f"t{i}": (torch.randn(200_000, generator=g).abs() * 64).round() / 64 for i in range(4)}  # ties
    k, total, chunk = 30_000, 800_000, 4096
    sel = select.TopK(k, total, ranks={n: i for i, n in enumerate(sorted(scores))})
    for n in sorted(scores):
        ranges = passes.sample_ranges(n, 200_000, total)
        for s, e in ranges:
            sel.observe(n, s, scores[n][s:e], weight=200_000 / sum(e - s for s, e in ranges))
    sel.end_pass()
    starts = range(0, 200_000, chunk)
    if threads:  # two workers, two tensors each, chunk by chunk

        def work(names):
            for s in starts:
                for n in names:
                    sel.count(n, s, scores[n][s : s + chunk])

        pool = [threading.Thread(target=work, args=(names,)) for names in (["t2", "t0"], ["t3", "t1"])]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    else:  # round robin: every tensor's candidates are split into many runs
        for s in starts:
            for n in ("t3", "t1", "t0", "t2"):
                sel.count(n, s, scores[n][s : s + chunk])
    sel.end_pass()
    assert sel.chosen() is not None  # settled by the window
    want = naive_topk(scores, k)
    got = {n: sel.select(n, 0, scores[n]) for n in scores}
    assert all(torch.equal(got[n], want[n]) for n in scores) and sel.selected == k


def test_largest_holds_every_entry_above_its_last_and_falls_back_when_the_subsample_misleads():
    import numpy as np

    g = np.random.default_rng(0)
    v = np.round(g.standard_normal(100_000), 2).astype(np.float32)  # many ties
    top = select._largest(v, 700)
    assert len(top) >= 700 and np.all(np.diff(v[top]) <= 0)
    assert len(top) == int((v >= v[top[-1]]).sum())  # ties at the edge included
    v = np.zeros(16_000, dtype=np.float32)
    v[::16] = 1000 + np.arange(1000)  # the subsample sees only these: its guess holds too few
    top = select._largest(v, 100)
    assert len(top) == 100 and set(top.tolist()) == set(range(16 * 900, 16_000, 16))
