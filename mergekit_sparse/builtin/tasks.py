"""Synthetic character-level tasks for the built-in demo model: seeded generators of JSONL records.

Pre-training mixture (what the built-in base model knows): add, rev, sort, count, lookup, mod.
Held-apart fine-tuning tasks (what the demo teaches it): caesar, dsort, sub, map.
Every generator is deterministic for a given (task, n, seed).
"""

from __future__ import annotations

import json
import random

LETTERS = "abcdefgh"
MAPPING = dict(zip(LETTERS, "hgfedcba"))  # the fixed letter map of the `map` task


def _word(rng: random.Random, lo: int = 3, hi: int = 5, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice("123456789") for _ in range(rng.randint(lo, hi)))


def _example(task: str, rng: random.Random) -> dict:
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return {"prompt": f"{a}+{b}=", "response": str(a + b)}
    if task == "sub":
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        return {"prompt": f"{a}-{b}=", "response": str(a - b)}
    if task == "mod":
        a, b = rng.randint(0, 99), rng.randint(2, 9)
        return {"prompt": f"{a}%{b}=", "response": str(a % b)}
    if task == "rev":
        w = _word(rng)
        return {"prompt": f"rev {w}=", "response": w[::-1]}
    if task == "sort":
        d = _digits(rng)
        return {"prompt": f"sort {d}=", "response": "".join(sorted(d))}
    if task == "dsort":
        d = _digits(rng)
        return {"prompt": f"dsort {d}=", "response": "".join(sorted(d, reverse=True))}
    if task == "count":
        w = _word(rng, 4, 7, "abc")
        c = rng.choice("abc")
        return {"prompt": f"count {c} {w}=", "response": str(w.count(c))}
    if task == "lookup":
        keys = rng.sample(LETTERS, 3)
        vals = [str(rng.randint(0, 9)) for _ in keys]
        q = rng.randrange(3)
        table = "".join(k + v for k, v in zip(keys, vals))
        return {"prompt": f"{table}?{keys[q]}=", "response": vals[q]}
    if task == "caesar":
        w = _word(rng)
        return {"prompt": f"shift {w}=", "response": "".join(LETTERS[(LETTERS.index(c) + 1) % 8] for c in w)}
    if task == "map":
        w = _word(rng)
        return {"prompt": f"map {w}=", "response": "".join(MAPPING[c] for c in w)}
    raise KeyError(task)


PRETRAIN_TASKS = ("add", "rev", "sort", "count", "lookup", "mod")
FINETUNE_TASKS = ("caesar", "dsort", "sub", "map")
ALL_TASKS = PRETRAIN_TASKS + FINETUNE_TASKS


def generate(task: str, n: int, seed: int = 0) -> list[dict]:
    """n records of `task`, deterministic for (task, n, seed)."""
    rng = random.Random(f"{task}:{seed}")
    return [_example(task, rng) for _ in range(n)]


def split(task: str, *, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test records (test prompts never appear in train)."""
    recs = generate(task, 4 * (n_train + n_test), seed)
    seen, test, train = set(), [], []
    for r in recs:
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        (test if len(test) < n_test else train).append(r)
        if len(train) >= n_train:
            break
    return train, test


def jsonl(records: list[dict]) -> str:
    """Records as JSONL text (one JSON object a line)."""
    return "".join(json.dumps(r) + "\n" for r in records)
