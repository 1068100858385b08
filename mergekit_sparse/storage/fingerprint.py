"""Content fingerprints (METHODS §3): what identifies a checkpoint's parameter values.

The digest: sha256 over, for every tensor in sorted-name order, `name NUL dtype NUL shape NUL
sha256(raw bytes)` (hex digests; shape as comma-separated integers), so it depends neither on how the
tensors are sharded nor on file metadata, and a tied head stored as a duplicate (an alias, METHODS §1)
does not count. The per-tensor digests of each file are cached in the user's cache folder
(`$XDG_CACHE_HOME/mergekit-sparse/fingerprints/`, or `~/.cache/...`), keyed by the file's resolved path,
size, mtime_ns, ctime_ns and inode: never next to an input. `SPARSEMERGE_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

ALGORITHM = "sha256-tensors-v1"
BLOCK = 1 << 24  # bytes hashed per update: the mapping is read in these steps


def cache_folder() -> Path:
    if os.environ.get("SPARSEMERGE_CACHE_DIR"):
        return Path(os.environ["SPARSEMERGE_CACHE_DIR"]) / "fingerprints"
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mergekit-sparse" / "fingerprints"


def _key(file: Path) -> tuple[str, dict]:
    st = file.stat()
    ident = {
        "path": str(file.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest(), ident


def _cached(file: Path) -> tuple[dict | None, Path | None, dict]:
    if os.environ.get("SPARSEMERGE_CACHE", "1") == "0":
        return None, None, {}
    try:
        key, ident = _key(file)
    except OSError:
        return None, None, {}
    entry = cache_folder() / f"{key}.json"
    try:
        doc = json.loads(entry.read_text())
        if doc.get("ident") == ident and doc.get("algorithm") == ALGORITHM and isinstance(doc.get("tensors"), dict):
            return doc["tensors"], entry, ident
    except (OSError, ValueError):
        pass
    return None, entry, ident


def _store(entry: Path | None, ident: dict, tensors: dict) -> None:
    if entry is None:
        return
    # a temporary name of this process and thread (two threads may hash one file), then a rename
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"algorithm": ALGORITHM, "ident": ident, "tensors": tensors}))
        os.replace(tmp, entry)
    except OSError:  # a read-only or full cache folder only costs the next run a re-hash
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def tensor_digests(ck) -> dict[str, str]:
    """sha256 of every tensor's raw bytes (aliases left out), per file from the cache when it is fresh."""
    out: dict[str, str] = {}
    by_file: dict[Path, list] = {}
    for info in ck.infos.values():
        by_file.setdefault(info.file, []).append(info)
    for file, infos in sorted(by_file.items()):
        cached, entry, ident = (None, None, {}) if ck._pickled is not None else _cached(file)
        if cached is not None and all(i.name in cached for i in infos):
            out.update({i.name: cached[i.name] for i in infos})
            continue
        digests = {}
        if ck._pickled is None and all(i.offset >= 0 for i in infos):
            digests = _file_digests(file, infos)
        else:
            for info in infos:
                h = hashlib.sha256()
                raw = ck.array(info.name).reshape(-1).view("uint8") if info.numel else b""
                for s in range(0, len(raw), BLOCK):
                    h.update(raw[s : s + BLOCK])
                digests[info.name] = h.hexdigest()
        _store(entry, ident, digests)
        out.update(digests)
    return out


def _file_digests(file: Path, infos: list) -> dict[str, str]:
    """Each tensor's sha256, read with plain reads into one buffer rather than through the memory map the
    command's passes fault in at the same time (two threads faulting one mapping slowed the passes)."""
    from . import dtypes

    buf = bytearray(BLOCK)
    view = memoryview(buf)
    out = {}
    with open(file, "rb") as f:
        for info in infos:
            h = hashlib.sha256()
            left = info.numel * dtypes.itemsize(info.code)
            f.seek(info.offset)
            while left:
                n = f.readinto(view[: min(left, BLOCK)])
                if not n:
                    raise OSError(f"{file} ends inside tensor '{info.name}'")
                h.update(view[:n])
                left -= n
            out[info.name] = h.hexdigest()
    return out


def content_fingerprint(ck) -> str:
    """The checkpoint's content fingerprint (see the module docstring); aliases of tied weights left out."""
    digests = tensor_digests(ck)
    h = hashlib.sha256()
    for name, info in sorted(ck.infos.items()):
        h.update(f"{name}\0{info.code}\0{','.join(map(str, info.shape))}\0{digests[name]}\n".encode())
    return f"{ALGORITHM}:{h.hexdigest()}"
