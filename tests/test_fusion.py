"""Fusion: SLERP maths checkable by eye, core overwrite policies, the streaming driver and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_select_core import naive_hash

from mergekit_sparse.cli.main import cli
from mergekit_sparse.fusion.maths import POLICIES, CoreScratch, fold_weights, resolve_cores, slerp
from mergekit_sparse.storage.checkpoint import Checkpoint


def mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """The reference semantics (mergekit's numpy slerp), written out independently as the oracle."""
    v0c, v1c = v0.copy(), v1.copy()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    v0 = v0 / n0 if n0 > eps else v0
    v1 = v1 / n1 if n1 > eps else v1
    dot = np.sum(v0 * v1)
    if np.abs(dot) > dot_threshold:
        return (1 - t) * v0c + t * v1c
    th = np.arccos(dot)
    return np.sin(th - th * t) / np.sin(th) * v0c + np.sin(th * t) / np.sin(th) * v1c


def test_slerp_endpoints_return_inputs():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)


def test_slerp_of_orthogonal_unit_vectors_is_the_sin_weighted_result():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert torch.allclose(slerp(a, b, 1 / 3), torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_colinear_inputs_fall_back_to_linear():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(slerp(a, 3 * a, 0.25), 1.5 * a)


@pytest.mark.parametrize("seed", range(4))
def test_slerp_agrees_with_mergekit_semantics(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    want = mergekit_slerp(0.3, a.numpy().astype(np.float32), b.numpy().astype(np.float32))
    assert np.allclose(slerp(a, b, 0.3).numpy(), want, rtol=1e-5, atol=1e-6)


def test_fold_weights_follow_methods():
    assert fold_weights([1, 1]) == [0.5]
    assert fold_weights([1, 1, 1]) == [0.5, 1 / 3]


@pytest.mark.parametrize(
    "policy, want", [("max-delta", [9.0, 20.0, 0.0]), ("last", [10.0, 20.0, 0.0]), ("mean", [9.5, 20.0, 0.0])]
)
def test_conflicts_resolved_as_each_policy_says(policy, want):
    out = np.zeros(3, dtype=np.float32)
    idx = [np.array([0]), np.array([0, 1])]  # task 0 covers position 0, task 1 positions 0 and 1
    values = [np.array([9.0], dtype=np.float32), np.array([10.0, 20.0], dtype=np.float32)]
    deltas = [np.array([5.0], dtype=np.float32), np.array([1.0, 3.0], dtype=np.float32)]
    resolve_cores(out, idx, values, deltas, policy)
    assert out.tolist() == want


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_p100_with_one_task_onto_base_returns_the_task_exactly(planted, tmp_path):
    out = tmp_path / "f.safetensors"
    run("fuse", planted["a"], "--onto", planted["base"], "--base", planted["base"], "--p", 100, "-o", out)
    got, want = load_file(out), load_file(planted["a"])
    for k in ("a.w", "b.w"):
        assert torch.equal(got[k], want[k])
    assert torch.equal(got["n.steps"], want["n.steps"])


def test_fuse_two_files_streaming_equals_naive(planted, tmp_path):
    out = tmp_path / "f.safetensors"
    r = run("fuse", planted["a"], planted["b"], "--base", planted["base"], "--p", 25, "-o", out, "--json")
    data = json.loads(r.stdout)
    base, a, b = (load_file(planted[k]) for k in ("base", "a", "b"))
    got = load_file(out)
    # naive: SLERP(b, a, 0.5) everywhere, then cores (top 3 of 12 |Δ| each) written back, max-delta wins.
    # a's core is its three moves; b's is a.w[1,1] and two of its 11 zero deltas, the smallest §2 hashes
    # (ranks: a.w 0, b.w 1)
    a_core = {("b.w", 0), ("b.w", 1), ("a.w", 4)}
    zeros = sorted(
        (naive_hash(0, r, j), n, j) for n, r in (("a.w", 0), ("b.w", 1)) for j in range(6) if (n, j) != ("a.w", 4)
    )
    b_core = {("a.w", 4)} | {(n, j) for _, n, j in zeros[:2]}
    for name in ("a.w", "b.w"):
        want = slerp(b[name], a[name], 0.5).reshape(-1)
        da, db = ((x[name] - base[name]).abs().reshape(-1) for x in (a, b))
        for j in range(6):
            ina, inb = (name, j) in a_core, (name, j) in b_core
            if ina and (not inb or da[j] > db[j]):
                want[j] = a[name].reshape(-1)[j]
            elif inb:
                want[j] = b[name].reshape(-1)[j]
        assert torch.allclose(got[name].reshape(-1), want), name
    c = data["counts"]
    shared, union = len(a_core & b_core), len(a_core | b_core)
    assert c["conflicts"] == {"a~b": shared} and c["core_positions"] == union and c["interpolated"] == 12 - union
    assert json.loads((tmp_path / "f.safetensors.fuse.json").read_text())["counts"]["conflicts"] == {"a~b": shared}


def test_fuse_tiny_llama_folder_loads_in_transformers_and_generates(tiny_base, tiny_tasks, tmp_path):
    out = tmp_path / "fused"
    r = run(
        "fuse", tiny_tasks[0], tiny_tasks[1], "--base", tiny_base, "--p", 1, "-o", out, "--json", "--dtype", "bfloat16"
    )
    assert json.loads(r.stdout)["checked"] is True
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and (out / "fuse.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ids = tok("12+3=", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("policy", ["max-delta", "last", "mean"])
def test_fuse_with_mask_files_equals_on_the_fly_cores(tiny_base, tiny_tasks, tmp_path, policy):
    """On the fly, fusion is the selection's counting pass and patches the chosen candidates in afterwards;
    with mask files it writes every core directly: outputs and counts must agree bit for bit."""
    run("core", "--base", tiny_base, tiny_tasks[0], tiny_tasks[1], "--p", 2, "-o", tmp_path / "cores")
    masks = [tmp_path / "cores" / f"{n}.mask.safetensors" for n in ("math", "code")]
    common = [tiny_tasks[0], tiny_tasks[1], "--base", tiny_base, "--conflict", policy, "--no-check", "--json"]
    rm = run("fuse", *common, "--masks", masks[0], "--masks", masks[1], "-o", tmp_path / "m")
    rp = run("fuse", *common, "--p", 2, "-o", tmp_path / "p")
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "p" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cm, cp = json.loads(rm.stdout)["counts"], json.loads(rp.stdout)["counts"]
    assert cp["full_passes"] == 1
    for key in ("overwritten", "conflicts", "core_positions", "interpolated"):
        assert cm[key] == cp[key], key
    assert cp["conflicts"]["math~code"] > 0  # the patched positions include conflicts


def test_fuse_falls_back_to_a_second_pass_when_the_window_misses(tiny_base, tiny_tasks, tmp_path, monkeypatch):
    from mergekit_sparse.selection import topk as select

    run("fuse", tiny_tasks[0], tiny_tasks[1], "--base", tiny_base, "--p", 2, "-o", tmp_path / "one", "--no-check")
    monkeypatch.setattr(select, "CANDIDATE_CAP", 10)  # every window now overflows
    r = run(
        "fuse",
        tiny_tasks[0],
        tiny_tasks[1],
        "--base",
        tiny_base,
        "--p",
        2,
        "-o",
        tmp_path / "two",
        "--no-check",
        "--json",
    )
    assert json.loads(r.stdout)["counts"]["full_passes"] == 4  # count pass, two radix passes, fusion
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".two.partial-*"))


def test_fuse_three_models_folds_in_order_with_weights(planted, tmp_path):
    out = tmp_path / "f.safetensors"
    run(
        "fuse",
        planted["a"],
        planted["b"],
        "--onto",
        planted["base"],
        "--masks",
        *_empty_masks(planted, tmp_path),
        "--conflict",
        "last",
        "--weights",
        "1,2,1",
        "-o",
        out,
    )
    base, a, b = (load_file(planted[k]) for k in ("base", "a", "b"))
    got = load_file(out)
    want = slerp(slerp(base["a.w"], a["a.w"], 0.5), b["a.w"], 0.5)  # t = 1/(1+1), then 2/(1+1+2)
    assert torch.allclose(got["a.w"], want)


def _empty_masks(planted, tmp_path):
    """Two all-false mask files for the planted models: fusion is then the SLERP fold alone."""
    from mergekit_sparse.storage.masks import save_masks

    args = []
    for k in ("a", "b"):
        p = tmp_path / f"{k}.mask.safetensors"
        save_masks(
            p,
            {"a.w": torch.zeros(2, 3, dtype=torch.bool), "b.w": torch.zeros(3, 2, dtype=torch.bool)},
            {"criterion": "none"},
        )
        args += ["--masks", p]
    return args[1:]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no base found"),
        ([], "or give --masks"),
        (["--base", "{base}", "--omega", "1.5"], "Invalid value for '--omega'"),
        (["--base", "{base}", "--weights", "1,x"], "must be comma-separated numbers"),
        (["--base", "{base}", "--weights", "1,1,1"], "--weights needs 2 non-negative numbers"),
        (["--masks", "{a}"], "--masks needs one mask file per task"),
        (["--base", "{base}", "-o", "{a}"], "would overwrite or nest inside the input"),
    ],
)
def test_fuse_cli_user_errors(planted, tmp_path, args, message):
    args = [a.format(**{k: str(v) for k, v in planted.items()}) for a in args]
    r = CliRunner().invoke(cli, ["fuse", str(planted["a"]), str(planted["b"]), *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output


def test_readme_card_command_on_single_files(tiny_base, tiny_tasks, tmp_path, monkeypatch):
    """`sparsemerge fuse a.safetensors b.safetensors --base base.safetensors --p 1`, output in the cwd."""
    import shutil

    for name, src in (("base", tiny_base), ("a", tiny_tasks[0]), ("b", tiny_tasks[1])):
        shutil.copy(src / "model.safetensors", tmp_path / f"{name}.safetensors")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["fuse", "a.safetensors", "b.safetensors", "--base", "base.safetensors", "--p", "1"])
    assert r.exit_code == 0, r.output
    fused = load_file(tmp_path / "fused.safetensors")
    assert fused.keys() == load_file(tmp_path / "a.safetensors").keys()
    record = json.loads((tmp_path / "fused.safetensors.fuse.json").read_text())
    assert sum(record["counts"]["overwritten"].values()) > 0 and record["settings"]["scope"]["tensors"] == len(fused)


def _resolve_by_position(out, idx, values, deltas, policy):
    """Reference for resolve_cores: position by position, straight from the policy's definition."""
    out = out.copy()
    T = len(idx)
    cover = {}
    for i in range(T):
        for x, v, d in zip(idx[i], values[i], deltas[i]):
            cover.setdefault(int(x), []).append((i, float(v), float(d)))
    won = [0] * T
    pairs = {(i, j): 0 for i in range(T) for j in range(i + 1, T)}
    for x, tasks in cover.items():
        ids = [i for i, _, _ in tasks]
        for a in ids:
            for b in ids:
                if a < b:
                    pairs[(a, b)] += 1
        if policy == "last":
            w, v, _ = tasks[-1]
            out[x] = v
            won[w] += 1
        elif policy == "mean":
            acc = np.float32(0.0)
            for _, v, _ in tasks:
                acc = np.float32(acc + np.float32(v))
            out[x] = acc / np.float32(len(tasks))
            for i in ids:
                won[i] += 1
        else:
            w, v, _ = max(tasks, key=lambda t: (t[2], -t[0]))  # largest |Δ|, first task on a tie
            out[x] = v
            won[w] += 1
    return out, won, pairs, len(cover)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("tasks", [1, 2, 3, 9])
def test_resolve_cores_matches_the_policy_position_by_position(policy, tasks):
    g = np.random.default_rng(tasks)
    n = 500
    out0 = g.standard_normal(n).astype(np.float32)
    idx = [np.sort(g.choice(n, size=g.integers(1, 200), replace=False)) for _ in range(tasks)]
    values = [g.standard_normal(len(x)).astype(np.float32) for x in idx]
    deltas = [g.integers(0, 4, len(x)).astype(np.float32) for x in idx]  # many |Δ| ties
    want, won_want, pairs_want, covered_want = _resolve_by_position(out0, idx, values, deltas, policy)
    scratch = CoreScratch()
    for _ in range(2):  # the scratch is left clean for the next call
        out = out0.copy()
        won, pairs, covered = resolve_cores(out, idx, values, deltas, policy, scratch)
        assert np.array_equal(out, want)
        assert won == won_want and pairs == pairs_want and covered == covered_want


def _fuse_with_workers(monkeypatch, workers, *args):
    """`sparsemerge fuse` with `workers` tensors fused at once."""
    from mergekit_sparse.fusion import driver as fusion

    monkeypatch.setattr(fusion, "fusion_workers", lambda: workers)
    return json.loads(run("fuse", *args, "--json").stdout)


@pytest.mark.parametrize("cores", ["p", "masks"])
def test_several_workers_write_what_one_worker_writes(tiny_base, tiny_tasks, tmp_path, monkeypatch, cores):
    """Workers take the largest tensor left and write it in place (positional writes, here across shards):
    the output and every count are those of the one-worker run, bit for bit."""
    if cores == "masks":
        run("core", "--base", tiny_base, *tiny_tasks, "--p", 2, "-o", tmp_path / "cores")
        how = [x for n in ("math", "code", "chat") for x in ("--masks", tmp_path / "cores" / f"{n}.mask.safetensors")]
    else:
        how = ["--p", 2]
    common = [*tiny_tasks, "--base", tiny_base, *how, "--shard-size", "40KB", "--no-check"]
    one = _fuse_with_workers(monkeypatch, 1, *common, "-o", tmp_path / "one")
    three = _fuse_with_workers(monkeypatch, 3, *common, "-o", tmp_path / "three")
    assert one["counts"] == three["counts"] and one["counts"]["full_passes"] == 1
    assert sum(one["counts"]["overwritten"].values()) > 0 and one["counts"]["conflicts"]["math~code"] > 0
    a, b = Checkpoint.open(tmp_path / "one"), Checkpoint.open(tmp_path / "three")
    assert len(b.files) > 1 and a.names == b.names
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names)
    index = json.loads((tmp_path / "three" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "one" / "model.safetensors.index.json").read_text())


def test_a_failing_worker_stops_the_fusion_and_leaves_nothing(planted, tmp_path, monkeypatch):
    from mergekit_sparse.fusion import driver as fusion

    monkeypatch.setattr(fusion, "fusion_workers", lambda: 2)
    sd = load_file(planted["b"])
    sd["b.w"][2, 1] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "fuse",
            str(planted["a"]),
            str(tmp_path / "nan.safetensors"),
            "--base",
            str(planted["base"]),
            "--p",
            "25",
            "-o",
            str(tmp_path / "f.safetensors"),
        ],
    )
    assert r.exit_code != 0 and "NaN/Inf" in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "base.safetensors",
        "nan.safetensors",
    ]


@pytest.mark.parametrize("cores", ["p", "masks"])
def test_nan_in_the_base_is_an_error_naming_it(planted, tmp_path, cores):
    """The base only enters through |Δ| (the cores, max-delta conflicts): NaN there must not pass silently."""
    sd = load_file(planted["base"])
    sd["a.w"][1, 2] = float("nan")
    save_file(sd, tmp_path / "nanbase.safetensors")
    how = ["--p", "25"] if cores == "p" else ["--masks", *_empty_masks(planted, tmp_path)]
    r = CliRunner().invoke(
        cli,
        [
            "fuse",
            str(planted["a"]),
            str(planted["b"]),
            "--base",
            str(tmp_path / "nanbase.safetensors"),
            *map(str, how),
            "-o",
            str(tmp_path / "f.safetensors"),
        ],
    )
    assert r.exit_code != 0 and "tensor 'a.w' in" in r.output and "nanbase.safetensors holds NaN/Inf" in r.output, (
        r.output
    )
    assert not (tmp_path / "f.safetensors").exists()


def test_values_too_large_for_float32_are_an_error_not_a_nan_merge(planted, tmp_path):
    sd = load_file(planted["b"])
    sd["b.w"] *= 1e20  # finite, but Σθ² overflows
    save_file(sd, tmp_path / "huge.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "fuse",
            str(planted["a"]),
            str(tmp_path / "huge.safetensors"),
            "--base",
            str(planted["base"]),
            "--p",
            "25",
            "-o",
            str(tmp_path / "f.safetensors"),
        ],
    )
    assert r.exit_code != 0 and "tensor 'b.w': values too large to fuse in float32" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "f.safetensors").exists()


NO_TORCH = """
import sys
from mergekit_sparse.cli.main import main
sys.argv = ["sparsemerge", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
print("torch imported" if "torch" in sys.modules else "torch not imported")
sys.exit(code)
"""


def _bf16_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("cores", ["p", "masks"])
def test_fuse_never_imports_torch_and_writes_what_a_torch_process_writes(tiny_base, tiny_tasks, tmp_path, cores):
    """The fusion is numpy throughout (torch's start-up is seconds): a `sparsemerge fuse` process of bf16
    models never loads torch, and writes bit for bit what the same fusion writes in a process that has it."""
    import subprocess
    import sys

    base, *tasks = (_bf16_copy(p, tmp_path / p.name) for p in (tiny_base, *tiny_tasks[:2]))
    if cores == "masks":
        run("core", "--base", base, *tasks, "--p", 2, "-o", tmp_path / "cores")
        how = [x for t in tasks for x in ("--masks", tmp_path / "cores" / f"{t.name}.mask.safetensors")]
    else:
        how = ["--p", 2]
    args = ["fuse", *tasks, "--base", base, *how, "--no-check", "--json"]
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args), "-o", str(tmp_path / "alone")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("torch not imported"), r.stdout + r.stderr
    run(*args, "-o", tmp_path / "with_torch")
    a, b = Checkpoint.open(tmp_path / "alone"), Checkpoint.open(tmp_path / "with_torch")
    assert a.infos["model.norm.weight"].code == "BF16" and a.names == b.names
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names)
    assert (
        json.loads((tmp_path / "alone" / "fuse.json").read_text())["counts"]
        == json.loads((tmp_path / "with_torch" / "fuse.json").read_text())["counts"]
    )


@pytest.mark.parametrize("sizes", [(0,), (5,), (0, 0), (7, 0), (300, 200, 0, 50)])
def test_union_of_position_sets_and_who_holds_what(sizes):
    from mergekit_sparse.fusion.driver import _union

    g = np.random.default_rng(len(sizes))
    sets = [np.sort(g.choice(1000, n, replace=False)).astype(np.int64) for n in sizes]
    P, held = _union(sets)
    assert np.array_equal(P, np.unique(np.concatenate(sets)))
    assert all(np.array_equal(h, np.isin(P, s)) for h, s in zip(held, sets))
