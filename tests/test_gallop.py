"""GaLLoP: gradients against a hand loop, masks against a naive computation, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_select_core import naive_topk

from mergekit_sparse.analysis.gallop import EPS, select_sparse
from mergekit_sparse.cli.main import cli
from mergekit_sparse.storage.checkpoint import Checkpoint
from mergekit_sparse.storage.masks import MaskSet
from mergekit_sparse.storage.scope import align


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def add_data(tmp_path) -> Path:
    recs = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(6) for b in range(5)]
    return write_jsonl(tmp_path / "add.jsonl", recs)


def naive_scores(theta, grad, criterion):
    return {"gallop": grad.abs() / (theta.abs() + EPS), "saft": grad.abs(), "pafi": -theta.abs()}[criterion]


@pytest.mark.parametrize("criterion", ["gallop", "saft", "pafi"])
def test_masks_equal_naive_for_each_criterion_with_ties_and_zero_gradients(tmp_path, criterion):
    g = torch.Generator().manual_seed(0)
    params = {
        "a.w": torch.randn(10, 7, generator=g),
        "b.w": torch.randn(40, generator=g),
        "c.w": torch.full((5, 5), 0.5),
    }  # ties in θ
    grads = {
        "a.w": torch.randn(10, 7, generator=g),
        "b.w": torch.zeros(40),  # zero gradients: ties in s
        "c.w": torch.full((5, 5), 0.25),
    }
    save_file(params, tmp_path / "p.safetensors")
    save_file(grads, tmp_path / "g.safetensors", metadata={"kind": "mean_gradient"})
    p, gr = Checkpoint.open(tmp_path / "p.safetensors"), Checkpoint.open(tmp_path / "g.safetensors")
    scope = align([p, gr])
    res = select_sparse(p, gr, scope, rho=30, criteria=[criterion], main=criterion, out=tmp_path / "m.mask.safetensors")
    k = 30 * 135 // 100
    want = naive_topk({n: naive_scores(params[n], grads[n], criterion) for n in params}, k)
    m = MaskSet.load(tmp_path / "m.mask.safetensors")
    for n in params:
        assert torch.equal(m.bool(n), want[n]), n
    assert res.summaries[criterion].selected == k == m.count()
    assert m.meta["criterion"] == criterion and m.meta["rho"] == 30


def test_random_criterion_is_seeded_and_exact(tmp_path):
    save_file({"w": torch.randn(100)}, tmp_path / "p.safetensors")
    save_file({"w": torch.randn(100)}, tmp_path / "g.safetensors")
    p, g = Checkpoint.open(tmp_path / "p.safetensors"), Checkpoint.open(tmp_path / "g.safetensors")
    outs = []
    for i, seed in enumerate([1, 1, 2]):
        select_sparse(
            p,
            g,
            align([p, g]),
            rho=10,
            criteria=["random"],
            main="random",
            out=tmp_path / f"r{i}.mask.safetensors",
            seed=seed,
        )
        outs.append(MaskSet.load(tmp_path / f"r{i}.mask.safetensors").bool("w"))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2]) and int(outs[0].sum()) == 10


def test_stored_mean_gradient_equals_hand_average_of_batch_gradients(tiny_base, add_data, tmp_path):
    from mergekit_sparse.training.data import collate, encode, lm_loss, read_jsonl, seeded_subset
    from mergekit_sparse.training.models import load_model

    out = tmp_path / "g.safetensors"
    r = CliRunner().invoke(
        cli,
        [
            "gradients",
            "--model",
            str(tiny_base),
            "--data",
            str(add_data),
            "--fraction",
            "0.5",
            "--seed",
            "3",
            "--batch-size",
            "4",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert meta["examples"] == "15" and meta["seed"] == "3"
    idx = seeded_subset(30, fraction=0.5, seed=3)
    assert idx == seeded_subset(30, fraction=0.5, seed=3) != seeded_subset(30, fraction=0.5, seed=4)  # frozen order
    model, tok = load_model(tiny_base, dtype=torch.float32)
    recs = read_jsonl(add_data)
    hand = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for start in range(0, 15, 4):
        b = idx[start : start + 4]
        model.zero_grad()
        lm_loss(model, collate([encode(tok, recs[i], 256) for i in b], tok.pad_token_id)).backward()
        for n, p in model.named_parameters():
            hand[n] += p.grad * len(b) / 15
    stored = load_file(out)
    assert set(stored) == set(hand)
    for n in hand:
        assert torch.allclose(stored[n], hand[n], atol=1e-6, rtol=1e-4), n
    assert any(stored[n].abs().sum() > 0 for n in stored)


def test_gallop_cli_report_renders_and_grads_for_another_model_are_refused(tiny_base, tiny_tasks, add_data, tmp_path):
    from browser import assert_renders

    grads = tmp_path / "g.safetensors"
    assert (
        CliRunner()
        .invoke(cli, ["gradients", "--model", str(tiny_base), "--data", str(add_data), "-o", str(grads)])
        .exit_code
        == 0
    )
    html = tmp_path / "gallop.html"
    r = CliRunner().invoke(
        cli,
        [
            "gallop",
            "--params",
            str(tiny_base),
            "--grads",
            str(grads),
            "--rho",
            "5",
            "-o",
            str(tmp_path / "m.mask.safetensors"),
            "--html",
            str(html),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["criteria"]) == {"gallop", "saft", "pafi", "random"} and doc["main"] == "gallop"
    assert 0 <= doc["jaccard"]["gallop~saft"] <= 1
    assert_renders(html, "gallop-report", tmp_path, figures=3)
    from mergekit_sparse.storage.checkpoint import Checkpoint

    fp = Checkpoint.open(tiny_base).content_fingerprint()
    assert doc["inputs"]["params"]["fingerprint"] == fp  # the summary and the report's header name the inputs
    assert fp.rsplit(":", 1)[-1][:12] in html.read_text() and "ρ (%) = 5.0" in html.read_text()
    # the same gradients against other parameters: allowed, with a warning naming both hashes
    r = CliRunner().invoke(
        cli,
        [
            "gallop",
            "--params",
            str(tiny_tasks[0]),
            "--grads",
            str(grads),
            "--rho",
            "5",
            "-o",
            str(tmp_path / "m2.mask.safetensors"),
        ],
    )
    assert r.exit_code == 0 and "warning:" in r.output and "scores mix two models" in r.output
    save_file({"w": torch.zeros(3)}, tmp_path / "other.safetensors", metadata={"kind": "mean_gradient"})
    r = CliRunner().invoke(
        cli,
        [
            "gallop",
            "--params",
            str(tiny_base),
            "--grads",
            str(tmp_path / "other.safetensors"),
            "-o",
            str(tmp_path / "m3.mask.safetensors"),
        ],
    )
    assert r.exit_code == 1 and "missing from" in r.output


def test_gradients_cli_bad_jsonl_names_the_line(tiny_base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    r = CliRunner().invoke(
        cli, ["gradients", "--model", str(tiny_base), "--data", str(bad), "-o", str(tmp_path / "g.st")]
    )
    assert r.exit_code == 1 and "bad.jsonl:2: expected" in r.output
    assert not (tmp_path / "g.st").exists()
