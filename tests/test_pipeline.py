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

SHORT = {"kind": "cpi-ft", "tasks": {"caesar": "builtin", "sub": "builtin"}, "ood_tasks": ["add", "rev"],
         "data": {"train": 32, "test": 4}, "probe": {"steps": 4, "batch_size": 8},
         "core": {"p": 5}, "overlap": {"tau": 0.05, "order": "input"}, "retrain": {"steps": 3, "batch_size": 8,
                                                                                    "per_task": 8},
         "eval": {"limit": 4}}


def sparsemerge() -> str:
    return str(Path(sys.executable).parent / "sparsemerge")


def test_cpi_ft_pipeline_writes_every_artefact_and_resumes_after_a_kill(tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(SHORT))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sparsemerge(), "run", str(cfg), "-o", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (run / ".stages" / "overlap.json").exists():          # stage 2 done: kill it
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in (run / ".stages").glob("*.json")}
    assert {"data", "probe-caesar", "probe-sub", "cores", "overlap"} <= finished
    assert not (run / "summary.json").exists()
    r = subprocess.run([sparsemerge(), "run", str(cfg), "-o", str(run), "--json"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    skipped = {line.split()[1] for line in r.stderr.splitlines() if line.startswith("[skip]")}
    assert finished <= skipped                                        # stages 1-2 (and all done before) skipped
    summary = json.loads(r.stdout)
    for artefact in ["data/caesar.train.jsonl", "data/add.test.jsonl", "probe/caesar/model.safetensors",
                     "cores/caesar.mask.safetensors", "cores/core.json", "groups.json", "fused/model.safetensors",
                     "fused/fuse.json", "retrained/retrain.json", "eval/vanilla.json", "eval/cpi-ft.json",
                     "summary.json"]:
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
    cfg.write_text(yaml.safe_dump({"kind": "cpi", "tasks": {"caesar": "builtin", "nope": "builtin", "x": {"train": "a"}},
                                   "core": {"p": "five", "extra": 1}, "probe": {"steps": 0}, "surprise": True,
                                   "retrain": {"optimizer": "adam"}, "gallop": {"optimizer": "sgd", "momentum": 1.0}}))
    r = CliRunner().invoke(cli, ["run", str(cfg), "-o", str(tmp_path / "run")])
    assert r.exit_code == 1
    for msg in ["config.kind: 'cpi' is not one of", "config.surprise: unknown key", "config.core.extra: unknown key",
                "config.core.p: expected a number, got 'five'", "config.probe.steps: 0 is out of range",
                "config.tasks.nope: no builtin task", "config.tasks.x: expected 'builtin'",
                "config.retrain.optimizer: 'adam' is not one of adamw, sgd", "config.gallop.momentum: 1.0 is out of range"]:
        assert msg in r.output, (msg, r.output)
    assert not (tmp_path / "run").exists()


def test_demo_fast_runs_both_pipelines_and_writes_the_report(tmp_path):
    from browser import assert_renders
    r = CliRunner().invoke(cli, ["demo", "--fast", "-o", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "cpi-ft" in r.stdout and "gallop:caesar" in r.stdout and "groups (stage order)" in r.stdout
    assert_renders(tmp_path / "demo" / "report.html", "demo-report", tmp_path, figures=7)
