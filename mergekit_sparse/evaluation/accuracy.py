"""Accuracy of a model on JSONL tasks: exact match by greedy generation, or multiple choice by
log-likelihood. Batched and deterministic (greedy decoding, no sampling, eval mode)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import OptionError
from ..training.data import read_jsonl


def normalise(text: str, *, strip: bool = True, case: bool = True) -> str:
    """Comparison form of an answer: whitespace stripped (strip), lower-cased unless `case` matters."""
    if strip:
        text = text.strip()
    return text if case else text.lower()


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16, progress: bool = False
) -> list[str]:
    """Greedy continuations of `prompts` (special tokens dropped), batched with left padding."""
    model.eval()
    tokenizer.padding_side = "left"
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=True)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]  # (B, new)
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def exact_match(
    model,
    tokenizer,
    records: list[dict],
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    strip: bool = True,
    case: bool = True,
    progress: bool = False,
) -> dict:
    """{accuracy, n, correct, empty, outputs}; `empty` counts answers that are empty (EOS only)."""
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records) + 2
    preds = generate_answers(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    outputs, correct, empty = [], 0, 0
    for r, p in zip(records, preds):
        # the answer ends at the first newline: a model may keep talking after it
        answer = p.split("\n")[0]
        ok = normalise(answer, strip=strip, case=case) == normalise(r["response"], strip=strip, case=case)
        correct += ok
        empty += not answer.strip()
        outputs.append({"prompt": r["prompt"], "target": r["response"], "output": p, "correct": bool(ok)})
    return {
        "accuracy": correct / len(records),
        "n": len(records),
        "correct": correct,
        "empty": empty,
        "outputs": outputs,
    }


@torch.no_grad()
def choice_loglik(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the prompt."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    scores = []
    seqs = [p + tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)  # (C, T, V)
    for i, s in enumerate(seqs):
        tgt = torch.tensor(s[len(p) :])
        scores.append(float(logp[i, len(p) - 1 : len(s) - 1].gather(-1, tgt[:, None]).sum()))
    return scores


def choice_accuracy(model, tokenizer, records: list[dict], *, progress: bool = False) -> dict:
    model.eval()
    correct, outputs = 0, []
    for r in tqdm(records, desc="choices", disable=not progress, leave=False):
        s = choice_loglik(model, tokenizer, r["prompt"], r["choices"])
        pick = max(range(len(s)), key=s.__getitem__)
        correct += pick == r["answer"]
        outputs.append({"prompt": r["prompt"], "choice": pick, "answer": r["answer"], "loglik": s})
    return {"accuracy": correct / len(records), "n": len(records), "correct": correct, "empty": 0, "outputs": outputs}


def task_kind(path: Path) -> str:
    """ "choice" when the first record has choices, else "generate" (a missing or bad file is left to
    `read_jsonl`, which names the problem and the line)."""
    from ..training.data import MAX_LINE_BYTES

    if not Path(path).is_file():
        return "generate"
    with open(path, "rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):
            if raw.strip():
                try:
                    rec = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_LINE_BYTES else None
                except (ValueError, RecursionError):
                    return "generate"
                return "choice" if isinstance(rec, dict) and "choices" in rec else "generate"
    return "generate"


def evaluate(
    model_dir: str,
    tasks: dict[str, str],
    *,
    batch_size: int = 16,
    limit: int | None = None,
    strip: bool = True,
    case: bool = True,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """The accuracy table of one model on several tasks: {model, tasks: {name: {...}}}."""
    from ..training.models import load_model

    if limit is not None and limit < 1:
        raise OptionError(f"--limit {limit} must be at least 1")
    data = {}
    for name, path in tasks.items():
        kind = task_kind(Path(path))
        data[name] = (kind, read_jsonl(path, kind=kind)[:limit])  # validate every file before the model
    model, tok = load_model(model_dir, dtype=torch.float32)
    out = {"model": str(model_dir), "tasks": {}}
    for name, (kind, recs) in data.items():
        if kind == "choice":
            res = choice_accuracy(model, tok, recs, progress=progress)
        else:
            res = exact_match(
                model,
                tok,
                recs,
                batch_size=batch_size,
                strip=strip,
                case=case,
                max_new_tokens=max_new_tokens,
                progress=progress,
            )
        out["tasks"][name] = res | {"kind": kind, "data": str(tasks[name])}
    return out
