"""`sparsemerge gallop` on ~0.5 B parameters of stored float32 gradients, next to a plain read of
params + grads once per full pass gallop makes (2: counting and selection; the sampling pass
touches ~2 %) in the same run.

    python bench/bench_gallop.py [--params 0.5e9] [--threads 2 1]

Target: peak RssAnon ≤ 2 × largest tensor in float32 + 400 MB, as for the other streaming commands.
"""

from __future__ import annotations

import argparse

import torch
from gen_checkpoints import llama_shapes

from common import BIN, HERE, generated_checkpoints, mb, measure, sparsemerge, table


def make_grads(path, shapes) -> None:
    from mergekit_sparse.storage.writer import CheckpointWriter

    if path.exists():
        return
    plan = [(n, torch.float32, s) for n, s in shapes]
    with CheckpointWriter(path, plan, folder=False) as w:
        for i, (n, _, s) in enumerate(plan):
            w.write(n, torch.randn(s, generator=torch.Generator().manual_seed(i)) * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=0.5e9)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args()
    root, largest, bound = generated_checkpoints(args.params)
    shapes, _ = llama_shapes(args.params)
    grads = root / "grads.safetensors"
    make_grads(grads, shapes)
    rows = []
    for threads in args.threads:
        plain = measure(
            [str(BIN / "python"), str(HERE / "plain_read.py"), str(root / "base"), str(grads), "--passes", "2"],
            threads=threads,
        )
        ours = measure(
            [
                sparsemerge(),
                "gallop",
                "--params",
                str(root / "base"),
                "--grads",
                str(grads),
                "--rho",
                "1",
                "-o",
                str(root / "gallop.mask.safetensors"),
                "--force",
            ],
            threads=threads,
        )
        rows.append(
            (
                threads,
                f"{plain['wall']:.1f}s",
                f"{ours['wall']:.1f}s",
                f"{ours['wall'] / plain['wall']:.2f}x",
                mb(ours["anon"]),
                mb(ours["rss"]),
                mb(bound),
                "ok" if ours["anon"] <= bound else "OVER",
            )
        )
    print(table(rows, ("threads", "plain read x2", "gallop", "ratio", "peak anon", "peak rss", "anon bound", "bound")))


if __name__ == "__main__":
    main()
