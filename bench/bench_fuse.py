"""`sparsemerge fuse` of two generated bf16 task checkpoints with a base (p = 1), next to (a) the floor
— a process reading every input tensor as float32 once per full pass our algorithm makes (fuse.json
says how many: 1 when the sampled window holds the threshold, the fusion pass then also being the
selection's counting pass; the sampling pass touches ~2 %) and writing the output bytes — and (b)
mergekit's slerp of the same two models when mergekit is installed in bench/.mergekit-venv (see
bench/README.md; the column is skipped otherwise). Same thread count, same run.

    python bench/bench_fuse.py [--size 0.5e9] [--threads 2 1] [--repeats 3]

Targets (issue 5): wall ≤ 1.5 × floor and ≤ 0.4 × mergekit slerp; peak RssAnon ≤ 2 × largest
tensor in float32 + 400 MB; `sparsemerge --help` under 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time

from common import BIN, HERE, generated_checkpoints, mb, measure, sparsemerge, table

MERGEKIT = HERE / ".mergekit-venv" / "bin" / "mergekit-yaml"


def median(runs: list[dict]) -> dict:
    """The median wall of repeated runs (their spread alongside) and the largest memory peaks."""
    walls = sorted(r["wall"] for r in runs)
    return {
        "wall": statistics.median(walls),
        "lo": walls[0],
        "hi": walls[-1],
        "anon": max(r["anon"] for r in runs),
        "rss": max(r["rss"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=float, default=0.5e9)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument(
        "--preset",
        choices=["synthetic", "tie-heavy"],
        default="synthetic",
        help="generated inputs: Gaussian deltas, or bf16 steps that tie like a real fine-tune",
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs of each contender, interleaved; medians shown")
    args = ap.parse_args()
    root, largest, bound = generated_checkpoints(args.size, args.preset)
    base, a, b = (str(root / x) for x in ("base", "task0", "task1"))
    cfg = root / "slerp.yaml"
    cfg.write_text(
        f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {b}\n"
        f"parameters:\n  t: 0.5\ndtype: bfloat16\n"
    )
    rows = []
    for threads in args.threads:
        runs: dict[str, list[dict]] = {"ours": [], "floor": [], "mk": []}
        for _ in range(args.repeats):
            out = root / "fused"
            shutil.rmtree(out, ignore_errors=True)
            runs["ours"].append(
                measure(
                    [sparsemerge(), "fuse", a, b, "--base", base, "--p", "1", "-o", str(out), "--no-check"],
                    threads=threads,
                )
            )
            passes = json.loads((out / "fuse.json").read_text())["counts"]["full_passes"]
            runs["floor"].append(
                measure(
                    [
                        str(BIN / "python"),
                        str(HERE / "plain_read.py"),
                        base,
                        a,
                        b,
                        "--passes",
                        str(passes),
                        "--write",
                        str(root / "floor.bin"),
                    ],
                    threads=threads,
                )
            )
            if MERGEKIT.exists():
                shutil.rmtree(root / "mk", ignore_errors=True)
                runs["mk"].append(measure([str(MERGEKIT), str(cfg), str(root / "mk")], threads=threads))
        ours, floor = median(runs["ours"]), median(runs["floor"])
        mk = "not installed"
        if runs["mk"]:
            m = median(runs["mk"])
            mk = f"{m['wall']:.1f}s [{m['lo']:.1f}-{m['hi']:.1f}] (ours {ours['wall'] / m['wall']:.2f}x)"
        rows.append(
            (
                threads,
                passes,
                f"{floor['wall']:.1f}s [{floor['lo']:.1f}-{floor['hi']:.1f}]",
                f"{ours['wall']:.1f}s [{ours['lo']:.1f}-{ours['hi']:.1f}]",
                f"{ours['wall'] / floor['wall']:.2f}x",
                mk,
                mb(ours["anon"]),
                mb(ours["rss"]),
                mb(bound),
                "ok" if ours["anon"] <= bound else "OVER",
            )
        )
    print(f"medians of {args.repeats} interleaved runs, [fastest-slowest]")
    print(
        table(
            rows,
            (
                "threads",
                "full passes",
                "floor",
                "fuse",
                "vs floor",
                "mergekit slerp",
                "peak anon",
                "peak rss",
                "anon bound",
                "bound",
            ),
        )
    )
    t = time.perf_counter()
    subprocess.run([sparsemerge(), "--help"], capture_output=True, check=True)
    print(f"sparsemerge --help: {time.perf_counter() - t:.2f}s (target < 0.5 s)")


if __name__ == "__main__":
    main()
