"""Packed-bit parameter masks (METHODS §3).

On disk a mask set is `*.mask.safetensors`: one uint8 tensor per parameter tensor holding
the mask bits packed with `numpy.packbits` (big-endian bit order, padded to a whole byte),
and `__metadata__["mergekit_sparse"]` holding JSON with the format version, every tensor's
shape, the criterion, the percentage, the number selected, the threshold and the sources.
Mask files are read lazily, one tensor at a time, like checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, MismatchError
from .atomic import AtomicPath, Committable, dumps, os_error
from .checkpoint import Checkpoint, read_header
from .writer import SafetensorsStream, check_output

FORMAT_VERSION = 2  # 2: sources carry content fingerprints (METHODS §3); tie_rule, tie_seed, tie bits
META_KEY = "mergekit_sparse"
TIE_PREFIX = "__ties__."  # the tie-pick bits of a tensor (optional, see MaskWriter)


def pack(mask) -> np.ndarray:
    """Bool array or tensor of any shape -> packed uint8 array of ceil(n / 8) bytes."""
    flat = mask.reshape(-1)
    return np.packbits((flat if isinstance(flat, np.ndarray) else flat.numpy()).astype(bool, copy=False))


def unpack_bits(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    return np.unpackbits(packed, count=n).view(bool).reshape(shape)


def unpack(packed: np.ndarray, shape: tuple[int, ...]):
    import torch

    return torch.from_numpy(unpack_bits(packed, shape))


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def popcount(packed: np.ndarray) -> int:
    """Set bits in a packed array (numpy's bitwise_count where it exists, else a byte table)."""
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(_POPCOUNT[packed].sum()) if packed.size else 0


def packed_size(shape: tuple[int, ...]) -> int:
    return (int(np.prod(shape, dtype=np.int64)) + 7) // 8


class MaskSet:
    """A lazily read mask file: `shapes`, `meta`, and per-tensor `packed(name)` / `bool(name)`."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], meta: dict):
        self.path, self.shapes, self.meta = Path(path), dict(sorted(shapes.items())), meta
        self._file: Checkpoint | None = None  # the packed bits, read like any checkpoint

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: mask file not found")
        infos, metadata, raw = read_header(path)
        try:
            meta = json.loads(metadata[META_KEY])
            shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        except (KeyError, ValueError, TypeError):
            raise CheckpointError(
                f"{path}: not a mergekit-sparse mask file (no '{META_KEY}' metadata); "
                "create masks with `sparsemerge core` or `sparsemerge gallop`"
            ) from None
        version = meta.get("format_version", 0) if isinstance(meta, dict) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise CheckpointError(f"{path}: mask metadata has format_version {version!r}; expected an integer")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for s in shapes.values() for d in s):
            raise CheckpointError(
                f"{path}: mask metadata has a malformed shape; expected lists of non-negative integers"
            )
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: mask format version {meta['format_version']} is newer than this "
                f"tool's ({FORMAT_VERSION}); upgrade mergekit-sparse"
            )
        for name, shape in shapes.items():
            for stored in (name, TIE_PREFIX + name) if meta.get("tie_bits") else (name,):
                info = infos.get(stored)
                if info is None or info.code != "U8" or info.numel != packed_size(shape):
                    raise CheckpointError(f"{path}: tensor '{stored}' is missing or has the wrong packed size")
        out = cls(path, shapes, meta)
        out._file = Checkpoint(path, infos, folder=None, headers={path: raw}, label=path.name)
        return out

    @property
    def label(self) -> str:
        return self.meta.get("task") or self.path.name.removesuffix(".mask.safetensors").removesuffix(".safetensors")

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def has_tie_bits(self) -> bool:
        """Whether the file says which entries the tie rule picked (masks from `core`)."""
        return bool(self.meta.get("tie_bits"))

    def tie_packed(self, name: str) -> np.ndarray:
        """The packed bits of the entries of `name` picked among ties at the threshold."""
        if not self.has_tie_bits:
            raise RuntimeError(f"{self.path} has no tie bits; this is a bug")
        return self.packed(TIE_PREFIX + name)

    @property
    def tie_rule(self) -> str:
        """How ties at the threshold were broken: "hash" (METHODS §2, with `tie_seed`), or "name-order"
        for masks written before the hash rule (sorted tensor name, then flat index)."""
        return self.meta.get("tie_rule", "name-order")

    def numel(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes.values())

    def packed(self, name: str) -> np.ndarray:
        """The packed bits of one tensor, read-only over the memory-mapped file (no copy)."""
        if self._file is None:
            self._file = Checkpoint.open(self.path)
        return self._file.array(name)

    def bits(self, name: str) -> np.ndarray:
        """One tensor's mask as a numpy bool array."""
        return unpack_bits(self.packed(name), self.shapes[name])

    def bool(self, name: str):
        """One tensor's mask as a torch bool tensor."""
        return unpack(self.packed(name), self.shapes[name])

    def count(self, name: str | None = None) -> int:
        if name is not None:
            return popcount(self.packed(name))
        return sum(popcount(self.packed(n)) for n in self.names)

    def check_fits(self, shapes: dict[str, tuple[int, ...]], where) -> None:
        """Raise unless this mask covers exactly the given tensors with the same shapes."""
        missing = [n for n in shapes if n not in self.shapes]
        extra = [n for n in self.shapes if n not in shapes]
        if missing or extra:
            what = f"has no mask for '{missing[0]}'" if missing else f"masks '{extra[0]}', which is not in scope"
            raise MismatchError(
                f"mask {self.path} does not fit {where}: it {what} ({len(missing)} missing, "
                f"{len(extra)} extra); was it made for another model or another scope?"
            )
        for n, s in shapes.items():
            if tuple(self.shapes[n]) != tuple(s):
                raise MismatchError(
                    f"mask {self.path} does not fit {where}: '{n}' is {list(self.shapes[n])} "
                    f"in the mask but {list(s)} in the model; it was made for another model"
                )


class MaskWriter(Committable):
    """Stream a mask set to disk tensor by tensor (header first, atomic rename at the end).

    With `tie_bits`, every tensor is followed by `TIE_PREFIX + name`: the bits of the entries that the
    METHODS §2 tie rule picked (equal to the threshold), so `overlap` can also report S over the
    strict cores (§4); write them with `write_ties_packed` after each tensor's mask.
    """

    def __init__(
        self,
        out: Path,
        shapes: dict[str, tuple[int, ...]],
        meta: dict,
        *,
        force: bool = False,
        inputs: list[Path] = (),
        tie_bits: bool = False,
    ):
        self.out = Path(out)
        check_output(self.out, list(inputs), force=force)
        self.shapes = shapes = dict(sorted(shapes.items()))  # written in sorted-name order
        meta = {
            "format_version": FORMAT_VERSION,
            "tie_rule": "hash",
            **meta,
            "shapes": {n: list(s) for n, s in shapes.items()},
        }
        if tie_bits:
            meta["tie_bits"] = True
        # masks first, written in order; tie bits after them, written only where a chunk has some (the
        # rest are holes: most tensors of most cores have no tie pick)
        plan = [(n, "U8", (packed_size(s),)) for n, s in shapes.items()]
        plan += [(TIE_PREFIX + n, "U8", (packed_size(s),)) for n, s in shapes.items()] if tie_bits else []
        self._atomic = AtomicPath(self.out, force=force, is_dir=False)
        self.meta = meta
        self._stream = SafetensorsStream(self._atomic.tmp, plan, {META_KEY: dumps(meta, indent=None)}, reserve=2048)
        self._patches: list[tuple[str, np.ndarray]] = []
        self._cleared: list[str] = []
        self._ties_written: list[str] = []
        self._tie_bits = tie_bits

    def write(self, name: str, mask) -> None:
        self.write_packed(name, pack(mask))

    def write_packed(self, name: str, packed: np.ndarray) -> None:
        try:
            self._stream.write(name, np.asarray(packed, dtype=np.uint8))
        except OSError as e:
            raise os_error(e, self.out) from None

    def write_packed_at(self, name: str, packed: np.ndarray) -> None:
        """`write_packed` in any order and from any thread (positioned writes)."""
        try:
            self._stream.write_at(name, [np.asarray(packed, dtype=np.uint8)])
        except OSError as e:
            raise os_error(e, self.out) from None

    def update_meta(self, **fields) -> None:
        """Metadata known only once the data is written (the threshold): rewritten before commit."""
        self.meta.update(fields)
        self._stream.set_metadata({META_KEY: dumps(self.meta, indent=None)})

    def write_ties_packed(self, name: str, packed: np.ndarray) -> None:
        """The packed tie-pick bits of `name` (any time after the file is opened; all-zero bits are not
        written at all)."""
        packed = np.asarray(packed, dtype=np.uint8)
        if not packed.any():  # (the hash spreads tie picks over a tensor: some byte of most pages is set)
            return
        try:
            self._stream.write_at(TIE_PREFIX + name, [packed])
        except OSError as e:
            raise os_error(e, self.out) from None
        self._ties_written.append(TIE_PREFIX + name)

    def clear_ties(self) -> None:
        """Zero every tie tensor written so far (before the patches: the threshold was not where the
        counting pass's preliminary tie bits assumed)."""
        self._cleared = list(self._ties_written)

    def set_bits(self, name: str, positions: np.ndarray) -> None:
        """Also select these flat positions of `name` (applied to the file before it is committed)."""
        self._patches.append((name, np.asarray(positions, dtype=np.int64)))

    def _apply_patches(self) -> None:
        if not self._patches and not self._cleared:
            return
        mm = np.memmap(self._atomic.tmp, dtype=np.uint8, mode="r+")
        for name in self._cleared:
            at = self._stream.data_start + self._stream.offsets[name]
            mm[at : at + packed_size(self.shapes[name.removeprefix(TIE_PREFIX)])] = 0
        for name, pos in self._patches:
            pos = ascending(pos)
            byte = pos // 8
            bits = (1 << (7 - pos % 8)).astype(np.uint8)  # packbits is big-endian
            first = np.flatnonzero(np.concatenate(([True], byte[1:] != byte[:-1])))
            where = self._stream.data_start + self._stream.offsets[name] + byte[first]
            mm[where] |= np.bitwise_or.reduceat(bits, first)  # the bits of each byte at once
        del mm  # left to the page cache like every other write (no msync)

    def _finish(self) -> None:
        if self._tie_bits:
            self._stream.leave_holes(TIE_PREFIX + n for n in self.shapes)
        self._stream.close()
        self._apply_patches()

    def commit(self) -> Path:
        """Finish the file (patches applied) and put it in place."""
        return self._atomic.commit_after(self._finish)

    def finish(self) -> AtomicPath:
        """Finish the file without putting it in place: the returned temporary is committed with the other
        outputs of the command as one (`atomic.commit_together`)."""
        try:
            self._finish()
        except OSError as e:
            self.discard()
            raise os_error(e, self.out) from None
        except BaseException:
            self.discard()
            raise
        return self._atomic

    def discard(self) -> None:
        """Drop the unfinished file (nothing is left behind)."""
        self._stream.abort()
        self._atomic.discard()


def ascending(pos: np.ndarray) -> np.ndarray:
    """`pos` sorted, without sorting what is sorted already (positions mostly arrive sorted: a check is one
    pass, a sort several)."""
    return pos if pos.size < 2 or bool((pos[1:] >= pos[:-1]).all()) else np.sort(pos)


def save_masks(out: Path, masks: dict, meta: dict, *, force: bool = False) -> Path:
    """Write in-memory boolean masks (small models, tests, training) as a mask file."""
    with MaskWriter(out, {n: tuple(m.shape) for n, m in masks.items()}, meta, force=force) as w:
        for name in sorted(masks):
            w.write(name, masks[name])
    return Path(out)
