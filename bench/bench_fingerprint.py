"""What content fingerprints (METHODS §3) cost `core` and `fuse`, A/B in one run.

    git worktree add /tmp/mks-old <a commit before fingerprints, e.g. 57c4dfc>
    ln -s ../cli /tmp/mks-old/mergekit_sparse/cli; ln -s ../reports /tmp/mks-old/mergekit_sparse/reports
    python bench/bench_fingerprint.py --old /tmp/mks-old [--size 0.5e9] [--threads 1] [--repeats 3]

Three variants of each command on the generated checkpoints (or `--real` on the SmolLM2 corpus): the old
tree (header hashes only: no fingerprint), this tree with a cold fingerprint cache (every input hashed,
on a second thread while the passes read the same pages), and this tree with a warm cache. Target (issue
19): cold ≤ 1.05 × old, warm ≈ old. Variants alternate within each repeat, so drift hits them alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from common import BIN, generated_checkpoints, measure, table

REAL = Path(os.environ.get("SPARSEMERGE_BENCH_CACHE", Path.home() / ".cache/mergekit-sparse/bench")) / "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, type=Path, help="a checkout of the code before fingerprints")
    ap.add_argument("--size", type=float, default=0.5e9)
    ap.add_argument("--real", action="store_true", help="the SmolLM2-135M corpus of bench/real/build.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.real:
        base, tasks = REAL / "base", [REAL / "ft" / "add", REAL / "ft" / "rev"]
        work = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    else:
        root, _, _ = generated_checkpoints(args.size, "synthetic")
        base, tasks, work = root / "base", [root / "task0", root / "task1"], root
    warm = Path(tempfile.mkdtemp(prefix="fp-warm-"))
    py = str(BIN / "python")
    commands = {
        "core": lambda out: ["core", "--base", str(base), *map(str, tasks), "--p", "1", "-o", str(out), "--force"],
        "fuse": lambda out: [
            "fuse",
            *map(str, tasks),
            "--base",
            str(base),
            "--p",
            "1",
            "-o",
            str(out),
            "--force",
            "--no-check",
        ],  # fmt: skip
    }
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms the page cache and the warm fingerprint cache
        for cmd, argv in commands.items():
            folder = (tasks[1] / "config.json").exists()
            out = work / f"fp-{cmd}" / ("out" if cmd == "core" else "fused" if folder else "fused.safetensors")
            variants = {
                "old (no fingerprint)": {"PYTHONPATH": str(args.old)},  # found before the editable install
                "cold cache": {"SPARSEMERGE_CACHE_DIR": tempfile.mkdtemp(prefix="fp-cold-")},
                "warm cache": {"SPARSEMERGE_CACHE_DIR": str(warm)},
            }
            for name, env in variants.items():
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                r = measure([py, "-m", "mergekit_sparse", *argv(out)], threads=args.threads, env=env)
                if rep:
                    times.setdefault((cmd, name), []).append(r["wall"])
    rows = []
    for cmd in commands:
        old = statistics.median(times[(cmd, "old (no fingerprint)")])
        for name in ("old (no fingerprint)", "cold cache", "warm cache"):
            t = statistics.median(times[(cmd, name)])
            rows.append((cmd, name, f"{t:.2f} s", f"{t / old:.3f}x"))
    what = "SmolLM2-135M corpus" if args.real else f"{args.size / 1e9:g} B synthetic preset"
    print(f"content fingerprints on the {what}, {args.threads} thread(s), median of {args.repeats}")
    print(table(rows, ("command", "variant", "wall", "vs old")))


if __name__ == "__main__":
    main()
