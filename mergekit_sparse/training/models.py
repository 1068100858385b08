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
