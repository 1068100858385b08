"""How concentrated is a fine-tune's change? The share of Σ|Δ| and of Σ Δ² carried by the top 1/5/10 %
largest |Δ| = |θ_task − θ_base| over all parameters — CPI-FT's premise is that a small core carries
most of a task's change.

    .venv/bin/python bench/science/concentration.py LABEL=MODEL_DIR ... [--base DIR]

e.g. the full fine-tunes of a science run: bench/out/science/seed0/lr0.003/full-A.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mergekit_sparse.builtin import builtin_model  # noqa: E402
from mergekit_sparse.storage.checkpoint import Checkpoint  # noqa: E402


def shares(base: Checkpoint, model: Checkpoint, percents=(1, 5, 10)) -> dict[int, tuple[float, float]]:
    d = torch.cat([(model.tensor(n).float() - base.tensor(n).float()).reshape(-1).abs() for n in base.names])
    s = torch.sort(d, descending=True).values
    l1, l2 = float(s.sum()), float((s**2).sum())
    return {
        q: (float(s[: int(s.numel() * q / 100)].sum()) / l1, float((s[: int(s.numel() * q / 100)] ** 2).sum()) / l2)
        for q in percents
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="LABEL=MODEL_DIR")
    ap.add_argument("--base", type=Path, default=None)
    args = ap.parse_args()
    base = Checkpoint.open(args.base or builtin_model())
    print("| run | top 1 %: Σ|Δ| / ΣΔ² | top 5 % | top 10 % |\n|---|---|---|---|")
    for spec in args.models:
        label, _, path = spec.partition("=")
        res = shares(base, Checkpoint.open(path))
        print(f"| {label} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in res.values()) + " |")


if __name__ == "__main__":
    main()
