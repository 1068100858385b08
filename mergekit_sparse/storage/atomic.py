"""Atomic outputs: every file or folder the tool writes appears complete or not at all.

`AtomicPath` is a temporary sibling of the output that replaces it on `commit()` and vanishes on
`discard()`; temporaries left by a killed process are cleaned up by the next writer of that output.
`write_text` / `write_json` write small files (JSON side files, records) through it. This is the one
mechanism: checkpoints, mask files, side files and stage records all use it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

from ..errors import OutputError


def os_error(e: OSError, where: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(
            f"no space left on the device while writing {where}; free space or write elsewhere "
            "(the partial output was removed)"
        )
    if e.errno == errno.EROFS:
        return OutputError(f"{where} is on a read-only file system; write elsewhere (the partial output was removed)")
    return OutputError(f"cannot write {where} ({e.strerror}); the partial output was removed")


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class _OutputLock:
    """An exclusive lock on one output path (a `.NAME.lock` file beside it, removed on release): a second
    process writing the same output fails at once instead of silently replacing the first one's result."""

    def __init__(self, out: Path):
        import fcntl

        self.path, self.fd = out.parent / f".{out.name}.lock", None
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise os_error(e, out) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise OutputError(
                    f"another process is writing {out} right now; wait for it to finish, or choose another -o path"
                ) from None
            try:  # the file may have been released and removed between our open and our lock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)
        raise OutputError(f"cannot lock {out} (its lock file keeps changing); try again")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def roll_forward(folder: Path) -> None:
    """Finish the commits a killed process journaled (`commit_together`): every temporary it lists was
    complete, so renaming the ones left gives the new state whole."""
    for journal in folder.glob(".*.commit-*"):
        if _alive(journal.name.rsplit("-", 1)[-1]):
            continue
        try:
            entries = json.loads(journal.read_text())
        except (OSError, ValueError):
            entries = []
        for tmp, out in entries if isinstance(entries, list) else []:
            tmp, out = Path(tmp), Path(out)
            if tmp.exists():
                _replace(tmp, out)
            _drop_stale_lock(out)
        journal.unlink(missing_ok=True)


def _drop_stale_lock(out: Path) -> None:
    """Remove the lock file a killed writer of `out` left, unless a live process holds it."""
    try:
        _OutputLock(out).release()
    except OutputError:
        pass


def _replace(tmp: Path, out: Path) -> None:
    """Put `tmp` in place of `out` (a folder replaced whole: renamed aside first, then removed)."""
    if out.is_dir() and not out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def commit_together(items: list[AtomicPath]) -> None:
    """Commit several finished temporaries as one output: a journal lists them before the first rename and
    goes after the last, so a kill in between is rolled forward by the next writer in that folder (the
    old state or the new, never half of each)."""
    if len(items) == 1:
        try:
            items[0].commit()
        except OSError as e:
            items[0].discard()
            raise os_error(e, items[0].out) from None
        return
    journal = items[0].out.parent / f".{items[0].out.name}.commit-{os.getpid()}"
    for it in items:
        it.check_replace()
    try:
        with open(journal, "w") as f:
            json.dump([[str(it.tmp), str(it.out)] for it in items], f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        for it in items:
            it.discard()
        journal.unlink(missing_ok=True)
        raise os_error(e, items[0].out) from None
    for i, it in enumerate(items):
        if os.environ.get("MERGEKIT_SPARSE_FAULT") == f"kill-commit:{i}":  # test hook: die mid-commit
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        it.commit()
    journal.unlink(missing_ok=True)


class AtomicPath:
    """A temporary sibling of `out` that replaces `out` on commit and vanishes on failure; the output is
    locked against other writers from creation to commit or discard."""

    def __init__(self, out: Path, *, force: bool, is_dir: bool):
        self.out = out
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        self.force = force
        roll_forward(out.parent)  # a commit a killed process journaled comes first
        self._lock = _OutputLock(out)
        for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run
            if not _alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp) if self.tmp.is_dir() else self.tmp.unlink()
        if is_dir:
            self.tmp.mkdir(parents=True)

    def check_replace(self) -> None:
        if self.out.exists() and not self.force:
            raise OutputError(f"output {self.out} appeared while writing; pass --force to replace it")

    def commit(self) -> None:
        self.check_replace()
        try:
            _replace(self.tmp, self.out)
        finally:
            self._lock.release()

    def commit_after(self, finish, together: list[AtomicPath] = ()) -> Path:
        """Run `finish()` (which completes the temporary output), then commit it with the finished `together`
        temporaries as one (`commit_together`); on any failure every temporary is removed, an OSError
        becoming the one-line output error."""
        try:
            finish()
            commit_together([self, *together])
        except OSError as e:
            for it in (self, *together):
                it.discard()
            raise os_error(e, self.out) from None
        except BaseException:
            for it in (self, *together):
                it.discard()
            raise
        return self.out

    def discard(self) -> None:
        try:
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp, ignore_errors=True)
            elif self.tmp.exists():
                self.tmp.unlink()
        finally:
            self._lock.release()


class Committable:
    """A writer's `with` block: leaving it commits on success and discards on error (the writer defines
    `commit()` and `discard()`, and callers may call them explicitly instead)."""

    def commit(self):
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.discard()
        else:
            self.commit()
        return False


def fault_point(site: str) -> None:
    """Test hook: MERGEKIT_SPARSE_FAULT=KIND-SITE:N (KIND kill, enospc or erofs) makes the N-th time this
    process reaches `site` (e.g. `snapshot`, halfway through a training snapshot) die by SIGKILL or fail."""
    kind, _, rest = os.environ.get("MERGEKIT_SPARSE_FAULT", "").partition("-")
    where, _, n = rest.partition(":")
    if where != site or kind not in ("kill", "enospc", "erofs") or not n.isdigit():
        return
    count = _FAULTS[site] = _FAULTS.get(site, 0) + 1
    if count == int(n):
        if kind == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        code = errno.ENOSPC if kind == "enospc" else errno.EROFS
        raise OSError(code, os.strerror(code))


_FAULTS: dict[str, int] = {}


def write_small(path: Path, text: str, site: str | None = None) -> None:
    """Write a small text file in place (inside a temporary output). Test hooks: MERGEKIT_SPARSE_FAULT=
    enospc-text / erofs-text fails every small write; KIND-NAME:N (`fault_point`) the N-th of the file
    NAME (`site`, e.g. stage.json)."""
    fault = os.environ.get("MERGEKIT_SPARSE_FAULT")
    if fault in ("enospc-text", "erofs-text"):
        code = errno.ENOSPC if fault == "enospc-text" else errno.EROFS
        raise OSError(code, os.strerror(code))
    if site and fault:
        fault_point(site)
    path.write_text(text, encoding="utf-8")


def staged_text(path: str | os.PathLike, text: str, *, force: bool = True) -> AtomicPath:
    """`text` written to a locked temporary of `path`, to be committed with others (`commit_together`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    target = AtomicPath(path, force=force, is_dir=False)
    try:
        write_small(target.tmp, text, site=path.name)
    except OSError as e:
        target.discard()
        raise os_error(e, path) from None
    return target


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (replacing what is there: callers check `--force` first)."""
    commit_together([staged_text(path, text)])
    return Path(path)


def write_texts(files: dict, *, force: bool = True) -> None:
    """Write several small files as one output (all or none, even on a kill: `commit_together`). The texts
    may be callables, called one by one once the earlier files are staged."""
    staged: list[AtomicPath] = []
    if not files:
        return
    try:
        for path, text in files.items():
            staged.append(staged_text(path, text() if callable(text) else text, force=force))
        commit_together(staged)
    except BaseException:
        for item in staged:
            item.discard()
        raise


def finite(doc):
    """`doc` with every NaN/±Inf float replaced by None: JSON has no such numbers (Python would write the
    invalid tokens NaN and -Infinity). Floats keep their full precision."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite(v) for v in doc]
    if hasattr(doc, "item") and hasattr(doc, "dtype") and getattr(doc, "ndim", 1) == 0:  # numpy scalars
        return finite(doc.item())
    return doc


def dumps(doc, *, indent: int | None = 2, **kw) -> str:
    """Valid JSON for any document the tool writes (see `finite`; paths and other objects as strings)."""
    return json.dumps(finite(doc), indent=indent, default=str, allow_nan=False, **kw)


def write_json(path: str | os.PathLike, doc, *, indent: int | None = 2) -> Path:
    """`doc` as JSON at `path`, atomically (non-JSON values such as paths are written as strings)."""
    return write_text(path, dumps(doc, indent=indent) + "\n")
