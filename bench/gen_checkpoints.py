"""Generate Llama-shaped HF checkpoints (base + tasks with planted deltas), streaming, seeded.

    python bench/gen_checkpoints.py --out bench/out/ckpt --params 0.5e9 --tasks 2 --dtype bfloat16
    python bench/gen_checkpoints.py --out bench/out/ties --params 0.5e9 --preset tie-heavy

`synthetic`: each task = base + small Gaussian noise everywhere + large deltas planted in a
task-specific layer's q_proj rows (so the core regions have a known structure).
`tie-heavy`: what a real bf16 fine-tune looks like (measured on SmolLM2-135M: 55 % of the entries
unchanged, a few thousand distinct |Δ|, millions tied at the 1 % threshold): bf16 weights of real
magnitudes, 45 % of the entries moved by 1-3 bf16 steps (a bounded, Adam-like update), the planted
q_proj rows by 4-8 steps. Written with the project's streaming writer: memory stays at a few
tensors, whatever the size.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch

from mergekit_sparse.storage.writer import CheckpointWriter


def llama_shapes(params: float, hidden: int = 1536, inter: int = 4096, vocab: int = 32000) -> list[tuple[str, tuple]]:
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    shapes = [
        ("model.embed_tokens.weight", (vocab, hidden)),
        ("lm_head.weight", (vocab, hidden)),
        ("model.norm.weight", (hidden,)),
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return sorted(shapes), layers


def bf16_steps(w: torch.Tensor, g: torch.Generator, lo: int, hi: int, share: float) -> torch.Tensor:
    """bf16 `w` with a `share` of its entries moved by ±lo..hi bf16 steps (integer steps of the bit pattern)."""
    bits = w.view(torch.int16).to(torch.int32)
    steps = torch.randint(lo, hi + 1, w.shape, generator=g, dtype=torch.int32)
    sign = torch.randint(0, 2, w.shape, generator=g, dtype=torch.int32) * 2 - 1
    move = torch.rand(w.shape, generator=g) < share
    # steps move the magnitude (sign kept, never through zero into the NaN patterns, never past the largest finite)
    mag = (bits & 0x7FFF) + torch.where(move, steps * sign, 0)
    mag = mag.clamp(0, 0x7F7F)
    return ((bits & 0x8000) | mag).to(torch.int16).view(torch.bfloat16)


def tie_heavy_tensor(name: str, shape, seed: int, task: int | None, layers: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{seed}".encode()))
    w = (torch.randn(shape, generator=g) * 0.02 if len(shape) > 1 else torch.ones(shape)).bfloat16()
    if task is None:
        return w
    gt = torch.Generator().manual_seed(zlib.crc32(f"{name}:{seed}:{task}".encode()))
    w = bf16_steps(w, gt, 1, 3, 0.45)
    if f"layers.{task % layers}.self_attn.q_proj" in name:
        rows = shape[0] // 8
        w[:rows] = bf16_steps(w[:rows].contiguous(), gt, 4, 8, 0.9)
    return w


def tensor(name: str, shape, seed: int, task: int | None, layers: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{seed}".encode()))
    w = torch.randn(shape, generator=g) * 0.02 if len(shape) > 1 else torch.ones(shape)
    if task is not None:
        gt = torch.Generator().manual_seed(zlib.crc32(f"{name}:{seed}:{task}".encode()))
        w += torch.randn(shape, generator=gt) * 0.002
        if f"layers.{task % layers}.self_attn.q_proj" in name:
            w[: shape[0] // 8] += 0.05
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=float, default=0.5e9)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=["synthetic", "tie-heavy"], default="synthetic")
    args = ap.parse_args()
    dtype = getattr(torch, "bfloat16" if args.preset == "tie-heavy" else args.dtype)
    make = tie_heavy_tensor if args.preset == "tie-heavy" else tensor
    shapes, layers = llama_shapes(args.params)
    plan = [(n, dtype, s) for n, s in shapes]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": layers,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for label, task in [("base", None)] + [(f"task{t}", t) for t in range(args.tasks)]:
        folder = args.out / label
        if folder.exists():
            continue
        ref = args.out / "_config"
        ref.mkdir(exist_ok=True)
        (ref / "config.json").write_text(json.dumps(cfg))
        with CheckpointWriter(folder, plan, folder=True, reference=ref, shard_bytes=int(2e9)) as w:
            for n, d, s in plan:
                w.write(n, make(n, s, args.seed, task, layers).to(d))
        print(f"wrote {folder}")
    total = sum(torch.Size(s).numel() for _, s in shapes)
    print(
        f"{total / 1e9:.2f} B parameters, {layers} layers, largest tensor {max(torch.Size(s).numel() for _, s in shapes):,}"
    )


if __name__ == "__main__":
    main()
