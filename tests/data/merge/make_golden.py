"""Build the merge parity fixtures and mergekit 0.1.5's outputs on them (committed; CI never runs mergekit).

    .venv/bin/python tests/data/merge/make_golden.py            # fixtures (if missing) + golden outputs

Fixtures: a tiny float32 Llama (3 layers, width 16, untied head) as `base/`, and three fine-tunes `a/`,
`b/`, `c/` = base + independent Gaussian deltas of per-tensor scales (continuous values: no |τ| ties,
so every tool's top-k picks the same entries). Golden outputs: every `NAME.yml` here merged by
mergekit 0.1.5 (`mergekit-yaml`, installed in bench/.mergekit-venv with `torch==2.13.0`, see
bench/README.md), only `model.safetensors` kept, as `golden/NAME.safetensors`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MERGEKIT = ROOT / "bench" / ".mergekit-venv" / "bin" / "mergekit-yaml"


def build_fixtures() -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from mergekit_sparse.builtin.tiny import build_tiny_llama

    base = build_tiny_llama(HERE / "base", seed=0, hidden=16, layers=3, heads=2, kv_heads=1)
    weights = load_file(base / "model.safetensors")
    for i, name in enumerate("abc"):
        rng = np.random.default_rng(100 + i)
        out = {}
        for k, v in sorted(weights.items()):
            scale = float(rng.uniform(0.002, 0.05))
            out[k] = (v + rng.normal(0.0, scale, v.shape)).astype(np.float32)
        shutil.copytree(base, HERE / name)
        save_file(out, str(HERE / name / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    if not (HERE / "base").is_dir():
        build_fixtures()
    if not MERGEKIT.exists():
        sys.exit(
            f"{MERGEKIT} is missing: python3 -m venv bench/.mergekit-venv && "
            "bench/.mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5"
        )
    (HERE / "golden").mkdir(exist_ok=True)
    for cfg in sorted(HERE.glob("*.yml")):
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(
                [str(MERGEKIT), str(cfg), tmp, "--allow-crimes", "--no-write-model-card", "--no-copy-tokenizer"],
                cwd=HERE,
                env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                sys.exit(f"mergekit failed on {cfg.name}:\n{r.stderr[-3000:]}")
            shutil.copy(Path(tmp) / "model.safetensors", HERE / "golden" / f"{cfg.stem}.safetensors")
            print(f"golden/{cfg.stem}.safetensors")


if __name__ == "__main__":
    main()
