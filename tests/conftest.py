"""Fixtures: tiny real checkpoints built in seconds (no download, no mocks)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ["HF_HUB_OFFLINE"] = "1"
# content fingerprints are cached per file (METHODS §3): in a folder of the test run, never the user's
os.environ["SPARSEMERGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsemerge-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)


def perturb_folder(
    src: Path, dst: Path, *, seed: int, scale: float = 0.01, hot: str | None = None, hot_scale: float = 0.5
) -> Path:
    """Copy an HF folder with every float tensor moved by small noise, and tensors matching `hot` moved a lot."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(src / "model.safetensors")
    for name, t in sd.items():
        if t.is_floating_point():
            s = hot_scale if (hot and hot in name) else scale
            sd[name] = (t.float() + s * torch.randn(t.shape, generator=g)).to(t.dtype)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from mergekit_sparse.builtin.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "base", seed=0, hidden=32, layers=2)


@pytest.fixture(scope="session")
def tiny_tasks(tiny_base, tmp_path_factory) -> list[Path]:
    """Three fine-tunes of tiny_base: two share hot layer 0 attention, one has hot layer 1 MLP."""
    root = tmp_path_factory.mktemp("tasks")
    return [
        perturb_folder(tiny_base, root / "math", seed=1, hot="layers.0.self_attn"),
        perturb_folder(tiny_base, root / "code", seed=2, hot="layers.0.self_attn"),
        perturb_folder(tiny_base, root / "chat", seed=3, hot="layers.1.mlp"),
    ]


def write_planted(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


@pytest.fixture
def planted(tmp_path) -> dict[str, Path]:
    """Bare safetensors files whose core regions can be checked by eye.

    base is all ones; task `a` moves b.w[0, :2] by 5 and a.w[1] by 3; task `b` moves a.w[1] by 4.
    """
    base = {"a.w": torch.ones(2, 3), "b.w": torch.ones(3, 2), "n.steps": torch.tensor([7])}
    a = {k: v.clone() for k, v in base.items()}
    b = {k: v.clone() for k, v in base.items()}
    a["b.w"][0, :2] += 5
    a["a.w"][1, 1] += 3
    b["a.w"][1, 1] += 4
    return {
        "base": write_planted(tmp_path / "base.safetensors", base),
        "a": write_planted(tmp_path / "a.safetensors", a),
        "b": write_planted(tmp_path / "b.safetensors", b),
    }
