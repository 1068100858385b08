"""Hardening: the bad-input matrix through the CLI, faults (SIGKILL, ENOSPC), determinism, security.

Every matrix row: exit code non-zero, one `Error:` line (no traceback) containing the expected
words, and no output left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import run_cli
from safetensors.torch import load_file, save_file

from mergekit_sparse.cli.main import cli


def sha(path: Path) -> str:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def world(tmp_path, planted, tiny_base, tiny_tasks):
    """Named inputs for the matrix: good ones and one bad file of every kind."""
    w = {k: str(v) for k, v in planted.items()}
    w["tiny"], w["math"], w["code"] = str(tiny_base), str(tiny_tasks[0]), str(tiny_tasks[1])
    w["missing"] = str(tmp_path / "missing.safetensors")
    (tmp_path / "empty_dir").mkdir()
    w["empty_dir"] = str(tmp_path / "empty_dir")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    w["empty"] = str(tmp_path / "empty.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(planted["a"].read_bytes()[:-7])
    w["trunc"] = str(tmp_path / "trunc.safetensors")
    hdr = json.dumps({"a.w": {"dtype": "F64", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    (tmp_path / "lie.safetensors").write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 24)
    w["lie"] = str(tmp_path / "lie.safetensors")
    listed = json.dumps([{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}]).encode()
    (tmp_path / "list.safetensors").write_bytes(len(listed).to_bytes(8, "little") + listed + b"\0" * 4)
    w["list_header"] = str(tmp_path / "list.safetensors")
    (tmp_path / "list_index").mkdir()
    (tmp_path / "list_index" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    w["list_index"] = str(tmp_path / "list_index")
    bad_index = tmp_path / "bad_index"
    shutil.copytree(tiny_base, bad_index)
    (bad_index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    w["bad_index"] = str(bad_index)
    torch.save({"a.w": torch.ones(2, 3)}, tmp_path / "pickle.bin")
    w["pickle"] = str(tmp_path / "pickle.bin")
    sd = load_file(planted["a"])
    save_file({"b.w": sd["b.w"], "n.steps": sd["n.steps"]}, tmp_path / "nofloat.safetensors")
    w["names"] = str(tmp_path / "nofloat.safetensors")  # a missing buffer is only a warning (METHODS §1)
    save_file({**sd, "b.w": torch.ones(2, 3)}, tmp_path / "shape.safetensors")
    w["shape"] = str(tmp_path / "shape.safetensors")
    save_file({**sd, "a.w": torch.ones(2, 3, dtype=torch.int32)}, tmp_path / "intdtype.safetensors")
    w["dtype"] = str(tmp_path / "intdtype.safetensors")
    save_file({**sd, "a.w": torch.full((2, 3), float("inf"))}, tmp_path / "inf.safetensors")
    w["inf"] = str(tmp_path / "inf.safetensors")
    grads = {k: torch.zeros_like(v) for k, v in load_file(Path(tiny_base) / "model.safetensors").items()}
    grads["model.norm.weight"][0] = float("nan")
    save_file(grads, tmp_path / "nan_grads.safetensors", metadata={"kind": "mean_gradient"})
    w["nan_grads"] = str(tmp_path / "nan_grads.safetensors")
    from mergekit_sparse.storage.masks import save_masks

    save_masks(tmp_path / "other.mask.safetensors", {"x.w": torch.ones(4, dtype=torch.bool)}, {})
    w["other_mask"] = str(tmp_path / "other.mask.safetensors")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    w["bad_jsonl"] = str(tmp_path / "bad.jsonl")
    (tmp_path / "a_file").write_text("x")
    w["under_file"] = str(tmp_path / "a_file" / "out")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "core.json").write_text("{}")  # an earlier run's output
    w["exists"] = str(tmp_path / "exists")
    w["out"] = str(tmp_path / "out")
    w["out_st"] = str(tmp_path / "out.safetensors")
    # headers the reference safetensors parser refuses (METHODS §1: one Error line each)
    one = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    headers = {
        "neg_dim": {"a.w": {**one, "shape": [-2, -3]}},
        "huge_dim": {"a.w": {**one, "shape": [2**63, 1]}},
        "float_dim": {"a.w": {**one, "shape": [2.0, 3]}},
        "overlap": {"a.w": one, "b.w": one},
        "gap": {"a.w": {**one, "data_offsets": [8, 32]}},
        "meta_map": {"__metadata__": {"x": 1}, "a.w": one},
    }
    for name, header in headers.items():
        raw = json.dumps(header).encode()
        (tmp_path / f"{name}.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 48)
        w[name] = str(tmp_path / f"{name}.safetensors")
    dup = b'{"a.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a.w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    (tmp_path / "dup.safetensors").write_bytes(len(dup).to_bytes(8, "little") + dup + b"\0" * 8)
    w["dup"] = str(tmp_path / "dup.safetensors")
    deep = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "deep.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    w["deep"] = str(tmp_path / "deep.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    w["fifo"] = str(tmp_path / "fifo.safetensors")
    for name, index in (
        ("int_index", {"weight_map": {"x": 1}}),
        ("stale_index", {"weight_map": {"nope.weight": "model.safetensors"}}),
        ("deep_index", None),
    ):
        shutil.copytree(tiny_base, tmp_path / name)
        text = json.dumps(index) if index else "[" * 100_000 + "]" * 100_000
        (tmp_path / name / "model.safetensors.index.json").write_text(text)
        w[name] = str(tmp_path / name)
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    w["latin1"] = str(tmp_path / "latin1.jsonl")
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "\\ud800", "response": "x"}\n')
    w["surrogate"] = str(tmp_path / "surrogate.jsonl")
    (tmp_path / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    w["nested"] = str(tmp_path / "nested.jsonl")
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "x" * (2 << 20), "response": "y"}) + "\n")
    w["long"] = str(tmp_path / "long.jsonl")
    (tmp_path / "empty_resp.jsonl").write_text('{"prompt": "", "response": ""}\n')
    w["empty_resp"] = str(tmp_path / "empty_resp.jsonl")
    (tmp_path / "bool_answer.jsonl").write_text('{"prompt": "q", "choices": ["a", "b"], "answer": true}\n')
    w["bool_answer"] = str(tmp_path / "bool_answer.jsonl")
    (tmp_path / "truncating.jsonl").write_text('{"prompt": "a long prompt here", "response": "zz"}\n')
    w["truncating"] = str(tmp_path / "truncating.jsonl")
    (tmp_path / "lm_number.json").write_text(json.dumps({"results": {"a": 0.5}}))
    w["lm_number"] = str(tmp_path / "lm_number.json")
    (tmp_path / "no_accuracy.json").write_text(json.dumps({"tasks": {"a": {"correct": 3}}}))
    w["no_accuracy"] = str(tmp_path / "no_accuracy.json")
    (tmp_path / "groups_mixed.json").write_text(json.dumps({"tasks": ["a", "b"], "groups": ["a", ["b"]]}))
    w["groups_mixed"] = str(tmp_path / "groups_mixed.json")
    big = {k: v * 1e5 for k, v in load_file(planted["a"]).items() if v.is_floating_point()}
    save_file(big, tmp_path / "big.safetensors")
    w["big"] = str(tmp_path / "big.safetensors")
    return w


MATRIX = [
    # (id, argv template, words the one Error line must contain)
    ("missing file", "core --base {missing} {a} --p 50 -o {out}", "missing.safetensors: no such file or folder"),
    ("folder without weights", "core --base {empty_dir} {a} --p 50 -o {out}", "folder holds no weights"),
    ("empty file", "inspect {empty}", "empty.safetensors: file is empty"),
    ("truncated safetensors", "fuse {trunc} {b} --base {base} --p 50 -o {out_st}", "truncated"),
    ("header lies about dtype", "inspect {lie}", "its offsets span 24"),
    ("index outside the folder", "inspect {bad_index}", "points outside the model folder"),
    ("header is a JSON list", "inspect {list_header}", "header is JSON but not an object"),
    ("index weight_map is a list", "inspect {list_index}", "not a valid index"),
    ("pickled weights", "core --base {pickle} {a} --p 50 -o {out}", "refusing pickled weights"),
    ("mismatched names", "core --base {base} {names} --p 50 -o {out}", "'a.w' is in"),
    ("mismatched shapes", "fuse {a} {shape} --base {base} --p 50 -o {out_st}", "shape mismatch for 'b.w'"),
    ("mismatched dtypes", "core --base {base} {dtype} --p 50 -o {out}", "dtype mismatch for 'a.w'"),
    ("Inf weights", "fuse {inf} {b} --base {base} --p 50 -o {out_st}", "tensor 'a.w' in"),
    ("NaN gradients", "gallop --params {tiny} --grads {nan_grads} --rho 5 -o {out_st}", "NaN/Inf gradients"),
    (
        "mask for another model",
        "fuse {a} {b} --masks {other_mask} --masks {other_mask} --conflict last -o {out_st}",
        "does not fit",
    ),
    ("a model given as gradients", "gallop --params {tiny} --grads {a} --rho 5 -o {out_st}", "no gradient metadata"),
    ("p out of range", "core --base {base} {a} --p 101 -o {out}", "Invalid value for '--p'"),
    ("p not a number", "fuse {a} {b} --base {base} --p x -o {out_st}", "Invalid value for '--p'"),
    ("rho out of range", "gallop --params {tiny} --grads {tiny} --rho 0 -o {out_st}", "Invalid value for '--rho'"),
    ("tau out of range", "overlap {a} {b} --tau 1.5 -o {out}", "Invalid value for '--tau'"),
    ("omega out of range", "fuse {a} {b} --base {base} --omega -0.1 -o {out_st}", "Invalid value for '--omega'"),
    ("duplicate task names", "core --base {base} {a} {a} --p 50 -o {out}", "two inputs have the task name 'a'"),
    ("output equal to an input", "fuse {a} {b} --base {base} --p 50 -o {b} --force", "would overwrite or nest inside"),
    ("existing output", "core --base {base} {a} --p 50 -o {exists}", "already exists; pass --force"),
    (
        "unwritable output folder",
        "fuse {a} {b} --base {base} --p 50 -o {under_file}/x.safetensors",
        "cannot create the output folder",
    ),
    ("malformed JSONL", "gradients --model {tiny} --data {bad_jsonl} -o {out_st}", "bad.jsonl:3: not valid JSON"),
    ("malformed JSONL (train)", "train --model {tiny} --data {bad_jsonl} -o {out}", "bad.jsonl:3: not valid JSON"),
    ("training data for eval", "eval --model {tiny} --task t={bad_jsonl} -o {out_st}", "bad.jsonl:3"),
    ("negative dimensions", "inspect {neg_dim}", "malformed"),
    ("a 2^63 dimension", "inspect {huge_dim}", "offsets span"),
    ("a non-integer dimension", "inspect {float_dim}", "malformed"),
    ("overlapping data offsets", "inspect {overlap}", "overlaps the tensor before it"),
    ("a gap between tensors", "inspect {gap}", "after a gap"),
    ("metadata not a string map", "inspect {meta_map}", "must map strings to strings"),
    ("a tensor named twice", "inspect {dup}", "appears twice"),
    ("a deeply nested header", "inspect {deep}", "nested deeper"),
    ("a FIFO named .safetensors", "inspect {fifo}", "not a regular file"),
    ("weight_map values not strings", "inspect {int_index}", "not a valid index"),
    ("an index naming a tensor its shard lacks", "inspect {stale_index}", "is in no shard"),
    ("a deeply nested index", "inspect {deep_index}", "nested deeper"),
    ("shard size NaN", "fuse {math} {code} --base {tiny} --p 5 --shard-size nanGB -o {out}", "positive, finite size"),
    ("weights NaN", "fuse {a} {b} --base {base} --p 50 --weights nan,1 -o {out_st}", "finite"),
    ("omega NaN", "fuse {a} {b} --base {base} --omega nan -o {out_st}", "not a finite number"),
    ("JSONL not UTF-8", "train --model {tiny} --data {latin1} -o {out}", "latin1.jsonl:1: not UTF-8"),
    ("JSONL lone surrogate", "train --model {tiny} --data {surrogate} -o {out}", "lone surrogate"),
    ("JSONL nested brackets", "train --model {tiny} --data {nested} -o {out}", "nested deeper"),
    ("JSONL line over the cap", "train --model {tiny} --data {long} -o {out}", "longer than 1024 KiB"),
    ("empty prompt and response", "train --model {tiny} --data {empty_resp} -o {out}", "is empty"),
    ("a bool as a choice index", "eval --model {tiny} --task t={bool_answer} -o {out_st}", "index into choices"),
    ("eval task file missing", "eval --model {tiny} --task t={missing} -o {out_st}", "not found"),
    ("eval task file a folder", "eval --model {tiny} --task t={empty_dir} -o {out_st}", "a folder, not a file"),
    (
        "every response truncated",
        "gradients --model {tiny} --data {truncating} --max-len 4 -o {out_st}",
        "every gradient entry is zero",
    ),
    ("lm-eval entry a number", "forget --vanilla {lm_number} --run x={lm_number}:a", "not a mapping of metrics"),
    ("accuracy table without accuracy", "forget --vanilla {no_accuracy} --run x={no_accuracy}:a", "no 'accuracy'"),
    (
        "groups mixing strings and lists",
        "retrain --model {tiny} --groups {groups_mixed} --masks {out} --data a={bad_jsonl} -o {out}",
        "groups must be lists",
    ),
    ("--p with --masks", "fuse {a} {b} --masks {other_mask} --masks {other_mask} --p 5 -o {out_st}", "--p and --masks"),
    (
        "float16 overflow",
        "fuse {a} {big} --base {base} --p 50 --dtype float16 -o {out_st}",
        "into Inf",
    ),
]


@pytest.mark.parametrize("argv, words", [pytest.param(a, w, id=i) for i, a, w in MATRIX])
def test_bad_input_matrix(world, argv, words):
    before = {k: sha(Path(v)) for k, v in world.items() if Path(v).exists()}
    r = CliRunner().invoke(cli, [x.format(**world) for x in argv.split()])
    assert r.exit_code != 0, r.output
    assert words in r.output, r.output
    assert "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, r.output
    for k in ("out", "out_st"):
        assert not Path(world[k]).exists(), f"{k} was written"
    assert [p.name for p in Path(world["exists"]).iterdir()] == ["core.json"]
    after = {k: sha(Path(v)) for k, v in world.items() if Path(v).exists()}
    assert before == after  # inputs untouched


HEADER_CASES = (
    "empty file",
    "truncated safetensors",
    "header lies about dtype",
    "index outside the folder",
    "header is a JSON list",
    "index weight_map is a list",
)


@pytest.mark.parametrize("argv, words", [pytest.param(a, w, id=i) for i, a, w in MATRIX if i in HEADER_CASES])
def test_bad_headers_give_the_same_one_line_error_under_python_O(world, argv, words):
    """Input checks are never `assert`s: `python -O` strips those, and the header checks must stay."""
    r = subprocess.run(
        [sys.executable, "-O", "-m", "mergekit_sparse", *[x.format(**world) for x in argv.split()]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("Error")]) == 1, r.stderr


def test_the_library_checks_nothing_with_assert():
    import ast

    root = Path(__file__).resolve().parent.parent
    found = [
        f"{p.relative_to(root)}:{n.lineno}"
        for top in ("mergekit_sparse", "cli", "reports")
        for p in (root / top).rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Assert)
    ]
    assert not found, found


@pytest.mark.parametrize("command", ["fuse", "core"])
def test_sigkill_mid_write_leaves_no_complete_output_and_a_rerun_succeeds(tiny_base, tiny_tasks, tmp_path, command):
    inputs = [tiny_base, *tiny_tasks[:2]]
    before = [sha(p) for p in inputs]
    out = tmp_path / "out"
    args = (
        ["fuse", tiny_tasks[0], tiny_tasks[1], "--base", tiny_base, "--p", "5", "-o", out]
        if command == "fuse"
        else ["core", "--base", tiny_base, tiny_tasks[0], tiny_tasks[1], "--p", "5", "-o", out]
    )
    r = run_cli(*args, env={"MERGEKIT_SPARSE_FAULT": "kill:5"})
    assert r.returncode == -9
    if command == "fuse":
        assert not out.exists()
    else:
        assert not list(out.glob("*.mask.safetensors")) and not (out / "core.json").exists()
    assert [sha(p) for p in inputs] == before
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert not [p for p in tmp_path.rglob("*partial*")]
    assert [sha(p) for p in inputs] == before


def test_sigkill_mid_retrain_resumes(tiny_base, tiny_tasks, tmp_path):
    from test_training import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}=", "response": str(i)} for i in range(20)])
    assert run_cli("core", "--base", tiny_base, *tiny_tasks, "--p", "5", "-o", tmp_path / "cores").returncode == 0
    masks = [tmp_path / "cores" / f"{t}.mask.safetensors" for t in ("math", "code", "chat")]
    assert run_cli("overlap", *masks, "--tau", "0.2", "--order", "input", "-o", tmp_path / "g.json").returncode == 0
    args = [
        "retrain",
        "--model",
        tiny_tasks[0],
        "--groups",
        tmp_path / "g.json",
        "--masks",
        tmp_path / "cores",
        *[x for t in ("math", "code", "chat") for x in ("--data", f"{t}={data}")],
        "--per-task",
        "4",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "-o",
        tmp_path / "rt",
    ]
    # each stage's model save writes 21 tensors; die inside stage 2's save
    r = run_cli(*args, env={"MERGEKIT_SPARSE_FAULT": "kill:30"})
    assert r.returncode == -9
    assert (tmp_path / "rt" / "stage-1" / "stage.json").is_file() and not (tmp_path / "rt" / "stage-2").exists()
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    stages = json.loads(r.stdout)["stages"]
    assert stages[0].get("skipped") and not stages[1].get("skipped")


@pytest.mark.parametrize("command", ["fuse", "core"])
def test_enospc_gives_a_clear_error_and_removes_temporary_files(tiny_base, tiny_tasks, tmp_path, command):
    out = tmp_path / "out"
    args = (
        ["fuse", tiny_tasks[0], tiny_tasks[1], "--base", tiny_base, "--p", "5", "-o", out]
        if command == "fuse"
        else ["core", "--base", tiny_base, tiny_tasks[0], "--p", "5", "-o", out]
    )
    r = run_cli(*args, env={"MERGEKIT_SPARSE_FAULT": "enospc:3"})
    assert r.returncode == 1
    assert "Error: no space left on the device while writing" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in tmp_path.rglob("*partial*")]


def test_determinism_two_runs_byte_identical_and_across_thread_counts(tiny_base, tiny_tasks, tmp_path):
    """core, overlap, fuse, gradients, gallop, train, eval, retrain: same inputs and seed -> same results.

    Training and gradients are compared at a tolerance across thread counts only if needed: the
    float reductions of matmuls may split differently with threads (see tests/README.md)."""
    from test_training import write_jsonl

    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": f"rev {w}=", "response": w[::-1]}
            for w in ["abc", "bca", "cab", "aab", "bba", "cca", "abb", "bcc"]
        ],
    )
    outputs = {}
    for run in ("a", "b", "c"):  # a, b: in this process at 1 thread; c: a process at 2
        d = tmp_path / run
        steps = [
            ["core", "--base", tiny_base, tiny_tasks[0], tiny_tasks[1], "--p", "5", "-o", d / "cores"],
            [
                "overlap",
                d / "cores" / "math.mask.safetensors",
                d / "cores" / "code.mask.safetensors",
                "--order",
                "random",
                "--seed",
                "3",
                "-o",
                d / "groups.json",
            ],
            ["fuse", tiny_tasks[0], tiny_tasks[1], "--base", tiny_base, "--p", "5", "-o", d / "fused", "--no-check"],
            [
                "gradients",
                "--model",
                tiny_base,
                "--data",
                data,
                "--fraction",
                "0.5",
                "--seed",
                "2",
                "-o",
                d / "g.safetensors",
            ],
            [
                "gallop",
                "--params",
                tiny_base,
                "--grads",
                d / "g.safetensors",
                "--rho",
                "5",
                "--criterion",
                "random",
                "-o",
                d / "r.mask.safetensors",
            ],
            ["train", "--model", tiny_base, "--data", data, "--steps", "3", "--batch-size", "4", "-o", d / "trained"],
            ["eval", "--model", tiny_base, "--task", f"t={data}", "-o", d / "acc.json"],
            [
                "retrain",
                "--model",
                tiny_tasks[0],
                "--groups",
                d / "groups.json",
                "--masks",
                d / "cores",
                "--data",
                f"math={data}",
                "--data",
                f"code={data}",
                "--per-task",
                "4",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "-o",
                d / "rt",
            ],
        ]
        for s in steps:
            if run == "c":
                r = run_cli(*s, env={"OMP_NUM_THREADS": "2"})
                assert r.returncode == 0, (s, r.stderr)
            else:
                r = CliRunner().invoke(cli, [str(x) for x in s])
                assert r.exit_code == 0, (s, r.output)
        groups = json.loads((d / "groups.json").read_text())
        groups.pop("settings")  # holds this run's own paths; so do the inputs, but not their fingerprints
        groups["inputs"] = [(r["task"], r["fingerprint"], r["base_fingerprint"]) for r in groups["inputs"]]
        outputs[run] = {
            "masks": sha(d / "cores" / "math.mask.safetensors"),
            "groups": groups,
            "fused": sha(d / "fused" / "model.safetensors"),
            "gallop": _mask_content(d / "r.mask.safetensors"),
            "grads": load_file(d / "g.safetensors"),
            "trained": load_file(d / "trained" / "model.safetensors"),
            "retrained": load_file(
                Path(json.loads((d / "rt" / "retrain.json").read_text())["final_model"]) / "model.safetensors"
            ),
            "acc": json.loads((d / "acc.json").read_text())["tasks"],
        }
    for key in ("masks", "groups", "fused", "gallop", "acc"):
        assert outputs["a"][key] == outputs["b"][key] == outputs["c"][key], key
    for key in ("grads", "trained", "retrained"):
        for n in outputs["a"][key]:
            assert torch.equal(outputs["a"][key][n], outputs["b"][key][n]), (key, n)  # same threads: exact
            assert torch.allclose(outputs["a"][key][n], outputs["c"][key][n], atol=1e-6), (key, n)


def _mask_content(path: Path):
    """Bits and metadata of a mask file, without `sources` (which name this run's own input paths)."""
    from mergekit_sparse.storage.masks import MaskSet

    m = MaskSet.load(path)
    meta = {k: v for k, v in m.meta.items() if k != "sources"}
    return meta, {n: m.packed(n).tobytes() for n in m.names}


def test_remote_code_is_never_run(tiny_base, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_base, evil)
    marker = tmp_path / "pwned"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(
        {
            "model_type": "evil",
            "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"},
        }
    )
    (evil / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    r = CliRunner().invoke(
        cli, ["eval", "--model", str(evil), "--task", f"t={tmp_path / 'x.jsonl'}", "-o", str(tmp_path / "acc.json")]
    )
    assert r.exit_code == 1 and "remote code is never run" in r.output, r.output
    assert not marker.exists()


def test_no_file_is_written_outside_the_chosen_output(planted, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "only-here"
    for args in (
        ["core", "--base", planted["base"], planted["a"], planted["b"], "--p", "25", "-o", out / "cores"],
        [
            "overlap",
            out / "cores" / "a.mask.safetensors",
            out / "cores" / "b.mask.safetensors",
            "-o",
            out / "g.json",
            "--html",
            out / "r.html",
        ],
        ["fuse", planted["a"], planted["b"], "--base", planted["base"], "--p", "25", "-o", out / "f.safetensors"],
    ):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == out or out in p.parents for p in new), sorted(map(str, new))
