"""Overlap of core regions and task groups (CPI-FT stage 2, METHODS §4).

S(Cⁱ, Cʲ) = |Cⁱ ∩ Cʲ| / |Cⁱ ∪ Cʲ| (0 when the union is empty), from popcounts of packed bits,
one tensor at a time, for the whole model and broken down per tensor, per layer, per module type.
When the mask files carry tie bits (cores from `core`), S is also reported over the strict cores —
each core without the entries its tie rule picked — so a reader sees how much of S the tie rule
contributes (METHODS §4).

The chance level of a pair is the Jaccard of two independent uniformly random masks of the same
sizes: |A∩B| is hypergeometric(D, |A|, |B|) with mean |A||B|/D, and the chance Jaccard is taken as
E|A∩B| / (|A| + |B| − E|A∩B|) (the ratio of means; at model sizes the distribution is so narrow
that this equals the mean ratio to many digits). The p-value is P(|A∩B| ≥ observed) under it.

Stage orders for the groups (connected components of the graph with an edge where S ≥ τ):
  random         seeded shuffle of the groups (the paper's default)
  input          order of first appearance of a group's tasks on the command line
  least-overlap  groups with the smallest mean Jaccard to tasks outside the group first: their cores,
                 frozen in later stages, block the fewest parameters the other tasks rely on.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from ..errors import MismatchError, OptionError
from ..storage.masks import MaskSet, popcount
from .names import layer_key, module_of, sorted_layers

ORDERS = ("random", "input", "least-overlap")


def popcount_and(a: np.ndarray, b: np.ndarray) -> int:
    return popcount(np.bitwise_and(a, b))


def jaccard(inter: int, size_a: int, size_b: int) -> float:
    union = size_a + size_b - inter
    return inter / union if union else 0.0


def jaccard_matrix(inter: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(N, N) Jaccard from an intersection-count matrix whose diagonal holds the sizes."""
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


@dataclass
class Counts:
    """Intersection counts (diagonal = sizes) and the number of parameters they are out of."""

    inter: np.ndarray
    total: int = 0

    def add(self, other: np.ndarray, numel: int) -> None:
        self.inter += other
        self.total += numel

    def to_json(self, tasks: list[str]) -> dict:
        return {
            "jaccard": jaccard_matrix(self.inter, np.diag(self.inter)).tolist(),
            "sizes": np.diag(self.inter).tolist(),
            "numel": self.total,
        }


@dataclass
class OverlapResult:
    tasks: list[str]
    whole: Counts
    per_tensor: dict[str, Counts] = field(default_factory=dict)
    per_layer: dict[str, Counts] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)  # per task: mask, settings, fingerprints
    per_module: dict[str, Counts] = field(default_factory=dict)
    strict: Counts | None = None  # over the strict cores (entries above each threshold), when masks say

    @property
    def matrix(self) -> np.ndarray:
        return jaccard_matrix(self.whole.inter, self.sizes)

    @property
    def sizes(self) -> np.ndarray:
        return np.diag(self.whole.inter).copy()

    def chance(self) -> tuple[np.ndarray, np.ndarray]:
        """(chance Jaccard, p-value of the observed intersection) per pair."""
        from scipy.stats import hypergeom

        n, D, s = len(self.tasks), self.whole.total, self.sizes
        chance, pval = np.zeros((n, n)), np.ones((n, n))
        for i in range(n):
            for j in range(n):
                e = s[i] * s[j] / D if D else 0.0
                chance[i, j] = e / (s[i] + s[j] - e) if (s[i] + s[j] - e) > 0 else 0.0
                if i != j:
                    pval[i, j] = float(hypergeom.sf(int(self.whole.inter[i, j]) - 1, D, int(s[i]), int(s[j])))
        return chance, pval

    def layer_share(self) -> dict[str, dict[str, float]]:
        """task -> layer -> share of that layer's parameters in the task's core."""
        return {
            t: {k: float(c.inter[i, i]) / c.total for k, c in self.per_layer.items() if c.total}
            for i, t in enumerate(self.tasks)
        }


def _intersections(packed: list[np.ndarray]) -> np.ndarray:
    n = len(packed)
    inter = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        inter[i, i] = popcount(packed[i])
        for j in range(i + 1, n):
            inter[i, j] = inter[j, i] = popcount_and(packed[i], packed[j])
    return inter


def compute_overlap(masks: list[MaskSet], labels: list[str]) -> OverlapResult:
    """Stream every tensor's packed bits once and count all pairwise intersections."""
    if len(masks) < 2:
        raise OptionError("overlap needs at least two tasks' masks")
    shapes = masks[0].shapes
    for m in masks[1:]:
        m.check_fits(shapes, masks[0].path)
    n = len(masks)
    result = OverlapResult(labels, Counts(np.zeros((n, n), dtype=np.int64)))
    result.inputs = mask_inputs(masks, labels)
    if all(m.has_tie_bits for m in masks):  # METHODS §4: S over the strict cores too
        result.strict = Counts(np.zeros((n, n), dtype=np.int64))
    layers: dict[str, Counts] = defaultdict(lambda: Counts(np.zeros((n, n), dtype=np.int64)))
    modules: dict[str, Counts] = defaultdict(lambda: Counts(np.zeros((n, n), dtype=np.int64)))
    for name, shape in shapes.items():
        packed = [m.packed(name) for m in masks]
        inter = _intersections(packed)
        numel = int(np.prod(shape, dtype=np.int64))
        result.whole.add(inter, numel)
        result.per_tensor[name] = Counts(inter, numel)
        if result.strict is not None:
            strict = [np.bitwise_and(p, np.invert(m.tie_packed(name))) for p, m in zip(packed, masks)]
            result.strict.add(_intersections(strict), numel)
        layers[layer_key(name)].add(inter, numel)
        modules[module_of(name)].add(inter, numel)
    result.per_layer = sorted_layers(layers)
    result.per_module = dict(sorted(modules.items()))
    return result


def group_tasks(
    matrix: np.ndarray, tasks: list[str], *, tau: float, order: str = "random", seed: int = 0
) -> list[list[str]]:
    """Connected components of the graph with an edge where S ≥ τ (i ≠ j), in stage order."""
    if not 0 <= tau <= 1:
        raise OptionError(f"--tau {tau} is out of range; give a Jaccard threshold in [0, 1]")
    if order not in ORDERS:
        raise OptionError(f"--order {order!r} is not one of {', '.join(ORDERS)}")
    g = task_graph(matrix, tasks, tau)
    position = {t: i for i, t in enumerate(tasks)}
    groups = [sorted(c, key=position.get) for c in nx.connected_components(g)]
    groups.sort(key=lambda grp: position[grp[0]])  # input order
    if order == "random":
        random.Random(seed).shuffle(groups)
    elif order == "least-overlap":

        def outside(grp):
            idx = [position[t] for t in grp]
            rest = [i for i in range(len(tasks)) if i not in idx]
            return float(matrix[np.ix_(idx, rest)].mean()) if rest else 0.0

        groups.sort(key=lambda grp: (outside(grp), position[grp[0]]))
    return groups


def task_graph(matrix: np.ndarray, tasks: list[str], tau: float) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from(tasks)
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            if matrix[i, j] >= tau:
                g.add_edge(tasks[i], tasks[j], weight=float(matrix[i, j]))
    return g


def tau_sweep(matrix: np.ndarray, tasks: list[str]) -> list[tuple[float, int]]:
    """(τ, number of groups) at every distinct off-diagonal S, plus just above the largest."""
    off = sorted({float(matrix[i, j]) for i in range(len(tasks)) for j in range(len(tasks)) if i != j})
    taus = [0.0] + off + [min(1.0, (off[-1] if off else 0.0) + 1e-6)]
    return [(t, nx.number_connected_components(task_graph(matrix, tasks, t))) for t in sorted(set(taus))]


def groups_document(
    result: OverlapResult, groups: list[list[str]], *, tau: float, order: str, seed: int, settings: dict
) -> dict:
    """The groups.json document: tasks, τ, matrix, chance level, breakdowns, groups in stage order."""
    chance, pval = result.chance()
    tasks = result.tasks
    return {
        "tasks": tasks,
        "tau": tau,
        "order": order,
        "seed": seed,
        "matrix": result.matrix.tolist(),
        "sizes": result.sizes.tolist(),
        "numel": result.whole.total,
        "intersections": result.whole.inter.tolist(),
        "chance": chance.tolist(),
        "p_values": pval.tolist(),
        "groups": groups,
        "strict": None
        if result.strict is None
        else {
            "matrix": jaccard_matrix(result.strict.inter, np.diag(result.strict.inter)).tolist(),
            "sizes": np.diag(result.strict.inter).tolist(),
            "intersections": result.strict.inter.tolist(),
        },
        "per_layer": {k: c.to_json(tasks) for k, c in result.per_layer.items()},
        "per_module": {k: c.to_json(tasks) for k, c in result.per_module.items()},
        "per_tensor": {k: c.to_json(tasks) for k, c in result.per_tensor.items()},
        "layer_share": result.layer_share(),
        "tau_sweep": tau_sweep(result.matrix, tasks),
        "settings": settings,
        "inputs": result.inputs,
    }


def mask_inputs(masks: list[MaskSet], labels: list[str]) -> list[dict]:
    """Per task: its mask file, how the core was made and the content fingerprints of the checkpoints it came
    from (from the mask's own metadata; None where the mask does not record them)."""

    def fingerprint(src) -> str | None:
        return src.get("fingerprint") if isinstance(src, dict) else None

    out = []
    for label, m in zip(labels, masks):
        sources = m.meta.get("sources") if isinstance(m.meta.get("sources"), list) else []
        out.append(
            {
                "task": label,
                "mask": str(m.path),
                "criterion": m.meta.get("criterion"),
                "percent": m.meta.get("percent", m.meta.get("rho")),
                "selected": m.meta.get("selected"),
                "checkpoint": sources[-1].get("path") if sources and isinstance(sources[-1], dict) else None,
                "fingerprint": fingerprint(sources[-1]) if sources else None,
                "base_fingerprint": fingerprint(m.meta.get("base")),
            }
        )
    return out


def load_groups(path) -> dict:
    """Read and check a groups.json document."""
    import json
    from pathlib import Path

    from ..errors import DataError

    try:
        doc = json.loads(Path(path).read_text())
        tasks, groups = doc["tasks"], doc["groups"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a groups file from `sparsemerge overlap` ({type(e).__name__})") from None
    if not isinstance(tasks, list) or not isinstance(groups, list):
        raise DataError(f"{path}: not a groups file from `sparsemerge overlap` (tasks and groups must be lists)")
    from ..storage.checkpoint import is_safe_name

    if not all(isinstance(g, list) for g in groups) or not all(is_safe_name(t) for t in tasks):
        raise DataError(
            f"{path}: groups must be lists of task names, and task names letters, digits and . _ + - only "
            "(they name mask files and stage folders)"
        )
    flat = [t for g in groups for t in g]
    if sorted(flat) != sorted(tasks):
        raise MismatchError(f"{path}: the groups do not partition the tasks {tasks}")
    return doc
