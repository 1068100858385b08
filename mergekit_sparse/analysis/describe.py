"""`sparsemerge inspect`: what a checkpoint holds, and how far it moved from a base."""

from __future__ import annotations

import math

import numpy as np

from ..selection.keys import CHUNK
from ..selection.passes import chunk_ranges
from ..storage.base import resolve_base
from ..storage.checkpoint import Checkpoint
from ..storage.modelcard import architecture
from ..storage.scope import align, name_filter


def inspect_checkpoint(
    spec: str, *, base: str | None = None, allow_pickle: bool = False, include=(), exclude=(), force: bool = False
) -> dict:
    """A JSON-able description: tensors (shape, dtype, numel), totals, shards; with `base`, per-tensor
    relative delta norms ‖θ − θ_base‖ / ‖θ_base‖ over the aligned scope. `base="auto"` finds the base the
    checkpoint records (METHODS §9). Parameters count floating tensors; integer/bool buffers and a tied
    head stored as a duplicate of the embedding (an alias, METHODS §1) are listed apart."""
    ck = Checkpoint.open(spec, allow_pickle=allow_pickle)
    keep = name_filter(include, exclude)
    infos = [i for i in ck.infos.values() if keep(i.name)]
    tensors = [
        {
            "name": i.name,
            "shape": list(i.shape),
            "dtype": i.dtype_name,
            "numel": i.numel,
            "file": i.file.name,
        }
        for i in infos
    ]
    report = {
        "path": str(ck.path),
        "tensors": tensors,
        "parameters": sum(i.numel for i in infos if i.is_float),
        "buffers": sum(i.numel for i in infos if not i.is_float),
        "bytes": sum(i.nbytes for i in infos),
        "tied_embedding": ck.tied_embedding,
        "stored_aliases": sorted(ck.aliases),
        "architecture": architecture(ck.config),
        "shards": [f.name for f in ck.files],
        "header_sha256": ck.fingerprint(),
        "has_config": bool(ck.folder and (ck.folder / "config.json").is_file()),
    }
    if base is not None:
        given = None if base == "auto" else Checkpoint.open(base, allow_pickle=allow_pickle)
        b, how = resolve_base([ck], given, force=force, allow_pickle=allow_pickle)
        scope = align([b, ck], include=include, exclude=exclude)
        rel = {name: relative_delta_norm(b, ck, name) for name in scope.names}
        report["base"] = {
            "path": str(b.path),
            "found": how,
            "aligned": True,
            "scope": scope.to_json(),
            "relative_delta_norm": rel,
            "warnings": scope.warnings,
        }
    return report


def relative_delta_norm(base: Checkpoint, ck: Checkpoint, name: str) -> float:
    """‖θ − θ_base‖ / ‖θ_base‖ of one tensor (‖θ − θ_base‖ when the base's norm is 0), streamed in chunks:
    memory stays at a few chunks whatever the tensor's size."""
    n = base.infos[name].numel
    a, d = np.empty(min(n, CHUNK), np.float32), np.empty(min(n, CHUNK), np.float32)
    sq0 = sqd = 0.0
    for s, e in chunk_ranges(n):
        w0 = base.float32(name, s, e, out=a[: e - s])
        w = ck.float32(name, s, e, out=d[: e - s])
        np.subtract(w, w0, out=w)
        sq0 += float(np.dot(w0, w0))
        sqd += float(np.dot(w, w))
    return math.sqrt(sqd) / math.sqrt(sq0) if sq0 > 0 else math.sqrt(sqd)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def printable(text: str) -> str:
    """`text` with control characters (terminal escape sequences among them) shown as escapes, so a tensor
    name cannot move the cursor or recolour the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def render_inspect(report: dict) -> str:
    rel = report.get("base", {}).get("relative_delta_norm", {})
    width = max((len(t["name"]) for t in report["tensors"]), default=10)
    lines = [f"{'tensor':<{width}}  {'dtype':<9} {'shape':<18} {'params':>12}" + ("  rel Δ" if rel else "")]
    for t in report["tensors"]:
        line = f"{printable(t['name']):<{width}}  {t['dtype']:<9} {t['shape']!s:<18} {t['numel']:>12,}"
        if t["name"] in rel:
            line += f"  {rel[t['name']]:.3g}"
        lines.append(line)
    buffers = f" (+ {report['buffers']:,} in integer buffers)" if report.get("buffers") else ""
    lines.append(
        f"{len(report['tensors'])} tensors, {report['parameters']:,} parameters{buffers}, "
        f"{_fmt_bytes(report['bytes'])} in {len(report['shards'])} shard(s): {', '.join(report['shards'])}"
    )
    if report.get("tied_embedding"):
        stored = report.get("stored_aliases")
        lines.append(
            f"tied: the output head is the embedding {report['tied_embedding']}"
            + (f" ({', '.join(stored)} stored as a duplicate, read as an alias)" if stored else "")
        )
    if "base" in report:
        diffs = report["base"]["scope"]["dtype_differences"]
        lines.append(
            f"aligned with {report['base']['path']} ({report['base']['found']}): "
            f"{report['base']['scope']['tensors']} tensors in scope"
            + (f", {len(diffs)} with different dtypes" if diffs else "")
        )
    return "\n".join(lines)
