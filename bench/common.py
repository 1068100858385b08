"""Shared benchmark helpers: run a command while sampling its memory, and print ratio tables.

Memory is sampled from /proc/<pid>/status every 20 ms: RssAnon (anonymous memory, what can run
a machine out of memory; the bound in the issues) and VmRSS (which also counts reclaimable
file-backed pages of memory-mapped inputs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(("RssAnon", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(cmd: list[str], *, threads: int, env: dict | None = None) -> dict:
    """Run `cmd` with `threads` torch/OpenMP threads; wall seconds, peak RssAnon and VmRSS (bytes)."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample():
        while proc.poll() is None:
            for k, v in _status(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall": wall, "anon": peak["RssAnon"], "rss": peak["VmRSS"], "stdout": out}


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*map(str, r)) for r in rows)])


def sparsemerge() -> str:
    return str(BIN / "sparsemerge")


def generated_checkpoints(size: float, preset: str = "synthetic", tasks: int = 2) -> tuple[Path, int, float]:
    """Generate (once) base + `tasks` task checkpoints (task0, task1, …) of ~`size` parameters under
    bench/out (`preset`: synthetic or tie-heavy, see gen_checkpoints.py); returns (folder, largest tensor's
    element count, the anon memory bound 2 × largest f32 + 400 MB)."""
    import math

    from gen_checkpoints import llama_shapes

    root = HERE / "out" / (f"ckpt-{int(size // 1e6)}M" + ("" if preset == "synthetic" else f"-{preset}"))
    subprocess.run(
        [
            sys.executable,
            str(HERE / "gen_checkpoints.py"),
            "--out",
            str(root),
            "--params",
            str(size),
            "--tasks",
            str(tasks),
            "--preset",
            preset,
        ],
        check=True,
    )
    shapes, _ = llama_shapes(size)
    largest = max(math.prod(s) for _, s in shapes)
    return root, largest, 2 * largest * 4 + 400e6
