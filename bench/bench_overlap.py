"""`sparsemerge overlap` of 8 task masks over ~0.5 B parameters, next to a plain read of the mask files.

python bench/bench_overlap.py [--params 0.5e9] [--threads 2 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import BIN, HERE, mb, measure, sparsemerge, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=0.5e9)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args()
    root = HERE / "out" / f"masks-{int(args.params // 1e6)}M"
    subprocess.run(
        [sys.executable, str(HERE / "gen_masks.py"), "--out", str(root), "--params", str(args.params)], check=True
    )
    masks = sorted(str(p) for p in root.glob("*.mask.safetensors"))
    rows = []
    for threads in args.threads:
        plain = measure([str(BIN / "python"), str(HERE / "plain_read.py"), *masks], threads=threads)
        ours = measure([sparsemerge(), "overlap", *masks, "-o", str(root / "groups.json"), "--force"], threads=threads)
        rows.append(
            (
                threads,
                len(masks),
                f"{plain['wall']:.1f}s",
                f"{ours['wall']:.1f}s",
                f"{ours['wall'] / plain['wall']:.2f}x",
                mb(ours["anon"]),
            )
        )
    print(table(rows, ("threads", "masks", "plain read", "overlap", "ratio", "peak anon")))


if __name__ == "__main__":
    main()
