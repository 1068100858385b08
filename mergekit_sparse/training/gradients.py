"""Mean gradients of the task loss at a model (GaLLoP's selection signal, METHODS §7).

g = Σ_b (n_b / N) ∇L_b over the batches b of a seeded subset of N examples, where L_b is the mean
loss over the response tokens of batch b: the per-batch gradients averaged, weighted by batch size.
Gradients accumulate in place in the parameters' `.grad` (one batch's activations at a time).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DataError, NonFiniteError, OptionError
from ..storage.checkpoint import Checkpoint
from ..storage.writer import CheckpointWriter
from .data import collate, encode, file_sha256, read_jsonl, seeded_subset
from .models import load_model


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def mean_gradient(
    model,
    tokenizer,
    records: list[dict],
    indices: list[int],
    *,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """{parameter name: float32 mean gradient}, from the examples `indices` in that order."""
    from .data import lm_loss

    model.train(False)  # deterministic: no dropout
    model.zero_grad(set_to_none=True)
    N = len(indices)
    for idx in tqdm(batches(indices, batch_size), desc="gradients", disable=not progress, leave=False):
        batch = collate([encode(tokenizer, records[i], max_len) for i in idx], tokenizer.pad_token_id)
        loss = lm_loss(model, batch) * (len(idx) / N)
        loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if not torch.isfinite(g).all():
            raise NonFiniteError(f"the gradient of '{name}' holds NaN/Inf; check the model and data")
        grads[name] = g.detach().float()
    model.zero_grad(set_to_none=True)
    return grads


def compute_gradients(
    model_dir: str,
    data: str,
    out: Path,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 8,
    max_len: int | None = 256,
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Compute and save the mean gradient as float32 safetensors with metadata; returns the metadata."""
    if not 0 < fraction <= 1:
        raise OptionError(f"--fraction {fraction} is out of range; give a share in (0, 1], e.g. 0.1")
    if batch_size < 1:
        raise OptionError(f"--batch-size {batch_size} must be at least 1")
    records = read_jsonl(data)
    ck = Checkpoint.open(model_dir)
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    indices = seeded_subset(len(records), fraction=fraction, seed=seed)
    meta = {
        "kind": "mean_gradient",
        "model": str(model_dir),
        "model_fingerprint": ck.content_fingerprint(),
        "data": str(data),
        "data_sha256": file_sha256(data),
        "fraction": str(fraction),
        "seed": str(seed),
        "examples": str(len(indices)),
        "batch_size": str(batch_size),
        "max_len": str(max_len),
        "loss": "mean over response tokens per batch, batches weighted by size",
    }
    from ..storage.writer import check_output

    check_output(out, [ck.path, Path(data)], force=force)
    grads = mean_gradient(model, tokenizer, records, indices, batch_size=batch_size, max_len=max_len, progress=progress)
    if all(not bool(g.any()) for g in grads.values()):
        raise DataError(
            f"every gradient entry is zero: no sampled example of {data} kept a response token within --max-len "
            f"{max_len} (or the loss does not depend on the weights); raise --max-len or check the data"
        )
    names = sorted(n for n in grads if n in ck.infos)
    plan = [(n, torch.float32, tuple(grads[n].shape)) for n in names]
    with CheckpointWriter(out, plan, folder=False, metadata=meta, inputs=[ck.path], force=force) as w:
        for n in names:
            w.write(n, grads[n])
    return meta
