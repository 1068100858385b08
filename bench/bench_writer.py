"""The streaming writer: copy a ~1 GB checkpoint (resharded to 500 MB shards), next to a plain read.

    python bench/bench_writer.py [--size 0.5e9]

Target (issue 2): peak RssAnon ≤ 2 × largest tensor in float32 + 400 MB.
"""

from __future__ import annotations

import argparse
import shutil

from common import BIN, HERE, generated_checkpoints, mb, measure, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=float, default=0.5e9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    root, largest, bound = generated_checkpoints(args.size)
    plain = measure([str(BIN / "python"), str(HERE / "plain_read.py"), str(root / "base")], threads=args.threads)
    shutil.rmtree(root / "copy", ignore_errors=True)
    ours = measure(
        [str(BIN / "python"), str(HERE / "copy_checkpoint.py"), str(root / "base"), str(root / "copy")],
        threads=args.threads,
    )
    print(
        table(
            [
                (
                    f"{plain['wall']:.1f}s",
                    f"{ours['wall']:.1f}s",
                    mb(ours["anon"]),
                    mb(ours["rss"]),
                    mb(largest * 4),
                    mb(bound),
                    "ok" if ours["anon"] <= bound else "OVER",
                )
            ],
            ("plain read", "copy", "peak anon", "peak rss", "largest f32", "anon bound", "bound"),
        )
    )


if __name__ == "__main__":
    main()
