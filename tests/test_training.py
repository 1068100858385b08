"""Masked optimizer bit-exactness, state size, bf16 master copies, the loop, staged retraining, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_sparse.cli.main import cli
from mergekit_sparse.storage.masks import save_masks
from mergekit_sparse.training.optim import MaskedAdamW, MaskedSGD


def toy_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ("w", torch.nn.Parameter(torch.randn(64, 32, generator=g).to(dtype))),
        ("v", torch.nn.Parameter(torch.randn(500, generator=g).to(dtype))),
    ]


def run_steps(params, masks, steps, *, wd=0.1, clip=0.5, opt=None, seed=1):
    opt = opt or MaskedAdamW(params, masks, lr=1e-2, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step(clip=clip)
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("density", [0.01, 0.5])  # sparse layout, dense layout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unselected_entries_stay_bit_identical_under_weight_decay_momentum_and_clipping(density, dtype):
    params = toy_params(dtype)
    g = torch.Generator().manual_seed(5)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in params}
    start = {n: p.detach().clone() for n, p in params}
    run_steps(params, masks, 25)
    for n, p in params:
        assert torch.equal(p[~masks[n]], start[n][~masks[n]]), n  # frozen: exact
        assert not torch.equal(p[masks[n]], start[n][masks[n]]), n  # selected: moved


def test_bit_exactness_holds_across_a_resume():
    masks = {"w": torch.zeros(64, 32, dtype=torch.bool), "v": torch.zeros(500, dtype=torch.bool)}
    masks["w"][3, :5] = True
    masks["v"][::50] = True
    a = toy_params()
    opt_a = run_steps(a, masks, 10)
    state = opt_a.state_dict()
    b = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in a]
    opt_b = MaskedAdamW(b, masks, lr=1e-2, weight_decay=0.1)
    opt_b.load_state_dict(state)
    run_steps(a, masks, 10, opt=opt_a, seed=2)
    run_steps(b, masks, 10, opt=opt_b, seed=2)
    start = toy_params()
    for (n, pa), (_, pb), (_, p0) in zip(a, b, start):
        assert torch.equal(pa, pb)  # resumed == uninterrupted
        assert torch.equal(pa[~masks[n]], p0[~masks[n]])


def test_sparse_state_is_at_most_two_percent_of_dense_adamw_at_rho_one_percent():
    params = [("w", torch.nn.Parameter(torch.randn(200, 500)))]
    mask = {"w": torch.zeros(200, 500, dtype=torch.bool)}
    mask["w"].view(-1)[torch.randperm(100_000)[:1000]] = True  # ρ = 1 %
    sparse = MaskedAdamW(params, mask, lr=1e-3)
    ref = torch.optim.AdamW([params[0][1]], lr=1e-3)
    params[0][1].grad = torch.randn(200, 500)
    ref.step()
    dense_bytes = sum(t.numel() * t.element_size() for s in ref.state.values() for t in s.values() if t.dim())
    assert sparse.state_bytes() <= 0.02 * dense_bytes, (sparse.state_bytes(), dense_bytes)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_unmasked_optimizers_match_torch(kind):
    """No mask: MaskedAdamW is torch.optim.AdamW and MaskedSGD is torch.optim.SGD (momentum, weight decay)."""
    ours, ref = toy_params(), toy_params()
    if kind == "adamw":
        opt = MaskedAdamW(ours, None, lr=1e-2, weight_decay=0.1)
        torch_opt = torch.optim.AdamW([p for _, p in ref], lr=1e-2, weight_decay=0.1)
    else:
        opt = MaskedSGD(ours, None, lr=1e-2, momentum=0.9, weight_decay=0.1)
        torch_opt = torch.optim.SGD([p for _, p in ref], lr=1e-2, momentum=0.9, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g) for _, p in ours]
        for (_, a), (_, b), gr in zip(ours, ref, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        opt.step()
        torch_opt.step()
    start = dict(toy_params())
    for (n, a), (_, b) in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6), n
        assert not torch.equal(a, start[n]), n


@pytest.mark.parametrize("density", [0.01, 0.5])  # sparse layout, dense layout
def test_masked_sgd_is_sgd_on_the_selected_entries(density):
    """Masked SGD equals torch SGD run on the selected entries alone; the rest never moves."""
    params = toy_params()
    g = torch.Generator().manual_seed(7)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in params}
    subs = [torch.nn.Parameter(p.detach()[masks[n]].clone()) for n, p in params]
    start = {n: p.detach().clone() for n, p in params}
    opt = MaskedSGD(params, masks, lr=5e-2, momentum=0.9, weight_decay=0.1)
    ref = torch.optim.SGD(subs, lr=5e-2, momentum=0.9, weight_decay=0.1)
    for _ in range(15):
        for (n, p), sub in zip(params, subs):
            p.grad = torch.randn(p.shape, generator=g)
            sub.grad = p.grad[masks[n]].clone()
        opt.step()
        ref.step()
    for (n, p), sub in zip(params, subs):
        assert torch.allclose(p.detach()[masks[n]], sub.detach(), atol=1e-6), n
        assert torch.equal(p[~masks[n]], start[n][~masks[n]]), n
    assert opt.state_bytes() < MaskedAdamW(toy_params(), masks).state_bytes()  # one moment, not two


def test_bf16_updates_below_resolution_accumulate_through_the_master_copy():
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    mask = {"p": torch.zeros(1000, dtype=torch.bool)}
    mask["p"][:5] = True
    opt = MaskedAdamW([("p", p)], mask, lr=1e-4)  # each step moves 1e-4 < bf16 spacing at 1.0 (7.8e-3)
    naive = torch.ones(5, dtype=torch.bfloat16)
    for _ in range(200):
        p.grad = torch.ones(1000, dtype=torch.bfloat16)
        opt.step()
        naive = naive - torch.tensor(1e-4, dtype=torch.bfloat16)  # rounded away each time
    assert torch.equal(naive, torch.ones(5, dtype=torch.bfloat16))
    assert float(p[0].detach()) < 0.985 and torch.equal(p[5:], torch.ones(995, dtype=torch.bfloat16))


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def rev_data(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    recs = []
    for _ in range(64):
        w = "".join(rng.choice("abcdef") for _ in range(4))
        recs.append({"prompt": f"rev {w}:", "response": w[::-1]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "rev.jsonl", recs)


@pytest.mark.parametrize(
    "optimizer", [["--optimizer", "adamw"], ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.3"]]
)
def test_train_cli_really_trains_and_masked_entries_stay_bit_identical(tiny_base, rev_data, tmp_path, optimizer):
    params = load_file(tiny_base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(t.shape, generator=g) < 0.05 for n, t in params.items()}
    save_masks(tmp_path / "m.mask.safetensors", masks, {"criterion": "random"})
    out = tmp_path / "trained"
    r = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            str(tiny_base),
            "--data",
            str(rev_data),
            "--mask",
            str(tmp_path / "m.mask.safetensors"),
            "--steps",
            "30",
            "--lr",
            "3e-3",
            "--weight-decay",
            "0.1",
            "--eval-every",
            "10",
            "--eval-fraction",
            "0.2",
            "-o",
            str(out),
            "--json",
            *optimizer,
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["config"]["optimizer"] == optimizer[1]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and log[-1]["loss"] < log[0]["loss"] and "eval_loss" in log[9]
    after = load_file(out / "model.safetensors")
    for n, t in params.items():
        assert torch.equal(after[n][~masks[n]], t[~masks[n]]), n
    assert any(not torch.equal(after[n], params[n]) for n in params)
    assert not Path(f"{out}.work").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_train_resumes_from_a_snapshot_to_the_same_weights(tiny_base, rev_data, tmp_path):
    from mergekit_sparse.training.staged import run_train
    from mergekit_sparse.training.trainer import TrainConfig

    cfg = TrainConfig(steps=12, lr=3e-3, batch_size=4, save_every=5, seed=3)
    run_train(str(tiny_base), str(rev_data), tmp_path / "straight", cfg=cfg)
    # interrupted run: a work folder with a step-5 snapshot, as the loop leaves it when killed at step 7
    from helpers import interrupted_at_step

    with interrupted_at_step(8), pytest.raises(KeyboardInterrupt):
        run_train(str(tiny_base), str(rev_data), tmp_path / "resumed", cfg=cfg)
    assert (tmp_path / "resumed.work" / "snapshot").is_dir() and not (tmp_path / "resumed").exists()
    run_train(str(tiny_base), str(rev_data), tmp_path / "resumed", cfg=cfg)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == list(range(1, 13))


def test_retrain_freezes_earlier_cores_and_resumes_after_finished_stages(tiny_base, tiny_tasks, rev_data, tmp_path):
    cores = tmp_path / "cores"
    runner = CliRunner()
    assert (
        runner.invoke(
            cli, ["core", "--base", str(tiny_base), *map(str, tiny_tasks), "--p", "5", "-o", str(cores)]
        ).exit_code
        == 0
    )
    groups = tmp_path / "groups.json"
    r = runner.invoke(
        cli,
        [
            "overlap",
            *[str(cores / f"{t}.mask.safetensors") for t in ("math", "code", "chat")],
            "--tau",
            "0.2",
            "--order",
            "input",
            "-o",
            str(groups),
        ],
    )
    assert r.exit_code == 0, r.output
    args = [
        "retrain",
        "--model",
        str(tiny_tasks[0]),
        "--groups",
        str(groups),
        "--masks",
        str(cores),
        "--data",
        f"math={rev_data}",
        "--data",
        f"code={rev_data}",
        "--data",
        f"chat={rev_data}",
        "--per-task",
        "8",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "-o",
        str(tmp_path / "rt"),
        "--json",
    ]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [s["group"] for s in doc["stages"]] == [["math", "code"], ["chat"]]
    s1 = load_file(tmp_path / "rt" / "stage-1" / "model.safetensors")
    s2 = load_file(tmp_path / "rt" / "stage-2" / "model.safetensors")
    from mergekit_sparse.storage.masks import MaskSet

    frozen = [MaskSet.load(cores / f"{t}.mask.safetensors") for t in ("math", "code")]
    moved = 0
    for n in s1:
        f = frozen[0].bool(n) | frozen[1].bool(n)
        assert torch.equal(s2[n][f], s1[n][f]), n  # earlier cores: bit-identical
        moved += int((s2[n][~f] != s1[n][~f]).sum())
    assert moved > 0 and doc["stages"][1]["frozen_bit_identical"] is True
    # rerun: both stages are skipped; removing stage-2 redoes only stage 2
    r = runner.invoke(cli, args)
    assert r.exit_code == 0 and all(s.get("skipped") for s in json.loads(r.stdout)["stages"])
    import shutil

    shutil.rmtree(tmp_path / "rt" / "stage-2")
    stages = json.loads(runner.invoke(cli, args).stdout)["stages"]
    assert stages[0].get("skipped") and not stages[1].get("skipped")
    assert all(torch.equal(s2[k], v) for k, v in load_file(tmp_path / "rt" / "stage-2" / "model.safetensors").items())


def test_torchrun_two_processes_match_one_process(tiny_base, rev_data, tmp_path):
    """2 CPU ranks (gloo) with the same global batch give the same weights as 1 process (float32 atol 1e-5)."""
    exe = Path(sys.executable).parent / "torchrun"
    cli_exe = Path(sys.executable).parent / "sparsemerge"
    common = [
        "train",
        "--model",
        str(tiny_base),
        "--data",
        str(rev_data),
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--seed",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([str(cli_exe), *common, "-o", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            str(exe),
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            "-m",  # the launch line the README shows: torchrun ... -m mergekit_sparse train ...
            "mergekit_sparse",
            *common,
            "-o",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained 6 steps") == 1, two.stdout  # rank 0 alone prints
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert json.loads((tmp_path / "two" / "train.json").read_text())["world_size"] == 2
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_a_bf16_model_trains_in_float32_on_cpu_and_is_saved_back_in_bf16(tiny_base, rev_data, tmp_path):
    """bf16 matrix products on a CPU are ~10x slower than float32: training computes in float32 and saves
    the stored dtype; masked-out entries survive the round trip bit for bit."""
    from mergekit_sparse.training.models import load_for_training

    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_base, bf16)
    sd = load_file(tiny_base / "model.safetensors")
    save_file({n: t.bfloat16() if t.is_floating_point() else t for n, t in sd.items()}, bf16 / "model.safetensors")
    model, _, stored = load_for_training(bf16)
    assert stored == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    params = load_file(bf16 / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(t.shape, generator=g) < 0.1 for n, t in params.items()}
    save_masks(tmp_path / "m.mask.safetensors", masks, {"criterion": "random"})
    out = tmp_path / "trained"
    args = ["train", "--model", str(bf16), "--data", str(rev_data), "--mask", str(tmp_path / "m.mask.safetensors")]
    r = CliRunner().invoke(cli, [*args, "--steps", "5", "--lr", "1e-2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    after = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for n, t in after.items() if params[n].is_floating_point())
    assert all(torch.equal(after[n][~masks[n]], params[n][~masks[n]]) for n in params)
    assert any(not torch.equal(after[n], params[n]) for n in params)
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
