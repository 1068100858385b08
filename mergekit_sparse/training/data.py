"""Task data: JSONL records, tokenisation with response-only labels, seeded subsets and batches.

Records are `{"prompt": ..., "response": ...}` (loss on the response tokens only), `{"text": ...}`
(loss on every token), or, for multiple-choice evaluation, `{"prompt", "choices", "answer"}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError

IGNORE = -100
MAX_LINE_BYTES = 1 << 20  # one JSONL record


def read_jsonl(path: str | Path, *, kind: str = "train") -> list[dict]:
    """Read and validate a JSONL file; every bad record is an error naming the line.

    kind: "train" accepts prompt/response or text; "generate" needs prompt/response;
    "choice" needs prompt/choices/answer.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: data file {what}")
    records = []
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)  # a cap before anything is decoded, parsed or tokenised
            if not raw:
                break
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{path}:{n}: the line is longer than {MAX_LINE_BYTES // 1024} KiB; records are one example each "
                    "(split long documents into several lines)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 (byte {e.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except RecursionError:
                raise DataError(
                    f"{path}:{n}: JSON nested deeper than Python can parse; a record is a flat object"
                ) from None
            except ValueError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            problem = _check_record(rec, kind) or _check_text(rec)
            if problem:
                raise DataError(f"{path}:{n}: {problem}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def _check_text(rec) -> str | None:
    """Strings must be encodable text (a lone surrogate escape such as "\\ud800" is not) and a response
    must say something (an empty one has no token to learn or to match)."""
    for key, value in rec.items():
        for s in value if isinstance(value, list) else [value]:
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    return f"field {key!r} holds a lone surrogate (an invalid \\u escape); it is not text"
    if rec.get("response") == "" or rec.get("text") == "":
        return "the response (or text) is empty: there is nothing to learn or to match"
    return None


def _check_record(rec, kind: str) -> str | None:
    if not isinstance(rec, dict):
        return "each line must be a JSON object"
    if kind == "choice":
        if not (
            isinstance(rec.get("prompt"), str)
            and isinstance(rec.get("choices"), list)
            and rec["choices"]
            and all(isinstance(c, str) for c in rec["choices"])
            and isinstance(rec.get("answer"), int)
            and not isinstance(rec["answer"], bool)  # true is not an index
            and 0 <= rec["answer"] < len(rec["choices"])
        ):
            return 'expected {"prompt": str, "choices": [str, ...], "answer": index into choices}'
        return None
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return None
    if kind == "train" and isinstance(rec.get("text"), str):
        return None
    want = '{"prompt": str, "response": str}' + (' or {"text": str}' if kind == "train" else "")
    return f"expected {want}, got keys {sorted(rec)}"


def file_sha256(path: str | Path) -> str:
    from ..storage.checkpoint import sha256_file

    return sha256_file(Path(path))


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, rec: dict, max_len: int | None = None) -> Example:
    """Token ids and labels; prompt tokens are labelled IGNORE so the loss covers the response only."""
    if "text" in rec and "prompt" not in rec:
        ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        p = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = p + r, [IGNORE] * len(p) + r
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return Example(ids, labels)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (pads are IGNORE)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def seeded_subset(n: int, *, fraction: float | None = None, count: int | None = None, seed: int = 0) -> list[int]:
    """Indices of a seeded random subset (order = the permutation's order, so it is also a shuffle)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    if count is None:
        count = n if fraction is None else max(1, round(fraction * n))
    return perm[: min(count, n)]


def balanced_sample(
    tasks: dict[str, list[dict]], *, per_task: int | None = None, fraction: float | None = None, seed: int = 0
) -> list[tuple[str, dict]]:
    """The same number of examples from each task (`per_task`, or `fraction` of the smallest task),
    drawn with a seed, then shuffled together."""
    if per_task is None:
        smallest = min(len(r) for r in tasks.values())
        per_task = max(1, round((fraction if fraction is not None else 1.0) * smallest))
    out = []
    for k, (name, recs) in enumerate(sorted(tasks.items())):
        idx = seeded_subset(len(recs), count=per_task, seed=seed * 1000 + k)
        if len(idx) < per_task:  # small task: cycle through it again
            idx = [idx[i % len(idx)] for i in range(per_task)]
        out += [(name, recs[i]) for i in idx]
    order = seeded_subset(len(out), seed=seed)
    return [out[i] for i in order]


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over the labelled tokens, number of labelled tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((target != IGNORE).sum())


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (non-IGNORE) next tokens of the batch."""
    loss, n = token_loss_sum(model, batch)
    return loss / max(n, 1)
