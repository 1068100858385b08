"""Helpers shared by the test modules: the CLI in-process or as a process, the one-error-line check, an
interrupted run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mergekit_sparse.cli.main import cli


def sm(*args, ok: bool = True):
    """`sparsemerge ARGS` in-process; asserts success unless ok=False."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def run_cli(*args, env=None):
    """`sparsemerge ARGS` as a process (what a fault hook that kills the process needs)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "sparsemerge"), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def one_error_line(r, *needles: str) -> None:
    """Exit 1, the last line one `Error:` line holding every needle, no traceback."""
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("Error:") and "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in lines[-1], r.output


@contextlib.contextmanager
def interrupted_at_step(n: int):
    """Training raises KeyboardInterrupt (Ctrl-C) at its n-th optimizer step inside this block."""
    import mergekit_sparse.training.trainer as T

    real, calls = T.MaskedAdamW.step, {"n": 0}

    def dying_step(self, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, **kw)

    T.MaskedAdamW.step = dying_step
    try:
        yield
    finally:
        T.MaskedAdamW.step = real
