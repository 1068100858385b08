"""The pipeline end to end on the built-in model: artefacts, resume after a kill, config validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from mergekit_sparse.cli.main import cli

SHORT = {
    "kind": "cpi-ft",
    "tasks": {"caesar": "builtin", "sub": "builtin"},
    "ood_tasks": ["add", "rev"],
    "data": {"train": 32, "test": 4},
    "probe": {"steps": 4, "batch_size": 8},
    "core": {"p": 5},
    "overlap": {"tau": 0.05, "order": "input"},
    "retrain": {"steps": 3, "batch_size": 8, "per_task": 8},
    "eval": {"limit": 4},
}


def sparsemerge() -> str:
    return str(Path(sys.executable).parent / "sparsemerge")


def test_cpi_ft_pipeline_writes_every_artefact_and_resumes_after_a_kill(tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(SHORT))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sparsemerge(), "run", str(cfg), "-o", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 240
    while not (run / ".stages" / "overlap.json").exists():  # stage 2 done: kill it
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in (run / ".stages").glob("*.json")}
    assert {"data", "probe-caesar", "probe-sub", "cores", "overlap"} <= finished
    assert not (run / "summary.json").exists()
    r = subprocess.run(
        [sparsemerge(), "run", str(cfg), "-o", str(run), "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    skipped = {line.split()[1] for line in r.stderr.splitlines() if line.startswith("[skip]")}
    assert finished <= skipped  # stages 1-2 (and all done before) skipped
    summary = json.loads(r.stdout)
    for artefact in [
        "data/caesar.train.jsonl",
        "data/add.test.jsonl",
        "probe/caesar/model.safetensors",
        "cores/caesar.mask.safetensors",
        "cores/core.json",
        "groups.json",
        "fused/model.safetensors",
        "fused/fuse.json",
        "retrained/retrain.json",
        "eval/vanilla.json",
        "eval/cpi-ft.json",
        "summary.json",
    ]:
        assert (run / artefact).exists(), artefact
    assert set(summary["metrics"]) == {"full-ft:caesar", "full-ft:sub", "fused", "cpi-ft"}
    m = summary["metrics"]["cpi-ft"]
    assert m["trained"] == ["caesar", "sub"] and 0 <= m["collapse_rate"] <= 1
    # a third run does nothing; changing a retrain setting redoes only retrain and what follows it
    r = subprocess.run([sparsemerge(), "run", str(cfg), "-o", str(run)], capture_output=True, text=True, env=env)
    assert "[run]" not in r.stderr
    SHORT2 = json.loads(json.dumps(SHORT))
    SHORT2["retrain"]["steps"] = 2
    cfg.write_text(yaml.safe_dump(SHORT2))
    r = subprocess.run([sparsemerge(), "run", str(cfg), "-o", str(run)], capture_output=True, text=True, env=env)
    ran = {line.split()[1] for line in r.stderr.splitlines() if line.startswith("[run]")}
    assert ran == {"retrain", "eval-cpi-ft"}, r.stderr


def test_config_problems_are_listed_all_at_once_before_any_work(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "kind": "cpi",
                "tasks": {"caesar": "builtin", "nope": "builtin", "x": {"train": "a"}},
                "core": {"p": "five", "extra": 1},
                "probe": {"steps": 0},
                "surprise": True,
                "retrain": {"optimizer": "adam"},
                "gallop": {"optimizer": "sgd", "momentum": 1.0},
            }
        )
    )
    r = CliRunner().invoke(cli, ["run", str(cfg), "-o", str(tmp_path / "run")])
    assert r.exit_code == 1
    for msg in [
        "config.kind: 'cpi' is not one of",
        "config.surprise: unknown key",
        "config.core.extra: unknown key",
        "config.core.p: expected a number, got 'five'",
        "config.probe.steps: 0 is out of range",
        "config.tasks.nope: no builtin task",
        "config.tasks.x: expected 'builtin'",
        "config.retrain.optimizer: 'adam' is not one of adamw, sgd",
        "config.gallop.momentum: 1.0 is out of range",
    ]:
        assert msg in r.output, (msg, r.output)
    assert not (tmp_path / "run").exists()


def test_demo_fast_runs_both_pipelines_and_writes_the_report(tmp_path):
    from browser import assert_renders

    r = CliRunner().invoke(cli, ["demo", "--fast", "-o", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "cpi-ft" in r.stdout and "gallop:caesar" in r.stdout and "groups (stage order)" in r.stdout
    # summary, accuracy, ID vs OOD, forgetting; overlap (3); GaLLoP score map and layer shares
    dom = assert_renders(tmp_path / "demo" / "report.html", "demo-report", tmp_path, figures=8)
    assert "<th>forget ratio</th>" in dom and "gallop config, as resolved" in dom


def test_dry_run_accepts_zero_edges_yaml_exponents_and_every_training_key(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "kind: cpi-ft\ntasks: {caesar: builtin, sub: builtin}\noverlap: {tau: 0}\nfuse: {omega: 0}\n"
        "probe: {lr: 2e-3, weight_decay: 0.0, max_len: 64, clip: 0.5, grad_accum: 2, batch_size: 8,\n"
        "        schedule: linear, eval_every: 5, eval_fraction: 0.1, save_every: 10}\n"
        "retrain: {lr: 1e4, per_task: 3}\n"
    )
    r = CliRunner().invoke(cli, ["run", str(cfg), "--dry-run", "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    s = doc["settings"]
    assert s["overlap"]["tau"] == 0 and s["fuse"]["omega"] == 0 and s["probe"]["weight_decay"] == 0.0
    assert s["probe"]["lr"] == 2e-3 and isinstance(s["retrain"]["lr"], float) and s["retrain"]["lr"] == 1e4
    assert s["probe"]["max_len"] == 64 and s["probe"]["schedule"] == "linear" and s["probe"]["grad_accum"] == 2
    assert s["retrain"]["max_len"] == 48  # the pipeline's default, now a key
    assert doc["run_folder"] == str(tmp_path / "run") and not (tmp_path / "run").exists()


def test_pipeline_training_keys_reach_the_trainer():
    from mergekit_sparse.pipeline.config import validate
    from mergekit_sparse.pipeline.run import _train_cfg

    cfg = validate(
        {
            "tasks": {"caesar": "builtin", "sub": "builtin"},
            "probe": {"max_len": 64, "clip": 0, "grad_accum": 2, "schedule": "constant"},
        },
        base_dir=Path("."),
    )
    tc = _train_cfg(cfg["probe"], 7)
    assert (tc.max_len, tc.clip, tc.grad_accum, tc.schedule, tc.seed) == (64, None, 2, "constant", 7)


def test_config_and_cli_reject_out_of_range_values_with_the_same_message(tmp_path):
    cases = [
        ("overlap", "tau", 1.5, ["overlap", "x.mask.safetensors", "--tau", "1.5"]),
        ("fuse", "omega", -0.1, ["fuse", "a", "b", "--omega", "-0.1"]),
        ("core", "p", 101, ["core", "a", "--base", "b", "--p", "101"]),
        ("probe", "momentum", 1.0, ["train", "--model", "m", "--data", "d", "-o", "o", "--momentum", "1.0"]),
        ("probe", "weight_decay", -1.0, ["train", "--model", "m", "--data", "d", "-o", "o", "--weight-decay", "-1.0"]),
        ("gallop", "rho", 0.0, ["gallop", "--params", "p", "--grads", "g", "--rho", "0.0"]),
    ]
    for section, key, value, argv in cases:
        cfg = tmp_path / f"{section}-{key}.yaml"
        cfg.write_text(yaml.safe_dump({"tasks": {"caesar": "builtin", "sub": "builtin"}, section: {key: value}}))
        r_cfg = CliRunner().invoke(cli, ["run", str(cfg), "--dry-run"])
        r_cli = CliRunner().invoke(cli, argv)
        assert r_cfg.exit_code == 1 and r_cli.exit_code == 2, (r_cfg.output, r_cli.output)
        line = next(ln for ln in r_cfg.output.splitlines() if f"config.{section}.{key}:" in ln)
        message = line.split(f"config.{section}.{key}: ", 1)[1]
        assert message in r_cli.output, (message, r_cli.output)
        assert "out of range" in message


def test_run_on_the_users_own_model_with_user_ood_tasks_gives_defined_forget_ratios(tmp_path):
    """Own base, own tasks, own OOD test file (relative paths: the config's folder), no builtin name."""
    import shutil

    from mergekit_sparse.builtin import builtin_model
    from mergekit_sparse.builtin.tasks import jsonl, split

    shutil.copytree(builtin_model(), tmp_path / "mine")
    (tmp_path / "data").mkdir()
    for name, builtin in (("my_caesar", "caesar"), ("my_sub", "sub"), ("my_add", "add")):
        tr, te = split(builtin, n_train=32, n_test=4, seed=0)
        (tmp_path / "data" / f"{name}.train.jsonl").write_text(jsonl(tr))
        (tmp_path / "data" / f"{name}.test.jsonl").write_text(jsonl(te))
    cfg = {
        **SHORT,
        "base": "mine",
        "tasks": {
            t: {"train": f"data/{t}.train.jsonl", "test": f"data/{t}.test.jsonl"} for t in ("my_caesar", "my_sub")
        },
        "ood_tasks": {"my_add": {"test": "data/my_add.test.jsonl"}, "rev": "builtin"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yaml"), "-o", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["vanilla"]) == {"my_caesar", "my_sub", "my_add", "rev"} and summary["vanilla"]["my_add"] > 0
    assert summary["metrics"] and all(m["forget_ratio"] is not None for m in summary["metrics"].values())
    from browser import assert_renders

    from mergekit_sparse.storage.checkpoint import Checkpoint

    # `run` writes the same report as the demo: summary, accuracy, ID vs OOD, forgetting, overlap (3)
    dom = assert_renders(tmp_path / "run" / "report.html", "run-report", tmp_path, figures=6)
    fp = Checkpoint.open(tmp_path / "mine").content_fingerprint()
    assert summary["inputs"]["base"]["fingerprint"] == fp and fp.rsplit(":", 1)[-1][:12] in dom
    assert "my_add" in dom and "<th>OOD acc</th>" in dom
    # a user task named like a builtin one is an error, not a silent swap for the builtin
    cfg["tasks"] = {"caesar": cfg["tasks"]["my_caesar"], "my_sub": cfg["tasks"]["my_sub"]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yaml"), "--dry-run"])
    assert r.exit_code == 1 and "the name of a builtin task" in r.output, r.output
