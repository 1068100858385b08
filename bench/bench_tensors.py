"""Cost per parameter as the number of tensors grows: `core` and `fuse` on 5,000 and 20,000 small tensors.

    python bench/bench_tensors.py [--counts 5000 20000] [--threads 1]

Target (real-fine-tune issue): 20,000 tensors cost at most 1.5x the time per parameter of 5,000
(every per-tensor cost must be constant: a whole-model sum per tensor made this 12x). Inputs: bf16
files of N tensors of 64 x 64 (base + 2 tasks moved by bf16 steps), generated once under bench/out.
"""

from __future__ import annotations

import argparse
import shutil

import torch
from gen_checkpoints import bf16_steps
from safetensors.torch import save_file

from common import HERE, measure, sparsemerge, table


def files(count: int):
    root = HERE / "out" / f"tensors-{count}"
    paths = [root / f"{x}.safetensors" for x in ("base", "task0", "task1")]
    if not all(p.exists() for p in paths):
        root.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(count)
        base = {
            f"model.layers.{i // 8}.w{i % 8}.weight": (0.02 * torch.randn(64, 64, generator=g)).bfloat16()
            for i in range(count)
        }
        save_file(base, paths[0])
        for p in paths[1:]:
            save_file({n: bf16_steps(t, g, 1, 3, 0.45) for n, t in base.items()}, p)
    return root, paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rows, per_param = [], {}
    for count in args.counts:
        root, (base, *tasks) = files(count)
        params = count * 64 * 64
        out = root / "cores"
        shutil.rmtree(out, ignore_errors=True)
        core = measure(
            [sparsemerge(), "core", "--base", str(base), *map(str, tasks), "--p", "1", "-o", str(out)],
            threads=args.threads,
        )
        fused = root / "fused.safetensors"
        fuse = measure(
            [sparsemerge(), "fuse", *map(str, tasks), "--base", str(base), "--p", "1", "-o", str(fused), "--force"],
            threads=args.threads,
        )
        per_param[count] = (core["wall"] / params, fuse["wall"] / params)
        rows.append(
            (
                count,
                f"{params / 1e6:.1f} M",
                f"{core['wall']:.2f}s",
                f"{fuse['wall']:.2f}s",
                f"{1e9 * per_param[count][0]:.1f}",
                f"{1e9 * per_param[count][1]:.1f}",
            )
        )
    print(f"threads {args.threads}")
    print(table(rows, ("tensors", "params", "core", "fuse", "core ns/param", "fuse ns/param")))
    lo, hi = min(per_param), max(per_param)
    print(
        f"time per parameter, {hi} vs {lo} tensors: core {per_param[hi][0] / per_param[lo][0]:.2f}x, "
        f"fuse {per_param[hi][1] / per_param[lo][1]:.2f}x (target <= 1.5x)"
    )


if __name__ == "__main__":
    main()
