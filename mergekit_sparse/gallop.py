"""GaLLoP selection and its baselines on the shared top-k machinery (METHODS §7).

  gallop  s = |g| / (|θ| + ε)     large gradient on a small weight
  saft    s = |g|                  large gradient
  pafi    s = −|θ|                 smallest weights
  random  s ~ U(0, 1), seeded per tensor name

Every criterion yields the exact top ρ % of its score with the tie rule of §2. All criteria
asked for share the three passes over (θ, g): the report compares them for the cost of one.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .errors import NonFiniteError, OptionError
from .masks import MaskWriter
from .names import layer_key, module_of
from .scope import Scope
from .select import GlobalTopK, k_for
from .stats import hist_quantiles, key_histogram

EPS = 1e-8
CRITERIA = ("gallop", "saft", "pafi", "random")


def score(criterion: str, theta: torch.Tensor, grad: torch.Tensor, *, name: str = "", seed: int = 0) -> torch.Tensor:
    """The selection score of every entry (float32, same shape as θ)."""
    if criterion == "gallop":
        return grad.abs() / (theta.abs() + EPS)
    if criterion == "saft":
        return grad.abs()
    if criterion == "pafi":
        return -theta.abs()
    if criterion == "random":
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(theta.shape, generator=g)
    raise OptionError(f"--criterion {criterion!r} is not one of {', '.join(CRITERIA)}")


@dataclass
class SelectionSummary:
    criterion: str
    rho: float
    selected: int
    total: int
    threshold: float
    per_tensor: dict[str, float] = field(default_factory=dict)        # selected share
    per_layer: dict[str, float] = field(default_factory=dict)
    per_module: dict[str, float] = field(default_factory=dict)
    score_quantiles: dict[str, float] = field(default_factory=dict)
    grad_quantiles: dict[str, dict] = field(default_factory=dict)     # selected / rest
    theta_quantiles: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GallopResult:
    summaries: dict[str, SelectionSummary]
    jaccard: dict[str, float]                                         # "a~b" -> S between criteria masks
    sample: dict[str, list] = field(default_factory=dict)             # log10|θ|, log10|g|, selected flags

    def to_json(self) -> dict:
        return {"criteria": {k: v.to_json() for k, v in self.summaries.items()}, "jaccard": self.jaccard,
                "sample_size": len(self.sample.get("log_theta", []))}


def _read(ck: Checkpoint, name: str) -> torch.Tensor:
    return ck.tensor(name).reshape(-1).float()


def select_sparse(params: Checkpoint, grads: Checkpoint, scope: Scope, *, rho: float, criteria: list[str],
                  main: str, out: Path | None, seed: int = 0, sample_size: int = 0, force: bool = False,
                  progress: bool = False, sources: dict | None = None) -> GallopResult:
    """Select the top ρ % under each criterion; write the `main` criterion's mask to `out`."""
    for c in criteria:
        score(c, torch.zeros(1), torch.zeros(1))                      # validates the name
    total = scope.numel()
    k = k_for(rho, total, what="rho")
    sels = {c: GlobalTopK(k, total) for c in criteria}
    for p in range(2):
        for name in tqdm(scope.names, desc=f"gallop: pass {p + 1}/3", disable=not progress, leave=False):
            theta, g = _read(params, name), _read(grads, name)
            if p == 0:
                for t, what, ck in ((theta, "weights", params), (g, "gradients", grads)):
                    if not torch.isfinite(t).all():
                        raise NonFiniteError(f"tensor '{name}' in {ck.path} holds NaN/Inf {what}")
            for c, sel in sels.items():
                sel.observe(name, score(c, theta, g, name=name, seed=seed))
        for sel in sels.values():
            sel.next_pass()
    writer = None
    if out is not None:
        meta = {"criterion": main, "rho": rho, "percent": rho, "selected": k, "total": total,
                "threshold": sels[main].threshold, "seed": seed, "sources": sources or {}}
        writer = MaskWriter(out, scope.shapes, meta, force=force, inputs=[params.path, grads.path])
    counts = {c: defaultdict(int) for c in criteria}
    sizes_layer, sizes_module = defaultdict(int), defaultdict(int)
    per_tensor = {c: {} for c in criteria}
    inter = defaultdict(int)
    hists = {c: {key: torch.zeros(1 << 16, dtype=torch.int64) for key in ("score", "g_sel", "g_rest", "t_sel", "t_rest")}
             for c in criteria}
    g_gen = torch.Generator().manual_seed(seed)
    sample = {"log_theta": [], "log_grad": [], **{c: [] for c in criteria}}
    try:
        for name in tqdm(scope.names, desc="gallop: pass 3/3", disable=not progress, leave=False):
            theta, g = _read(params, name), _read(grads, name)
            masks = {}
            for c, sel in sels.items():
                s = score(c, theta, g, name=name, seed=seed)
                m = sel.select(name, s)
                masks[c] = m
                h = hists[c]
                h["score"] += key_histogram(s)
                h["g_sel"] += key_histogram(g.abs()[m])
                h["g_rest"] += key_histogram(g.abs()[~m])
                h["t_sel"] += key_histogram(theta.abs()[m])
                h["t_rest"] += key_histogram(theta.abs()[~m])
                n_sel = int(m.sum())
                per_tensor[c][name] = n_sel / m.numel()
                counts[c][("layer", layer_key(name))] += n_sel
                counts[c][("module", module_of(name))] += n_sel
            if writer is not None:
                writer.write(name, masks[main].view(scope.shapes[name]))
            sizes_layer[layer_key(name)] += theta.numel()
            sizes_module[module_of(name)] += theta.numel()
            for i, a in enumerate(criteria):
                for b in criteria[i + 1:]:
                    inter[(a, b)] += int((masks[a] & masks[b]).sum())
            if sample_size:
                n = max(1, round(sample_size * theta.numel() / total))
                idx = torch.randint(0, theta.numel(), (n,), generator=g_gen)
                sample["log_theta"] += torch.log10(theta.abs()[idx] + 1e-12).tolist()
                sample["log_grad"] += torch.log10(g.abs()[idx] + 1e-12).tolist()
                for c in criteria:
                    sample[c] += masks[c][idx].tolist()
        if writer is not None:
            writer.__exit__(None, None, None)
    except BaseException as e:
        if writer is not None:
            writer.__exit__(type(e), e, None)
        raise
    summaries = {}
    for c, sel in sels.items():
        h = hists[c]
        summaries[c] = SelectionSummary(
            criterion=c, rho=rho, selected=sel.selected, total=total, threshold=sel.threshold,
            per_tensor=per_tensor[c],
            per_layer={key: counts[c][("layer", key)] / n for key, n in sizes_layer.items()},
            per_module={key: counts[c][("module", key)] / n for key, n in sizes_module.items()},
            score_quantiles=hist_quantiles(h["score"]),
            grad_quantiles={"selected": hist_quantiles(h["g_sel"]), "rest": hist_quantiles(h["g_rest"])},
            theta_quantiles={"selected": hist_quantiles(h["t_sel"]), "rest": hist_quantiles(h["t_rest"])})
    jac = {f"{a}~{b}": v / (2 * k - v) if 2 * k - v else 0.0 for (a, b), v in inter.items()}
    return GallopResult(summaries, jac, sample if sample_size else {})


def check_gradients_fit(params: Checkpoint, grads: Checkpoint) -> str | None:
    """A warning when the gradient file says it was computed at other parameters (None when it fits)."""
    from .checkpoint import read_header
    meta = read_header(grads.files[0])[1] if grads.files else {}
    recorded = meta.get("model_sha256")
    if recorded and recorded != (actual := params.content_sha256()):
        return (f"warning: {grads.path} was computed at a model with sha256 {recorded[:12]}…, but "
                f"{params.path} has sha256 {actual[:12]}…; the scores mix two models")
    return None
