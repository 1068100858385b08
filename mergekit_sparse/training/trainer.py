"""One readable training loop: masked AdamW, accumulation, clipping, warm-up + cosine/linear schedule,
evaluation loss, a JSONL log, resume, and torch.distributed (DDP) when run under torchrun.

The loss of an optimizer step is the mean over every labelled token of the step's micro-batches on
every rank, so one process and N processes with the same global batch compute the same update.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import OptionError
from ..settings import TrainConfig
from ..storage import atomic
from ..storage.atomic import AtomicPath
from ..storage.writer import CheckpointWriter
from .data import IGNORE, collate, encode, token_loss_sum
from .models import saved_state
from .optim import MaskedAdamW, make_optimizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - frac)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))


class Dist:
    """Rank/world from torchrun's environment; a no-op in one process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)

    def sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t[0])

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, k = token_loss_sum(model, collate(examples[i : i + batch_size], pad_id))
        total, n = total + float(loss), n + k
    model.train()
    return total / max(1, n)


def save_model(
    model,
    out: Path,
    *,
    reference: Path,
    force: bool,
    metadata: dict | None = None,
    extra_files: dict[str, str] | None = None,
    inputs=(),
    dtype=None,
) -> None:
    """Stream the model's state dict out as an HF folder with the reference's config and tokenizer;
    `dtype` casts floating tensors (a model trained in float32 saved back as bf16)."""
    sd = saved_state(model)
    if dtype is not None:
        sd = {n: t.to(dtype) if t.is_floating_point() else t for n, t in sd.items()}
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in sorted(sd.items())]
    with CheckpointWriter(
        out,
        plan,
        folder=True,
        reference=reference,
        force=force,
        metadata={k: str(v) for k, v in (metadata or {}).items()},
        inputs=list(inputs),
        config_dtype=dtype,
    ) as w:
        for n, _, _ in plan:
            w.write(n, sd[n])
        for name, text in (extra_files or {}).items():
            w.add_file(name, text)


def train(
    model,
    tokenizer,
    records: list[dict],
    *,
    cfg: TrainConfig,
    masks: dict[str, torch.Tensor] | None,
    out: Path,
    reference: Path,
    force: bool = False,
    progress: bool = False,
    record: dict | None = None,
    save_dtype=None,
    metadata: dict | None = None,
    card: str | None = None,
) -> dict:
    """Train `model` in place and save it to `out` (floating tensors cast to `save_dtype` when given);
    returns a summary (also written to out/train.json).

    A work folder `<out>.work/` holds the JSONL log and resumable snapshots; a rerun with the same
    settings resumes from the last snapshot, and the folder is removed once `out` is complete.
    """
    cfg.check()
    dist = Dist()
    torch.manual_seed(cfg.seed)
    work = Path(f"{out}.work")
    settings = {"config": asdict(cfg), "examples": len(records), **(record or {})}
    examples = [encode(tokenizer, r, cfg.max_len) for r in records]
    examples = [e for e in examples if any(lbl != IGNORE for lbl in e.labels[1:])]
    if not examples:
        raise OptionError("no example has a response token left after truncation; raise --max-len")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(examples), generator=g).tolist()
    n_eval = int(cfg.eval_fraction * len(examples))
    eval_set = [examples[i] for i in perm[:n_eval]]
    train_set = [examples[i] for i in perm[n_eval:]]
    named = [(n, p) for n, p in model.named_parameters()]
    opt = make_optimizer(
        cfg.optimizer,
        named,
        masks,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        sparse_below=cfg.sparse_below,
    )
    start = _resume_point(work, settings)  # read-only on every rank, then one writer
    if start:
        _load_snapshot(work, model, opt)
        if dist.rank == 0:
            print(
                f"resuming from the snapshot at step {start} of {cfg.steps} in {work} (same settings and inputs)",
                file=sys.stderr,
            )
    elif dist.rank == 0 and (work / "snapshot").is_dir():
        print(f"starting over: the snapshot in {work} was made with other settings or inputs", file=sys.stderr)
    dist.barrier()
    if dist.rank == 0:
        _prepare_work(work, settings, start)
    dist.barrier()
    ddp = model
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    micro = cfg.batch_size // cfg.grad_accum
    if micro % dist.world:
        raise OptionError(
            f"--batch-size {cfg.batch_size} / --grad-accum {cfg.grad_accum} = {micro} examples per "
            f"micro-batch cannot be split evenly over {dist.world} processes"
        )
    per_rank = micro // dist.world
    order = _order(len(train_set), cfg.steps * cfg.batch_size, cfg.seed)
    log = open(work / "log.jsonl", "a") if dist.rank == 0 else None
    last = {}
    for step in tqdm(
        range(start, cfg.steps), desc="train", disable=not progress or dist.rank, initial=start, total=cfg.steps
    ):
        t0 = time.perf_counter()
        ids = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        micro_batches = []
        for a in range(cfg.grad_accum):
            chunk = ids[a * micro : (a + 1) * micro]
            mine = chunk[dist.rank * per_rank : (dist.rank + 1) * per_rank]
            micro_batches.append(collate([train_set[i] for i in mine], tokenizer.pad_token_id))
        n_tokens = dist.sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches))
        loss_total = 0.0
        for b in micro_batches:
            loss_sum, _ = token_loss_sum(ddp, b)
            (loss_sum * dist.world / n_tokens).backward()  # DDP averages over ranks
            loss_total += float(loss_sum.detach())
        lr = lr_at(step, cfg)
        gnorm = opt.step(lr=lr, clip=cfg.clip)
        opt.zero_grad()
        last = {
            "step": step + 1,
            "loss": dist.sum(loss_total) / n_tokens,
            "lr": lr,
            "grad_norm": gnorm,
            "step_time": time.perf_counter() - t0,
        }
        if cfg.eval_every and eval_set and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            last["eval_loss"] = eval_loss(model, eval_set, tokenizer.pad_token_id)
        if log:
            log.write(atomic.dumps(last, indent=None) + "\n")
            log.flush()
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps and dist.rank == 0:
            _snapshot(work, model, opt, step + 1)
    if log:
        log.close()
    summary = {
        "settings": settings,
        "final": last,
        "optimizer_state_bytes": opt.state_bytes(),
        "trainable": sum(int(m.sum()) for m in masks.values()) if masks else sum(p.numel() for _, p in named),
        "world_size": dist.world,
    }
    if dist.rank == 0:
        save_model(
            model,
            out,
            reference=reference,
            force=force,
            metadata={"trained_by": "mergekit-sparse", **(metadata or {})},
            dtype=save_dtype,
            extra_files={
                "train.json": atomic.dumps(summary),
                "train_log.jsonl": (work / "log.jsonl").read_text(),
                **({"README.md": card} if card else {}),
            },
        )
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    return summary


def _order(n: int, count: int, seed: int) -> list[int]:
    """`count` example indices: seeded shuffles of 0..n-1, one epoch after another."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    while len(out) < count:
        out += torch.randperm(n, generator=g).tolist()
    return out[:count]


def _snapshot(work: Path, model, opt: MaskedAdamW, step: int) -> None:
    """Atomically write model weights + optimizer state + step (the resume point)."""
    from safetensors.torch import save_file

    snap = AtomicPath(work / "snapshot", force=True, is_dir=True)
    try:
        save_file({k: v.contiguous() for k, v in saved_state(model).items()}, snap.tmp / "model.safetensors")
        atomic.fault_point("snapshot")
        torch.save(opt.state_dict(), snap.tmp / "optimizer.pt")
        (snap.tmp / "step.json").write_text(json.dumps({"step": step}))
        snap.commit()
    except OSError as e:  # a full or read-only disk: the last good snapshot stays, the new one is dropped
        snap.discard()
        raise atomic.os_error(e, work / "snapshot") from None
    except BaseException:
        snap.discard()
        raise


def _resume_point(work: Path, settings: dict) -> int:
    """The step of the last snapshot when it was made with the same settings, else 0."""
    try:
        same = json.loads((work / "settings.json").read_text()) == json.loads(
            json.dumps(settings, sort_keys=True, default=str)
        )
        return json.loads((work / "snapshot" / "step.json").read_text())["step"] if same else 0
    except (OSError, ValueError, KeyError):
        return 0


def _load_snapshot(work: Path, model, opt: MaskedAdamW) -> None:
    from safetensors.torch import load_file

    snap = work / "snapshot"
    with torch.no_grad():
        sd = load_file(snap / "model.safetensors")
        for n, t in saved_state(model).items():
            t.copy_(sd[n])
    opt.load_state_dict(torch.load(snap / "optimizer.pt", weights_only=True))


def _prepare_work(work: Path, settings: dict, start: int) -> None:
    """Fresh work folder when starting over; when resuming, drop log lines past the snapshot."""
    if not start:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic.write_text(work / "settings.json", json.dumps(settings, sort_keys=True, default=str))
    log = work / "log.jsonl"
    if start and log.exists():
        lines = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] <= start]
        atomic.write_text(log, "".join(ln + "\n" for ln in lines))
