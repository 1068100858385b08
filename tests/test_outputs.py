"""Nothing lost, nothing stale (METHODS §3): outputs never touch inputs, and a changed input is never
mistaken for the old one. Each case checks the error and that every input is byte-identical after it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import interrupted_at_step, run_cli, sm
from helpers import one_error_line as one_error
from safetensors.torch import load_file, save_file

from mergekit_sparse.builtin.tasks import generate, jsonl
from mergekit_sparse.cli.main import cli
from mergekit_sparse.storage.checkpoint import Checkpoint
from mergekit_sparse.storage.masks import MaskSet


def digest(path: Path) -> str:
    """sha256 over a file or every file of a folder (names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path if path.is_dir() else path.parent)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text(jsonl(generate("caesar", 16, seed=0)))
    return p


def test_a_pipeline_task_name_never_becomes_a_path_outside_the_run(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "precious.txt").write_text("keep me")
    d = tmp_path / "d.jsonl"
    d.write_text(jsonl(generate("caesar", 8)))
    for name in (str(precious), "../precious", "a/b", ".hidden"):
        cfg = tmp_path / "p.yaml"
        cfg.write_text(yaml.safe_dump({"tasks": {name: {"train": str(d), "test": str(d)}, "sub": "builtin"}}))
        r = sm("run", cfg, "-o", tmp_path / "run", ok=False)
        assert r.exit_code == 1 and "not a valid task name" in r.output, r.output
    assert (precious / "precious.txt").read_text() == "keep me" and not (tmp_path / "run").exists()


def test_a_side_file_that_links_to_an_input_is_refused(planted, tmp_path):
    before = digest(planted["a"])
    out = tmp_path / "out.safetensors"
    os.symlink(planted["a"], tmp_path / "out.safetensors.fuse.json")
    r = sm("fuse", planted["a"], planted["b"], "--base", planted["base"], "--p", 50, "-o", out, "--force", ok=False)
    one_error(r, "symbolic link")
    assert digest(planted["a"]) == before and not out.exists()


def test_train_scratch_folder_may_not_be_the_input(tiny_base, data, tmp_path):
    m = tmp_path / "m.work"
    shutil.copytree(tiny_base, m)
    before = digest(m)
    r = sm("train", "--model", m, "--data", data, "--steps", 1, "-o", tmp_path / "m", ok=False)
    one_error(r, "nest inside the input")
    assert digest(m) == before


def test_retrain_into_the_folder_holding_its_input_is_refused(tiny_base, data, tmp_path):
    rt = tmp_path / "rt"
    shutil.copytree(tiny_base, rt / "stage-1")
    before = digest(rt / "stage-1")
    (tmp_path / "g.json").write_text(json.dumps({"tasks": ["a"], "groups": [["a"]]}))
    (tmp_path / "cores").mkdir()
    shapes = {n: tuple(i.shape) for n, i in Checkpoint.open(tiny_base).infos.items() if i.is_float}
    from mergekit_sparse.storage.masks import save_masks

    save_masks(
        tmp_path / "cores" / "a.mask.safetensors", {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}, {}
    )
    args = ["--groups", tmp_path / "g.json", "--masks", tmp_path / "cores", "--data", f"a={data}", "--steps", 1]
    r = sm("retrain", "--model", rt / "stage-1", *args, "-o", rt, ok=False)
    one_error(r, "nest inside the input")
    assert digest(rt / "stage-1") == before


def test_forget_output_equal_to_an_input_table_is_refused_even_with_force(tmp_path):
    v = tmp_path / "v.json"
    v.write_text(json.dumps({"tasks": {"a": 0.5, "b": 0.5}}))
    before = digest(v)
    r = sm("forget", "--vanilla", v, "--run", f"x={v}:a", "-o", v, "--force", ok=False)
    one_error(r, "input")
    assert digest(v) == before


def test_two_outputs_of_one_command_may_not_be_one_path(planted, tmp_path):
    r = sm("overlap", planted["a"], planted["b"], "--base", planted["base"], "--p", 50, "-o", tmp_path / "r.html",
           "--html", tmp_path / "r.html", ok=False)  # fmt: skip
    one_error(r, "two outputs")


def test_a_side_file_is_never_replaced_without_force(tiny_base, tmp_path):
    g = tmp_path / "g.safetensors"
    save_file({n: torch.randn(i.shape) for n, i in Checkpoint.open(tiny_base).infos.items() if i.is_float}, g,
              metadata={"kind": "mean_gradient"})  # fmt: skip
    (tmp_path / "m.json").write_text("mine")
    r = sm("gallop", "--params", tiny_base, "--grads", g, "--rho", 5, "-o", tmp_path / "m.mask.safetensors", ok=False)
    one_error(r, "m.json already exists", "--force")
    assert (tmp_path / "m.json").read_text() == "mine"


def test_run_and_demo_refuse_a_folder_of_the_users_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("my own")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"tasks": {"caesar": "builtin", "sub": "builtin"}}))
    one_error(sm("run", cfg, "-o", mine, ok=False), "is not a run folder")
    one_error(sm("demo", "--fast", "-o", mine, ok=False), "is not a run folder")
    assert (mine / "summary.json").read_text() == "my own" and sorted(p.name for p in mine.iterdir()) == [
        "summary.json"
    ]


# -- stale results ------------------------------------------------------------------------------------
def _same_header_other_values(src: Path, dst: Path, seed: int) -> None:
    """Rewrite dst's weights with other values: the same names, shapes and dtypes, so the same header."""
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
        for k, v in sd.items()
    }
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})


def test_masks_and_core_json_record_content_fingerprints(tiny_base, tiny_tasks, tmp_path):
    sm("core", "--base", tiny_base, tiny_tasks[0], "--p", 5, "-o", tmp_path / "c")
    meta = MaskSet.load(tmp_path / "c" / "math.mask.safetensors").meta
    assert meta["format_version"] == 2
    base_fp, task_fp = (s["fingerprint"] for s in meta["sources"])
    assert base_fp == Checkpoint.open(tiny_base).content_fingerprint() != task_fp
    assert base_fp.startswith("sha256-tensors-v1:")
    core = json.loads((tmp_path / "c" / "core.json").read_text())
    assert core["settings"]["base"]["fingerprint"] != core["settings"]["tasks"][0]["fingerprint"]
    # the header hash, which every fine-tune of one architecture shares, cannot tell them apart
    assert core["settings"]["base"]["header_sha256"] == core["settings"]["tasks"][0]["header_sha256"]


def test_the_fingerprint_ignores_sharding_and_metadata_and_is_cached(tiny_base, tmp_path):
    sd = load_file(tiny_base / "model.safetensors")
    names = sorted(sd)
    shards = tmp_path / "sharded"
    shutil.copytree(tiny_base, shards)
    (shards / "model.safetensors").unlink()
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, shards / "model-00001-of-00002.safetensors", metadata={"x": "1"})
    save_file({k: sd[k] for k in names[half:]}, shards / "model-00002-of-00002.safetensors")
    wm = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert Checkpoint.open(shards).content_fingerprint() == Checkpoint.open(tiny_base).content_fingerprint()
    from mergekit_sparse.storage import fingerprint

    before = len(list(fingerprint.cache_folder().glob("*.json")))
    Checkpoint.open(shards).content_fingerprint()
    assert len(list(fingerprint.cache_folder().glob("*.json"))) == before  # the second time: from the cache


def test_retrain_redoes_its_stages_after_a_refuse_or_a_recore(tiny_base, tiny_tasks, data, tmp_path):
    sm("core", "--base", tiny_base, *tiny_tasks[:2], "--p", 5, "-o", tmp_path / "c")
    (tmp_path / "g.json").write_text(json.dumps({"tasks": ["math", "code"], "groups": [["math"], ["code"]]}))
    fused = tmp_path / "fused"
    shutil.copytree(tiny_tasks[1], fused)
    args = ["retrain", "--model", fused, "--groups", tmp_path / "g.json", "--masks", tmp_path / "c", "--data",
            f"math={data}", "--data", f"code={data}", "--per-task", 4, "--steps", 1, "--batch-size", 4,
            "-o", tmp_path / "rt", "--json"]  # fmt: skip

    def skipped() -> list[bool]:
        return [s.get("skipped", False) for s in json.loads(sm(*args).stdout)["stages"]]

    assert skipped() == [False, False]
    assert skipped() == [True, True]
    _same_header_other_values(tiny_tasks[1], fused, seed=7)  # re-fused: same header, other values
    assert skipped() == [False, False]
    sm("core", "--base", tiny_base, *tiny_tasks[:2], "--p", 10, "-o", tmp_path / "c", "--force")  # re-cored
    assert skipped() == [False, False]


def test_train_starts_over_when_its_input_was_replaced_and_says_so(tiny_base, data, tmp_path):
    from mergekit_sparse.training.staged import run_train
    from mergekit_sparse.training.trainer import TrainConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    cfg = TrainConfig(steps=6, lr=3e-3, batch_size=4, save_every=2, seed=3)
    with interrupted_at_step(4), pytest.raises(KeyboardInterrupt):
        run_train(str(model), str(data), tmp_path / "out", cfg=cfg)
    assert (tmp_path / "out.work" / "snapshot").is_dir()
    _same_header_other_values(tiny_base, model, seed=11)  # the input model replaced
    r = sm("train", "--model", model, "--data", data, "--steps", 6, "--lr", "3e-3", "--batch-size", 4,
           "--save-every", 2, "--seed", 3, "-o", tmp_path / "out")  # fmt: skip
    assert "starting over" in r.output and "resuming" not in r.output
    log = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == list(range(1, 7))


def test_malformed_mask_metadata_is_one_error_line(tiny_base, tmp_path):
    from mergekit_sparse.storage.masks import save_masks

    shapes = {n: tuple(i.shape) for n, i in Checkpoint.open(tiny_base).infos.items() if i.is_float}
    m = save_masks(tmp_path / "m.mask.safetensors", {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}, {})
    raw = load_file(m)
    from safetensors import safe_open

    with safe_open(m, "pt") as f:
        meta = json.loads(f.metadata()["mergekit_sparse"])
    for bad in ({"format_version": "2"}, {"shapes": {n: ["x"] for n in shapes}}):
        save_file(raw, tmp_path / "bad.mask.safetensors", metadata={"mergekit_sparse": json.dumps({**meta, **bad})})
        one_error(sm("overlap", tmp_path / "bad.mask.safetensors", m, "-o", tmp_path / "g.json", ok=False), "bad.mask")


# -- configs, exit codes, terminal output, JSON, Hub cache ------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_quickly_and_plain_anchors_still_work(tmp_path):
    import time

    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        bomb.append(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    t = time.perf_counter()
    r = sm("run", tmp_path / "bomb.yaml", "--dry-run", ok=False)
    one_error(r, "expands to more than")
    assert time.perf_counter() - t < 5 and len(r.output) < 1000
    (tmp_path / "anchors.yaml").write_text(
        "probe: &train {steps: 3, lr: 0.001}\nretrain: *train\ntasks: {caesar: builtin, sub: builtin}\n"
    )
    r = sm("run", tmp_path / "anchors.yaml", "--dry-run")
    assert json.loads(r.output)["settings"]["retrain"]["steps"] == 3


def test_config_decode_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "latin.yaml").write_bytes(b"tasks:\n  caf\xe9: builtin\n")
    one_error(sm("run", tmp_path / "latin.yaml", "--dry-run", ok=False), "latin.yaml:2: not UTF-8")
    (tmp_path / "bad.yaml").write_text("tasks:\n  a: [unclosed\n")
    one_error(sm("run", tmp_path / "bad.yaml", "--dry-run", ok=False), "bad.yaml:", "cannot parse")


def test_relative_paths_in_a_config_are_the_config_folders(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    d = tmp_path / "cfg" / "data" / "t.jsonl"
    d.write_text(jsonl(generate("caesar", 8)))
    (tmp_path / "cfg" / "p.yaml").write_text(
        yaml.safe_dump({"tasks": {"mine": {"train": "data/t.jsonl", "test": "data/t.jsonl"}, "sub": "builtin"}})
    )
    monkeypatch.chdir(tmp_path)  # the working directory is not the config's folder
    r = sm("run", "cfg/p.yaml", "--dry-run")
    assert json.loads(r.output)["settings"]["tasks"]["mine"]["train"] == str(tmp_path / "cfg" / "data" / "t.jsonl")


def test_usage_errors_exit_2_with_one_error_line(planted):
    for argv in (["fuse", "--nope"], ["core", "--p", "abc", str(planted["a"])], ["nocommand"]):
        r = CliRunner().invoke(cli, argv)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), r.output
        assert "Usage:" not in r.output
    r = CliRunner().invoke(cli, [])
    assert r.exit_code == 0 and "Usage:" in r.output  # a bare `sparsemerge` shows the help


def test_control_characters_in_names_are_escaped(tmp_path):
    save_file({"evil\x1b[31mred\x07": torch.ones(2)}, tmp_path / "e.safetensors")
    r = sm("inspect", tmp_path / "e.safetensors")
    assert "\x1b" not in r.output and "\x07" not in r.output and "\\x1b[31mred" in r.output


def test_json_outputs_are_valid_json_with_full_precision(planted, tmp_path):
    r = sm("core", "--base", planted["base"], planted["a"], "--p", 100, "-o", tmp_path / "c", "--json")
    json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    for f in (tmp_path / "c").glob("*.json"):
        json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c} in {f}"))
    sm("overlap", planted["a"], planted["b"], "--base", planted["base"], "--p", 50, "-o", tmp_path / "g.json",
       "--save-masks", tmp_path / "m")  # fmt: skip
    a, b = (MaskSet.load(tmp_path / "m" / f"{t}.mask.safetensors") for t in ("a", "b"))
    inter = sum(int((a.bool(n) & b.bool(n)).sum()) for n in a.names)
    union = sum(int((a.bool(n) | b.bool(n)).sum()) for n in a.names)
    assert 0 < inter < union and round(inter / union, 6) != inter / union  # a value that rounding would change
    assert json.loads((tmp_path / "g.json").read_text())["matrix"][0][1] == inter / union  # stored unrounded


def test_masks_given_in_the_wrong_order_are_an_error(tiny_base, tiny_tasks, tmp_path):
    sm("core", "--base", tiny_base, *tiny_tasks[:2], "--p", 5, "-o", tmp_path / "c")
    math, code = tmp_path / "c" / "math.mask.safetensors", tmp_path / "c" / "code.mask.safetensors"
    r = sm("fuse", *tiny_tasks[:2], "--masks", code, "--masks", math, "--conflict", "last", "-o", tmp_path / "f",
           ok=False)  # fmt: skip
    one_error(r, "made for task code", "order of the tasks")
    sm(
        "fuse",
        *tiny_tasks[:2],
        "--masks",
        math,
        "--masks",
        code,
        "--conflict",
        "last",
        "-o",
        tmp_path / "f",
        "--no-check",
    )


def test_a_sharded_model_in_the_real_hub_cache_layout(tiny_base, tmp_path, monkeypatch):
    """Snapshot files are links into ../../blobs (as huggingface_hub stores them); a mistyped org/name that is
    neither a local path nor cached is an error, with no network request."""
    repo = tmp_path / "hub" / "models--org--sharded"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("c" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    sd = load_file(tiny_base / "model.safetensors")
    names = sorted(sd)
    files = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), 1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, blobs / f"blob{i}")
        files.update({k: name for k in part})
        os.symlink(f"../../blobs/blob{i}", snap / name)
    (blobs / "index").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    os.symlink("../../blobs/index", snap / "model.safetensors.index.json")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / f, blobs / f)
        os.symlink(f"../../blobs/{f}", snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = sm("inspect", "org/sharded", "--json")
    assert json.loads(r.output)["parameters"] == Checkpoint.open(tiny_base).numel
    assert Checkpoint.open("org/sharded").content_fingerprint() == Checkpoint.open(tiny_base).content_fingerprint()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online, a plain org/name never downloads
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_network(huggingface_hub.snapshot_download))
    one_error(sm("inspect", "org/typo", ok=False), "hf://org/typo")


def _no_network(real):
    def wrapped(*args, **kw):
        if not kw.get("local_files_only"):
            raise AssertionError("a network request was made")
        return real(*args, **kw)

    return wrapped


# -- faults: kills between outputs, a full file system, a second writer, Ctrl-C -------------------------
def _core(base, tasks, out, **env):
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "sparsemerge"
    cmd = [str(exe), "core", "--base", str(base), *map(str, tasks), "--p", "5", "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_a_kill_between_two_outputs_of_one_command_leaves_all_or_none(tiny_base, tiny_tasks, tmp_path):
    out = tmp_path / "c"
    r = _core(tiny_base, tiny_tasks[:2], out, MERGEKIT_SPARSE_FAULT="kill-commit:1")  # after the first rename
    assert r.returncode == -9
    # the next writer in that folder finishes the journaled commit: the whole new state, consistent
    r = _core(tiny_base, tiny_tasks[:2], out)
    assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["code.mask.safetensors", "core.json", "math.mask.safetensors"], names
    core = json.loads((out / "core.json").read_text())
    for t in core["tasks"]:
        assert MaskSet.load(t["mask"]).meta["selected"] == t["selected"]
    # killed while writing a mask (before the commit): nothing that looks finished, and a plain rerun works
    shutil.rmtree(out)
    r = _core(tiny_base, tiny_tasks[:2], out, MERGEKIT_SPARSE_FAULT="kill:3")
    assert r.returncode == -9 and not [p for p in out.iterdir() if not p.name.startswith(".")]
    r = _core(tiny_base, tiny_tasks[:2], out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == names  # temporaries and locks gone


def test_a_full_file_system_is_one_error_line_and_leaves_nothing(tiny_base, tiny_tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_SPARSE_FAULT", "enospc-text")
    r = sm("core", "--base", tiny_base, *tiny_tasks[:2], "--p", 5, "-o", tmp_path / "c", ok=False)
    one_error(r, "no space left")
    assert not list((tmp_path / "c").iterdir())  # the masks were not committed without core.json
    r = sm("fuse", *tiny_tasks[:2], "--base", tiny_base, "--p", 5, "-o", tmp_path / "f", "--no-check", ok=False)
    one_error(r, "no space left")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("f", ".f"))]


def test_a_second_writer_of_one_output_fails_at_once(planted, tmp_path):
    from mergekit_sparse.storage.atomic import AtomicPath

    out = tmp_path / "f.safetensors"
    held = AtomicPath(out, force=True, is_dir=False)  # another process's writer, mid-write
    try:
        r = sm("fuse", planted["a"], planted["b"], "--base", planted["base"], "--p", 50, "-o", out, ok=False)
        one_error(r, "another process is writing")
    finally:
        held.discard()
    sm("fuse", planted["a"], planted["b"], "--base", planted["base"], "--p", 50, "-o", out)
    assert not list(tmp_path.glob(".*lock"))


def test_ctrl_c_during_retrain_resumes_without_force(tiny_base, tiny_tasks, data, tmp_path):
    sm("core", "--base", tiny_base, *tiny_tasks[:2], "--p", 5, "-o", tmp_path / "c")
    (tmp_path / "g.json").write_text(json.dumps({"tasks": ["math", "code"], "groups": [["math"], ["code"]]}))
    args = ["retrain", "--model", tiny_tasks[1], "--groups", tmp_path / "g.json", "--masks", tmp_path / "c",
            "--data", f"math={data}", "--data", f"code={data}", "--per-task", 4, "--steps", 2, "--batch-size", 4,
            "-o", tmp_path / "rt", "--json"]  # fmt: skip
    with interrupted_at_step(3):  # Ctrl-C in stage 2's first step
        r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code != 0 and (tmp_path / "rt" / "stage-1" / "stage.json").is_file()
    assert not (tmp_path / "rt" / "stage-2").exists()
    stages = json.loads(sm(*args).stdout)["stages"]
    assert [s.get("skipped", False) for s in stages] == [True, False]


def test_a_full_disk_while_training_or_evaluating_is_one_error_line(tiny_base, data, tmp_path, monkeypatch):
    from mergekit_sparse.storage import writer

    monkeypatch.setattr(writer._fault_injection, "count", 0, raising=False)  # the hook counts per process
    monkeypatch.setenv("MERGEKIT_SPARSE_FAULT", "enospc:3")  # the third tensor of the trained model
    r = sm("train", "--model", tiny_base, "--data", data, "--steps", 1, "--batch-size", 4, "-o", tmp_path / "t",
           ok=False)  # fmt: skip
    one_error(r, "no space left")
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t*"))
    monkeypatch.setenv("MERGEKIT_SPARSE_FAULT", "enospc-text")
    r = sm("eval", "--model", tiny_base, "--task", f"t={data}", "--limit", 2, "-o", tmp_path / "acc.json", ok=False)
    one_error(r, "no space left")
    assert not list(tmp_path.glob("*acc.json*"))


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _sparsemerge(*args, env=None, **kw):
    """`sparsemerge ARGS` started as a process of its own."""
    import subprocess
    import sys

    return subprocess.Popen(
        [str(Path(sys.executable).parent / "sparsemerge"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )


def test_two_real_processes_writing_one_output_never_both_succeed(planted, tmp_path):
    """Two `sparsemerge fuse` processes on one output: the second, started while the first writes (the
    first slowed by the test hook), fails at once with one line; started together without --force,
    exactly one succeeds every time and the output is that one's, whole."""
    import time

    args = ["fuse", planted["a"], planted["b"], "--base", planted["base"], "--p", 50, "--no-check"]
    solo = tmp_path / "solo.safetensors"
    sm(*args, "-o", solo)
    out = tmp_path / "f.safetensors"
    first = _sparsemerge(*args, "-o", out, env={"MERGEKIT_SPARSE_FAULT": "slow:0.2"})
    lock = tmp_path / ".f.safetensors.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.exists(), first.communicate()
    second = _sparsemerge(*args, "-o", out, "--force")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1 and "another process is writing" in err and "Traceback" not in err, err
    assert first.wait(timeout=120) == 0, first.communicate()
    assert same_tensors(out, solo)
    for trial in range(3):
        out = tmp_path / f"t{trial}.safetensors"
        procs = [_sparsemerge(*args, "-o", out) for _ in range(2)]
        results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
        assert sorted(rc for rc, _ in results) == [0, 1], results
        loser = next(e for rc, e in results if rc)
        assert loser.strip().splitlines()[-1].startswith("Error:") and "Traceback" not in loser, loser
        assert same_tensors(out, solo)
    assert not list(tmp_path.glob(".*lock")) and not list(tmp_path.glob("*partial*"))


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a real read-only file system (a tmpfs mounted ro; skipped where mounting is not allowed)."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a read-only file system here (needs root)")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_read_only_file_system_is_one_error_line(tiny_base, tiny_tasks, read_only_folder):
    before = [digest(Path(p) / "model.safetensors") for p in (tiny_base, *tiny_tasks[:2])]
    for args in (
        ["core", "--base", tiny_base, *tiny_tasks[:2], "--p", 5, "-o", read_only_folder / "c"],
        ["fuse", *tiny_tasks[:2], "--base", tiny_base, "--p", 5, "-o", read_only_folder / "f", "--no-check"],
    ):
        one_error(sm(*args, ok=False), "read-only file system")
    assert not list(read_only_folder.iterdir())
    assert [digest(Path(p) / "model.safetensors") for p in (tiny_base, *tiny_tasks[:2])] == before


@pytest.mark.parametrize("fault,says", [("enospc", "no space left"), ("erofs", "read-only file system")])
def test_a_write_failing_midway_is_one_error_line_and_leaves_nothing(tiny_base, tiny_tasks, tmp_path, fault, says):
    """The file system fills up or turns read-only in the middle of an output (the test hook fails the
    third tensor write, or the small side file): one line, nothing left, for core and fuse."""
    for kind in (f"{fault}:3", f"{fault}-text"):
        outs = {"c": tmp_path / f"c-{kind}", "f": tmp_path / f"f-{kind}"}
        for key, args in (
            ("c", ["core", "--base", tiny_base, *tiny_tasks[:2], "--p", 5, "-o", outs["c"]]),
            ("f", ["fuse", *tiny_tasks[:2], "--base", tiny_base, "--p", 5, "-o", outs["f"], "--no-check"]),
        ):
            r = run_cli(*args, env={"MERGEKIT_SPARSE_FAULT": kind})
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert r.returncode == 1 and lines[-1].startswith("Error:") and says in lines[-1], (kind, r.stderr)
            assert "Traceback" not in r.stderr
            assert not outs[key].exists() or not any(p for p in outs[key].iterdir() if not p.name.startswith("."))
        assert not list(tmp_path.rglob("*partial*")) and not list(tmp_path.rglob(".*.tmp*"))


def test_a_killed_or_failed_training_snapshot_keeps_the_last_good_one(tiny_base, data, tmp_path):
    """Killed halfway through a snapshot (its weights written, not its optimizer state): the rerun resumes
    from the snapshot before and ends with the weights of an uninterrupted run. A full or read-only disk at
    a snapshot: one line, the last good snapshot kept, no temporaries."""
    args = ["train", "--model", tiny_base, "--data", data, "--steps", 6, "--lr", "3e-3", "--batch-size", 4,
            "--save-every", 2, "--seed", 3]  # fmt: skip
    sm(*args, "-o", tmp_path / "ref")
    out = tmp_path / "out"
    r = run_cli(*args, "-o", out, env={"MERGEKIT_SPARSE_FAULT": "kill-snapshot:2"})  # the step-4 snapshot
    assert r.returncode == -9, r.stderr
    assert json.loads((tmp_path / "out.work" / "snapshot" / "step.json").read_text())["step"] == 2
    r = run_cli(*args, "-o", out)
    assert r.returncode == 0 and "resuming from the snapshot at step 2" in r.stderr, r.stderr
    assert same_tensors(out / "model.safetensors", tmp_path / "ref" / "model.safetensors")
    assert not (tmp_path / "out.work").exists()
    for fault, says in (("enospc", "no space left"), ("erofs", "read-only file system")):
        out = tmp_path / f"out-{fault}"
        r = run_cli(*args, "-o", out, env={"MERGEKIT_SPARSE_FAULT": f"{fault}-snapshot:2"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and lines[-1].startswith("Error:") and says in lines[-1], r.stderr
        work = tmp_path / f"out-{fault}.work"
        assert json.loads((work / "snapshot" / "step.json").read_text())["step"] == 2
        assert sorted(p.name for p in work.iterdir()) == ["log.jsonl", "settings.json", "snapshot"]
        assert not out.exists()


def test_a_stage_without_its_record_is_redone_and_a_failed_record_is_one_line(tiny_base, tiny_tasks, data, tmp_path):
    """retrain killed between a stage's committed model and its stage.json: the rerun redoes that stage
    (never skips it) and ends where an uninterrupted run ends; a full disk at the record: one line, the
    earlier stages' records intact, and the rerun skips exactly those."""
    sm("core", "--base", tiny_base, *tiny_tasks[:2], "--p", 5, "-o", tmp_path / "c")
    (tmp_path / "g.json").write_text(json.dumps({"tasks": ["math", "code"], "groups": [["math"], ["code"]]}))
    args = ["retrain", "--model", tiny_tasks[1], "--groups", tmp_path / "g.json", "--masks", tmp_path / "c",
            "--data", f"math={data}", "--data", f"code={data}", "--per-task", 4, "--steps", 2, "--batch-size", 4,
            "--json"]  # fmt: skip
    sm(*args, "-o", tmp_path / "ref")
    rt = tmp_path / "rt"
    r = run_cli(*args, "-o", rt, env={"MERGEKIT_SPARSE_FAULT": "kill-stage.json:1"})
    assert r.returncode == -9 and (rt / "stage-1" / "model.safetensors").is_file()
    assert not (rt / "stage-1" / "stage.json").exists()
    r = run_cli(*args, "-o", rt)
    assert r.returncode == 0, r.stderr
    assert [s.get("skipped", False) for s in json.loads(r.stdout)["stages"]] == [False, False]
    for k in (1, 2):
        assert same_tensors(
            rt / f"stage-{k}" / "model.safetensors", tmp_path / "ref" / f"stage-{k}" / "model.safetensors"
        )
    rt = tmp_path / "rt2"
    r = run_cli(*args, "-o", rt, env={"MERGEKIT_SPARSE_FAULT": "enospc-stage.json:2"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and lines[-1].startswith("Error:") and "no space left" in lines[-1], r.stderr
    assert (rt / "stage-1" / "stage.json").is_file() and not (rt / "stage-2" / "stage.json").exists()
    r = run_cli(*args, "-o", rt)
    assert [s.get("skipped", False) for s in json.loads(r.stdout)["stages"]] == [True, False], r.stderr
