"""The real-model benchmark: core, overlap, fuse and gallop on bf16 fine-tunes of SmolLM2-135M.

    python bench/real/build.py              # once: the corpus, in $SPARSEMERGE_BENCH_CACHE
    python bench/real/bench_real.py [--threads 1 2] [--repeats 3]

Every row is measured next to its baseline in the same run, interleaved over `--repeats` rounds
(medians shown): a plain read of the same files (safetensors, every tensor to float32, once per full
pass the command reports) and, for `fuse`, mergekit 0.1.5's slerp of the same pair (when
bench/.mergekit-venv exists). Targets (real-fine-tune issue): core <= 1.5x the plain read; fuse
--base --p <= 0.4x mergekit and <= 2x the plain read; gallop <= 2x the plain read per full pass;
one full pass in every row; peak RssAnon <= 2 x largest float32 tensor + 400 MB + 64 MB per task
beyond the second. The base is Q4_1-dequantised (see build.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from build import cache_root  # noqa: E402
from common import BIN, HERE, mb, measure, sparsemerge, table  # noqa: E402

MERGEKIT = HERE / ".mergekit-venv" / "bin" / "mergekit-yaml"


def med(runs: list[dict]) -> dict:
    return {"wall": statistics.median(r["wall"] for r in runs), "anon": max(r["anon"] for r in runs)}


def plain(files: list[str], passes: int, threads: int, write: Path | None = None) -> dict:
    cmd = [str(BIN / "python"), str(HERE / "plain_read.py"), *files, "--passes", str(passes)]
    return measure(cmd + (["--write", str(write)] if write else []), threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = cache_root()
    base = str(root / "base")
    tasks = sorted(str(p) for p in (root / "ft").iterdir() if (p / "model.safetensors").is_file())
    if len(tasks) < 3:
        raise SystemExit(f"run bench/real/build.py first (found {len(tasks)} fine-tunes in {root / 'ft'})")
    from mergekit_sparse.storage.checkpoint import Checkpoint

    largest = max(i.numel for i in Checkpoint.open(base).infos.values())
    bound = lambda n_tasks: 2 * 4 * largest + 400e6 + 64e6 * max(0, n_tasks - 2)  # noqa: E731
    work = root / "bench-out"
    work.mkdir(exist_ok=True)
    grads = work / "grads.safetensors"
    if not grads.exists():
        subprocess.run(
            [
                sparsemerge(),
                "gradients",
                "--model",
                base,
                "--data",
                str(root / "data" / "add.train.jsonl"),
                "--fraction",
                "0.25",
                "--max-len",
                "48",
                "-o",
                str(grads),
            ],
            check=True,
        )
    cfg = work / "slerp.yaml"
    cfg.write_text(
        f"merge_method: slerp\nbase_model: {tasks[1]}\nmodels:\n  - model: {tasks[0]}\n"
        f"  - model: {tasks[1]}\nparameters:\n  t: 0.5\ndtype: bfloat16\n"
    )
    rows = []
    for threads in args.threads:
        runs: dict[str, list] = {}
        passes: dict[str, int] = {}

        def run(key, cmd, reader=None):
            shutil.rmtree(work / key, ignore_errors=True)
            (work / key).parent.mkdir(exist_ok=True)
            runs.setdefault(key, []).append(measure(cmd, threads=threads))
            if reader:
                passes[key] = reader()

        for _ in range(args.repeats):
            core2 = work / "core2"
            run(
                "core2",
                [sparsemerge(), "core", "--base", base, *tasks[:2], "--p", "1", "-o", str(core2)],
                lambda: max(t["full_passes"] for t in json.loads((core2 / "core.json").read_text())["tasks"]),
            )
            core4 = work / "core4"
            run(
                "core4",
                [sparsemerge(), "core", "--base", base, *tasks, "--p", "1", "-o", str(core4)],
                lambda: max(t["full_passes"] for t in json.loads((core4 / "core.json").read_text())["tasks"]),
            )
            masks = [str(core2 / f"{Path(t).name}.mask.safetensors") for t in tasks[:2]]
            run("overlap", [sparsemerge(), "overlap", *masks, "-o", str(work / "overlap" / "g.json")])
            fused = work / "fuse_p"
            run(
                "fuse_p",
                [sparsemerge(), "fuse", *tasks[:2], "--base", base, "--p", "1", "-o", str(fused), "--no-check"],
                lambda: json.loads((fused / "fuse.json").read_text())["counts"]["full_passes"],
            )
            run(
                "fuse_masks",
                [
                    sparsemerge(),
                    "fuse",
                    *tasks[:2],
                    "--base",
                    base,
                    *[x for m in masks for x in ("--masks", m)],
                    "-o",
                    str(work / "fuse_masks"),
                    "--no-check",
                ],
            )
            run(
                "gallop",
                [
                    sparsemerge(),
                    "gallop",
                    "--params",
                    base,
                    "--grads",
                    str(grads),
                    "--rho",
                    "1",
                    "-o",
                    str(work / "gallop" / "g.mask.safetensors"),
                ],
                lambda: json.loads((work / "gallop" / "g.json").read_text())["criteria"]["gallop"]["full_passes"],
            )
            runs.setdefault("read2", []).append(plain([base, *tasks[:2]], 1, threads))
            runs.setdefault("read4", []).append(plain([base, *tasks], 1, threads))
            runs.setdefault("readw", []).append(plain([base, *tasks[:2]], 1, threads, write=work / "floor.bin"))
            runs.setdefault("readg", []).append(plain([base, str(grads)], passes.get("gallop", 2), threads))
            if MERGEKIT.exists():
                shutil.rmtree(work / "mk", ignore_errors=True)
                runs.setdefault("mk", []).append(measure([str(MERGEKIT), str(cfg), str(work / "mk")], threads=threads))
        m = {k: med(v) for k, v in runs.items()}
        mk = m.get("mk", {}).get("wall")

        def row(what, key, base_key, n_tasks, extra=""):
            r, b = m[key], m[base_key]
            rows.append(
                (
                    threads,
                    what,
                    passes.get(key, "-"),
                    f"{b['wall']:.2f}s",
                    f"{r['wall']:.2f}s",
                    f"{r['wall'] / b['wall']:.2f}x",
                    extra,
                    mb(r["anon"]),
                    mb(bound(n_tasks)),
                    "ok" if r["anon"] <= bound(n_tasks) else "OVER",
                )
            )

        row("core, 2 tasks", "core2", "read2", 2)
        row(f"core, {len(tasks)} tasks", "core4", "read4", len(tasks))
        row("overlap (masks)", "overlap", "read2", 2)
        row(
            "fuse --base --p 1",
            "fuse_p",
            "readw",
            2,
            f"mergekit {mk:.2f}s: {m['fuse_p']['wall'] / mk:.2f}x" if mk else "",
        )
        row("fuse --masks", "fuse_masks", "readw", 2)
        row("gallop rho 1", "gallop", "readg", 2)
    print(
        f"SmolLM2-135M (Q4_1-dequantised) bf16 fine-tunes: {', '.join(Path(t).name for t in tasks)}; "
        f"medians of {args.repeats} interleaved rounds"
    )
    print(
        table(
            rows,
            (
                "threads",
                "command",
                "full passes",
                "plain read",
                "ours",
                "ratio",
                "vs mergekit",
                "peak anon",
                "bound",
                "",
            ),
        )
    )


if __name__ == "__main__":
    main()
