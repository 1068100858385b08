"""Step time of sparse-masked (ρ = 1 %) vs dense AdamW training on the same model, in the same run.

    python bench/bench_train.py [--steps 30] [--threads 2 1]

Target (issue 7): sparse step time ≤ 1.3 × dense. Also prints the optimizer state sizes.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergekit_sparse.builtin import builtin_model
from mergekit_sparse.builtin.tasks import generate
from mergekit_sparse.training.data import collate, encode, token_loss_sum
from mergekit_sparse.training.models import load_model
from mergekit_sparse.training.optim import MaskedAdamW

from common import table


def steps_per_second(model, tok, opt, batches, steps) -> float:
    for b in batches[:3]:  # warm-up
        loss, n = token_loss_sum(model, b)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    t = time.perf_counter()
    for i in range(steps):
        loss, n = token_loss_sum(model, batches[i % len(batches)])
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        res = {}
        for kind in ("dense", "sparse", "dense"):
            model, tok = load_model(builtin_model(), dtype=torch.float32)
            recs = generate("caesar", 16 * 8, seed=0)
            batches = [collate([encode(tok, r) for r in recs[i : i + 16]], tok.pad_token_id) for i in range(0, 128, 16)]
            named = list(model.named_parameters())
            masks = None
            if kind == "sparse":
                g = torch.Generator().manual_seed(0)
                masks = {n: torch.rand(p.shape, generator=g) < 0.01 for n, p in named}
            opt = MaskedAdamW(named, masks, lr=1e-3, weight_decay=0.01)
            res.setdefault(kind, []).append((steps_per_second(model, tok, opt, batches, args.steps), opt.state_bytes()))
        dense = min(t for t, _ in res["dense"])  # best of two dense runs, around the sparse one
        sparse, sparse_bytes = res["sparse"][0]
        rows.append(
            (
                threads,
                f"{dense * 1e3:.1f} ms",
                f"{sparse * 1e3:.1f} ms",
                f"{sparse / dense:.2f}x",
                f"{res['dense'][0][1]:,} B",
                f"{sparse_bytes:,} B",
                f"{sparse_bytes / res['dense'][0][1]:.3%}",
            )
        )
    print(table(rows, ("threads", "dense step", "sparse step", "ratio", "dense state", "sparse state", "state ratio")))


if __name__ == "__main__":
    main()
