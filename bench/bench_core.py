"""`sparsemerge core` on generated bf16 Llama-shaped checkpoints, next to a plain read in the same run.

    python bench/bench_core.py [--sizes 0.25e9 0.5e9] [--threads 2 1]

Targets (issue 3): wall ≤ 1.5 × the plain read, read once per full pass the algorithm makes
(core.json says how many: 1 when the sampled window holds the threshold, plus a sampling pass
that touches ~2 % of the data); peak RssAnon ≤ 2 × largest tensor in float32 + 400 MB, not
growing with model size. The plain read of the old three-pass radix design is printed too.
"""

from __future__ import annotations

import argparse
import json
import shutil

from common import BIN, HERE, generated_checkpoints, mb, measure, sparsemerge, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25e9, 0.5e9])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument(
        "--preset",
        choices=["synthetic", "tie-heavy"],
        default="synthetic",
        help="generated inputs: Gaussian deltas, or bf16 steps that tie like a real fine-tune",
    )
    ap.add_argument("--p", type=float, default=1.0)
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        root, largest, bound = generated_checkpoints(size, args.preset)
        inputs = [str(root / x) for x in ("base", "task0", "task1")]
        for threads in args.threads:
            out = root / "cores"
            shutil.rmtree(out, ignore_errors=True)
            ours = measure(
                [
                    sparsemerge(),
                    "core",
                    "--base",
                    inputs[0],
                    *inputs[1:],
                    "--p",
                    str(args.p),
                    "-o",
                    str(out),
                    "--force",
                ],
                threads=threads,
            )
            passes = max(t["full_passes"] for t in json.loads((out / "core.json").read_text())["tasks"])
            plain = measure(
                [str(BIN / "python"), str(HERE / "plain_read.py"), *inputs, "--passes", str(passes)], threads=threads
            )
            plain3 = measure(
                [str(BIN / "python"), str(HERE / "plain_read.py"), *inputs, "--passes", "3"], threads=threads
            )
            rows.append(
                (
                    f"{size / 1e9:.2f}B",
                    threads,
                    passes,
                    f"{plain['wall']:.1f}s",
                    f"{ours['wall']:.1f}s",
                    f"{ours['wall'] / plain['wall']:.2f}x",
                    f"{plain3['wall']:.1f}s",
                    mb(ours["anon"]),
                    mb(ours["rss"]),
                    mb(bound),
                    "ok" if ours["anon"] <= bound else "OVER",
                )
            )
    print(
        table(
            rows,
            (
                "params",
                "threads",
                "full passes",
                "plain read",
                "core",
                "ratio",
                "plain read x3",
                "peak anon",
                "peak rss",
                "anon bound",
                "bound",
            ),
        )
    )


if __name__ == "__main__":
    main()
