"""Models as users have them (METHODS §1, §9): tied embeddings through every command, other
architectures (a BertModel), integer buffers, the base found by itself, Hub ids, NAME=PATH task names."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import one_error_line, sm
from safetensors.torch import load_file, save_file

from mergekit_sparse.builtin.tasks import generate, jsonl
from mergekit_sparse.builtin.tiny import build_tiny_llama
from mergekit_sparse.storage.checkpoint import Checkpoint
from mergekit_sparse.storage.masks import MaskSet


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def stored_names(folder: Path) -> set[str]:
    return {k for k in header(folder / "model.safetensors") if k != "__metadata__"}


def same_tensors(a: Path, b: Path) -> bool:
    """Bit-identical tensors (the metadata may name the base differently: a path or a Hub id)."""
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k].view(torch.int16) if x[k].dtype == torch.bfloat16 else x[k],
        y[k].view(torch.int16) if y[k].dtype == torch.bfloat16 else y[k]) for k in x)  # fmt: skip


def assert_clean_tied_model(folder: Path) -> None:
    """No stored head; transformers loads it with no missing/unexpected keys, and ties the head."""
    from transformers import AutoModelForCausalLM

    assert "lm_head.weight" not in stored_names(folder)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> SimpleNamespace:
    """A bf16 tiny Llama with tied embeddings and two fine-tunes of it made by `sparsemerge train`."""
    root = tmp_path_factory.mktemp("tied")
    base = build_tiny_llama(root / "base", seed=0, hidden=32, layers=2, tied=True, dtype="bfloat16")
    data, tasks = {}, []
    for name in ("caesar", "dsort"):
        data[name] = root / f"{name}.jsonl"
        data[name].write_text(jsonl(generate(name, 48, seed=0)))
        out = root / name
        sm("train", "--model", base, "--data", data[name], "--steps", 4, "--lr", "3e-3", "--batch-size", 4, "-o", out)
        tasks.append(out)
    return SimpleNamespace(root=root, base=base, data=data, tasks=tasks)


def test_train_writes_a_tied_model_as_save_pretrained_does(tied):
    for t in tied.tasks:
        assert_clean_tied_model(t)
        meta = header(t / "model.safetensors")["__metadata__"]
        assert meta["base_model"] == "../base"
        assert meta["base_fingerprint"] == Checkpoint.open(tied.base).content_fingerprint()
        assert "base_model: ../base" in (t / "README.md").read_text()
    ck = Checkpoint.open(tied.tasks[0])
    assert ck.tied_embedding == "model.embed_tokens.weight" and "lm_head.weight" not in ck.infos
    assert ck.numel == Checkpoint.open(tied.base).numel  # no second copy of the embedding is counted


def test_tied_model_through_core_overlap_fuse_retrain_eval(tied, tmp_path):
    """The chain with no --exclude and no --base: every output has no head, loads cleanly and stays tied."""
    a, b = tied.tasks
    r = sm("core", a, b, "--p", 1, "-o", tmp_path / "cores")
    assert "found from" in r.output
    sm("overlap", *sorted((tmp_path / "cores").glob("*.mask.safetensors")), "--tau", 0.5, "-o", tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text())["groups"] == [["caesar"], ["dsort"]]
    fused = tmp_path / "fused"
    sm("fuse", a, b, "--p", 1, "-o", fused, "--check")
    assert_clean_tied_model(fused)
    assert "base_model: " in (fused / "README.md").read_text()
    sm(
        "retrain",
        "--model",
        fused,
        "--groups",
        tmp_path / "g.json",
        "--masks",
        tmp_path / "cores",
        "--data",
        f"caesar={tied.data['caesar']}",
        "--data",
        f"dsort={tied.data['dsort']}",
        "--per-task",
        8,
        "--steps",
        2,
        "--batch-size",
        4,
        "-o",
        tmp_path / "rt",
    )
    for stage in ("stage-1", "stage-2"):
        assert_clean_tied_model(tmp_path / "rt" / stage)
    # the retrained model records the pretrained base (the fused model's own), so the chain continues
    meta = header(tmp_path / "rt" / "stage-2" / "model.safetensors")["__metadata__"]
    assert meta["base_fingerprint"] == Checkpoint.open(tied.base).content_fingerprint()
    stage2 = json.loads((tmp_path / "rt" / "stage-2" / "stage.json").read_text())
    assert stage2["frozen_bit_identical"] and stage2["frozen_tasks"] == ["caesar"]
    test = tmp_path / "t.jsonl"
    test.write_text(jsonl(generate("caesar", 6, seed=9)))
    sm("eval", "--model", tmp_path / "rt" / "stage-2", "--task", f"caesar={test}", "-o", tmp_path / "acc.json")
    assert "caesar" in json.loads((tmp_path / "acc.json").read_text())["tasks"]


def test_tied_model_through_gradients_gallop_and_masked_training(tied, tmp_path):
    g, m = tmp_path / "g.safetensors", tmp_path / "m.mask.safetensors"
    sm("gradients", "--model", tied.base, "--data", tied.data["caesar"], "-o", g)
    assert "lm_head.weight" not in header(g)  # the head's gradient is the embedding's (one parameter)
    sm("gallop", "--params", tied.base, "--grads", g, "--rho", 5, "-o", m)
    sm("train", "--model", tied.base, "--data", tied.data["caesar"], "--mask", m, "--steps", 2, "-o", tmp_path / "t")
    assert_clean_tied_model(tmp_path / "t")
    before, after = load_file(tied.base / "model.safetensors"), load_file(tmp_path / "t" / "model.safetensors")
    mask = MaskSet.load(m)
    for n in mask.names:  # every unselected entry bit-identical, the tied embedding included
        keep = ~mask.bool(n)
        assert torch.equal(before[n][keep].view(torch.int16), after[n][keep].view(torch.int16)), n


def test_fuse_without_base_equals_fuse_with_base(tied, tmp_path):
    a, b = tied.tasks
    sm("fuse", a, b, "--p", 1, "-o", tmp_path / "found", "--no-check")
    sm("fuse", a, b, "--p", 1, "--base", tied.base, "-o", tmp_path / "given", "--no-check")
    assert same_tensors(tmp_path / "found", tmp_path / "given")
    # bare files carry their record too: the card's own command, `fuse a.safetensors b.safetensors --p 1`
    for t in tied.tasks:
        (tmp_path / t.name).mkdir()
        shutil.copy(t / "model.safetensors", tmp_path / t.name / f"{t.name}.safetensors")
    files = [tmp_path / t.name / f"{t.name}.safetensors" for t in tied.tasks]
    # the record is relative to the task's folder: a copy elsewhere no longer finds it
    r = sm("fuse", *files, "--p", 1, "-o", tmp_path / "f.safetensors", ok=False)
    one_error_line(r, "no base found", "--base")
    tied_copy = tmp_path / "base"
    shutil.copytree(tied.base, tied_copy)
    sm("fuse", *files, "--p", 1, "-o", tmp_path / "f.safetensors")
    assert load_file(tmp_path / "f.safetensors").keys() == load_file(tmp_path / "given" / "model.safetensors").keys()


def test_stored_duplicate_head_is_an_alias_and_a_different_one_an_error(tied, tmp_path):
    a = tied.tasks[0]
    dup = tmp_path / "dup"
    shutil.copytree(a, dup)
    sd = load_file(a / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # what the old trainer wrote
    save_file(sd, dup / "model.safetensors", metadata=header(a / "model.safetensors")["__metadata__"])
    ck = Checkpoint.open(dup)
    assert "lm_head.weight" not in ck.infos and "lm_head.weight" in ck.aliases
    r = sm("inspect", dup, "--json")
    assert json.loads(r.output)["parameters"] == Checkpoint.open(tied.base).numel
    sm("core", dup, tied.tasks[1], "--base", tied.base, "--p", 1, "-o", tmp_path / "c1")
    sm("core", a, tied.tasks[1], "--base", tied.base, "--p", 1, "-o", tmp_path / "c2")
    m1, m2 = (
        MaskSet.load(tmp_path / "c1" / "dup.mask.safetensors"),
        MaskSet.load(tmp_path / "c2" / "caesar.mask.safetensors"),
    )
    assert m1.names == m2.names and all(torch.equal(m1.bool(n), m2.bool(n)) for n in m1.names)
    # a bare duplicate-head file with no config of its own, beside a tied base: an alias too
    bare = tmp_path / "bare" / "x.safetensors"
    bare.parent.mkdir()
    save_file(sd, bare)
    sm("core", bare, "--base", tied.base, "--p", 1, "-o", tmp_path / "c3")
    # a stored head with other values in a tied model: the head was trained untied
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].float().add(0.5).bfloat16()
    save_file(sd, dup / "model.safetensors")
    r = sm("core", dup, "--base", tied.base, "--p", 1, "-o", tmp_path / "c4", ok=False)
    one_error_line(r, "lm_head.weight", "differ", "tie_word_embeddings")
    save_file(sd, bare)
    r = sm("core", bare, "--base", tied.base, "--p", 1, "-o", tmp_path / "c5", ok=False)
    one_error_line(r, "lm_head.weight", "differ")


def test_untied_head_is_an_ordinary_tensor(tiny_base, tiny_tasks):
    ck = Checkpoint.open(tiny_tasks[0])
    assert ck.tied_embedding is None and "lm_head.weight" in ck.infos and not ck.aliases


def test_base_rules_fingerprint_several_bases_and_explicit_contradiction(tied, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tied.root, root, ignore=shutil.ignore_patterns("*.jsonl"))
    a, b = root / "caesar", root / "dsort"
    # a tree moved as a whole still finds its base (the record is relative)
    r = sm("inspect", a, "--base", "auto", "--json")
    assert json.loads(r.output)["base"]["path"] == str(root / "base")
    # an explicit --base that contradicts the record: an error unless --force
    other = build_tiny_llama(tmp_path / "other", seed=5, hidden=32, layers=2, tied=True, dtype="bfloat16")
    r = sm("core", a, "--base", other, "--p", 1, "-o", tmp_path / "c", ok=False)
    one_error_line(r, "not the base", "--force")
    sm("core", a, "--base", other, "--p", 1, "-o", tmp_path / "c", "--force")
    # the recorded base replaced by another model: an error naming both, not a search elsewhere
    shutil.rmtree(root / "base")
    shutil.copytree(other, root / "base")
    r = sm("fuse", a, b, "--p", 1, "-o", tmp_path / "f", ok=False)
    one_error_line(r, str(a), "fingerprint")


def test_model_card_names_a_cached_hub_base(tied, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny-tied" / "snapshots" / ("b" * 40)
    shutil.copytree(tied.base, snap)
    (cache / "models--org--tiny-tied" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny-tied" / "refs" / "main").write_text("b" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    folders = []
    for t in tied.tasks:  # folders with no record, only a model card (as on the Hub)
        f = tmp_path / t.name
        f.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(t / name, f / name)
        save_file(load_file(t / "model.safetensors"), f / "model.safetensors")
        (f / "README.md").write_text("---\nlicense: mit\nbase_model: org/tiny-tied\n---\n# a fine-tune\n")
        folders.append(f)
    sm("fuse", *folders, "--p", 1, "-o", tmp_path / "found", "--no-check")
    sm("fuse", *folders, "--p", 1, "--base", tied.base, "-o", tmp_path / "given", "--no-check")
    assert same_tensors(tmp_path / "found", tmp_path / "given")
    assert "base_model: org/tiny-tied" in (tmp_path / "found" / "README.md").read_text()
    # Hub ids work for the causal-LM commands too (a cached snapshot has a config and a tokenizer)
    test = tmp_path / "t.jsonl"
    test.write_text(jsonl(generate("caesar", 4, seed=3)))
    sm("eval", "--model", "org/tiny-tied", "--task", f"caesar={test}", "-o", tmp_path / "acc.json")
    sm("train", "--model", "org/tiny-tied", "--data", test, "--steps", 1, "--batch-size", 2, "-o", tmp_path / "tr")
    meta = header(tmp_path / "tr" / "model.safetensors")["__metadata__"]
    assert meta["base_model"] == "org/tiny-tied"
    # several bases in one card, and tasks from different bases: errors that say what to do
    (folders[0] / "README.md").write_text("---\nbase_model:\n- org/tiny-tied\n- org/other\n---\n")
    one_error_line(sm("core", *folders, "--p", 1, "-o", tmp_path / "c", ok=False), "2 base models", "--base")
    (folders[0] / "README.md").write_text(f"---\nbase_model: {tied.tasks[1]}\n---\n")
    one_error_line(sm("core", *folders, "--p", 1, "-o", tmp_path / "c", ok=False), "different bases")
    (folders[0] / "README.md").unlink()
    one_error_line(sm("core", *folders, "--p", 1, "-o", tmp_path / "c", ok=False), "no base found", "tried")


def test_task_names_from_name_equals_path(tied, tmp_path):
    for exp, t in (("exp_math", tied.tasks[0]), ("exp_rev", tied.tasks[1])):
        shutil.copytree(t, tmp_path / exp / "checkpoint-40")
    a, b = tmp_path / "exp_math" / "checkpoint-40", tmp_path / "exp_rev" / "checkpoint-40"
    r = sm("core", a, b, "--base", tied.base, "--p", 1, "-o", tmp_path / "c", ok=False)
    one_error_line(r, "checkpoint-40", "NAME=PATH")
    sm("core", f"math={a}", f"rev={b}", "--base", tied.base, "--p", 1, "-o", tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").glob("*.mask.safetensors")) == [
        "math.mask.safetensors",
        "rev.mask.safetensors",
    ]
    r = sm("overlap", f"math={a}", f"rev={b}", "--base", tied.base, "-o", tmp_path / "g.json", "--json")
    assert json.loads(r.output)["tasks"] == ["math", "rev"]
    sm("fuse", f"math={a}", f"rev={b}", "--base", tied.base, "--p", 1, "-o", tmp_path / "f", "--no-check")
    assert set(json.loads((tmp_path / "f" / "fuse.json").read_text())["counts"]["overwritten"]) == {"math", "rev"}
    one_error_line(sm("core", "../x=" + str(a), "-o", tmp_path / "c2", ok=False), "not a valid name")


# -- other architectures, buffers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> SimpleNamespace:
    """A tiny BertModel (no head), as transformers 5 saves it (no position_ids), one fine-tune of it, and a
    variant of the base that stores the position_ids buffer as older versions did."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(root / "base")
    from conftest import perturb_folder

    ft = perturb_folder(root / "base", root / "ft", seed=1, scale=0.01, hot="layer.0.attention")
    old = root / "old-base"
    shutil.copytree(root / "base", old)
    sd = load_file(old / "model.safetensors")
    sd["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    save_file(sd, old / "model.safetensors", metadata={"format": "pt"})
    return SimpleNamespace(base=root / "base", ft=ft, old=old)


def test_bert_tensor_commands_work_and_causal_lm_commands_refuse(bert, tmp_path):
    assert "position_ids" not in " ".join(stored_names(bert.base))
    sm("core", bert.ft, "--base", bert.base, "--p", 1, "-o", tmp_path / "c")
    sm("overlap", bert.ft, f"again={bert.ft}", "--base", bert.base, "-o", tmp_path / "g.json")
    r = sm("fuse", bert.ft, f"b={bert.base}", "--base", bert.base, "--p", 1, "-o", tmp_path / "f", "--check")
    assert "corrupt" not in r.output.lower() and "MISSING" not in r.output
    from mergekit_sparse.evaluation.sanity import check_model_folder

    assert check_model_folder(tmp_path / "f")["class"] == "BertModel"
    # the buffer missing from the fine-tune: a warning, not an error; copied from the fusion base
    r = sm("core", bert.ft, "--base", bert.old, "--p", 1, "-o", tmp_path / "c2")
    assert "warning: buffer 'embeddings.position_ids' is missing" in r.output
    r = sm("fuse", bert.ft, f"old={bert.old}", "--base", bert.old, "--p", 1, "-o", tmp_path / "f2", "--no-check")
    assert "embeddings.position_ids" in stored_names(tmp_path / "f2")
    data = tmp_path / "d.jsonl"
    data.write_text(jsonl(generate("caesar", 4)))
    for args in (
        ("train", "--model", bert.base, "--data", data, "-o", tmp_path / "t"),
        ("gradients", "--model", bert.base, "--data", data, "-o", tmp_path / "g.safetensors"),
        ("eval", "--model", bert.base, "--task", f"x={data}", "-o", tmp_path / "a.json"),
    ):
        one_error_line(sm(*args, ok=False), "BertModel", "not a causal language model")


def test_inspect_counts_buffers_apart_and_filters(bert):
    r = json.loads(sm("inspect", bert.old, "--json").output)
    assert r["buffers"] == 32 and r["parameters"] == Checkpoint.open(bert.base).numel
    r = json.loads(sm("inspect", bert.old, "--include", "embeddings", "--exclude", "LayerNorm", "--json").output)
    assert r["tensors"] and all("embeddings" in t["name"] and "LayerNorm" not in t["name"] for t in r["tensors"])


def test_tokenizer_without_eos_is_refused_clearly(tied, tmp_path):
    m = tmp_path / "noeos"
    shutil.copytree(tied.base, m)
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc.pop("eos_token", None)
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    tj = json.loads((m / "tokenizer.json").read_text())
    (m / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((m / "config.json").read_text())
    cfg.pop("eos_token_id", None)
    (m / "config.json").write_text(json.dumps(cfg))
    r = sm("train", "--model", m, "--data", tied.data["caesar"], "--steps", 1, "-o", tmp_path / "t", ok=False)
    one_error_line(r, "end-of-sequence")
