"""A checkpoint larger than this machine's RAM, as sparse files: real headers, data mostly holes.

    python bench/gen_sparse.py --out bench/out/sparse --gb 32

Writes base + 2 tasks of `--gb` GB each (bf16, 2 GB tensors): every tensor's data is a hole (zeros)
except planted blocks: the base has random weights in one block of each tensor, each task moves
some of those weights by bf16 steps and plants larger moves in a task-specific tensor, so the top
entries do not all tie. The files take a few hundred MB on disk whatever `--gb` says.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TENSOR = 1 << 30  # entries per tensor: 2 GB in bf16
BLOCK = 1 << 20  # entries written per tensor


def bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write(path: Path, names: list[str], planted) -> None:
    header = {
        n: {"dtype": "BF16", "shape": [TENSOR // 1024, 1024], "data_offsets": [i * 2 * TENSOR, (i + 1) * 2 * TENSOR]}
        for i, n in enumerate(names)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        start = f.tell()
        f.truncate(start + 2 * TENSOR * len(names))  # holes
        for i, n in enumerate(names):
            for offset, values in planted(i, n):
                f.seek(start + 2 * (i * TENSOR + offset))
                f.write(values.tobytes())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gb", type=float, default=32)
    args = ap.parse_args()
    n = max(1, round(args.gb * 1e9 / (2 * TENSOR)))
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)]
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base_blocks = {i: (0.02 * rng.standard_normal(BLOCK)).astype(np.float32) for i in range(n)}
    write(args.out / "base.safetensors", names, lambda i, _: [(TENSOR // 2, bf16(base_blocks[i]))])
    for t in range(2):
        g = np.random.default_rng(t + 1)

        def planted(i, _, t=t, g=g):
            bits = bf16(base_blocks[i]).astype(np.int32)
            bits += np.where(g.random(BLOCK) < 0.45, g.integers(1, 4, BLOCK) * g.choice([-1, 1], BLOCK), 0)
            blocks = [(TENSOR // 2, bits.astype(np.uint16))]
            if i == t % n:
                blocks.append((TENSOR // 4, bf16(0.05 + 0.01 * g.standard_normal(BLOCK))))
            return blocks

        write(args.out / f"task{t}.safetensors", names, planted)
    print(f"{n} tensors of {TENSOR:,} entries: {2 * TENSOR * n / 1e9:.1f} GB per file -> {args.out}")


if __name__ == "__main__":
    main()
