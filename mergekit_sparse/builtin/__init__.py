"""The built-in demo model and its tasks: a ~0.9 M-parameter Llama with a character tokenizer,
pre-trained on the synthetic mixture of `tasks.PRETRAIN_TASKS` and shipped in `assets/tiny-base`;
the seeded task generators (`tasks`); a tiny random Llama for fixtures (`tiny`).

This package owns the shipped assets and imports nothing of the library but `errors`.
Regenerate the checkpoint with `python -m mergekit_sparse.builtin` (see `__main__`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

ASSET = Path(__file__).resolve().parent / "assets" / "tiny-base"
ARCH = {"hidden": 128, "layers": 6, "heads": 4, "kv_heads": 2, "intermediate": 256, "max_positions": 64}


def builtin_model() -> Path:
    """The shipped checkpoint folder."""
    if not (ASSET / "model.safetensors").is_file():
        raise CheckpointError(
            f"the built-in model is missing from {ASSET}; reinstall mergekit-sparse or "
            "regenerate it with `python -m mergekit_sparse.builtin`"
        )
    return ASSET
