"""Regenerate the built-in demo model: `pretrain()` trains the tiny Llama from a random init on the
synthetic mixture of `tasks.PRETRAIN_TASKS` and saves it to `assets/tiny-base`. An entry point (like the
CLI), so it may use `training`, which the `builtin` package itself never imports.

Regenerate it (deterministic up to float rounding across machines; about 10 minutes on 2 CPU cores):

    python -m mergekit_sparse.builtin --out mergekit_sparse/builtin/assets/tiny-base
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from . import ARCH, ASSET


def pretrain(
    out: Path,
    *,
    steps: int = 6000,
    per_task: int = 4000,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    arch: dict | None = None,
) -> dict:
    """Pre-train the tiny Llama from a random init on the mixture and save it to `out`.

    `arch` overrides entries of ARCH (e.g. {"hidden": 64, "intermediate": 128} for a narrower model)."""
    import torch

    from ..training.models import load_model
    from ..training.trainer import TrainConfig, train
    from .tasks import PRETRAIN_TASKS, generate
    from .tiny import build_tiny_llama

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        init = build_tiny_llama(Path(tmp) / "init", seed=seed, **{**ARCH, **(arch or {})})
        model, tok = load_model(init, dtype=torch.float32)
        records = [r for t in PRETRAIN_TASKS for r in generate(t, per_task, seed=1000 + seed)]
        cfg = TrainConfig(
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            warmup=200,
            schedule="cosine",
            weight_decay=0.01,
            clip=1.0,
            max_len=48,
            seed=seed,
        )
        summary = train(
            model,
            tok,
            records,
            cfg=cfg,
            masks=None,
            out=Path(out),
            reference=init,
            force=True,
            progress=progress,
            record={"pretrain_tasks": list(PRETRAIN_TASKS), "per_task": per_task},
        )
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=ARCH["hidden"], help="width (the MLP is twice as wide)")
    args = ap.parse_args()
    arch = {"hidden": args.hidden, "intermediate": 2 * args.hidden}
    summary = pretrain(args.out, steps=args.steps, seed=args.seed, arch=arch)
    (args.out / "train_log.jsonl").unlink(missing_ok=True)  # 0.8 MB of log: not shipped
    print(f"final loss {summary['final']['loss']:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
