"""What content fingerprints (METHODS §3) cost `core` and `fuse`, A/B in one run.

    git worktree add /tmp/mks-old <a commit before fingerprints, e.g. 57c4dfc>
    ln -s ../cli /tmp/mks-old/mergekit_sparse/cli; ln -s ../reports /tmp/mks-old/mergekit_sparse/reports
    python bench/bench_fingerprint.py [--old /tmp/mks-old] [--size 0.5e9] [--threads 1 2] [--repeats 3]

Variants of each command on the generated checkpoints (or `--real` on the SmolLM2 corpus): this tree with
a cold fingerprint cache (every input hashed, on a background thread while the passes read the same
pages), this tree with a warm cache (the digests read back from the cache: no hashing), and with `--old`
the tree before fingerprints (header hashes only). Ratios are to the warm cache, or to the old tree when
it is given. Target (issue 19): cold ≤ 1.05 × the baseline, warm ≈ old. Variants alternate within each
repeat, so drift hits them alike.
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
    ap.add_argument("--old", type=Path, help="a checkout of the code before fingerprints (optional baseline)")
    ap.add_argument("--size", type=float, default=0.5e9)
    ap.add_argument("--real", action="store_true", help="the SmolLM2-135M corpus of bench/real/build.py")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
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
    variants: dict[str, dict | None] = {"cold cache": None, "warm cache": {"SPARSEMERGE_CACHE_DIR": str(warm)}}
    if args.old:
        variants = {"old (no fingerprint)": {"PYTHONPATH": str(args.old)}, **variants}  # before the editable install
    baseline = "old (no fingerprint)" if args.old else "warm cache"
    times: dict[tuple[int, str, str], list[float]] = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms the page cache and the warm fingerprint cache
        for threads in args.threads:
            for cmd, argv in commands.items():
                folder = (tasks[1] / "config.json").exists()
                out = work / f"fp-{cmd}" / ("out" if cmd == "core" else "fused" if folder else "fused.safetensors")
                for name, env in variants.items():
                    env = env or {"SPARSEMERGE_CACHE_DIR": tempfile.mkdtemp(prefix="fp-cold-")}
                    shutil.rmtree(out, ignore_errors=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    r = measure([py, "-m", "mergekit_sparse", *argv(out)], threads=threads, env=env)
                    if rep:
                        times.setdefault((threads, cmd, name), []).append(r["wall"])
    rows = []
    for threads in args.threads:
        for cmd in commands:
            ref = statistics.median(times[(threads, cmd, baseline)])
            for name in variants:
                t = statistics.median(times[(threads, cmd, name)])
                rows.append((threads, cmd, name, f"{t:.2f} s", f"{t / ref:.3f}x"))
    what = "SmolLM2-135M corpus" if args.real else f"{args.size / 1e9:g} B synthetic preset"
    print(f"content fingerprints on the {what}, median of {args.repeats} interleaved repeats")
    print(table(rows, ("threads", "command", "variant", "wall", f"vs {baseline}")))


if __name__ == "__main__":
    main()
