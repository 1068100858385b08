"""Finding the base (METHODS §9): the pretrained model the tasks were fine-tuned from, when no `--base`
is given, from each task's own record (safetensors metadata `base_model` + `base_fingerprint`, written by
`train`/`retrain`/`fuse`) or else its Hugging Face model card (`base_model:` in README.md)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MismatchError, OptionError
from . import modelcard
from .checkpoint import Checkpoint, _sole_model_folder

BASE_KEY, FINGERPRINT_KEY = "base_model", "base_fingerprint"


def record_for(base: Checkpoint, out: Path, spec: str | None = None) -> dict[str, str]:
    """The metadata an output records about its base: where it is (relative to the output's folder when the
    two share a tree, absolute otherwise; a Hub id as given) and its content fingerprint."""
    out_folder = Path(out) if Path(out).suffix != ".safetensors" else Path(out).parent
    if spec is None and _looks_like_hub_id(base.label):  # opened from the Hub cache by its id
        spec = base.label
    where = str(spec) if spec is not None and _looks_like_hub_id(spec) and not Path(spec).exists() else None
    if where is None:
        target, here = Path(base.path).resolve(), out_folder.resolve()
        shared = os.path.commonpath([target, here]) != os.path.commonpath([target, Path(target.anchor)])
        # relative when the two share a folder below the root (a tree moved as a whole still finds it)
        where = os.path.relpath(target, here) if shared else str(target)
    return {BASE_KEY: where, FINGERPRINT_KEY: base.content_fingerprint()}


def _looks_like_hub_id(spec: str) -> bool:
    import re

    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(spec))) and not str(spec).startswith(".")


def _open(where: str, relative_to: Path | None, allow_pickle: bool) -> tuple[Checkpoint | None, str]:
    """Open a recorded base: a path (absolute, or relative to the task's folder) or a cached Hub id."""
    candidates = [Path(where)] if Path(where).is_absolute() else []
    if not candidates and relative_to is not None:
        candidates.append(relative_to / where)
    for path in candidates:
        if path.exists():
            return Checkpoint.open(os.path.normpath(path), allow_pickle=allow_pickle), os.path.normpath(path)
    if _looks_like_hub_id(where):
        try:
            return Checkpoint.open(where, allow_pickle=allow_pickle), f"{where} (Hub cache)"
        except Exception:  # noqa: BLE001 - not cached: reported in the list of what was tried
            pass
    return None, str(candidates[0]) if candidates else where


def _task_folder(ck: Checkpoint) -> Path:
    return ck.folder if ck.folder is not None else Path(ck.path).parent


def base_of(task: Checkpoint, *, allow_pickle: bool = False) -> tuple[Checkpoint | None, list[str]]:
    """The base one task names (its record first, then its model card), with what was tried."""
    tried: list[str] = []
    meta = task.metadata
    where = meta.get(BASE_KEY)
    if where:
        base, at = _open(where, _task_folder(task), allow_pickle)
        recorded = meta.get(FINGERPRINT_KEY)
        if base is not None:
            if recorded and base.content_fingerprint() != recorded:
                raise MismatchError(
                    f"{task.path} records its base as {where} with fingerprint {recorded[-16:]}, but {at} has "
                    f"fingerprint {base.content_fingerprint()[-16:]}: the base was changed or replaced since the "
                    "fine-tune was made; pass the right one with --base"
                )
            return base, tried
        tried.append(f"metadata base_model {where!r} of {task.path} (not found at {at})")
    else:
        tried.append(f"no base_model in the safetensors metadata of {task.path}")
    card_folder = task.folder if task.folder is not None else _sole_model_folder(Path(task.path))
    bases = modelcard.card_base_models(card_folder) if card_folder is not None else None
    if bases is None:
        tried.append(f"no model card with base_model: in {card_folder or Path(task.path).parent}")
        return None, tried
    if len(bases) != 1:
        raise OptionError(
            f"{card_folder / 'README.md'} names {len(bases)} base models ({', '.join(bases)}); "
            "pass the one the deltas are against with --base"
        )
    base, at = _open(bases[0], card_folder, allow_pickle)
    if base is None and not Path(bases[0]).is_absolute() and Path(bases[0]).exists():
        base, at = Checkpoint.open(bases[0], allow_pickle=allow_pickle), bases[0]
    if base is None:
        tried.append(f"model card base_model {bases[0]!r} of {card_folder} (not a local path or a cached Hub id)")
    return base, tried


def resolve_base(
    tasks: list[Checkpoint],
    explicit: Checkpoint | None = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    hint: str = "",
) -> tuple[Checkpoint, str]:
    """(base, how it was found). With an explicit base, check it against every task's recorded fingerprint
    (a contradiction is an error unless `force`); without one, find it per METHODS §9."""
    if explicit is not None:
        for t in tasks:
            recorded = t.metadata.get(FINGERPRINT_KEY)
            if recorded and not force and explicit.content_fingerprint() != recorded:
                raise MismatchError(
                    f"--base {explicit.path} is not the base {t.path} was fine-tuned from (it records "
                    f"{t.metadata.get(BASE_KEY)!r}, fingerprint {recorded[-16:]}; --base has "
                    f"{explicit.content_fingerprint()[-16:]}); pass --force to use it anyway"
                )
        return explicit, "given with --base"
    found: list[tuple[Checkpoint, Checkpoint]] = []
    tried: list[str] = []
    for t in tasks:
        base, t_tried = base_of(t, allow_pickle=allow_pickle)
        tried += t_tried
        if base is None:
            raise OptionError(
                f"no base found for {t.path}; tried: {'; '.join(t_tried)}. Pass the pretrained model with --base BASE{hint}"
            )
        found.append((t, base))
    prints = {b.content_fingerprint() for _, b in found}
    if len(prints) > 1:
        detail = ", ".join(f"{t.path} -> {b.path}" for t, b in found)
        raise MismatchError(
            f"the tasks were fine-tuned from different bases ({detail}); pass the one to use with --base"
        )
    base = found[0][1]
    return base, f"found from {found[0][0].path}'s record" if found[0][0].metadata.get(
        BASE_KEY
    ) else "found from the model card"
