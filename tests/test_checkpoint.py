"""Checkpoint opening, alignment, streaming writer, inspect."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_sparse.cli.main import cli
from mergekit_sparse.errors import CheckpointError, MismatchError, OutputError
from mergekit_sparse.storage.checkpoint import Checkpoint
from mergekit_sparse.storage.scope import align
from mergekit_sparse.storage.writer import CheckpointWriter


def test_open_single_file_reads_headers_lazily(planted):
    ck = Checkpoint.open(planted["base"])
    assert ck.names == ["a.w", "b.w", "n.steps"]
    assert ck.infos["a.w"].shape == (2, 3) and ck.numel == 6 + 6 + 1
    assert torch.equal(ck.tensor("b.w"), torch.ones(3, 2))


def test_open_hf_folder_and_sharded_copy_agree(tiny_base, tmp_path):
    ck = Checkpoint.open(tiny_base)
    plan = [(n, i.dtype, i.shape) for n, i in ck.infos.items()]
    out = tmp_path / "sharded"
    with CheckpointWriter(out, plan, folder=True, shard_bytes=20_000, reference=tiny_base) as w:
        for name in ck.names:
            w.write(name, ck.tensor(name))
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    sharded = Checkpoint.open(out)
    assert len(sharded.files) > 1
    for name in ck.names:
        assert torch.equal(ck.tensor(name), sharded.tensor(name))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.norm.weight"], ck.tensor("model.norm.weight"))


def test_writer_output_reads_back_with_safetensors_and_keeps_metadata(planted, tmp_path):
    ck = Checkpoint.open(planted["a"])
    out = tmp_path / "copy.safetensors"
    with CheckpointWriter(
        out, [(n, i.dtype, i.shape) for n, i in ck.infos.items()], folder=False, metadata={"note": "x"}
    ) as w:
        for n in ck.names:
            w.write(n, ck.tensor(n))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["note"] == "x"
    assert all(torch.equal(v, ck.tensor(k)) for k, v in load_file(out).items())


def test_writer_patch_rewrites_exactly_the_given_entries(tmp_path):
    """Patches land in the right tensor of the right shard, also at offsets odd dtypes leave unaligned."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.u8": torch.randint(0, 9, (3,), generator=g, dtype=torch.uint8),  # 3 bytes: unaligns the rest
        "b.bf16": torch.randn(5, 7, generator=g).bfloat16(),
        "c.f32": torch.randn(11, generator=g),
        "d.f16": torch.randn(4, 4, generator=g).half(),
    }
    out = tmp_path / "p"
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    want = {n: t.clone() for n, t in tensors.items()}
    with CheckpointWriter(out, plan, folder=True, shard_bytes=80) as w:
        for n, t in tensors.items():
            w.write(n, t)
        for n, pos in (("b.bf16", [0, 9, 34]), ("c.f32", [10]), ("d.f16", [3, 4])):
            vals = torch.arange(1, len(pos) + 1, dtype=tensors[n].dtype) * 100
            w.patch(n, np.array(pos), vals)
            want[n].view(-1)[pos] = vals
    assert len(list(out.glob("*.safetensors"))) > 1
    got = Checkpoint.open(out)
    for n in tensors:
        assert torch.equal(got.tensor(n), want[n]), n


def test_writer_leaves_nothing_behind_on_failure(planted, tmp_path):
    ck = Checkpoint.open(planted["a"])
    out = tmp_path / "out.safetensors"
    with pytest.raises(ZeroDivisionError):
        with CheckpointWriter(out, [(n, i.dtype, i.shape) for n, i in ck.infos.items()], folder=False) as w:
            w.write("a.w", ck.tensor("a.w"))
            1 / 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "base.safetensors"]


def test_writer_refuses_existing_output_and_inputs(planted, tmp_path):
    with pytest.raises(OutputError, match="already exists; pass --force"):
        CheckpointWriter(planted["a"], [], folder=False)
    with pytest.raises(OutputError, match="would overwrite or nest inside the input"):
        CheckpointWriter(planted["a"], [], folder=False, inputs=[planted["a"]], force=True)


def test_truncated_file_is_a_one_line_error_naming_it(planted, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(planted["a"].read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"bad.safetensors: '[a-z.]+' ends at byte .* truncated"):
        Checkpoint.open(bad)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty or too short"),
        (b"\xff" * 16, "header length .* exceeds the file size"),
        ((10).to_bytes(8, "little") + b"not json!!", "header is not valid JSON"),
    ],
)
def test_corrupt_files_are_refused(tmp_path, content, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(bad)


def test_header_lying_about_dtype_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "lie.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"says 'w' is F32\[4\] \(16 bytes\) but its offsets span 8"):
        Checkpoint.open(bad)


def test_pickles_are_refused_unless_allowed(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, p)
    with pytest.raises(CheckpointError, match="refusing pickled weights .* --allow-pickle"):
        Checkpoint.open(p)
    with pytest.raises(CheckpointError, match="refusing pickled weights"):
        Checkpoint.open(tmp_path)
    assert torch.equal(Checkpoint.open(p, allow_pickle=True).tensor("w"), torch.ones(2))


def test_index_escaping_the_folder_or_missing_shard_is_refused(tiny_base, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_base, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="points outside the model folder"):
        Checkpoint.open(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="'gone.safetensors' listed in the index is missing"):
        Checkpoint.open(folder)


def test_folder_without_weights_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="folder holds no weights"):
        Checkpoint.open(tmp_path)


def test_align_names_missing_tensor_and_shape_mismatch(planted, tmp_path):
    base = Checkpoint.open(planted["base"])
    save_file({"a.w": torch.ones(2, 3)}, tmp_path / "short.safetensors")
    with pytest.raises(MismatchError, match=r"tensor 'b.w' is in .*base.safetensors but missing from .*short"):
        align([base, Checkpoint.open(tmp_path / "short.safetensors")])
    save_file(
        {"a.w": torch.ones(3, 2), "b.w": torch.ones(3, 2), "n.steps": torch.tensor([7])}, tmp_path / "wide.safetensors"
    )
    with pytest.raises(MismatchError, match=r"shape mismatch for 'a.w': .*\[2, 3\] vs .*\[3, 2\]"):
        align([base, Checkpoint.open(tmp_path / "wide.safetensors")])
    scope = align([base, Checkpoint.open(tmp_path / "wide.safetensors")], exclude=["^a"])
    assert scope.names == ["b.w"] and "a.w" in scope.copied and "n.steps" in scope.copied


def test_align_records_dtype_differences(planted, tmp_path):
    sd = load_file(planted["a"])
    sd["a.w"] = sd["a.w"].bfloat16()
    save_file(sd, tmp_path / "bf.safetensors")
    scope = align([Checkpoint.open(planted["base"]), Checkpoint.open(tmp_path / "bf.safetensors")])
    assert scope.dtype_differences == {"a.w": ("float32", "bfloat16")}


def test_hub_id_resolves_from_local_cache_offline(tiny_base, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_base, snap)
    (cache / "models--org--tiny" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    result = CliRunner().invoke(cli, ["inspect", "org/tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["parameters"] == Checkpoint.open(tiny_base).numel
    result = CliRunner().invoke(cli, ["inspect", "org/absent"])
    assert result.exit_code == 1 and "not in the Hugging Face cache" in result.output


def test_inspect_cli_on_file_and_folder_with_base(tiny_base, tiny_tasks, planted):
    r = CliRunner().invoke(cli, ["inspect", str(planted["a"])])
    assert r.exit_code == 0, r.output
    assert "3 tensors, 12 parameters (+ 1 in integer buffers)" in r.output  # n.steps is a buffer
    r = CliRunner().invoke(cli, ["inspect", str(tiny_tasks[0]), "--base", str(tiny_base), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    rel = data["base"]["relative_delta_norm"]
    hot = [v for k, v in rel.items() if "layers.0.self_attn" in k]
    cold = [v for k, v in rel.items() if "layers.1.mlp" in k]
    assert min(hot) > 5 * max(cold)  # the planted hot module shows up


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and "no such file or folder" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_inspect_cli_on_a_sharded_folder(tiny_base, tmp_path):
    ck = Checkpoint.open(tiny_base)
    out = tmp_path / "sharded"
    with CheckpointWriter(
        out, [(n, i.dtype, i.shape) for n, i in ck.infos.items()], folder=True, shard_bytes=30_000, reference=tiny_base
    ) as w:
        for name in ck.names:
            w.write(name, ck.tensor(name))
    r = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data["shards"]) > 1 and data["parameters"] == ck.numel and data["has_config"]


def test_writer_in_any_order_places_every_tensor_and_refuses_a_missing_one(tiny_base, tmp_path):
    """`any_order` (fusion's workers): tensors arrive in any order, each lands in its planned shard and place."""
    ck = Checkpoint.open(tiny_base)
    plan = [(n, i.dtype, i.shape) for n, i in ck.infos.items()]
    out = tmp_path / "any"
    with CheckpointWriter(out, plan, folder=True, shard_bytes=20_000, any_order=True) as w:
        for name in reversed(ck.names):
            w.write_chunks(name, iter(ck.tensor(name).reshape(-1).split(1000)))
    got = Checkpoint.open(out)
    assert len(got.files) > 1 and all(torch.equal(got.tensor(n), ck.tensor(n)) for n in ck.names)
    with pytest.raises(RuntimeError, match="1 tensors never written"):
        with CheckpointWriter(tmp_path / "short", plan, folder=True, any_order=True) as w:
            for name in ck.names[1:]:
                w.write(name, ck.tensor(name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["any"]


@pytest.mark.parametrize("any_order", [False, True])
def test_writer_metadata_given_as_a_callable_is_resolved_at_commit_into_every_shard(tiny_base, tmp_path, any_order):
    """fuse and merge pass their base record (with the base's content fingerprint, hashed during the pass)
    as a callable: it is called once, after every tensor is written, and lands in every shard's header and
    the index, the shards already closed by then included; when it fails, nothing is left behind."""
    ck = Checkpoint.open(tiny_base)
    plan = [(n, i.dtype, i.shape) for n, i in ck.infos.items()]
    written: list[str] = []
    calls: list[int] = []

    def late() -> dict[str, str]:
        calls.append(len(written))
        return {"base_model": "x" * 3000, "base_fingerprint": "sha256-tensors-v1:" + "f" * 64}

    out = tmp_path / "late"
    with CheckpointWriter(out, plan, folder=True, shard_bytes=20_000, metadata=late, any_order=any_order) as w:
        for name in ck.names:
            w.write(name, ck.tensor(name))
            written.append(name)
    assert calls == [len(ck.names)]  # once, after the last tensor
    got = Checkpoint.open(out)
    assert len(got.files) > 1 and all(torch.equal(got.tensor(n), ck.tensor(n)) for n in ck.names)
    for f in got.files:
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt", **late()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["base_fingerprint"] == late()["base_fingerprint"]

    def failing() -> dict[str, str]:
        raise CheckpointError("the base changed while it was read")

    with pytest.raises(CheckpointError, match="changed while"):
        with CheckpointWriter(tmp_path / "failed", plan, folder=True, shard_bytes=20_000, metadata=failing) as w:
            for name in ck.names:
                w.write(name, ck.tensor(name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late"]
