"""Staged retraining (CPI-FT stage 4, METHODS §6) and the `train` driver.

Stage k trains the groups' k-th entry on a balanced sample of its tasks while every parameter in
F_k = ∪_{g<k} ∪_{i∈G_g} Cⁱ (the cores of all earlier groups) is frozen. Each finished stage is a
complete HF folder OUT/stage-k (written atomically, with stage.json inside); a rerun skips the
stages whose folder exists with matching settings and resumes from the last one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..analysis.overlap import load_groups
from ..errors import MismatchError, OptionError
from ..storage import atomic, modelcard
from ..storage.base import BASE_KEY, base_of, record_for
from ..storage.masks import MaskSet
from ..storage.writer import check_output
from .data import balanced_sample, file_sha256, read_jsonl
from .models import load_for_training, model_folder
from .trainer import TrainConfig, train


def model_masks(model, mask_set: MaskSet, where) -> dict[str, torch.Tensor]:
    """Boolean masks keyed like the model's parameters, checked against their shapes."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = [n for n in mask_set.names if n not in shapes]
    if missing:
        raise MismatchError(
            f"mask {mask_set.path} names '{missing[0]}', which is not a parameter of {where}; "
            "was it made for another model?"
        )
    for n in mask_set.names:
        if tuple(mask_set.shapes[n]) != shapes[n]:
            raise MismatchError(
                f"mask {mask_set.path} does not fit {where}: '{n}' is {list(mask_set.shapes[n])} in "
                f"the mask but {list(shapes[n])} in the model; it was made for another model"
            )
    out = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}  # unmasked params stay frozen
    for n in mask_set.names:
        out[n] = mask_set.bool(n)
    return out


def run_train(
    model_dir: str,
    data: str,
    out: Path,
    *,
    cfg: TrainConfig,
    mask: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Full fine-tuning (no mask) or masked training of one task."""
    cfg.check()
    folder, start_ck = model_folder(model_dir)
    # the trainer's scratch folder OUT.work is an output too: it must not be (or hold) the input
    inputs = [folder, *start_ck.files, Path(data)] + ([Path(mask)] if mask else [])
    check_output(out, inputs, force=force, scratch=[Path(f"{out}.work")])
    records = read_jsonl(data)
    model, tok, stored = load_for_training(folder)
    masks = model_masks(model, MaskSet.load(mask), model_dir) if mask else None
    record = {
        "model": str(model_dir),
        # the resume key (METHODS §3): a replaced model, data or mask file starts over, never resumes
        "model_fingerprint": start_ck.content_fingerprint(),
        "data": str(data),
        "data_sha256": file_sha256(data),
        "mask": mask,
        "mask_sha256": file_sha256(mask) if mask else None,
    }
    base = record_for(start_ck, out, spec=model_dir)  # METHODS §9: the model this one is fine-tuned from
    method = "masked fine-tuning" if mask else "full fine-tuning"
    card = modelcard.write_card(base[BASE_KEY], method, {"config": cfg.__dict__, **record})
    return train(
        model,
        tok,
        records,
        cfg=cfg,
        masks=masks,
        out=out,
        reference=folder,
        force=force,
        progress=progress,
        record=record,
        save_dtype=stored,
        metadata=base,
        card=card,
    )


def retrain(
    model_dir: str,
    groups_path: str,
    masks_dir: str,
    data: dict[str, str],
    out: Path,
    *,
    cfg: TrainConfig,
    per_task: int | None = None,
    fraction: float | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Run every stage in the order of the groups file; returns the retrain.json document."""
    cfg.check()
    doc = load_groups(groups_path)
    tasks, groups = doc["tasks"], doc["groups"]
    missing = [t for t in tasks if t not in data]
    if missing:
        raise OptionError(f"no --data for task(s) {', '.join(missing)} of {groups_path}; give --data TASK=PATH")
    mask_paths = {t: Path(masks_dir) / f"{t}.mask.safetensors" for t in tasks}
    for t, p in mask_paths.items():
        if not p.is_file():
            raise OptionError(f"no core mask for task '{t}': expected {p} (from `sparsemerge core`)")
        made_for = MaskSet.load(p).meta.get("task")
        if made_for is not None and made_for != t:
            raise MismatchError(f"{p} is the core of task '{made_for}', not of '{t}'; the masks folder is mixed up")
    records = {t: read_jsonl(data[t]) for t in tasks}
    out = Path(out)
    inputs = [Path(model_dir), Path(groups_path), *mask_paths.values(), *map(Path, data.values())]
    check_output(out, inputs, force=True)  # never inside, around or through an input, ours or not
    ours = out.is_dir() and any(p.name.startswith("stage-") or p.name == "retrain.json" for p in out.iterdir())
    if out.exists() and not ours:  # a folder of ours is resumed, anything else protected
        check_output(out, inputs, force=force)
    check_output(
        out / "retrain.json", inputs, force=True, scratch=[out / f"stage-{k}.work" for k in range(1, len(groups) + 1)]
    )
    out.mkdir(parents=True, exist_ok=True)
    current, start_ck = model_folder(model_dir)
    plan = {
        "model": str(model_dir),
        "model_fingerprint": start_ck.content_fingerprint(),  # a re-fused model means every stage reruns
        "groups": groups,
        "groups_file": str(groups_path),
        "masks": {t: str(p) for t, p in mask_paths.items()},
        "masks_sha256": {t: file_sha256(p) for t, p in mask_paths.items()},  # re-cored masks too
        "data": {t: {"path": data[t], "sha256": file_sha256(data[t])} for t in tasks},
        "per_task": per_task,
        "fraction": fraction,
        "config": cfg.__dict__,
    }
    stages = []
    # the retrained model is a multi-task fine-tune of the fused model's own base (θ⁰) when it records one
    root, _ = base_of(start_ck)
    root_spec = None
    if root is None:
        root, root_spec = start_ck, model_dir
    for k, group in enumerate(groups, 1):
        stage_dir = out / f"stage-{k}"
        stage_plan = {"stage": k, "group": group, "start": str(current), "plan": plan}
        done = stage_dir / "stage.json"
        if done.is_file() and json.loads(done.read_text()).get("stage_plan") == json.loads(
            json.dumps(stage_plan, default=str)
        ):
            stages.append(json.loads(done.read_text()) | {"skipped": True})
            current = stage_dir
            continue
        if stage_dir.exists():
            check_output(stage_dir, [], force=True)  # stale stage from other settings: redo
        model, tok, stored = load_for_training(current)
        frozen_tasks = [t for g in groups[: k - 1] for t in g]
        trainable = _trainable_masks(model, [MaskSet.load(mask_paths[t]) for t in frozen_tasks], current)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        sample = balanced_sample(
            {t: records[t] for t in group}, per_task=per_task, fraction=fraction, seed=cfg.seed + k
        )
        summary = train(
            model,
            tok,
            [r for _, r in sample],
            cfg=TrainConfig(**{**cfg.__dict__, "seed": cfg.seed + k}),
            masks=trainable,
            out=stage_dir,
            reference=current,
            force=True,
            progress=progress,
            record={"stage": k, "group": group},
            save_dtype=stored,
            metadata=record_for(root, stage_dir, spec=root_spec),
            card=modelcard.write_card(
                record_for(root, stage_dir, spec=root_spec)[BASE_KEY],
                "CPI-FT staged retraining",
                {"stage": k, "group": group, "frozen_tasks": [t for g in groups[: k - 1] for t in g], **plan},
            ),
        )
        frozen_ok = all(torch.equal(p[~trainable[n]], before[n][~trainable[n]]) for n, p in model.named_parameters())
        frozen_count = sum(int((~m).sum()) for m in trainable.values())
        info = {
            "stage": k,
            "group": group,
            "stage_plan": stage_plan,
            "examples": len(sample),
            "frozen_tasks": frozen_tasks,
            "frozen_parameters": frozen_count,
            "frozen_bit_identical": frozen_ok,
            "final": summary["final"],
        }
        if not frozen_ok:
            raise RuntimeError(f"stage {k}: a frozen parameter changed; this is a bug")
        atomic.write_json(done, info)
        stages.append(info)
        current = stage_dir
    result = {
        "plan": plan,
        "stages": [{k: v for k, v in s.items() if k != "stage_plan"} for s in stages],
        "final_model": str(current),
    }
    atomic.write_json(out / "retrain.json", result)
    return result


def _trainable_masks(model, frozen: list[MaskSet], where) -> dict[str, torch.Tensor] | None:
    """True where a parameter trains at this stage: not in any earlier group's core."""
    if not frozen:
        return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    out = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    for m in frozen:
        for n, mask in model_masks(model, m, where).items():
            out[n] &= ~mask
    return out
