"""What a model folder says about itself without importing transformers: its `config.json`
(architecture, tied embeddings) and its model card's `base_model:` (METHODS §1 and §9).

Tied weights (METHODS §1): when the config ties the output head to the input embedding, the head is
an alias of the embedding. The names are the ones transformers' architectures use (`_tied_weights_keys`);
they are listed here because importing transformers costs seconds that tensor-level commands
(`inspect`, `core`, `fuse`) should not pay.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError

# output heads that architectures tie to their input embedding, and the embeddings' name endings
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight", "cls.predictions.decoder.weight")
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_config(folder: Path | None) -> dict | None:
    """The folder's `config.json` as a dict, None when there is none; a malformed one is an error."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    path = folder / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for a model config")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable JSON model config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a model config must be a JSON object")
    return config


def architecture(config: dict | None) -> str | None:
    """The model class named by the config (`architectures[0]`), None when it names none."""
    archs = (config or {}).get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def is_causal_lm(config: dict | None) -> bool:
    arch = architecture(config)
    return arch is None or arch.endswith(CAUSAL_SUFFIXES)


def tie_flag(config: dict | None) -> bool | None:
    """True/False when the config says whether the head is tied, None when it does not say (transformers'
    own default is tied; a stored head that differs from the embedding is then simply untied)."""
    if config is None:
        return None
    flag = config.get("tie_word_embeddings")
    if flag is None and isinstance(config.get("text_config"), dict):  # multimodal configs nest it
        flag = config["text_config"].get("tie_word_embeddings")
    return flag if isinstance(flag, bool) else None


def embedding_name(names) -> str | None:
    """The input embedding among `names` (the first by the suffix order above), None when there is none."""
    for suffix in EMBEDDING_SUFFIXES:
        hits = sorted(n for n in names if n == suffix or n.endswith("." + suffix))
        if hits:
            return hits[0]
    return None


# -- model cards (METHODS §9) -------------------------------------------------------------------------
_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)


def card_base_models(folder: Path) -> list[str] | None:
    """`base_model:` from the YAML front matter of the folder's README.md: a list of strings (one for a
    plain string), None when there is no card or no `base_model:` entry."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    try:
        text = card.read_text(encoding="utf-8", errors="replace")[: 1 << 20]
    except OSError:
        return None
    m = _FRONT.match(text)
    if not m:
        return None
    import yaml

    try:
        front = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        raise CheckpointError(f"{card}: the model card's YAML front matter does not parse") from None
    if not isinstance(front, dict) or front.get("base_model") is None:
        return None
    value = front["base_model"]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise CheckpointError(f"{card}: base_model must be a string or a list of strings, found {value!r}")
    return values


def write_card(base_model: str | None, method: str, settings: dict, *, extra: str = "") -> str:
    """A model card (README.md) with `base_model:` in its front matter, the method and its settings."""
    import yaml

    front = {
        "library_name": "transformers",
        "tags": ["mergekit-sparse", re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")],
    }
    if base_model:
        front["base_model"] = base_model
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {method} (mergekit-sparse)", ""]
    if base_model:
        lines.append(f"Made from `{base_model}` by `sparsemerge` ({method}).")
    lines += ["", "Settings:", "", "```json", json.dumps(settings, indent=2, sort_keys=True, default=str), "```"]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"
