"""Post-merge sanity check: the model folder loads with its architecture's own transformers class, every
weight it expects is there and nothing else, and one short forward pass gives finite outputs."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, NonFiniteError
from ..storage import modelcard


def model_class(config: dict | None):
    """The transformers class the config names (`architectures[0]`), AutoModelForCausalLM when it names none;
    an architecture this transformers does not know is an error naming it."""
    import transformers

    arch = modelcard.architecture(config)
    if arch is None:
        return transformers.AutoModelForCausalLM
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise CheckpointError(
            f"config.json names the architecture {arch}, which transformers {transformers.__version__} does not "
            "provide (remote code is never run); pass --no-check to skip this check"
        )
    return cls


def check_model_folder(folder: Path) -> dict:
    """Load `folder` with its architecture's class (no remote code); missing, unexpected or mismatched keys
    are errors; one short forward pass must give finite outputs."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = modelcard.read_config(folder)
    cls = model_class(config)
    try:
        model, info = cls.from_pretrained(folder, trust_remote_code=False, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any load failure means the output is not a usable model
        raise NonFiniteError(
            f"the output in {folder} does not load with transformers' {cls.__name__} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); pass --no-check to skip this check"
        ) from None
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}" for k, v in problems.items())
        raise CheckpointError(
            f"the output in {folder} does not match its architecture {cls.__name__} ({detail}); "
            "the merge dropped or renamed weights"
        )
    vocab = getattr(model.config, "vocab_size", None) or 8
    ids = torch.arange(min(8, vocab)).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        out = model(input_ids=ids)
    first = out.logits if getattr(out, "logits", None) is not None else out[0]
    if not torch.isfinite(first).all():
        raise NonFiniteError(f"the output in {folder} loads but gives NaN/Inf outputs; the merge is broken")
    report = {"loads": True, "class": cls.__name__, "finite_outputs": True, "output_shape": list(first.shape)}
    tied = modelcard.tie_flag(config)
    if tied and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        report["tied"] = head.data_ptr() == emb.data_ptr()
        if not report["tied"]:
            raise NonFiniteError(f"the output in {folder} says its head is tied, but transformers did not tie it")
    return report
