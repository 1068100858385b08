"""Which tensors take part (METHODS §1): floating tensors present with identical shape in
every checkpoint, narrowed by include/exclude regular expressions on tensor names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import MismatchError, OptionError
from .checkpoint import Checkpoint
from .modelcard import HEAD_NAMES


@dataclass(frozen=True)
class Scope:
    """Tensor names in scope (sorted: the order of every pass and of the tie rule) and their shapes."""

    shapes: dict[str, tuple[int, ...]]
    copied: tuple[str, ...] = ()  # in the checkpoints but not selected (ints, excluded)
    dtype_differences: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # integer/bool buffers some inputs lack (METHODS §1: a warning; copied from the fusion base when it has them)
    missing_buffers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # each tensor's rank for the tie hash (METHODS §2): its 0-based position among every floating
    # tensor of the first checkpoint (the base), sorted, whatever the include/exclude patterns say
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        sizes = {n: _prod(s) for n, s in self.shapes.items()}
        object.__setattr__(self, "_sizes", sizes)
        object.__setattr__(self, "_total", sum(sizes.values()))
        if not self.ranks:  # scopes built by hand (tests): rank by sorted name in scope
            object.__setattr__(self, "ranks", {n: i for i, n in enumerate(sorted(self.shapes))})

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def numel(self, name: str | None = None) -> int:
        """Entries of one tensor, or of the whole scope (both precomputed: drivers ask per tensor)."""
        return self._sizes[name] if name is not None else self._total

    def to_json(self) -> dict:
        return {
            "tensors": len(self.shapes),
            "parameters": self.numel(),
            "copied": list(self.copied),
            "dtype_differences": {k: list(v) for k, v in self.dtype_differences.items()},
            "missing_buffers": {k: list(v) for k, v in self.missing_buffers.items()},
        }

    @property
    def warnings(self) -> list[str]:
        return [
            f"buffer '{name}' is missing from {', '.join(paths)}; it is not a parameter (never selected) and is "
            "copied from the fusion base when the base has it"
            for name, paths in self.missing_buffers.items()
        ]


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _compile(patterns: tuple[str, ...] | list[str], flag: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise OptionError(f"{flag} {p!r} is not a valid regular expression ({e})") from None
    return out


def name_filter(include=(), exclude=()):
    """A predicate on tensor names: matches some include (all when none given) and no exclude."""
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")

    def keep(name: str) -> bool:
        return (not inc or any(p.search(name) for p in inc)) and not any(p.search(name) for p in exc)

    return keep


def align(checkpoints: list[Checkpoint], *, include=(), exclude=(), allow_empty: bool = False) -> Scope:
    """Check that the checkpoints line up and return the scope.

    Missing tensors and shape differences are errors naming the tensor and both files, unless
    the tensor is excluded. Dtype differences are allowed (computation is float32) and recorded.
    """
    keep = name_filter(include, exclude)
    first = checkpoints[0]
    tied = next((c for c in checkpoints if c.tied_embedding), None)
    if tied is not None:  # a bare file beside a tied model: its stored head is an alias too (METHODS §1)
        for c in checkpoints:
            c.adopt_ties(tied)
    all_names = sorted(set().union(*(c.infos for c in checkpoints)))
    shapes: dict[str, tuple[int, ...]] = {}
    copied, dtype_diff, missing_buffers = [], {}, {}
    for name in all_names:
        if not keep(name):
            copied.append(name)
            continue
        owners = [c for c in checkpoints if name in c.infos]
        if len(owners) != len(checkpoints):
            lacking = [c for c in checkpoints if name not in c.infos]
            if not owners[0].infos[name].is_float:  # an integer buffer (position_ids): METHODS §1
                missing_buffers[name] = tuple(str(c.path) for c in lacking)
                copied.append(name)
                continue
            missing = lacking[0]
            why = ""
            if missing.tied_embedding and name in HEAD_NAMES:
                why = (
                    f" ({missing.path} ties the head to '{missing.tied_embedding}' but {owners[0].path} stores "
                    "it with other values: it was trained untied)"
                )
            raise MismatchError(
                f"tensor '{name}' is in {owners[0].path} but missing from {missing.path}{why}; "
                f"exclude it with --exclude '{re.escape(name)}' if that is intended"
            )
        infos = [c.infos[name] for c in checkpoints]
        ref = infos[0]
        for c, info in zip(checkpoints, infos):
            if info.shape != ref.shape:
                raise MismatchError(
                    f"shape mismatch for '{name}': {first.path} {list(ref.shape)} vs "
                    f"{c.path} {list(info.shape)}; the checkpoints are not fine-tunes of "
                    "one model (resize the vocabulary first, or exclude the tensor)"
                )
            if info.is_float != ref.is_float:
                raise MismatchError(
                    f"dtype mismatch for '{name}': {first.path} {ref.dtype_name} vs {c.path} "
                    f"{info.dtype_name} (one floating, one not)"
                )
        if not ref.is_float or ref.numel == 0:  # nothing to select in an empty tensor
            copied.append(name)
            continue
        dtypes = {i.dtype_name for i in infos}
        if len(dtypes) > 1:
            dtype_diff[name] = tuple(i.dtype_name for i in infos)
        shapes[name] = ref.shape
    if not shapes and not allow_empty:
        raise OptionError("no tensor is in scope: the include/exclude patterns leave nothing to select")
    ranks = {n: i for i, n in enumerate(sorted(n for n, info in first.infos.items() if info.is_float))}
    missing = [n for n in shapes if n not in ranks]  # a floating tensor the first checkpoint lacks: cannot be
    if missing:
        raise RuntimeError(f"tensors {missing[:3]} in scope have no rank; this is a bug")
    return Scope(shapes, tuple(copied), dtype_diff, missing_buffers=missing_buffers, ranks=ranks)
