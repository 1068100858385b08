"""`sparsemerge merge` (TIES density 0.2, DARE-TIES density 0.2) against mergekit 0.1.5 on the same config,
in the same run: wall time and peak anonymous memory, medians of interleaved repeats.

    python bench/bench_merge.py [--threads 1 2] [--repeats 2] [--tasks add rev caps]
                                [--methods ties dare_ties] [--scopes tensor global]
                                [--preset real|synthetic|tie-heavy] [--size 0.5e9]

Inputs: `--preset real` (the default), the real-model corpus (SmolLM2-135M, Q4_1-dequantised weights,
bf16 fine-tunes by `sparsemerge train`; `python bench/real/build.py` makes it), base + 3 tasks; or the
generated Llama-shaped checkpoints of gen_checkpoints.py (`synthetic`: Gaussian deltas; `tie-heavy`:
bf16 steps that tie like a fine-tune), base + 3 tasks of `--size` parameters (0.5 B: about 1 GB each
in bf16, made once under bench/out). mergekit runs from
bench/.mergekit-venv (see bench/README.md); its column is skipped without it. Targets (merge-family
issue): TIES ≥ 5× faster than mergekit at tensor scope and ≥ 3× at global scope (mergekit has no global
scope: its column is its tensor-scope run); anon ≤ 2 × largest float32 tensor + 400 MB + 64 MB per task
beyond the second, at both scopes. DARE draws per entry, so its scope changes nothing: tensor only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "real"))
from build import cache_root  # noqa: E402
from common import HERE, generated_checkpoints, mb, measure, sparsemerge, table  # noqa: E402

MERGEKIT = HERE / ".mergekit-venv" / "bin" / "mergekit-yaml"


def config(method: str, base: Path, tasks: list[Path], scope: str = "tensor") -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(t), "parameters": {"weight": 1.0, "density": 0.2}} for t in tasks],
        "parameters": ({"normalize": True} if method == "ties" else {})
        | ({"scope": scope} if scope != "tensor" else {}),
        "dtype": "bfloat16",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=["add", "rev", "caps"])
    ap.add_argument("--methods", nargs="+", default=["ties", "dare_ties"], choices=["ties", "dare_ties"])
    ap.add_argument("--scopes", nargs="+", default=["tensor", "global"], choices=["tensor", "global"])
    ap.add_argument("--preset", default="real", choices=["real", "synthetic", "tie-heavy"])
    ap.add_argument("--size", type=float, default=0.5e9, help="parameters of a generated preset")
    args = ap.parse_args()
    if args.preset == "real":
        root = cache_root()
        base, tasks = root / "base", [root / "ft" / t for t in args.tasks]
        if not all(p.is_dir() for p in [base, *tasks]):
            raise SystemExit(f"the corpus is missing under {root}: run python bench/real/build.py")
        what = (
            f"SmolLM2-135M (Q4_1-dequantised), base + {len(tasks)} bf16 fine-tunes ({', '.join(args.tasks)}), "
            "density 0.2"
        )
    else:
        root, _, _ = generated_checkpoints(args.size, args.preset, tasks=len(args.tasks))
        base, tasks = root / "base", [root / f"task{i}" for i in range(len(args.tasks))]
        what = (
            f"generated {args.preset} Llama, {args.size / 1e9:g} B parameters, base + {len(tasks)} tasks, density 0.2"
        )
    from safetensors import safe_open

    largest = 0
    for f in base.glob("*.safetensors"):
        with safe_open(str(f), "np") as h:
            for k in h.keys():
                n = 1
                for d in h.get_slice(k).get_shape():
                    n *= d
                largest = max(largest, n)
    bound = 2 * 4 * largest + (400 << 20) + (64 << 20) * max(0, len(tasks) - 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for threads in args.threads:
            for method in args.methods:
                import yaml

                scopes = [x for x in args.scopes if method == "ties" or x == "tensor"]
                cfgs = {}
                for scope in scopes:
                    cfgs[scope] = work / f"{method}-{scope}.yml"
                    cfgs[scope].write_text(yaml.safe_dump(config(method, base, tasks, scope)))
                ours, theirs = {x: [] for x in scopes}, []
                for _ in range(args.repeats):  # interleaved: ours at each scope, then mergekit
                    for scope in scopes:
                        shutil.rmtree(work / "ours", ignore_errors=True)
                        cmd = [sparsemerge(), "merge", str(cfgs[scope]), "-o", str(work / "ours")]
                        ours[scope].append(measure(cmd, threads=threads))
                    if MERGEKIT.exists():
                        shutil.rmtree(work / "mk", ignore_errors=True)
                        theirs.append(
                            measure(
                                [str(MERGEKIT), str(cfgs["tensor"]), str(work / "mk"), "--no-write-model-card"],
                                threads=threads,
                                env={"HF_HUB_OFFLINE": "1"},
                            )
                        )
                m = statistics.median(r["wall"] for r in theirs) if theirs else None
                for scope in scopes:
                    o = statistics.median(r["wall"] for r in ours[scope])
                    anon = max(r["anon"] for r in ours[scope])
                    rows.append(
                        (
                            threads,
                            method,
                            scope,
                            f"{o:.1f}s",
                            f"{m:.1f}s" if m else "-",
                            f"{m / o:.1f}x" if m else "-",
                            mb(anon),
                            mb(max(r["anon"] for r in theirs)) if theirs else "-",
                            f"{mb(bound)} ({'ok' if anon <= bound else 'OVER'})",
                        )
                    )
                    print(table(rows[-1:], HEADER), flush=True)
    print()
    print(what)
    print(table(rows, HEADER))


HEADER = ("threads", "method", "scope", "ours", "mergekit", "speed-up", "our anon", "mergekit anon", "anon bound")

if __name__ == "__main__":
    main()
