"""Load a model folder for training, gradients and evaluation (transformers, never remote code)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..storage import modelcard


def model_folder(spec: str | Path):
    """(folder, checkpoint) of a model given as a folder or a cached Hub id, the same way every command takes
    one; a bare .safetensors file has no config or tokenizer, and causal-LM work needs both."""
    from ..storage.checkpoint import Checkpoint

    ck = Checkpoint.open(spec)  # validates the weights with our clear errors first; resolves Hub ids
    if ck.folder is None or ck.config is None:
        raise CheckpointError(
            f"{spec}: not a model folder (no config.json); training, gradients and evaluation need a "
            "Hugging Face folder (or a cached Hub id) with its config and tokenizer"
        )
    if not modelcard.is_causal_lm(ck.config):
        raise CheckpointError(
            f"{spec}: the architecture is {modelcard.architecture(ck.config)}, not a causal language model; "
            "train, retrain, gradients and eval need a *ForCausalLM model (inspect, core, overlap, fuse and "
            "gallop work on any architecture)"
        )
    return ck.folder, ck


def load_model(spec: str | Path, *, dtype=None):
    """(model, tokenizer) from an HF folder or cached Hub id; the tokenizer must be in the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, _ = model_folder(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{spec}: cannot load the tokenizer ({type(e).__name__}); the folder needs "
            "tokenizer.json / tokenizer_config.json"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=False, dtype=dtype if dtype is not None else "auto"
        )
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unusable folders
        raise CheckpointError(
            f"{spec}: transformers cannot build a causal LM from this folder "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); remote code is never run"
        ) from None
    if tokenizer.eos_token_id is None:
        raise CheckpointError(
            f"{spec}: the tokenizer has no end-of-sequence token, which training and generation need to end a "
            "response; set eos_token in tokenizer_config.json"
        )
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

    _, ck = model_folder(folder)
    codes = [i.code for i in ck.infos.values() if i.is_float]
    stored = max(set(codes), key=codes.count) if codes else "F32"
    from ..storage import dtypes

    stored_dtype = dtypes.torch_dtype(stored)
    compute = torch.float32 if stored in ("BF16", "F16") and not torch.cuda.is_available() else None
    model, tok = load_model(folder, dtype=compute)
    return model, tok, stored_dtype


def saved_state(model) -> dict:
    """The state dict as `save_pretrained` stores it (METHODS §1): a tied head is an alias of the embedding
    and is left out (the config's `tie_word_embeddings` re-ties it on load); untied heads stay."""
    sd = model.state_dict()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    aliases = set(keys) if isinstance(keys, (dict, list, tuple, set)) else set()
    kept: dict = {}
    owners: dict = {}
    for name in sorted(sd, key=lambda n: (n in aliases, n)):  # aliases last: the embedding owns the storage
        t = sd[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in owners and name in aliases:
            continue
        owners.setdefault(key, name)
        kept[name] = t
    return dict(sorted(kept.items()))
