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
    """The breakdown key of a tensor: its block index as text, or "other" (embeddings, final norm, head)."""
    layer = layer_of(name)
    return str(layer) if layer is not None else "other"


def layer_order(key: str) -> tuple[bool, int, str]:
    """Sort key for layer keys: numeric order (0, 1, 2, …, 10), "other" last; the one order of every
    per-layer table and figure."""
    return (not key.isdigit(), int(key) if key.isdigit() else 0, key)


def sorted_layers(per_layer: dict) -> dict:
    """`per_layer` (keyed by `layer_key`) in `layer_order`."""
    return dict(sorted(per_layer.items(), key=lambda kv: layer_order(kv[0])))


def layer_label(key: str) -> str:
    """How a layer key reads on an axis: "layer 3", or "outside the blocks" for "other"."""
    return f"layer {key}" if key.isdigit() else "outside the blocks"
