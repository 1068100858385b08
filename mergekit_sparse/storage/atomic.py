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
    return OutputError(f"cannot write {where} ({e.strerror}); the partial output was removed")


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class AtomicPath:
    """A temporary sibling of `out` that replaces `out` on commit and vanishes on failure."""

    def __init__(self, out: Path, *, force: bool, is_dir: bool):
        self.out = out
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        self.force = force
        for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run
            if not _alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp) if self.tmp.is_dir() else self.tmp.unlink()
        if is_dir:
            self.tmp.mkdir(parents=True)

    def commit(self) -> None:
        if self.out.exists():
            if not self.force:
                raise OutputError(f"output {self.out} appeared while writing; pass --force to replace it")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.tmp, self.out)

    def commit_after(self, finish) -> Path:
        """Run `finish()` (which completes the temporary output), then commit; on any failure the
        temporary output is removed, an OSError becoming the one-line output error."""
        try:
            finish()
            self.commit()
        except OSError as e:
            self.discard()
            raise os_error(e, self.out) from None
        except BaseException:
            self.discard()
            raise
        return self.out

    def discard(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists():
            self.tmp.unlink()


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


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (replacing what is there: callers check `--force` first)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    target = AtomicPath(path, force=True, is_dir=False)
    try:
        target.tmp.write_text(text, encoding="utf-8")
        target.commit()
    except OSError as e:
        target.discard()
        raise os_error(e, path) from None
    except BaseException:
        target.discard()
        raise
    return path


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
