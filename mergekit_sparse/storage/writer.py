"""Stream tensors out to safetensors files with memory bounded by one tensor.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. Since every
output's names, dtypes and shapes are known before any data is computed, the header can be
written first and tensors appended one by one: the file is byte-for-byte valid safetensors
(read back with `safe_open` in the tests), and memory never holds more than the current tensor.

Outputs go to a temporary sibling path that is renamed into place only when complete, so an
interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import OptionError, OutputError
from . import dtypes
from .atomic import AtomicPath, Committable, os_error, roll_forward, staged_text, write_small
from .checkpoint import INDEX_NAME, SINGLE_NAME

LATE_METADATA_ROOM = 16384  # header bytes kept for metadata given as a callable (paths and fingerprints)
REFERENCE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _input_paths(inputs) -> list[tuple[Path, Path]]:
    """(as given, resolved) for every input and, for a folder, every file in it resolved (a Hub cache
    snapshot's files are links into its blobs: writing over a blob would change the input too)."""
    out = []
    for p in inputs:
        p = Path(p)
        out.append((p, p.resolve()))
        if p.is_dir():
            try:
                files = [f for f in p.iterdir() if f.is_symlink()]
            except OSError:
                files = []
            out += [(p, f.resolve()) for f in files]
    return out


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or b in a.parents or a in b.parents


def check_output(out: Path, inputs: list[Path], *, force: bool, side_files=(), scratch=()) -> None:
    """The one output discipline, before anything is written: the output, its side files (`side_files`,
    e.g. OUT.fuse.json) and the command's scratch folders (`scratch`, e.g. OUT.work) are compared, resolved
    through symbolic links, with every input and with each other: none may be, contain, or lie inside an
    input; no output is written through a symbolic link; an existing output or side file needs `force`."""
    outputs = [Path(out), *map(Path, side_files)]
    for folder in {o.parent for o in outputs}:  # a commit a killed process journaled is finished first
        if folder.is_dir():
            roll_forward(folder)
    ins = _input_paths(inputs)
    seen: dict[Path, Path] = {}
    for o in [*outputs, *map(Path, scratch)]:
        if o.is_symlink():
            raise OutputError(
                f"output {o} is a symbolic link (to {os.readlink(o)}); refusing to write through it: remove the "
                "link or choose another -o path"
            )
        o_r = o.resolve()
        for given, p_r in ins:
            if _overlaps(o_r, p_r):
                raise OutputError(
                    f"output {o} would overwrite or nest inside the input {given}; choose another -o path"
                )
        for other_r, other in seen.items():
            if _overlaps(o_r, other_r):
                raise OutputError(f"two outputs of this command are one path ({other} and {o}); give different paths")
        seen[o_r] = o
    for o in outputs:
        if (o.exists() or o.is_symlink()) and not force:
            raise OutputError(f"output {o} already exists; pass --force to replace it or choose another -o path")
    parent = Path(out).resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            if e.errno == errno.EROFS:
                raise OutputError(
                    f"cannot create the output folder {parent}: it is on a read-only file system; choose another -o path"
                ) from None
            raise OutputError(f"cannot create the output folder {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise OutputError(f"output folder {parent} is on a read-only file system; choose another -o path")
        raise OutputError(f"output folder {parent} is not writable; choose another -o path")


def _fault_injection() -> None:
    """Test hook: MERGEKIT_SPARSE_FAULT=kill:N, enospc:N or erofs:N makes the N-th tensor write of the
    process die by SIGKILL or fail with ENOSPC or EROFS, so the fault tests hit a real mid-write state;
    slow:SECONDS sleeps before every tensor write (a writer that stays mid-write for a race test)."""
    spec = os.environ.get("MERGEKIT_SPARSE_FAULT")
    if not spec:
        return
    kind, _, n = spec.partition(":")
    if kind == "slow":
        import time

        time.sleep(float(n))
        return
    if kind not in ("kill", "enospc", "erofs") or not n.isdigit():
        return  # another hook's spec (kill-commit:K, enospc-text)
    _fault_injection.count = getattr(_fault_injection, "count", 0) + 1
    if _fault_injection.count == int(n):
        if kind == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        code = errno.ENOSPC if kind == "enospc" else errno.EROFS
        raise OSError(code, os.strerror(code))


def _storage(piece, code: str, name: str) -> np.ndarray:
    """One piece of a tensor as a flat numpy array of `code`'s storage dtype: `piece` is such an array,
    or a torch tensor of that dtype."""
    if isinstance(piece, np.ndarray):
        if piece.dtype != dtypes.storage(code):
            raise RuntimeError(f"writer expected {code} for {name}, got numpy {piece.dtype}")  # a caller bug
        return np.ascontiguousarray(piece).reshape(-1)
    import torch

    if dtypes.code_of(piece.dtype) != code:
        raise RuntimeError(f"writer expected {code} for {name}, got {piece.dtype}")  # a caller bug
    return piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy().view(dtypes.storage(code))


def _bytes(piece, code: str, name: str) -> memoryview:
    return memoryview(_storage(piece, code, name).view(np.uint8))


class SafetensorsStream:
    """One safetensors file written header-first; `write` follows the planned order, `write_at` takes
    tensors in any order (positional writes: several threads may each write their own tensors).
    Entries are (name, dtype, shape), the dtype a safetensors code or a torch dtype; pieces written
    are numpy arrays (of the code's storage dtype, see `dtypes`) or torch tensors."""

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, object, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        *,
        reserve: int = 0,
    ):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._order = []
        self.offsets: dict[str, int] = {}
        for name, dtype, shape in entries:
            dtype = dtypes.code_of(dtype)
            n = 1
            for s in shape:
                n *= s
            nbytes = n * dtypes.itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape), nbytes))
            self.offsets[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (reserve + (-(len(raw) + reserve) % 8))  # room to rewrite metadata at close
        self._header = header
        self.path = path
        self.total = offset
        self.data_start = 8 + len(raw)
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0
        self._written: set[str] = set()
        self._sizes = {name: (dtype, nbytes) for name, dtype, _, nbytes in self._order}

    def write(self, name: str, tensor) -> None:
        exp_name, dtype, shape, nbytes = self._order[self._next]
        if name != exp_name or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"writer expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )  # a bug in the caller, not a user mistake
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks) -> None:
        """Write one tensor as consecutive flat pieces (each of the planned dtype)."""
        exp_name, dtype, shape, nbytes = self._order[self._next]
        if name != exp_name:
            raise RuntimeError(f"writer expected {exp_name}, got {name}")  # a caller bug
        _fault_injection()
        written = 0
        for piece in chunks:
            data = _bytes(piece, dtype, name)
            self._f.write(data)
            written += data.nbytes
        if written != nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {nbytes}")
        self._next += 1

    def write_at(self, name: str, chunks) -> None:
        """Write one tensor, in any order, from consecutive flat pieces (each of the planned dtype)."""
        dtype, nbytes = self._sizes[name]
        _fault_injection()
        pos, fd = self.data_start + self.offsets[name], self._f.fileno()
        written = 0
        for piece in chunks:
            data = _bytes(piece, dtype, name)
            while data:  # pwrite may write less than asked
                done = os.pwrite(fd, data, pos + written)
                data, written = data[done:], written + done
        if written != nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {nbytes}")
        self._written.add(name)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the metadata in place (it must fit in the header's reserved room); the file may be
        closed already (a finished shard)."""
        self._header["__metadata__"] = dict(metadata)
        raw = json.dumps(self._header, separators=(",", ":")).encode()
        room = self.data_start - 8
        if len(raw) > room:
            raise RuntimeError(f"{self.path}: metadata outgrew the reserved header room")  # a bug, not a user error
        padded = raw + b" " * (room - len(raw))
        if self._f.closed:
            with open(self.path, "r+b") as f:
                f.seek(8)
                f.write(padded)
            return
        pos = self._f.tell()
        self._f.seek(8)
        self._f.write(padded)
        self._f.seek(pos)

    def leave_holes(self, names) -> None:
        """Tensors never written read as zeros: the file is extended over them at close (a sparse file
        where the file system allows, so an all-zero tensor costs no I/O)."""
        self._written.update(n for n in names if n in self._sizes)

    def close(self) -> None:
        if not self._f.closed:
            self._f.truncate(self.data_start + self.total)
        if self._next + len(self._written) != len(self._order):
            raise RuntimeError(
                f"{self.path}: {len(self._order) - self._next - len(self._written)} tensors never written"
            )
        self._f.close()

    def abort(self) -> None:
        self._f.close()

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """The planned (name, dtype code, shape, nbytes), in file order."""
        return list(self._order)

    def upcoming(self) -> tuple[str, str, tuple[int, ...], int]:
        """The next tensor `write`/`write_chunks` expects."""
        return self._order[self._next]

    def flush(self) -> None:
        """Push buffered bytes to the file (before positional writes or a mapping of it)."""
        if not self._f.closed:
            self._f.flush()


class CheckpointWriter(Committable):
    """Write a checkpoint tensor by tensor: a single file, or an HF folder (optionally sharded).

    Usage::

        with CheckpointWriter(out, plan, folder=True, reference=src_dir) as w:
            for name, dtype, shape in plan:
                w.write(name, tensor)

    `plan` lists (name, dtype, shape) in the order tensors will be written (the order in the
    files). With `any_order`, every file is opened at once and `write_chunks` takes the tensors in
    any order, from several threads if need be (each tensor from one thread). Shards are cut by
    `shard_bytes` (None: one file). `metadata` may be a callable, called when the output is committed
    (for values known only after the pass, such as content fingerprints hashed meanwhile): every file's
    header then keeps `LATE_METADATA_ROOM` bytes for it. `commit()` puts the finished output in place and
    `discard()` removes the temporary output (leaving a `with` block does one or the other).
    """

    def __init__(
        self,
        out: Path,
        plan: list[tuple[str, object, tuple[int, ...]]],
        *,
        folder: bool,
        shard_bytes: int | None = None,
        metadata: dict[str, str] | Callable[[], dict[str, str]] | None = None,
        reference: Path | None = None,
        inputs: list[Path] = (),
        force: bool = False,
        config_dtype=None,
        validate=None,
        any_order: bool = False,
    ):
        self.out = Path(out)
        self.validate = validate  # called with the finished temporary path before the rename
        self.extra_files: dict[str, str] = {}
        self.side_files: dict[Path, str] = {}  # files beside the output, committed with it as one
        self.together: list = []  # finished temporaries (atomic.AtomicPath) of other outputs, committed with it
        self.force = force
        check_output(self.out, list(inputs), force=force)
        self._late_metadata = metadata if callable(metadata) else None
        self._reserve = LATE_METADATA_ROOM if self._late_metadata else 0
        self.plan, self.folder = plan, folder
        self.metadata = {} if self._late_metadata else dict(metadata or {})
        self.reference, self.config_dtype = reference, config_dtype
        self.shards = _cut_shards(plan, shard_bytes) if folder else [plan]
        self._atomic = AtomicPath(self.out, force=force, is_dir=folder)
        self._stream: SafetensorsStream | None = None
        self._opened: list[SafetensorsStream] = []
        self._shard_i = -1
        self._in_shard = 0
        self.weight_map: dict[str, str] = {}
        self.locations: dict[str, tuple[Path, int, int, str]] = {}  # name -> (file, offset, numel, dtype code)
        self._streams: dict[str, SafetensorsStream] = {}  # any_order: name -> its file
        if any_order:
            try:
                for i, shard in enumerate(self.shards):
                    stream = self._open_stream(i)
                    stream.flush()  # the header, before any positional write
                    self._opened.append(stream)
                    for name, dtype, _, nbytes in stream.entries:
                        self._streams[name] = stream
                        self.weight_map[name] = stream.path.name
                        self.locations[name] = (
                            stream.path,
                            stream.data_start + stream.offsets[name],
                            nbytes // dtypes.itemsize(dtype),
                            dtype,
                        )
            except OSError as e:
                self.discard()
                raise os_error(e, self.out) from None

    def _open_stream(self, i: int, entries=None) -> SafetensorsStream:
        entries = self.shards[i] if entries is None else entries
        return SafetensorsStream(self._shard_path(i), entries, {"format": "pt", **self.metadata}, reserve=self._reserve)

    def _shard_path(self, i: int) -> Path:
        if not self.folder:
            return self._atomic.tmp
        if len(self.shards) == 1:
            return self._atomic.tmp / SINGLE_NAME
        return self._atomic.tmp / f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, name: str, tensor) -> None:
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks) -> None:
        """Write one tensor from consecutive flat pieces (a generator: memory stays at one piece)."""
        if self._streams:
            try:
                self._streams[name].write_at(name, chunks)
            except OSError as e:
                raise os_error(e, self.out) from None
            return
        try:
            if self._stream is None or self._in_shard == len(self.shards[self._shard_i]):
                if self._stream is not None:
                    self._stream.close()
                self._shard_i += 1
                self._in_shard = 0
                self._stream = self._open_stream(self._shard_i)
                self._opened.append(self._stream)
            stream = self._stream
            _, dtype, shape, nbytes = stream.upcoming()
            self.locations[name] = (
                stream.path,
                stream.data_start + stream.offsets[name],
                nbytes // dtypes.itemsize(dtype),
                dtype,
            )
            stream.write_chunks(name, chunks)
        except OSError as e:
            raise os_error(e, self.out) from None
        self.weight_map[name] = self._shard_path(self._shard_i).name
        self._in_shard += 1

    def patch(self, name: str, positions: np.ndarray, values) -> None:
        """Overwrite entries of a tensor already written: flat `positions` get `values` (of the tensor's
        dtype: a numpy array of its storage dtype, see `dtypes`, or a torch tensor)."""
        path, offset, numel, dtype = self.locations[name]
        view = _storage(values, dtype, name)
        if view.size != len(positions):
            raise RuntimeError(f"patch of {name}: {view.size} values for {len(positions)} positions")  # a caller bug
        if not len(positions):
            return
        try:
            for stream in self._opened:
                if stream.path == path:
                    stream.flush()
            mm = np.memmap(path, dtype=view.dtype, mode="r+", offset=offset, shape=(numel,))
            mm[positions] = view  # left to the page cache like every other write (no msync)
            del mm
        except OSError as e:
            raise os_error(e, self.out) from None

    def discard(self) -> None:
        """Drop everything written so far (nothing is left behind), the outputs to commit with it too."""
        for stream in self._opened:
            stream.abort()
        self._atomic.discard()
        for other in self.together:
            other.discard()

    def commit(self) -> Path:
        """Finish every file (index, reference files), validate, and put the output in place."""

        def finish() -> None:
            if not self._opened:  # an empty plan still yields a valid file
                self._opened.append(self._open_stream(0, []))
            if self._late_metadata is not None:
                self.metadata = dict(self._late_metadata())
                for stream in self._opened:
                    stream.set_metadata({"format": "pt", **self.metadata})
            for stream in self._opened:
                stream.close()
            if self.folder:
                self._finish_folder()
            if self.validate is not None:
                self.validate(self._atomic.tmp)

        sides = []
        try:
            for path, text in self.side_files.items():
                sides.append(staged_text(path, text, force=self.force))
        except BaseException:
            for s in sides + self.together:
                s.discard()
            self.discard()
            raise
        return self._atomic.commit_after(finish, together=sides + self.together)

    def add_side_file(self, path: Path, text: str) -> None:
        """A small file beside the output (e.g. OUT.fuse.json), committed together with it (a kill leaves
        both or neither)."""
        self.side_files[Path(path)] = text

    def add_file(self, name: str, text: str) -> None:
        """A small text file to put in the output folder (written before the rename)."""
        self.extra_files[name] = text

    def _finish_folder(self) -> None:
        tmp = self._atomic.tmp
        for fname, text in self.extra_files.items():
            write_small(tmp / fname, text)
        if len(self.shards) > 1:
            total = sum(_nbytes(d, s) for _, d, s in self.plan)
            index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": self.weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if self.reference is not None:
            for fname in REFERENCE_FILES:
                src = Path(self.reference) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
            cfg = tmp / "config.json"
            if self.config_dtype is not None and cfg.is_file():
                data = json.loads(cfg.read_text())
                key = "dtype" if "dtype" in data else "torch_dtype"
                data[key] = dtypes.name(dtypes.code_of(self.config_dtype))
                cfg.write_text(json.dumps(data, indent=2))


def _nbytes(dtype, shape: tuple[int, ...]) -> int:
    n = dtypes.itemsize(dtypes.code_of(dtype))
    for s in shape:
        n *= s
    return n


def _cut_shards(plan, shard_bytes: int | None) -> list[list]:
    if not shard_bytes:
        return [list(plan)]
    shards, cur, size = [], [], 0
    for entry in plan:
        nb = _nbytes(entry[1], entry[2])
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(entry)
        size += nb
    if cur or not shards:
        shards.append(cur)
    return shards


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    t = text.strip().upper()
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    for u, m in sorted(units.items(), key=lambda x: -len(x[0])):
        if t.endswith(u):
            t, mult = t[: -len(u)], m
            break
    else:
        mult = 1
    try:
        value = float(t) * mult
    except ValueError:
        raise OptionError(f"shard size {text!r} is not a size; use e.g. 5GB or 500MB") from None
    if not math.isfinite(value) or value < 1:
        raise OptionError(f"shard size {text!r} must be a positive, finite size such as 5GB")
    return int(value)
