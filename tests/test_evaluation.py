"""Metrics on tables computable by hand, lm-eval input, the evaluator against a hand loop."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mergekit_sparse.cli.main import cli
from mergekit_sparse.evaluation.metrics import (
    collapse,
    forget_ratio,
    load_accuracy_table,
    run_metrics,
    sequential,
)

VANILLA = {"a": 0.8, "b": 0.6, "c": 0.4}


def test_forget_ratio_by_hand():
    run = {"a": 0.9, "b": 0.3, "c": 0.2}  # OOD (b, c): vanilla 0.5, run 0.25
    assert forget_ratio(VANILLA, run, "a") == pytest.approx(0.5)
    assert forget_ratio(VANILLA, {"a": 0, "b": 0.9, "c": 0.9}, "a") == 0.0  # improvement clips at 0


def test_forget_ratio_undefined_when_vanilla_ood_is_zero():
    assert forget_ratio({"a": 0.5, "b": 0.0, "c": 0.0}, {"a": 1, "b": 0, "c": 0}, "a") is None
    r = run_metrics({"a": 0.5, "b": 0.0, "c": 0.0}, {"a": 1, "b": 0, "c": 0}, "a")
    assert r["forget_ratio"] is None and "undefined" in r["warning"]


def test_collapse_counts_tasks_below_one_percent():
    assert collapse({"a": 1.0, "b": 0.0099, "c": 0.01, "d": 0.0}, "a") == (pytest.approx(2 / 3), 2)


def test_sequential_forgetting_by_hand():
    after_a = {"A": 0.9, "B": 0.1}
    after_b = {"A": 0.4, "B": 0.8}
    assert sequential(after_a, after_b, "A", "B") == {"delta_A": pytest.approx(-0.5), "delta_B": pytest.approx(0.7)}


def test_lm_eval_results_layout_is_read_with_default_and_chosen_metric(tmp_path):
    doc = {
        "results": {
            "arc_easy": {
                "alias": "arc_easy",
                "acc,none": 0.7,
                "acc_stderr,none": 0.01,
                "acc_norm,none": 0.65,
                "acc_norm_stderr,none": 0.01,
            },
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.12,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": 0.2,
            },
        },
        "group_subtasks": {"arc_easy": [], "gsm8k": []},
        "configs": {},
        "versions": {"arc_easy": 1.0, "gsm8k": 3.0},
        "n-shot": {"arc_easy": 0, "gsm8k": 5},
        "config": {"model": "hf"},
    }
    p = tmp_path / "results_2026-01-01T00-00-00.json"
    p.write_text(json.dumps(doc))
    assert load_accuracy_table(p) == {"arc_easy": 0.7, "gsm8k": 0.12}
    assert load_accuracy_table(p, metric={"arc_easy": "acc_norm,none"})["arc_easy"] == 0.65
    with pytest.raises(Exception, match="task 'gsm8k' has no metric acc,none; it has: .*--metric gsm8k=NAME"):
        load_accuracy_table(p, metric="acc,none")


def table(tmp_path, name, accs):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"model": name, "tasks": {t: {"accuracy": a} for t, a in accs.items()}}))
    return str(p)


def test_forget_cli_json_and_report(tmp_path):
    from browser import assert_renders

    v = table(tmp_path, "vanilla", VANILLA)
    full = table(tmp_path, "full", {"a": 0.95, "b": 0.0, "c": 0.005})
    sparse = table(tmp_path, "sparse", {"a": 0.9, "b": 0.5, "c": 0.4})
    html = tmp_path / "f.html"
    r = CliRunner().invoke(
        cli,
        [
            "forget",
            "--vanilla",
            v,
            "--run",
            f"full={full}:a",
            "--run",
            f"sparse={sparse}:a",
            "--seq",
            f"a:b={sparse},{full}",
            "--json",
            "--html",
            str(html),
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["runs"]["full"]["forget_ratio"] == pytest.approx(1 - 0.0025 / 0.5)  # OOD mean (0 + 0.005) / 2
    assert doc["runs"]["full"]["collapse_count"] == 2 and doc["runs"]["sparse"]["collapse_count"] == 0
    assert doc["runs"]["sparse"]["forget_ratio"] == pytest.approx((0.5 - 0.45) / 0.5)
    assert doc["sequential"]["a→b"] == {"delta_A": pytest.approx(0.05), "delta_B": pytest.approx(-0.5)}
    dom = assert_renders(html, "forget-report", tmp_path, figures=3)  # accuracy, ID vs OOD, forgetting
    text = html.read_text()
    assert v in text and full in text  # the header lists the tables compared
    assert "<td>full</td><td>a</td><td class='num'>0.950</td>" in text  # the summary table
    assert "Pareto front" in dom and "Sequential forgetting" in dom


def test_pareto_front_keeps_the_runs_no_other_run_beats_on_both_axes():
    from mergekit_sparse.reports.forget import _pareto

    pts = [(0.2, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5)]
    assert _pareto(pts) == [0, 1, 4, 3]  # (0.4, 0.4) is beaten by (0.5, 0.5); ties both stay, sorted by OOD


def test_forget_scores_a_run_trained_on_several_tasks(tmp_path):
    """METHODS §8: a fused / CPI-FT run's ID accuracy is the mean over its tasks, OOD every other task."""
    v = table(tmp_path, "vanilla", VANILLA)
    fused = table(tmp_path, "fused", {"a": 0.9, "b": 0.7, "c": 0.25})
    r = CliRunner().invoke(cli, ["forget", "--vanilla", v, "--run", f"fused={fused}:a,b", "--json"])
    assert r.exit_code == 0, r.output
    run = json.loads(r.stdout)["runs"]["fused"]
    assert run["trained"] == ["a", "b"] and run["id_accuracy"] == pytest.approx(0.8) and run["ood_tasks"] == 1
    assert run["forget_ratio"] == pytest.approx(max(0.0, (VANILLA["c"] - 0.25) / VANILLA["c"]))
    r = CliRunner().invoke(cli, ["forget", "--vanilla", v, "--run", f"fused={fused}:a,b"])
    assert "a,b" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "x=nofile.json:a"], "cannot read an accuracy table"),
        (["--run", "x={v}"], "should look like NAME=TABLE.json:TRAINED_TASK"),
        (["--run", "x={v}:zzz"], "trained task 'zzz' is not in the vanilla table"),
        ([], "give at least one --run"),
    ],
)
def test_forget_cli_user_errors(tmp_path, args, message):
    v = table(tmp_path, "vanilla", VANILLA)
    r = CliRunner().invoke(cli, ["forget", "--vanilla", v, *[a.format(v=v) for a in args]])
    assert r.exit_code == 1 and message in r.output, r.output


def test_evaluator_accuracy_equals_hand_loop(tiny_base, tmp_path):
    """Targets are set to the model's own greedy answer for half the prompts: accuracy must be 0.5,
    and every batched prediction must equal the one-at-a-time hand loop."""
    from mergekit_sparse.evaluation.accuracy import generate_answers
    from mergekit_sparse.training.models import load_model

    model, tok = load_model(tiny_base, dtype=torch.float32)
    prompts = [f"{a}+{b}=" for a in range(3) for b in range(4)] + ["longer prompt 7*8="]
    hand = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        g = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2)
        hand.append(tok.decode(g[0, ids.shape[1] :], skip_special_tokens=True))
    assert generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=5) == hand
    recs = [
        {"prompt": p, "response": h.split("\n")[0].strip() if i % 2 == 0 else "never"}
        for i, (p, h) in enumerate(zip(prompts, hand))
    ]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = CliRunner().invoke(
        cli,
        [
            "eval",
            "--model",
            str(tiny_base),
            "--task",
            f"t={data}",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "5",
            "-o",
            str(tmp_path / "acc.json"),
            "--outputs",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "acc.json").read_text())["tasks"]["t"]
    expected = sum(1 for i in range(len(recs)) if i % 2 == 0 and recs[i]["response"] != "never") / len(recs)
    assert got["accuracy"] == pytest.approx(expected) and got["n"] == len(recs)
    assert [o["output"] for o in got["outputs"]] == hand


def test_multiple_choice_accuracy_uses_loglikelihood(tiny_base, tmp_path):
    from mergekit_sparse.evaluation.accuracy import choice_loglik
    from mergekit_sparse.training.models import load_model

    model, tok = load_model(tiny_base, dtype=torch.float32)
    s = choice_loglik(model, tok, "q:", ["ab", "cd", "e"])
    best = max(range(3), key=s.__getitem__)
    data = tmp_path / "mc.jsonl"
    data.write_text(
        json.dumps({"prompt": "q:", "choices": ["ab", "cd", "e"], "answer": best})
        + "\n"
        + json.dumps({"prompt": "q:", "choices": ["ab", "cd", "e"], "answer": (best + 1) % 3})
        + "\n"
    )
    r = CliRunner().invoke(
        cli, ["eval", "--model", str(tiny_base), "--task", f"mc={data}", "-o", str(tmp_path / "acc.json"), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tasks"]["mc"]["accuracy"] == 0.5
