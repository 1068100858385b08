"""The baseline: import torch, open checkpoints with safetensors, convert every tensor to float32,
`--passes` times (one per pass the measured algorithm makes). Optionally write the bytes of one
checkpoint out again (`--write`), as the floor of a merge."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open


def files(spec: str) -> list[Path]:
    p = Path(spec)
    return [p] if p.is_file() else sorted(x for x in p.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    total = 0.0
    for _ in range(args.passes):
        for spec in args.inputs:
            for f in files(spec):
                with safe_open(str(f), "pt") as h:
                    for name in h.keys():
                        total += float(h.get_tensor(name).float()[:1].sum())
    if args.write:
        with open(args.write, "wb") as out:
            for f in files(args.inputs[-1]):
                with safe_open(str(f), "pt") as h:
                    for name in h.keys():
                        out.write(h.get_tensor(name).float().to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    print(total)


if __name__ == "__main__":
    main()
