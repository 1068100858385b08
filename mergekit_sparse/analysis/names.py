"""Parse Hugging Face tensor names into layer index and module type (for breakdowns)."""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_SUFFIX = re.compile(r"\.(weight|bias)$")


def layer_of(name: str) -> int | None:
    """The transformer block index in a tensor name (`model.layers.3.mlp...` -> 3), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """The module type: the last name part before `.weight`/`.bias` (`q_proj`, `embed_tokens`, ...).

    Names with no recognisable module part fall into "other".
    """
    stem = _SUFFIX.sub("", name)
    part = stem.rsplit(".", 1)[-1]
    if not part or part.isdigit():
        return "other"
    return part


def layer_key(name: str) -> str:
    layer = layer_of(name)
    return str(layer) if layer is not None else "other"
