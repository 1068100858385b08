"""Load a model folder for training, gradients and evaluation (transformers, never remote code)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError


def load_model(folder: str | Path, *, dtype=None):
    """(model, tokenizer) from an HF folder; the tokenizer must be in the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: not a model folder (no config.json); training, gradients and "
            "evaluation need a Hugging Face folder with its config and tokenizer"
        )
    from ..storage.checkpoint import Checkpoint

    Checkpoint.open(folder)  # validates the weights with our clear errors first
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{folder}: cannot load the tokenizer ({type(e).__name__}); the folder needs "
            "tokenizer.json / tokenizer_config.json"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=False, dtype=dtype if dtype is not None else "auto"
        )
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unusable folders
        raise CheckpointError(
            f"{folder}: transformers cannot build a causal LM from this folder "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); remote code is never run"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    return model, tokenizer


def load_for_training(folder: str | Path):
    """(model, tokenizer, stored dtype) for training: low-precision weights (bf16, fp16) are computed in
    float32 on a CPU, where bf16 matrix products are an order of magnitude slower (56 s against 4.6 s
    for one step of a 135 M model on one thread), and saved back in their stored dtype; every frozen
    entry survives the float32 round trip bit for bit, and updates are not rounded away between steps."""
    import torch

    from ..storage.checkpoint import Checkpoint

    ck = Checkpoint.open(folder)
    codes = [i.code for i in ck.infos.values() if i.is_float]
    stored = max(set(codes), key=codes.count) if codes else "F32"
    from ..storage import dtypes

    stored_dtype = dtypes.torch_dtype(stored)
    compute = torch.float32 if stored in ("BF16", "F16") and not torch.cuda.is_available() else None
    model, tok = load_model(folder, dtype=compute)
    return model, tok, stored_dtype
