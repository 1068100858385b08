"""Post-merge sanity check: the model folder loads with transformers and gives finite logits."""

from __future__ import annotations

from pathlib import Path

from ..errors import NonFiniteError


def check_model_folder(folder: Path) -> dict:
    """Load `folder` with AutoModelForCausalLM (no remote code) and run one short forward pass."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any load failure means the output is not a usable model
        raise NonFiniteError(
            f"the output in {folder} does not load with transformers ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); pass --no-check to skip this check"
        ) from None
    vocab = model.config.vocab_size
    ids = torch.arange(min(8, vocab)).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, T, V)
    if not torch.isfinite(logits).all():
        raise NonFiniteError(f"the output in {folder} loads but gives NaN/Inf logits; the merge is broken")
    return {"loads": True, "finite_logits": True, "logits_shape": list(logits.shape)}
