"""GaLLoP selection and its baselines on the shared top-k machinery (METHODS §7).

  gallop  s = |g| / (|θ| + ε)     large gradient on a small weight
  saft    s = |g|                  large gradient
  pafi    s = −|θ|                 smallest weights
  random  s ~ U(0, 1): a seeded hash of (tensor name, flat position)

Every criterion yields the exact top ρ % of its score with the tie rule of §2. All criteria
asked for share the passes over (θ, g) (sampling, counting, selection): the report compares
them for the cost of one.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

from ..errors import NonFiniteError, OptionError
from ..selection.keys import hist_quantiles, key_histogram
from ..selection.passes import Buffers, chunk_ranges, run_passes
from ..selection.topk import TopK, k_for, tie_summary
from ..storage import atomic
from ..storage.checkpoint import Checkpoint
from ..storage.masks import MaskWriter
from ..storage.scope import Scope
from .names import layer_key, module_of, sorted_layers

EPS = 1e-8
CRITERIA = ("gallop", "saft", "pafi", "random")


def hash_uniform(name: str, seed: int, start: int, n: int) -> torch.Tensor:
    """Seeded U[0, 1) scores for flat positions start..start+n of tensor `name`: a hash of the
    position, so any slice of a tensor gets the same values whatever pass reads it."""
    import torch

    x = torch.arange(start, start + n, dtype=torch.int64) + (zlib.crc32(name.encode()) << 20) + seed * 0x9E3779B9
    for mult in (0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)):  # splitmix64 finaliser
        x = (x ^ (x >> 31 & ((1 << 33) - 1))) * mult
    return ((x >> 40) & ((1 << 24) - 1)).float() / (1 << 24)


def score(
    criterion: str, theta: torch.Tensor, grad: torch.Tensor, *, name: str = "", seed: int = 0, start: int = 0
) -> torch.Tensor:
    """The selection score of every entry (float32, same shape as θ); `start` is the flat offset of a chunk."""
    if criterion == "gallop":  # |g| / (|θ| + ε), two temporaries instead of four
        return grad.abs().div_(theta.abs().add_(EPS))
    if criterion == "saft":
        return grad.abs()
    if criterion == "pafi":
        return -theta.abs()
    if criterion == "random":
        return hash_uniform(name, seed, start, theta.numel()).view(theta.shape)
    raise OptionError(f"--criterion {criterion!r} is not one of {', '.join(CRITERIA)}")


@dataclass
class SelectionSummary:
    criterion: str
    rho: float
    selected: int
    total: int
    threshold: float
    per_tensor: dict[str, float] = field(default_factory=dict)  # selected share
    per_layer: dict[str, float] = field(default_factory=dict)
    per_module: dict[str, float] = field(default_factory=dict)
    score_quantiles: dict[str, float] = field(default_factory=dict)
    grad_quantiles: dict[str, dict] = field(default_factory=dict)  # selected / rest
    theta_quantiles: dict[str, dict] = field(default_factory=dict)
    ties: dict = field(default_factory=dict)  # METHODS §2: threshold, ties, tie_picks, p_strict, tie seed
    full_passes: int = 2  # over (θ, g), the sampling pass aside: the counting pass and the selection pass

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GallopResult:
    summaries: dict[str, SelectionSummary]
    jaccard: dict[str, float]  # "a~b" -> S between criteria masks
    sample: dict[str, list] = field(default_factory=dict)  # log10|θ|, log10|g|, selected flags

    def to_json(self) -> dict:
        return {
            "criteria": {k: v.to_json() for k, v in self.summaries.items()},
            "jaccard": self.jaccard,
            "sample_size": len(self.sample.get("log_theta", [])),
        }


STATS_STRIDE = 16  # the selected-vs-rest quantiles look at every 16th entry


def select_sparse(
    params: Checkpoint,
    grads: Checkpoint,
    scope: Scope,
    *,
    rho: float,
    criteria: list[str],
    main: str,
    out: Path | None,
    seed: int = 0,
    sample_size: int = 0,
    force: bool = False,
    progress: bool = False,
    sources: dict | None = None,
    side_files=None,
    tie_seed: int = 0,
) -> GallopResult:
    """Select the top ρ % under each criterion; write the `main` criterion's mask to `out`.

    Passes over (θ, g): sampling + counting (see `selection`), then one selection pass.
    Scores are computed with torch (imported here: the analysis package itself never loads it).
    """
    import torch

    for c in criteria:
        score(c, torch.zeros(1), torch.zeros(1))  # validates the name
    total = scope.numel()
    k = k_for(rho, total, what="rho")
    sels = [TopK(k, total, ranks=scope.ranks, seed=tie_seed) for _ in criteria]

    bufs = Buffers()  # the chunks' float32 copies, reused: every consumer is done with a chunk before the next

    def chunks(name, ranges):
        for s, e in ranges:  # float32 chunks of the read-only mappings
            th = torch.from_numpy(params.float32(name, s, e, out=bufs.get("theta", e - s)))
            g = torch.from_numpy(grads.float32(name, s, e, out=bufs.get("grad", e - s)))
            if not math.isfinite(float(g.sum())) and not torch.isfinite(g).all():  # a sum is one cheap pass
                raise NonFiniteError(f"tensor '{name}' in {grads.path} holds NaN/Inf gradients")
            yield s, [score(c, th, g, name=name, seed=seed, start=s) for c in criteria]

    run_passes(sels, scope, chunks, sources=[[params, grads]] * len(criteria), progress=progress, desc="gallop")
    writer = None
    if out is not None:
        meta = {
            "criterion": main,
            "rho": rho,
            "percent": rho,
            "selected": k,
            "total": total,
            "threshold": sels[criteria.index(main)].threshold,
            "seed": seed,
            "tie_seed": tie_seed,
            "ties": {
                k: v
                for k, v in tie_summary(sels[criteria.index(main)], total, seed=tie_seed, what="rho").items()
                if k != "warning"
            },
            "sources": {} if callable(sources) else (sources or {}),
        }
        writer = MaskWriter(out, scope.shapes, meta, force=force, inputs=[params.path, grads.path])
    counts = {c: defaultdict(int) for c in criteria}
    sizes_layer, sizes_module = defaultdict(int), defaultdict(int)
    per_tensor = {c: {} for c in criteria}
    inter = defaultdict(int)
    hists = {
        c: {key: np.zeros(1 << 16, dtype=np.int64) for key in ("score", "g_sel", "g_rest", "t_sel", "t_rest")}
        for c in criteria
    }
    g_gen = torch.Generator().manual_seed(seed)
    sample = {"log_theta": [], "log_grad": [], **{c: [] for c in criteria}}
    try:
        for name in tqdm(scope.names, desc="gallop: select", disable=not progress, leave=False):
            n = scope.numel(name)
            parts = {c: [] for c in criteria}
            for s, e in chunk_ranges(n):
                theta = torch.from_numpy(params.float32(name, s, e, out=bufs.get("theta", e - s)))
                g = torch.from_numpy(grads.float32(name, s, e, out=bufs.get("grad", e - s)))
                masks = {}
                for c, sel in zip(criteria, sels):
                    sc = score(c, theta, g, name=name, seed=seed, start=s)
                    m = sel.select(name, s, sc)
                    masks[c] = m
                    parts[c].append(m)
                    h = hists[c]
                    ms, ts, gs = m[::STATS_STRIDE], theta[::STATS_STRIDE].abs(), g[::STATS_STRIDE].abs()
                    h["score"] += key_histogram(sc[::STATS_STRIDE])
                    h["g_sel"] += key_histogram(gs[ms])
                    h["g_rest"] += key_histogram(gs[~ms])
                    h["t_sel"] += key_histogram(ts[ms])
                    h["t_rest"] += key_histogram(ts[~ms])
                for i, a in enumerate(criteria):
                    for b in criteria[i + 1 :]:
                        inter[(a, b)] += int((masks[a] & masks[b]).sum())
                if sample_size:
                    m_n = max(1, round(sample_size * (e - s) / total))
                    idx = torch.randint(0, e - s, (m_n,), generator=g_gen)
                    sample["log_theta"] += torch.log10(theta.abs()[idx] + 1e-12).tolist()
                    sample["log_grad"] += torch.log10(g.abs()[idx] + 1e-12).tolist()
                    for c in criteria:
                        sample[c] += masks[c][idx].tolist()
            for c in criteria:
                m = torch.cat(parts[c])
                n_sel = int(m.sum())
                per_tensor[c][name] = n_sel / n
                counts[c][("layer", layer_key(name))] += n_sel
                counts[c][("module", module_of(name))] += n_sel
                if writer is not None and c == main:
                    writer.write(name, m.view(scope.shapes[name]))
            sizes_layer[layer_key(name)] += n
            sizes_module[module_of(name)] += n
        if writer is not None:
            if callable(sources):  # provenance known once the fingerprints (hashed meanwhile) are done
                writer.update_meta(sources=sources())
            finished = writer.finish()
    except BaseException as e:
        if writer is not None:
            writer.discard()
        raise
    summaries = {}
    for c, sel in zip(criteria, sels):
        h = hists[c]
        summaries[c] = SelectionSummary(
            criterion=c,
            rho=rho,
            selected=sel.selected,
            total=total,
            threshold=sel.threshold,
            per_tensor=per_tensor[c],
            per_layer=sorted_layers({key: counts[c][("layer", key)] / n for key, n in sizes_layer.items()}),
            per_module={key: counts[c][("module", key)] / n for key, n in sizes_module.items()},
            score_quantiles=hist_quantiles(h["score"]),
            grad_quantiles={"selected": hist_quantiles(h["g_sel"]), "rest": hist_quantiles(h["g_rest"])},
            theta_quantiles={"selected": hist_quantiles(h["t_sel"]), "rest": hist_quantiles(h["t_rest"])},
            ties=tie_summary(sel, total, seed=tie_seed, what="rho"),
            full_passes=sel.full_passes + 1,
        )
    jac = {f"{a}~{b}": v / (2 * k - v) if 2 * k - v else 0.0 for (a, b), v in inter.items()}
    result = GallopResult(summaries, jac, sample if sample_size else {})
    if writer is not None:  # the mask and its side files (the summary) are one output
        sides: list[atomic.AtomicPath] = []
        try:
            for path, text in (side_files(result) if side_files else {}).items():
                sides.append(atomic.staged_text(path, text, force=force))
            atomic.commit_together([finished, *sides])
        except BaseException:
            for item in (finished, *sides):
                item.discard()
            raise
    return result


def check_gradients_fit(params: Checkpoint, grads: Checkpoint) -> str | None:
    """A warning when the gradient file says it was computed at other parameters (None when it fits)."""
    from ..storage.checkpoint import read_header

    meta = read_header(grads.files[0])[1] if grads.files else {}
    if meta.get("model_fingerprint"):  # the content fingerprint (METHODS §3), cached and hashed meanwhile
        recorded, actual = meta["model_fingerprint"], params.content_fingerprint()
    else:  # gradient files written before fingerprints: the whole-file sha256
        recorded = meta.get("model_sha256")
        actual = params.content_sha256() if recorded else None
    if recorded and recorded != actual:
        return (
            f"warning: {grads.path} was computed at a model with fingerprint {recorded[-12:]}, but "
            f"{params.path} has {actual[-12:]}; the scores mix two models"
        )
    return None
