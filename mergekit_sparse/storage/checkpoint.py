"""Open checkpoints lazily and read them one tensor at a time.

A checkpoint is a single `.safetensors` file, a Hugging Face model folder (one file or
shards with `model.safetensors.index.json`), or a Hub repo id resolved through the local
Hugging Face cache. Opening one reads only headers: names, shapes and dtypes are known
without touching tensor data, and every header is validated against the file size so a
truncated or corrupt file fails at open time with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, MismatchError
from . import dtypes, modelcard

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like; no data."""

    name: str
    shape: tuple[int, ...]
    code: str  # safetensors dtype code ("BF16"); see `dtypes`
    file: Path
    offset: int = -1  # where the data starts in `file` (-1: not a safetensors file)

    @property
    def dtype(self):
        """The torch dtype (imports torch: the streaming code uses `code`)."""
        return dtypes.torch_dtype(self.code)

    @property
    def dtype_name(self) -> str:
        return dtypes.name(self.code)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.code)

    @property
    def is_float(self) -> bool:
        return dtypes.is_float(self.code)


MAX_DIMS = 16


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _Duplicate(dup)
    return dict(pairs)


class _Duplicate(ValueError):
    pass


def load_json(raw: str | bytes, where, *, what: str = "the file"):
    """Parse JSON with the checks the reference safetensors parser makes: no duplicate keys, bounded depth
    (the C decoder's recursion limit, caught); any problem is a CheckpointError naming `where` and `what`."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise CheckpointError(f"{where}: the key {str(e)!r} appears twice in {what}; the file is corrupt") from None
    except RecursionError:
        raise CheckpointError(
            f"{where}: {what} is JSON nested deeper than Python can parse; the file is corrupt"
        ) from None
    except ValueError:
        raise CheckpointError(f"{where}: {what} is not valid JSON; the file is corrupt") from None


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
    """Parse and validate a safetensors header: (tensors, metadata, raw header bytes).

    The checks are the reference implementation's: a regular file; a JSON object without duplicate
    keys; metadata a map of strings; per tensor a known dtype, a shape of non-negative integers and two
    integer offsets whose span is the shape's byte size; tensors laid out back to back from offset 0 with
    no overlap, inside the file.
    """
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket); give a .safetensors file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is empty or too short to be safetensors ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {n} exceeds the file size {size}); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: safetensors header is not UTF-8 JSON; the file is corrupt") from None
    header = load_json(raw, path, what="safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: safetensors header is JSON but not an object (found {type(header).__name__}); the file is corrupt"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the header's __metadata__ must map strings to strings; the file is corrupt")
    infos: dict[str, TensorInfo] = {}
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("data_offsets"), list)
        )
        ok = ok and all(_is_index(d) and d >= 0 for d in entry["shape"]) and len(entry["shape"]) <= MAX_DIMS
        ok = ok and len(entry["data_offsets"]) == 2 and all(_is_index(o) and o >= 0 for o in entry["data_offsets"])
        try:
            itemsize = dtypes.itemsize(entry["dtype"]) if ok and isinstance(entry.get("dtype"), str) else None
        except (KeyError, ValueError):
            itemsize = None
        if itemsize is None:
            raise CheckpointError(
                f"{path}: header entry for '{name}' is malformed or has an unknown dtype "
                f"(dtype, a shape of non-negative integers and two integer data_offsets are required; found "
                f"{str(entry)[:120]})"
            )
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        info = TensorInfo(name, shape, entry["dtype"], path, 8 + n + begin)
        if end - begin != info.numel * itemsize or end < begin:
            raise CheckpointError(
                f"{path}: header says '{name}' is {entry['dtype']}{list(shape)} "
                f"({info.numel * itemsize} bytes) but its offsets span {end - begin} bytes; "
                "the file is corrupt"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: '{name}' ends at byte {end} but the file holds only {data_size} "
                "data bytes; the file is truncated (re-download or re-save it)"
            )
        spans.append((begin, end, name))
        infos[name] = info
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"starts at byte {begin}, after a gap"
            raise CheckpointError(f"{path}: tensor '{name}' {what} (offsets must be back to back); the file is corrupt")
        at = end
    return infos, metadata, raw


def _load_pickle(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise CheckpointError(f"{path}: cannot load pickled weights with weights_only=True ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: pickled file is not a plain state dict of tensors")
    return obj


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing pickled weights (loading a pickle can run arbitrary code); convert the model to "
        "safetensors (model.save_pretrained(dir, safe_serialization=True)) or pass --allow-pickle to load "
        "it with torch.load(weights_only=True)"
    )


class Checkpoint:
    """A lazily opened checkpoint: headers in memory, tensors read on demand.

    `array(name)` returns the tensor's data as a numpy array over the memory-mapped file
    (file-backed pages, not anonymous memory; read-only; BF16 as its uint16 bit patterns, see
    `dtypes`), `float32(name, start, end, out)` a flat range of it as float32: neither imports
    torch. `tensor(name)` is the same data as a torch tensor.
    """

    def __init__(
        self,
        path: Path,
        infos: dict[str, TensorInfo],
        *,
        folder: Path | None,
        headers: dict[Path, bytes],
        label: str,
        pickled: dict | None = None,
        metadata: dict | None = None,
    ):
        self.path = path
        # the safetensors metadata of the (first) weight file: string keys and values only
        self.metadata = {k: v for k, v in (metadata or {}).items() if isinstance(k, str) and isinstance(v, str)}
        self.folder = folder  # HF folder with config/tokenizer, or None for a bare file
        self.label = label
        self.infos = dict(sorted(infos.items()))
        self._headers = headers
        self._pickled = pickled
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._content: str | None = None
        self._hasher: _Job | None = None
        # the folder's config.json (for a bare file: its folder's, when it is the folder's one model)
        self.config = modelcard.read_config(self.folder if self.folder is not None else _sole_model_folder(path))
        # tied weights (METHODS §1): the embedding the output head is tied to (None: untied or unknown),
        # and the heads stored anyway, read as aliases of it (hidden from `infos`)
        self.tied_embedding: str | None = None
        self.aliases: dict[str, TensorInfo] = {}
        flag = modelcard.tie_flag(self.config)
        if flag is not False and self.config is not None:
            self._tie(modelcard.embedding_name(self.infos), explicit=flag is True)

    def _tie(self, embedding: str | None, *, explicit: bool, other: Checkpoint | None = None) -> None:
        """Read every stored head that the embedding ties as an alias of it (hidden from `infos`); a head
        stored with other values is an error when the tie is explicit, an ordinary untied head otherwise."""
        if embedding is None or embedding not in self.infos:
            return
        emb = self.infos[embedding]
        self.tied_embedding = embedding
        for head in modelcard.HEAD_NAMES:
            info = self.infos.get(head)
            if info is None or info.shape != emb.shape:
                continue  # not stored, or not this embedding's head (another architecture's name)
            if self._same_values(head, embedding):
                self.aliases[head] = self.infos.pop(head)
            elif not explicit:
                self.tied_embedding = None  # the config does not say, and the stored head differs: untied
            else:
                why = f"{other.path} ties it" if other is not None else "its config ties the head to the embedding"
                raise MismatchError(
                    f"{self.path}: '{head}' is stored with values that differ from '{embedding}', but {why} "
                    "(tie_word_embeddings); the head was trained untied: set tie_word_embeddings to false in "
                    "config.json if that is intended, or drop the stale head"
                )

    def _same_values(self, a: str, b: str) -> bool:
        ia, ib = self.infos[a], self.infos[b]
        if ia.code == ib.code:
            return bool(np.array_equal(self.array(a), self.array(b)))
        return bool(np.array_equal(self.float32(a), self.float32(b)))

    def adopt_ties(self, other: Checkpoint) -> None:
        """Take `other`'s tied weights when this checkpoint's own config does not say (a bare file next to a
        tied base): a stored head identical to this checkpoint's embedding becomes an alias; a different one is
        an error naming both."""
        if modelcard.tie_flag(self.config) is not None or other.tied_embedding is None:
            return
        self._tie(other.tied_embedding, explicit=True, other=other)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, spec: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
        """Open a `.safetensors` file, an HF folder, or a Hub repo id found in the local cache."""
        path = Path(spec)
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                if not allow_pickle:
                    raise _pickle_refusal(path)
                return cls._from_pickles([path], path, folder=None)
            infos, meta, raw = read_header(path)
            label = path.name.removesuffix(".safetensors")
            return cls(path, infos, folder=None, headers={path: raw}, label=label, metadata=meta)
        if path.is_dir():
            return cls._open_folder(path, allow_pickle)
        if path.exists():
            raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket); give a .safetensors file")
        text = str(spec)
        online = text.startswith("hf://")  # the user asked for the Hub: a download is allowed
        repo = text.removeprefix("hf://")
        if re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo) and not repo.startswith("."):
            return cls._open_folder(_resolve_hub(repo, online=online), allow_pickle, label=repo)
        raise CheckpointError(
            f"{spec}: no such file or folder (expected a .safetensors file, a model "
            "folder, or a Hub repo id such as org/name)"
        )

    @classmethod
    def _open_folder(cls, folder: Path, allow_pickle: bool, label: str | None = None) -> Checkpoint:
        label = label or folder.name
        index = folder / INDEX_NAME
        weight_map = None
        if index.is_file():
            files, weight_map = _shards_from_index(index)
        elif (folder / SINGLE_NAME).is_file():
            files = [folder / SINGLE_NAME]
        else:
            files = sorted(folder.glob("*.safetensors"))
            files = [f for f in files if not f.name.endswith(".mask.safetensors")]
        if not files:
            pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles and not allow_pickle:
                raise _pickle_refusal(pickles[0])
            if pickles:
                return cls._from_pickles(pickles, folder, folder=folder)
            raise CheckpointError(
                f"{folder}: folder holds no weights (no {SINGLE_NAME}, no {INDEX_NAME}, no *.safetensors)"
            )
        infos: dict[str, TensorInfo] = {}
        headers: dict[Path, bytes] = {}
        metadata = None
        for file in files:
            file_infos, meta, raw = read_header(file)
            metadata = meta if metadata is None else metadata
            headers[file] = raw
            for name, info in file_infos.items():
                if name in infos:
                    raise CheckpointError(
                        f"{folder}: tensor '{name}' appears in two shards ({infos[name].file.name}, {file.name})"
                    )
                infos[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in infos or infos[name].file.name != shard:
                    where = f"is in {infos[name].file.name}" if name in infos else "is in no shard"
                    raise CheckpointError(
                        f"{index}: the index puts '{name}' in {shard}, but it {where}; the index is stale or corrupt"
                    )
        return cls(folder, infos, folder=folder, headers=headers, label=label, metadata=metadata)

    @classmethod
    def _from_pickles(cls, files: list[Path], path: Path, folder: Path | None) -> Checkpoint:
        tensors: dict = {}
        for f in files:
            tensors.update(_load_pickle(f))
        try:
            infos = {n: TensorInfo(n, tuple(t.shape), dtypes.code_of(t.dtype), files[0]) for n, t in tensors.items()}
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return cls(path, infos, folder=folder, headers={}, label=path.stem, pickled=tensors)

    # -- lazy facts ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self.infos.values()})

    @property
    def numel(self) -> int:
        return sum(i.numel for i in self.infos.values())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def fingerprint(self) -> str:
        """sha256 over every shard's header bytes and size: cheap, and changes with any re-save."""
        h = hashlib.sha256()
        for file, raw in sorted(self._headers.items()):
            h.update(file.name.encode() + b"\0" + raw + str(file.stat().st_size).encode())
        if self._pickled is not None:
            for f in self.files:
                h.update(f.read_bytes())
        return h.hexdigest()

    def content_fingerprint(self) -> str:
        """The METHODS §3 content fingerprint (`storage.fingerprint`): computed once per checkpoint (on the
        thread `start_fingerprint` started, when it did), and cached per file in the user's cache folder."""
        if self._content is None:
            if self._hasher is not None:
                self._hasher.join()
                self._hasher = None
                if isinstance(self._content, BaseException):
                    error, self._content = self._content, None
                    raise error
                return self._content
            from .fingerprint import content_fingerprint

            self._content = content_fingerprint(self)
        return self._content

    def start_fingerprint(self) -> Checkpoint:
        """Hash the content on the background hashing thread while the command's passes read the same pages
        (hashlib releases the GIL); `content_fingerprint()` waits for it. Returns self. One thread hashes
        every checkpoint in turn: a thread per checkpoint (three on two cores for `core` with two tasks)
        took CPU from the passes, which made a cold cache cost 23 % of `core` on the 0.5 B preset."""
        if self._content is None and self._hasher is None:
            from .fingerprint import content_fingerprint

            def run() -> None:
                try:
                    self._content = content_fingerprint(self)
                except BaseException as e:  # noqa: BLE001 - raised again by content_fingerprint()
                    self._content = e

            self._hasher = _in_background(run)
        return self

    def content_sha256(self) -> str:
        """sha256 over every weight file's bytes (a full read): identifies the parameter values."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(sha256_file(f).encode())
        return h.hexdigest()

    def sources(self) -> dict:
        """Provenance: the path and the content fingerprint (METHODS §3; the header hash is kept beside it,
        but every fine-tune of one architecture shares it)."""
        return {"path": str(self.path), "fingerprint": self.content_fingerprint(), "header_sha256": self.fingerprint()}

    # -- data ---------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'")
        return info

    def _mapping(self, info: TensorInfo) -> mmap.mmap:
        """The file's one read-only shared mapping: page-cache pages, never charged as private memory, so a
        checkpoint larger than RAM opens and streams (a copy-on-write mapping of the whole file is charged
        against the commit limit and fails there)."""
        m = self._maps.get(info.file)
        if m is None:
            with self._lock:
                m = self._maps.get(info.file)
                if m is None:
                    try:
                        with open(info.file, "rb") as f:
                            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    except (OSError, ValueError) as e:
                        raise CheckpointError(f"{info.file}: cannot open safetensors file ({e})") from None
                    self._maps[info.file] = m
        if info.offset + info.nbytes > len(m):
            raise CheckpointError(
                f"{info.file}: '{info.name}' ends past the end of the file; the file was truncated after it was opened"
            )
        return m

    def array(self, name: str) -> np.ndarray:
        """One tensor's data as a read-only numpy array over the memory-mapped file (no copy)."""
        info = self._info(name)
        if self._pickled is not None:
            import torch

            t = self._pickled[name].detach().contiguous()
            if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                t = t.view({2: torch.int16, 1: torch.uint8}[t.element_size()])
            return t.numpy().view(dtypes.storage(info.code))
        a = np.frombuffer(
            self._mapping(info), dtype=dtypes.storage(info.code), count=info.numel, offset=info.offset
        ).reshape(info.shape)
        a.flags.writeable = False
        return a

    def float32(self, name: str, start: int = 0, end: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Entries [start, end) of the flattened tensor as float32 (into `out` when given)."""
        raw = self.array(name).reshape(-1)[start:end]
        return dtypes.to_float32(raw, self.infos[name].code, out)

    def tensor(self, name: str):
        """One tensor as a writable torch tensor: a copy of that tensor alone (the mapping is read-only;
        streaming code reads `array` or `float32` chunks instead)."""
        info = self._info(name)
        if self._pickled is not None:
            return self._pickled[name]
        import torch

        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        t = torch.from_numpy(np.array(self.array(name)))  # (shape,) copy, storage dtype
        return t.view(info.dtype) if t.dtype != info.dtype else t

    def close(self) -> None:
        self._maps.clear()  # unmapped by the collector once no array or tensor refers to them

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self.infos)}, params={self.numel})"


def _sole_model_folder(path: Path) -> Path | None:
    """The folder of a bare `.safetensors` file when the file is that folder's one model (its config and
    card describe it), else None."""
    folder = path.parent
    models = [f for f in folder.glob("*.safetensors") if not f.name.endswith(".mask.safetensors")]
    return folder if models == [path] or path.name == SINGLE_NAME else None


def _shards_from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """(shard files, weight map) of an index, checked: the shards lie in the model folder (or, for a Hub
    cache snapshot, are its links into the cache's own blobs/) and exist."""
    try:
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{index}: {index.stat().st_size} bytes is too large for an index")
        doc = load_json(index.read_bytes(), index, what="the index")
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: not a valid index (expected a 'weight_map' object of tensor -> shard file name)"
        )
    folder = index.parent
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":  # the Hub cache: snapshot files are links into ../../blobs
        roots.append((folder.parent.parent / "blobs").resolve())
    files = []
    for shard in sorted(set(weight_map.values())):
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts or len(parts) != 1:
            raise CheckpointError(f"{index}: shard '{shard}' points outside the model folder; refusing it")
        file = folder / shard
        target = file.resolve()
        if not any(root == target.parent or root in target.parents for root in roots):
            raise CheckpointError(f"{index}: shard '{shard}' links outside the model folder; refusing it")
        if not file.is_file():
            raise CheckpointError(f"{index}: shard '{shard}' listed in the index is missing from {folder}")
        files.append(file)
    return files, weight_map


def _resolve_hub(repo_id: str, *, online: bool = False) -> Path:
    """Resolve a Hub repo id to a local snapshot folder: from the cache; from the network only when the user
    asked for the Hub (`hf://org/name`) and HF_HUB_OFFLINE is not set. A mistyped local path that looks like
    `org/name` is an error, never a request."""
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if not online or offline:
            why = "while HF_HUB_OFFLINE is set" if online else f"(to download it from the Hub, pass hf://{repo_id})"
            raise CheckpointError(
                f"{repo_id}: no such local file or folder, and not in the Hugging Face cache {why}"
            ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{repo_id}: cannot resolve as a Hub repo ({type(e).__name__}); give a local path or check the repo id"
        ) from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def task_label(spec) -> str:
    """A task's display name from its path: `runs/math/` -> math, `a.safetensors` -> a."""
    p = Path(str(spec).rstrip("/"))
    name = p.name
    for suffix in (".mask.safetensors", ".safetensors", ".bin", ".pt"):
        name = name.removesuffix(suffix)
    return name or str(spec)


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def is_safe_name(name) -> bool:
    """A name that becomes a file or folder name (task, stage, label): letters, digits and . _ + - only,
    not starting with a dot or dash (so never `..`, an absolute path or a separator), at most 128 characters."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def split_task_spec(spec) -> tuple[str, str]:
    """(name, path) of one task argument: `NAME=PATH` names it (an existing path containing `=` stays a
    path); otherwise the name is the path's folder or file name."""
    text = str(spec)
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        if not NAME_RE.fullmatch(name) or name in (".", ".."):
            from ..errors import OptionError

            raise OptionError(
                f"task name {name!r} in {text!r} is not a valid name: use letters, digits and . _ + - "
                "(no path separators), e.g. math=exp_math/checkpoint-40"
            )
        if not path:
            from ..errors import OptionError

            raise OptionError(f"{text!r} names a task but gives no path after '='")
        return name, path
    return task_label(text), text


def split_task_specs(specs) -> tuple[list[str], list[str]]:
    """(names, paths) for several task arguments; two tasks with one name are an error (their outputs would
    collide) that suggests NAME=PATH."""
    from ..errors import OptionError

    pairs = [split_task_spec(s) for s in specs]
    seen: dict[str, str] = {}
    for spec, (label, _) in zip(specs, pairs):
        if label in seen:
            raise OptionError(
                f"two inputs have the task name '{label}' ({seen[label]} and {spec}); name them with "
                f"NAME=PATH, e.g. {label}_a={seen[label]} {label}_b={spec}"
            )
        seen[label] = str(spec)
    return [p[0] for p in pairs], [p[1] for p in pairs]


class _Job:
    """A function queued for the background hashing thread; `join()` waits until it has run."""

    def __init__(self, fn):
        self.fn, self.done = fn, threading.Event()

    def run(self) -> None:
        try:
            self.fn()
        finally:
            self.done.set()

    def join(self) -> None:
        self.done.wait()


_BACKGROUND: list = []  # [queue.Queue] once the daemon thread runs
_BACKGROUND_LOCK = threading.Lock()


def _in_background(fn) -> _Job:
    """Run `fn` on the one background (daemon) thread, after the jobs queued before it."""
    import queue

    job = _Job(fn)
    with _BACKGROUND_LOCK:
        if not _BACKGROUND:
            _BACKGROUND.append(queue.Queue())

            def worker(q=_BACKGROUND[0]) -> None:
                while True:
                    q.get().run()

            threading.Thread(target=worker, name="fingerprint", daemon=True).start()
    _BACKGROUND[0].put(job)
    return job
