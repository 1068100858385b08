"""`sparsemerge merge CONFIG.yml`: a mergekit-schema config (METHODS §10) checked whole before any tensor
is read, its parameters resolved per tensor as mergekit resolves them, and the merge run on the streaming
engine (`fusion.merge`).

Schema: `merge_method`, `base_model`, `models: [{model, parameters}]`, top-level `parameters`, `dtype`,
`out_dtype`, `tokenizer_source` (`base` or one of the models), and `slices:` when every slice spans all
layers. Parameter values are scalars, `[{filter: substring, value: …}, …]` lists (the first filter
contained in the tensor name wins; no filter or `*` matches all) or layer gradients (lists interpolated
piecewise linearly over t = layer / (layers − 1); tensors outside the blocks take t = 0). A model's own
`parameters` come before the top-level ones; a setting no filter matches falls through to the next
source, then to the default. Our extensions, under `parameters`: `scope` (`tensor`), `semantics`
(`mergekit`, the default, or `reference`), `random_seed` (DARE), `tie_seed` (METHODS §2), `rescale`
(`true`/`l1`, `inverse`, `false`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, OptionError
from ..fusion.methods import DEFAULTS, METHODS, PLANNED, SEMANTICS, TOP_ONLY, Method
from .config import MAX_CONFIG_BYTES, MAX_CONFIG_NODES, expanded_size, load_yaml

TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}
MODEL_KEYS = {"model", "parameters"}
SHARED = {"normalize", "lambda", "rescale", "int8_mask", "scope", "semantics", "random_seed", "tie_seed"}
PER_MODEL = {"weight", "density", "gamma", "tall_lambda"}
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "fp32": "F32", "bf16": "BF16", "fp16": "F16"}
SCOPES = ("tensor", "global", "row")  # row: Breadcrumbs per row (the reference)


@dataclass
class MergeConfig:
    method: Method
    base: str
    models: list[str]
    labels: list[str]
    model_params: list[dict]
    parameters: dict
    out_dtype: str | None
    tokenizer_source: str | None
    semantics: str
    scope: str
    seed: int
    tie_seed: int
    path: Path
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "merge_method": self.method.name,
            "base_model": self.base,
            "models": [{"model": m, "parameters": p} for m, p in zip(self.models, self.model_params)],
            "parameters": self.parameters,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
            "semantics": self.semantics,
            "scope": self.scope,
            "random_seed": self.seed,
            "tie_seed": self.tie_seed,
        }


def read_config(path: Path):
    """The parsed YAML/JSON of a config file, with the pipeline's caps (size, alias expansion, UTF-8)."""
    import json

    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    data = path.read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise DataError(f"{path}: {len(data)} bytes is too large for a merge config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {e.start}); save the config as UTF-8") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except RecursionError:
        raise DataError(f"{path}: nested deeper than Python can parse") from None
    except Exception as e:  # noqa: BLE001 - YAML and JSON raise different types
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(e, "problem", None) or getattr(e, "msg", None) or str(e).splitlines()[0]
        raise DataError(f"{where}: cannot parse the config ({str(reason)[:200]})") from None
    if expanded_size(raw) > MAX_CONFIG_NODES:
        raise DataError(f"{path}: the config expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases)")
    return raw


def _scalars(setting) -> list:
    """Every scalar a setting can resolve to (to validate them all before any tensor is read)."""
    if isinstance(setting, dict):
        return _scalars(setting.get("value"))
    if isinstance(setting, list):
        return [x for item in setting for x in _scalars(item)]
    return [setting]


def _check_setting(where: str, key: str, setting, problems: list[str]) -> None:
    if isinstance(setting, list) and any(isinstance(x, dict) for x in setting):
        for k, item in enumerate(setting):
            if not isinstance(item, dict) or "value" not in item or set(item) - {"filter", "value"}:
                problems.append(f"{where}.{key}[{k}]: expected {{filter: SUBSTRING, value: …}}")
            elif item.get("filter") is not None and not isinstance(item["filter"], str):
                problems.append(f"{where}.{key}[{k}].filter: expected a string")
    elif isinstance(setting, dict):
        if "value" not in setting or set(setting) - {"filter", "value"}:
            problems.append(f"{where}.{key}: expected {{filter: SUBSTRING, value: …}}")
    elif isinstance(setting, list) and not setting:
        problems.append(f"{where}.{key}: an empty list")
    for v in _scalars(setting):
        if key in ("normalize", "int8_mask"):
            ok = isinstance(v, bool)
            want = "true or false"
        elif key == "rescale":
            ok = isinstance(v, bool) or v in ("l1", "inverse")
            want = "true, false, l1 or inverse"
        elif key == "scope":
            ok = v in SCOPES
            want = " or ".join(SCOPES)
        elif key == "semantics":
            ok = v in SEMANTICS
            want = " or ".join(SEMANTICS)
        elif key == "retrieve":
            ok, want = isinstance(v, str), "a model (its path as under models, or its name)"
        elif key == "conflict":
            from ..fusion.maths import POLICIES

            ok, want = v in POLICIES, " or ".join(POLICIES)
        elif key == "consensus_k":
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
            want = "an integer of at least 1"
        elif key in ("random_seed", "tie_seed"):
            ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32
            want = "an integer in [0, 2^32)"
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            want = "a finite number"
            if ok and key in ("density", "gamma"):
                ok, want = 0 <= v <= 1, "a number in [0, 1]"
            elif ok and key == "p":
                ok, want = 0 < v <= 100, "a percentage in (0, 100]"
            elif ok and key == "tall_lambda":
                ok, want = v >= 0, "a number of at least 0"
        if not ok:
            problems.append(f"{where}.{key}: {v!r} is not {want}")


def parse_merge_config(path: str | Path) -> MergeConfig:
    """Read and check a merge config; every problem is listed at once (DataError), before any model is read."""
    path = Path(path)
    raw = read_config(path)
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a merge config is a mapping (merge_method, base_model, models, …)")
    for k in sorted(set(raw) - TOP_KEYS, key=str):
        problems.append(f"config.{k}: unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    name = raw.get("merge_method")
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        extra = f"; {name} is planned, not in this release yet" if name in PLANNED else ""
        problems.append(f"config.merge_method: {name!r} is not one of {', '.join(METHODS)}{extra}")
    models_raw = raw.get("models")
    if raw.get("slices") is not None:
        if models_raw is not None:
            problems.append("config: give `models` or `slices`, not both")
        models_raw = _slices_to_models(raw["slices"], path, problems)
    if not isinstance(models_raw, list) or not models_raw:
        problems.append("config.models: a list of {model: PATH, parameters: {…}} entries is needed")
        models_raw = []
    models, model_params = [], []
    for i, entry in enumerate(models_raw):
        where = f"config.models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            problems.append(f"{where}: expected {{model: PATH, parameters: {{…}}}}")
            continue
        for k in sorted(set(entry) - MODEL_KEYS, key=str):
            problems.append(f"{where}.{k}: unknown key (known: model, parameters)")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append(f"{where}.parameters: expected a mapping")
            params = {}
        allowed = set(method.params) if method else PER_MODEL
        for k, v in params.items():
            if k not in allowed:
                problems.append(
                    f"{where}.parameters.{k}: not a parameter of {name} (it takes {', '.join(sorted(allowed))})"
                )
            else:
                _check_setting(f"{where}.parameters", k, v, problems)
        models.append(entry["model"])
        model_params.append(params)
    top = raw.get("parameters") or {}
    if not isinstance(top, dict):
        problems.append("config.parameters: expected a mapping")
        top = {}
    allowed_top = SHARED | (set(method.params) | set(TOP_ONLY.get(method.name, ())) if method else PER_MODEL)
    for k, v in top.items():
        if k not in allowed_top:
            problems.append(f"config.parameters.{k}: unknown (known: {', '.join(sorted(allowed_top))})")
        else:
            _check_setting("config.parameters", k, v, problems)
    for k in ("scope", "semantics", "random_seed", "tie_seed", "consensus_k", "retrieve", "p", "conflict"):
        if k in top and isinstance(top[k], (list, dict)):
            problems.append(f"config.parameters.{k}: one value for the whole merge, not per tensor")
    globally = method is not None and method.name in ("localize_stitch", "cpi_ft")  # cores are global (§2)
    scope = top.get("scope", "global" if globally else "tensor")
    if scope == "row" and method is not None and method.sparsify != "outliers":
        problems.append(
            f"config.parameters.scope: row is Breadcrumbs' scope (breadcrumbs, breadcrumbs_ties), not {name}'s"
        )
    if method is not None and method.name == "cpi_ft":
        for i, mp in enumerate(model_params):
            if isinstance(mp.get("weight"), (list, dict)):
                problems.append(f"config.models[{i}].parameters.weight: cpi_ft takes one weight per model")
    if scope == "global" and method is not None and method.sparsify in ("magnitude", "outliers"):
        # one budget over all tensors: one density (and gamma) per model, and no per-tensor rescale
        for where, own in [("config.parameters", top)] + [
            (f"config.models[{i}].parameters", mp) for i, mp in enumerate(model_params) if isinstance(mp, dict)
        ]:
            for k in ("density", "gamma"):
                if k in own and isinstance(own[k], (list, dict)):
                    problems.append(f"{where}.{k}: scope global takes one value per model, not per tensor or layer")
        if top.get("rescale") == "l1" or (
            top.get("rescale") is True and top.get("semantics", "mergekit") == "mergekit"
        ):
            problems.append("config.parameters.rescale: l1 matches ‖τ‖₁ per tensor; with scope global use inverse")
    base = raw.get("base_model")
    if method is not None and method.delta and not isinstance(base, str):
        problems.append(f"config.base_model: {name} needs the pretrained model (θ⁰) as base_model")
    elif base is not None and not isinstance(base, str):
        problems.append("config.base_model: expected a path or model id")
    out_dtype = raw.get("out_dtype", raw.get("dtype"))
    for k in ("dtype", "out_dtype"):
        if raw.get(k) is not None and raw[k] not in DTYPES:
            problems.append(f"config.{k}: {raw[k]!r} is not one of {', '.join(DTYPES)}")
    tok = raw.get("tokenizer_source")
    if tok == "union":
        problems.append("config.tokenizer_source: union (a merged vocabulary) is not supported; use base or a model")
    elif tok is not None and tok != "base" and tok not in models and tok != base:
        problems.append(f"config.tokenizer_source: {tok!r} is neither base nor one of the models")
    base_dir = path.parent.absolute()

    def resolve(p: str) -> str:  # relative to the config's folder, as the pipeline's paths are
        local = base_dir / p
        return str(local) if not Path(p).is_absolute() and local.exists() else p

    if method is not None and base is not None and isinstance(base, str):
        deltas = [m for m in models if resolve(m) != resolve(base)]
        strip = method.delta or method.name == "slerp"  # slerp: the base is its t = 0 endpoint
        if strip and len(deltas) < len(models):  # mergekit lists the base among the models: it is θ⁰
            keep = [i for i, m in enumerate(models) if resolve(m) != resolve(base)]
            models, model_params = [models[i] for i in keep], [model_params[i] for i in keep]
        if not models:
            problems.append("config.models: no model besides base_model to merge")
        elif method.name == "cpi_ft" and len(models) < 2:
            problems.append("config.models: cpi_ft fuses at least two models besides base_model")
        elif method.name == "slerp" and len(models) != 1:
            problems.append(f"config.models: slerp interpolates base_model and one other model, not {len(models)}")
    if method is not None and method.name == "localize_stitch":
        if "density" not in top and not all("density" in mp for mp in model_params):
            problems.append("config.parameters.density: localize_stitch needs density (the share each γₜ keeps)")
    if method is not None and method.name == "tall":
        want = top.get("retrieve")
        if want is None:
            problems.append("config.parameters.retrieve: tall retrieves one model: name it (path or name)")
        elif isinstance(want, str):
            names = [resolve(m) for m in models] + _labels(models)
            if resolve(want) not in names and want not in names:
                problems.append(f"config.parameters.retrieve: {want!r} is not one of the models")
    if method is not None and method.name == "consensus" and isinstance(top.get("consensus_k"), int):
        if top["consensus_k"] > len(models):
            problems.append(
                f"config.parameters.consensus_k: {top['consensus_k']} is more than the {len(models)} models"
            )
    if method is not None and method.name == "slerp":
        if not isinstance(base, str):
            problems.append("config.base_model: slerp needs base_model (its t = 0 endpoint)")
        if "t" not in top and not any("t" in mp for mp in model_params):
            problems.append("config.parameters.t: slerp needs t (0: base_model, 1: the other model)")
    if problems:
        raise DataError(f"invalid merge config {path}:\n  " + "\n  ".join(problems))
    labels = _labels(models)
    return MergeConfig(
        method=method,
        base=resolve(base) if isinstance(base, str) else resolve(models[0]),
        models=[resolve(m) for m in models],
        labels=labels,
        model_params=model_params,
        parameters=top,
        out_dtype=DTYPES[out_dtype] if out_dtype else None,
        tokenizer_source=None if tok in (None, "base") else resolve(tok),
        semantics=top.get("semantics", "mergekit"),
        scope=scope,
        seed=int(top.get("random_seed", 0)),
        tie_seed=int(top.get("tie_seed", 0)),
        path=path,
    )


def _labels(models: list[str]) -> list[str]:
    """Short unique names of the models (their last path parts), for reports and counts."""
    names = [Path(m.rstrip("/")).name or m for m in models]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _slices_to_models(slices, path: Path, problems: list[str]) -> list:
    """`slices:` with one slice whose sources span every layer is the same as `models:`; anything else is a
    frankenmerge (layers stacked from different ranges), which this tool does not do."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        problems.append("config.slices: only one full-range slice is supported (partial slices are frankenmerges)")
        return []
    sources = slices[0].get("sources")
    if not isinstance(sources, list) or not sources:
        problems.append("config.slices[0].sources: a list of {model, layer_range} is needed")
        return []
    out = []
    for k, src in enumerate(sources):
        if not isinstance(src, dict) or not isinstance(src.get("model"), str):
            problems.append(f"config.slices[0].sources[{k}]: expected {{model, layer_range, parameters}}")
            continue
        lr = src.get("layer_range")
        layers = (
            _num_layers(path.parent / src["model"])
            if not Path(src["model"]).is_absolute()
            else _num_layers(Path(src["model"]))
        )
        if not (isinstance(lr, list) and len(lr) == 2 and lr[0] == 0 and (layers is None or lr[1] == layers)):
            problems.append(
                f"config.slices[0].sources[{k}].layer_range: {lr!r} is not the full range [0, {layers}] "
                "(partial slices are frankenmerges: not supported)"
            )
        out.append({"model": src["model"], "parameters": src.get("parameters") or {}})
    return out


def _num_layers(folder: Path) -> int | None:
    import json

    try:
        return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate(setting, name: str, t: float):
    """mergekit's `evaluate_setting`: filters (first match), then a gradient (piecewise linear in t) or a
    scalar; None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(not isinstance(x, dict) for x in setting):
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or (name and f in name):
                return evaluate(cond["value"], name, t)
        return None
    return setting


def resolver(cfg: MergeConfig, num_layers: int | None):
    """params(name) -> TensorParams for the engine, as mergekit resolves them for that tensor."""
    from ..analysis.names import layer_of
    from ..fusion.merge import TensorParams

    m = cfg.method

    def t_of(name: str) -> float:
        layer = layer_of(name)
        if layer is None or not num_layers:
            return 0.0
        return layer / (num_layers - 1) if num_layers > 1 else 1.0

    def lookup(key: str, name: str, t: float, own: dict | None):
        for source in ([own] if own is not None else []) + [cfg.parameters]:
            if source and key in source:
                v = evaluate(source[key], name, t)
                if v is not None:
                    return v
        return None

    retrieve = 0
    if m.name == "tall":
        want = cfg.parameters["retrieve"]
        for i, (path, label) in enumerate(zip(cfg.models, cfg.labels)):
            if want in (label, path) or str(cfg.path.parent.absolute() / want) == path:
                retrieve = i

    def params(name: str) -> TensorParams:
        t = t_of(name)
        keys = ("weight", "density", "gamma", "tall_lambda")
        per = {key: [lookup(key, name, t, own) for own in cfg.model_params] for key in keys}
        per = {k: [DEFAULTS[k] if v is None else float(v) for v in vals] for k, vals in per.items()}
        normalize = lookup("normalize", name, t, None)
        lam = lookup("lambda", name, t, None)
        rescale = lookup("rescale", name, t, None)
        if rescale is None:
            rescale = m.rescale
        if rescale is True:
            rescale = "l1" if cfg.semantics == "mergekit" else "inverse"
        slerp_t = None
        if m.name == "slerp":
            slerp_t = next((v for own in cfg.model_params if (v := lookup("t", name, t, own)) is not None), None)
            slerp_t = float(lookup("t", name, t, None) if slerp_t is None else slerp_t)
        return TensorParams(
            t=slerp_t,
            tall_lambda=per["tall_lambda"],
            consensus_k=int(cfg.parameters.get("consensus_k", DEFAULTS["consensus_k"])),
            retrieve=retrieve,
            weight=per["weight"],
            density=per["density"] if m.sparsify else [1.0] * len(cfg.models),
            gamma=per["gamma"],
            normalize=m.normalize if normalize is None else bool(normalize),
            lam=1.0 if lam is None else float(lam),
            rescale=rescale or None,
        )

    return params


def run_merge(
    cfg: MergeConfig,
    out: Path,
    *,
    force: bool = False,
    progress: bool = False,
    allow_pickle: bool = False,
    shard_size: str | None = None,
    save_masks: Path | None = None,
) -> dict:
    """Open the models, check them against the base, merge; returns {output, settings, counts} (and the
    mask files written with `save_masks`)."""
    from ..fusion.merge import merge_models
    from ..storage.base import BASE_KEY, record_for
    from ..storage.checkpoint import Checkpoint
    from ..storage.modelcard import write_card
    from ..storage.scope import align
    from ..storage.writer import parse_size

    if cfg.method.name == "cpi_ft":
        return _run_cpi_ft(
            cfg,
            out,
            force=force,
            progress=progress,
            allow_pickle=allow_pickle,
            shard_size=shard_size,
            save_masks=save_masks,
        )
    base = Checkpoint.open(cfg.base, allow_pickle=allow_pickle)
    models = [Checkpoint.open(m, allow_pickle=allow_pickle) for m in cfg.models]
    scope = align([base, *models])
    folder = base.folder is not None
    if not folder and out.suffix != ".safetensors":
        raise OptionError(f"output {out} should end in .safetensors (the base is a single file)")
    for ck in {c.path.resolve(): c for c in (base, *models)}.values():
        ck.start_fingerprint()
    layers = (base.config or {}).get("num_hidden_layers") if folder else None
    extra = _tokenizer_files(cfg.tokenizer_source) if folder and cfg.tokenizer_source else {}
    settings = cfg.to_json() | {"config": str(cfg.path), "scope_tensors": scope.to_json()}
    provenance: dict = {}

    def full_settings() -> dict:
        if not provenance:
            provenance.update(base=base.sources(), models=[c.sources() for c in models])
        return {**provenance, **settings}

    record: dict = {}

    def base_record() -> dict:
        if not record:
            record.update(record_for(base, out, spec=cfg.base))
        return record

    report = merge_models(
        cfg.method,
        base,
        models,
        cfg.labels,
        resolver(cfg, layers),
        scope=scope,
        out=out,
        semantics=cfg.semantics,
        seed=cfg.seed,
        tie_seed=cfg.tie_seed,
        dtype=cfg.out_dtype,
        shard_bytes=parse_size(shard_size) if shard_size else None,
        force=force,
        progress=progress,
        settings=full_settings,
        metadata=base_record if cfg.method.delta else None,
        card=lambda: write_card(
            base_record()[BASE_KEY] if cfg.method.delta else None,
            f"{cfg.method.name} merge (sparsemerge merge)",
            {"models": cfg.labels, "semantics": cfg.semantics, "scope": cfg.scope},
        ),
        extra_files=extra,
        selection=cfg.scope,
        save_masks=save_masks,
    )
    doc = {"output": str(out), "settings": full_settings(), "counts": report.to_json()}
    if save_masks:
        doc["masks"] = [str(Path(save_masks) / f"{x}.mask.safetensors") for x in cfg.labels]
    return doc


def _run_cpi_ft(cfg: MergeConfig, out: Path, *, save_masks, **kw) -> dict:
    """`merge_method: cpi_ft`: the `fuse` pipeline (METHODS §5) from a config: cores at `p` % (default 1) of
    |θᵗ − θ⁰| (`scope: global`, the default, or `tensor`), SLERP folds onto the last model with the models'
    weights, the cores written back by `conflict` (default max-delta)."""
    from ..fusion.api import fuse_checkpoints

    if save_masks:
        raise OptionError("--save-masks: for cpi_ft, write the cores with `sparsemerge core` and fuse with --masks")
    top = cfg.parameters
    weights = [float(mp.get("weight", 1.0)) for mp in cfg.model_params]
    res = fuse_checkpoints(
        [f"{x}={m}" for x, m in zip(cfg.labels, cfg.models)],
        out=out,
        base=cfg.base,
        percent=float(top.get("p", 1.0)),
        per_tensor=cfg.scope == "tensor",
        weights=weights if any(w != 1.0 for w in weights) else None,
        conflict=top.get("conflict", "max-delta"),
        dtype=cfg.out_dtype,
        tie_seed=cfg.tie_seed,
        **kw,
    )
    return res | {"counts": {**res["counts"], "total": res["counts"].get("total", 0), "kept": {}}}


def merge_plan(cfg: MergeConfig, *, allow_pickle: bool = False) -> dict:
    """What `--dry-run` prints: headers only (every model's tensors and shapes checked against the base by
    `align`), the output's size and the expected peak anonymous memory of the merge."""
    from ..selection.keys import CHUNK
    from ..storage import dtypes
    from ..storage.checkpoint import Checkpoint
    from ..storage.scope import align

    base = Checkpoint.open(cfg.base, allow_pickle=allow_pickle)
    models = [Checkpoint.open(m, allow_pickle=allow_pickle) for m in cfg.models]
    scope = align([base, *models])
    out_bytes = 0
    for name, info in base.infos.items():
        code = cfg.out_dtype if (cfg.out_dtype and info.is_float) else info.code
        out_bytes += int(np.prod(info.shape, dtype=np.int64)) * dtypes.itemsize(code)
    largest = max(scope.names, key=scope.numel) if scope.names else None
    n = scope.numel(largest) if largest else 0
    ranks = cfg.method.sparsify in ("magnitude", "outliers")
    # at tensor scope a ranking method holds one tensor's float32 |τ| (its bits are the keys) and two bool
    # masks (6 bytes an entry), plus per model its packed bits; at global scope each selection worker holds
    # two float32 chunks, the sample (its sorted copy and its parts) and at most CANDIDATES bracket values
    # (twice, when they are joined), and the merge pass decides each chunk from the cuts; every method holds
    # per model a float32 chunk and the combination's scratch (a few chunks), and 100 MB of interpreter and
    # libraries
    passes = 6 * CHUNK * 4 * (len(models) + 2)
    if ranks and cfg.scope == "global":
        from ..fusion.driver import fusion_workers
        from ..selection.cuts import CANDIDATES, SAMPLE

        per_worker = 2 * 4 * CHUNK + 3 * 4 * SAMPLE + 2 * 4 * CANDIDATES
        peak = max(min(fusion_workers(), len(models) * 2) * per_worker, passes) + (100 << 20)
    else:
        selection = 6 * n + (n // 8) * len(models) if ranks else 0
        peak = selection + passes + (100 << 20)
    return {
        "tensors": len(base.infos),
        "in_scope": len(scope.names),
        "copied": len(base.infos) - len(scope.names),
        "parameters": scope.numel(),
        "output_bytes": out_bytes,
        "largest_tensor": largest,
        "peak_memory_bytes": int(peak),
        "peak_memory_is_bound": bool(ranks and cfg.scope == "global"),
        "warnings": list(scope.warnings),
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _tokenizer_files(source: str) -> dict[str, str]:
    folder = Path(source)
    files = {f: (folder / f).read_text() for f in TOKENIZER_FILES if (folder / f).is_file()}
    if not files:
        raise DataError(f"tokenizer_source {source}: no tokenizer files there ({', '.join(TOKENIZER_FILES[:2])}, …)")
    return files
