"""`sparsemerge inspect`: what a checkpoint holds, and how far it moved from a base."""

from __future__ import annotations

import math

import numpy as np

from ..selection.keys import CHUNK
from ..selection.passes import chunk_ranges
from ..storage.checkpoint import Checkpoint
from ..storage.scope import align


def inspect_checkpoint(spec: str, *, base: str | None = None, allow_pickle: bool = False) -> dict:
    """A JSON-able description: tensors (shape, dtype, numel), totals, shards; with `base`, per-tensor
    relative delta norms ‖θ − θ_base‖ / ‖θ_base‖ over the aligned scope."""
    ck = Checkpoint.open(spec, allow_pickle=allow_pickle)
    tensors = [
        {
            "name": i.name,
            "shape": list(i.shape),
            "dtype": i.dtype_name,
            "numel": i.numel,
            "file": i.file.name,
        }
        for i in ck.infos.values()
    ]
    report = {
        "path": str(ck.path),
        "tensors": tensors,
        "parameters": ck.numel,
        "bytes": ck.nbytes,
        "shards": [f.name for f in ck.files],
        "header_sha256": ck.fingerprint(),
        "has_config": bool(ck.folder and (ck.folder / "config.json").is_file()),
    }
    if base is not None:
        b = Checkpoint.open(base, allow_pickle=allow_pickle)
        scope = align([b, ck])
        rel = {name: relative_delta_norm(b, ck, name) for name in scope.names}
        report["base"] = {"path": str(b.path), "aligned": True, "scope": scope.to_json(), "relative_delta_norm": rel}
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


def render_inspect(report: dict) -> str:
    rel = report.get("base", {}).get("relative_delta_norm", {})
    width = max((len(t["name"]) for t in report["tensors"]), default=10)
    lines = [f"{'tensor':<{width}}  {'dtype':<9} {'shape':<18} {'params':>12}" + ("  rel Δ" if rel else "")]
    for t in report["tensors"]:
        line = f"{t['name']:<{width}}  {t['dtype']:<9} {t['shape']!s:<18} {t['numel']:>12,}"
        if t["name"] in rel:
            line += f"  {rel[t['name']]:.3g}"
        lines.append(line)
    lines.append(
        f"{len(report['tensors'])} tensors, {report['parameters']:,} parameters, "
        f"{_fmt_bytes(report['bytes'])} in {len(report['shards'])} shard(s): {', '.join(report['shards'])}"
    )
    if "base" in report:
        diffs = report["base"]["scope"]["dtype_differences"]
        lines.append(
            f"aligned with {report['base']['path']}: {report['base']['scope']['tensors']} tensors in scope"
            + (f", {len(diffs)} with different dtypes" if diffs else "")
        )
    return "\n".join(lines)
