"""Write N random mask files (density d, seeded) over Llama-shaped tensors of ~P parameters, streaming."""

import argparse
from pathlib import Path

import torch
from gen_checkpoints import llama_shapes

from mergekit_sparse.storage.masks import MaskWriter

ap = argparse.ArgumentParser()
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--params", type=float, default=0.5e9)
ap.add_argument("--n", type=int, default=8)
ap.add_argument("--density", type=float, default=0.01)
args = ap.parse_args()
shapes, _ = llama_shapes(args.params)
args.out.mkdir(parents=True, exist_ok=True)
for i in range(args.n):
    path = args.out / f"t{i}.mask.safetensors"
    if path.exists():
        continue
    g = torch.Generator().manual_seed(i)
    with MaskWriter(path, dict(shapes), {"criterion": "random", "percent": args.density * 100}) as w:
        for name, shape in sorted(shapes):
            w.write(name, torch.rand(shape, generator=g) < args.density)
