"""`sparsemerge merge`: parity with mergekit 0.1.5 (golden outputs committed in tests/data/merge, made by
its make_golden.py), naive in-memory oracles for what mergekit does not do, DARE's determinism and
rescale, Breadcrumbs on tiny tensors, the config's errors and `--dry-run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.numpy import load_file

from mergekit_sparse.cli.main import cli

DATA = Path(__file__).resolve().parent / "data" / "merge"
GOLDEN = sorted(p.stem for p in DATA.glob("*.yml"))


def weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def config_here(tmp_path: Path, doc: dict, name: str = "m.yml") -> Path:
    """A config in a copy-free place: absolute model paths into the fixtures."""
    doc = json.loads(json.dumps(doc))
    for key in ("base_model",):
        if key in doc:
            doc[key] = str(DATA / doc[key])
    for m in doc.get("models", []):
        m["model"] = str(DATA / m["model"])
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def merge(cfg: Path, out: Path, *extra: str):
    r = CliRunner().invoke(cli, ["merge", str(cfg), "-o", str(out), *extra])
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("name", GOLDEN)
def test_equals_mergekit_0_1_5(name, tmp_path):
    """linear, task_arithmetic, ties (normalised and plain sum), breadcrumbs, breadcrumbs_ties, slerp:
    filters, layer gradients, lambda; three tasks with conflicting signs. Exact but for the float32
    rounding of linear's division and slerp's angle (mergekit computes them in float32)."""
    assert len(GOLDEN) == 7
    merge(DATA / f"{name}.yml", tmp_path / "out")
    got, want = weights(tmp_path / "out"), load_file(str(DATA / "golden" / f"{name}.safetensors"))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")
        if name not in ("linear", "slerp"):
            assert np.array_equal(got[k], want[k]), (name, k)
    base = weights(DATA / "base")
    assert any(not np.array_equal(got[k], base[k]) for k in got)  # it merged something


def _taus():
    base = weights(DATA / "base")
    return base, [{k: weights(DATA / t)[k] - base[k] for k in base} for t in "abc"]


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Naive top-k mask by a full sort (continuous fixtures: no ties)."""
    m = np.zeros(x.size, dtype=bool)
    m[np.argsort(-np.abs(x).reshape(-1), kind="stable")[:k]] = True
    return m.reshape(x.shape)


def test_ties_reference_semantics_against_a_naive_oracle(tmp_path):
    """semantics: reference — trim, elect on the unweighted sum, mean over the agreeing tasks by count."""
    w = [1.0, 0.5, 2.0]
    doc = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": t, "parameters": {"weight": wi, "density": 0.3}} for t, wi in zip("abc", w)],
        "parameters": {"semantics": "reference", "lambda": 0.9},
    }
    merge(config_here(tmp_path, doc), tmp_path / "out")
    got = weights(tmp_path / "out")
    base, taus = _taus()
    for k in base:
        trimmed = [t[k] * _top(t[k], max(1, int(0.3 * t[k].size))) for t in taus]
        gamma = np.where(sum(trimmed) >= 0, 1.0, -1.0)
        agree = [np.sign(t) == gamma for t in trimmed]
        total = sum(wi * t * a for wi, t, a in zip(w, trimmed, agree))
        count = np.maximum(sum(a.astype(np.float32) for a in agree), 1)
        np.testing.assert_allclose(got[k], base[k] + 0.9 * total / count, rtol=1e-5, atol=1e-6, err_msg=k)


def test_dare_is_deterministic_across_threads_and_its_rescales_hold(tmp_path):
    """DARE keeps each entry by the §2 hash (seed s + 1 + t): the same output at 1 and 2 threads; about
    `density` of every tensor kept; `rescale: inverse` multiplies kept entries by exactly 1/density;
    mergekit's `l1` rescale preserves each task vector's ‖τ‖₁."""
    density = 0.25
    outs = {}
    for rescale in ("inverse", "l1"):
        doc = {
            "merge_method": "dare_linear",
            "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1.0, "density": density}}],
            "parameters": {"rescale": rescale, "random_seed": 7},
        }
        cfg = config_here(tmp_path, doc, f"{rescale}.yml")
        for threads in ("1", "2"):
            out = tmp_path / f"{rescale}-{threads}"
            env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
            r = subprocess.run(
                [str(Path(sys.executable).parent / "sparsemerge"), "merge", str(cfg), "-o", str(out), "--json"],
                capture_output=True,
                text=True,
                env=env,
            )
            assert r.returncode == 0, r.stderr
            outs[rescale, threads] = weights(out)
    base, taus = _taus()
    for rescale in ("inverse", "l1"):
        for k in base:
            assert np.array_equal(outs[rescale, "1"][k], outs[rescale, "2"][k]), (rescale, k)
    kept_total = n_total = 0
    for k in base:
        tau, got = taus[0][k], outs["inverse", "1"][k] - base[k]
        kept = outs["inverse", "1"][k] != base[k]
        kept_total, n_total = kept_total + int(kept.sum()), n_total + kept.size
        np.testing.assert_allclose(got[kept], tau[kept] / density, rtol=1e-4, atol=1e-6)
        got_l1 = outs["l1", "1"][k] - base[k]
        if tau.size >= 64:
            assert abs(np.abs(got_l1).sum() / np.abs(tau).sum() - 1) < 1e-3, k
    sigma = (n_total * density * (1 - density)) ** 0.5
    assert abs(kept_total - density * n_total) < 4 * sigma


def test_dare_seed_changes_the_drop_and_tasks_drop_independently(tmp_path):
    from mergekit_sparse.fusion.methods import dare_keep

    a, b = dare_keep(0, 0, 3, 0, 20000, 0.5), dare_keep(0, 1, 3, 0, 20000, 0.5)
    assert 0.45 < a.mean() < 0.55 and 0.2 < (a & b).mean() < 0.3  # independent: about density²
    assert not np.array_equal(a, dare_keep(1, 0, 3, 0, 20000, 0.5))
    assert np.array_equal(a[5000:7000], dare_keep(0, 0, 3, 5000, 7000, 0.5))  # chunking changes nothing


def test_breadcrumbs_on_tiny_tensors_keeps_the_window_and_never_zeroes_a_whole_delta():
    """⌊γ·n⌋ = 0 drops nothing from the top; a window that would run past the end slides down."""
    from mergekit_sparse.fusion.methods import METHODS, keep_window

    bc = METHODS["breadcrumbs"]
    assert keep_window(bc, 16, 0.5, 0.01) == (0, 8)  # n_top = 0: the top half kept, not nothing
    assert keep_window(bc, 100, 0.3, 0.05) == (5, 35)
    assert keep_window(bc, 10, 0.9, 0.2) == (1, 10)  # 2 + 9 > 10: drop only 1 from the top
    assert keep_window(bc, 10, 1.0, 0.2) is None  # density 1 keeps all (as mergekit)
    assert keep_window(METHODS["ties"], 10, 0.01, 0) == (0, 1)  # magnitude keeps at least one


def test_the_output_is_a_model_transformers_loads_with_its_record(tmp_path):
    from transformers import AutoModelForCausalLM

    merge(DATA / "ties.yml", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3
    rec = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert rec["settings"]["merge_method"] == "ties" and rec["settings"]["semantics"] == "mergekit"
    assert rec["settings"]["base"]["fingerprint"].startswith("sha256-tensors-v1:")
    assert set(rec["counts"]["kept"]) == {"a", "b", "c"}
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # from the base
    assert "base_model:" in (tmp_path / "out" / "README.md").read_text()
    # inputs are never touched; an existing output needs --force
    r = CliRunner().invoke(cli, ["merge", str(DATA / "ties.yml"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "already exists" in r.output


def test_config_problems_are_listed_at_once_before_any_tensor_is_read(tmp_path):
    doc = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": "heavy", "density": 1.5, "gamma": 0.1}},
            {"model": "b", "extra": 1},
        ],
        "parameters": {"normalize": "yes", "scope": "sideways", "bogus": 1},
        "tokenizer_source": "union",
        "surprise": True,
    }
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1
    for msg in [
        "config.surprise: unknown key",
        "config.models[0].parameters.weight: 'heavy' is not a finite number",
        "config.models[0].parameters.density: 1.5 is not a number in [0, 1]",
        "config.models[0].parameters.gamma: not a parameter of ties",
        "config.models[1].extra: unknown key",
        "config.parameters.normalize: 'yes' is not true or false",
        "config.parameters.scope: 'sideways' is not tensor or global or row",
        "config.parameters.bogus: unknown",
        "config.tokenizer_source: union",
    ]:
        assert msg in r.output, (msg, r.output)
    assert not (tmp_path / "out").exists()
    for method, want in [
        ("model_stock", "is not one of linear, task_arithmetic, ties"),
        ("cpi_ft", "config.models: cpi_ft fuses at least two models besides base_model"),
    ]:
        cfg = config_here(tmp_path, {"merge_method": method, "base_model": "base", "models": [{"model": "a"}]})
        r = CliRunner().invoke(cli, ["merge", str(cfg), "-o", str(tmp_path / "out")])
        assert r.exit_code == 1 and want in r.output, r.output


def test_slices_full_range_runs_and_partial_slices_are_refused(tmp_path):
    for d in ("base", "a", "b"):
        shutil.copytree(DATA / d, tmp_path / d)
    full = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "slices": [{"sources": [{"model": m, "layer_range": [0, 3]} for m in ("base", "a", "b")]}],
        "parameters": {"weight": 0.5},
    }
    (tmp_path / "s.yml").write_text(yaml.safe_dump(full))
    merge(tmp_path / "s.yml", tmp_path / "out")
    models = {**full, "models": [{"model": "a"}, {"model": "b"}]}
    models.pop("slices")
    (tmp_path / "m.yml").write_text(yaml.safe_dump(models))
    merge(tmp_path / "m.yml", tmp_path / "out2")
    a, b = weights(tmp_path / "out"), weights(tmp_path / "out2")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the base listed among the sources is θ⁰, not a task
    full["slices"][0]["sources"][1]["layer_range"] = [0, 2]
    (tmp_path / "s.yml").write_text(yaml.safe_dump(full))
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "s.yml"), "-o", str(tmp_path / "out3")])
    assert r.exit_code == 1 and "frankenmerges" in r.output


def test_dry_run_checks_shapes_and_prints_the_plan_without_writing(tmp_path):
    r = CliRunner().invoke(cli, ["merge", str(DATA / "ties.yml"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    merge(DATA / "ties.yml", tmp_path / "out")
    data = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert plan["output_bytes"] <= data < plan["output_bytes"] + 20_000  # tensors + the header
    assert plan["in_scope"] == plan["tensors"] and plan["peak_memory_bytes"] > 100 << 20
    # a model with another shape is found from the headers alone
    odd = tmp_path / "odd"
    shutil.copytree(DATA / "a", odd)
    from safetensors.numpy import save_file

    w = weights(odd)
    w["model.norm.weight"] = np.ones(17, dtype=np.float32)
    save_file(w, str(odd / "model.safetensors"), metadata={"format": "pt"})
    doc = {"merge_method": "ties", "base_model": str(DATA / "base"), "models": [{"model": str(odd)}]}
    (tmp_path / "odd.yml").write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(cli, ["merge", str(tmp_path / "odd.yml"), "--dry-run"])
    assert r.exit_code == 1 and "model.norm.weight" in r.output


def _quantised_models(tmp_path: Path, step: float = 1 / 64) -> dict[str, np.ndarray]:
    """Copies of the fixtures whose task vectors take few values (τ rounded to `step`, as bf16 fine-tunes
    do): thousands of entries tie at any global threshold, so the §2 hash decides the picks."""
    from safetensors.numpy import save_file

    base = weights(DATA / "base")
    for t in "abc":
        shutil.copytree(DATA / t, tmp_path / t)
        w = weights(DATA / t)
        save_file(
            {k: (base[k] + np.round((w[k] - base[k]) / step) * step).astype(np.float32) for k in base},
            str(tmp_path / t / "model.safetensors"),
        )
    shutil.copytree(DATA / "base", tmp_path / "base")
    return base


def _global_top(taus: dict[str, np.ndarray], k: int, ranks: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Naive global top-k over every tensor at once: sort all |τ| (descending), ties by the smallest §2 hash."""
    from mergekit_sparse.selection.keys import tie_hash

    names = sorted(taus)
    mag = np.concatenate([np.abs(taus[n]).reshape(-1) for n in names])
    h = np.concatenate([tie_hash(seed, ranks[n], np.arange(taus[n].size)) for n in names])
    order = np.lexsort((h, -mag))[:k]
    flat = np.zeros(mag.size, dtype=bool)
    flat[order] = True
    out, start = {}, 0
    for n in names:
        out[n] = flat[start : start + taus[n].size].reshape(taus[n].shape)
        start += taus[n].size
    return out


def _ranks(folder: Path) -> dict[str, int]:
    from mergekit_sparse.storage.checkpoint import Checkpoint
    from mergekit_sparse.storage.scope import align

    return align([Checkpoint.open(folder / x) for x in ("base", "a", "b", "c")]).ranks


def test_global_ties_equals_a_naive_global_oracle_with_massive_ties_and_saves_its_masks(tmp_path):
    """scope: global trims each τₜ to its top ⌊density·N⌋ over the whole model (ties at the threshold by
    the §2 hash), then elects and merges as at tensor scope; --save-masks writes exactly those trims."""
    from mergekit_sparse.storage.masks import MaskSet

    base = _quantised_models(tmp_path)
    w, density = [1.0, 0.5, 2.0], 0.2
    doc = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [
            {"model": str(tmp_path / t), "parameters": {"weight": wi, "density": density}} for t, wi in zip("abc", w)
        ],
        "parameters": {"scope": "global", "semantics": "reference"},
    }
    cfg = tmp_path / "g.yml"
    cfg.write_text(yaml.safe_dump(doc))
    r = merge(cfg, tmp_path / "out", "--save-masks", str(tmp_path / "masks"), "--json")
    counts = json.loads(r.output)["counts"]
    got = weights(tmp_path / "out")
    taus = [{k: weights(tmp_path / t)[k] - base[k] for k in base} for t in "abc"]
    n_all = sum(v.size for v in base.values())
    ranks = _ranks(tmp_path)
    tops = [_global_top(tau, int(density * n_all), ranks) for tau in taus]
    for t, top in zip("abc", tops):
        saved = MaskSet.load(tmp_path / "masks" / f"{t}.mask.safetensors")
        assert saved.count() == int(density * n_all)
        for k in base:
            assert np.array_equal(saved.bits(k), top[k]), (t, k)
    assert all(counts["tie_picks"][t] > 0 for t in "abc")  # the quantised deltas do tie at the threshold
    assert len({int(top[k].sum()) for top in tops[:1] for k in base}) > 3  # global: shares differ per tensor
    for k in base:
        trimmed = [tau[k] * top[k] for tau, top in zip(taus, tops)]
        gamma = np.where(sum(trimmed) >= 0, 1.0, -1.0)
        agree = [(np.sign(t) == gamma) & (t != 0) for t in trimmed]
        total = sum(wi * t * a for wi, t, a in zip(w, trimmed, agree))
        count = np.maximum(sum(a.astype(np.float32) for a in agree), 1)
        np.testing.assert_allclose(got[k], base[k] + total / count, rtol=1e-5, atol=1e-6, err_msg=k)
    assert not list(tmp_path.glob(".out.masks-*"))  # the scratch selection is gone


def test_global_breadcrumbs_keeps_the_global_rank_window(tmp_path):
    """Breadcrumbs at scope global: ranks (⌊γ·N⌋, ⌊(γ+density)·N⌋] of |τ| over the whole model."""
    base = _quantised_models(tmp_path)
    density, gamma = 0.3, 0.05
    doc = {
        "merge_method": "breadcrumbs",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0, "density": density, "gamma": gamma}}],
        "parameters": {"scope": "global"},
    }
    cfg = tmp_path / "b.yml"
    cfg.write_text(yaml.safe_dump(doc))
    merge(cfg, tmp_path / "out")
    got = weights(tmp_path / "out")
    tau = {k: weights(tmp_path / "a")[k] - base[k] for k in base}
    n_all = sum(v.size for v in base.values())
    ranks = _ranks(tmp_path)
    hi = _global_top(tau, int((gamma + density) * n_all), ranks)
    lo = _global_top(tau, int(gamma * n_all), ranks)
    for k in base:
        np.testing.assert_array_equal(got[k], (base[k] + tau[k] * (hi[k] & ~lo[k])).astype(np.float32), err_msg=k)


def test_saved_tensor_scope_masks_are_the_trims_and_overlap_reads_them(tmp_path):
    """--save-masks at tensor scope: each model's mask is its per-tensor top max(1, ⌊density·n⌋) of |τ|."""
    from mergekit_sparse.storage.masks import MaskSet

    doc = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": t, "parameters": {"density": 0.3}} for t in "ab"],
    }
    masks = tmp_path / "masks"
    merge(config_here(tmp_path, doc), tmp_path / "out", "--save-masks", str(masks))
    base, taus = _taus()
    for t, tau in zip("ab", taus):
        m = MaskSet.load(masks / f"{t}.mask.safetensors")
        for k in base:
            assert np.array_equal(m.bits(k), _top(tau[k], max(1, int(0.3 * tau[k].size)))), (t, k)
    r = CliRunner().invoke(
        cli,
        [
            "overlap",
            str(masks / "a.mask.safetensors"),
            str(masks / "b.mask.safetensors"),
            "-o",
            str(tmp_path / "ov"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output


def test_global_scope_config_errors_and_a_failed_merge_leaves_no_masks(tmp_path):
    from safetensors.numpy import save_file

    doc = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"density": [0.1, 0.5]}}],
        "parameters": {"scope": "global", "rescale": "l1"},
    }
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0
    assert "scope global takes one value per model" in r.output and "with scope global use inverse" in r.output
    doc = {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"density": 0.5}}],
    }
    r = CliRunner().invoke(
        cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "o"), "--save-masks", str(tmp_path / "m")]
    )
    assert r.exit_code != 0 and "keeps no ranked selection" in r.output
    # a NaN in the last model: the merge fails after the global selection; nothing is left behind
    shutil.copytree(DATA / "b", tmp_path / "bad")
    w = weights(DATA / "b")
    w["model.norm.weight"][3] = np.nan
    save_file(w, str(tmp_path / "bad" / "model.safetensors"))
    doc = {
        "merge_method": "ties",
        "base_model": str(DATA / "base"),
        "models": [
            {"model": str(DATA / "a"), "parameters": {"density": 0.3}},
            {"model": str(tmp_path / "bad"), "parameters": {"density": 0.3}},
        ],
        "parameters": {"scope": "global"},
    }
    cfg = tmp_path / "nan.yml"
    cfg.write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(cli, ["merge", str(cfg), "-o", str(tmp_path / "out"), "--save-masks", str(tmp_path / "mk")])
    assert r.exit_code != 0 and "NaN" in r.output, r.output
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "mk").glob("*")) if (tmp_path / "mk").exists() else True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_slerp_takes_base_and_one_model_and_needs_t(tmp_path):
    """slerp: base_model is t = 0, the one other model t = 1; t = 0 gives the base bit for bit."""
    doc = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0
    assert "slerp interpolates base_model and one other model, not 2" in r.output and "slerp needs t" in r.output
    doc = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}], "parameters": {"t": 0.0}}
    merge(config_here(tmp_path, doc), tmp_path / "t0")
    base, got = weights(DATA / "base"), weights(tmp_path / "t0")
    assert all(np.array_equal(got[k], base[k]) for k in base)


def _tall_oracle(taus, lambdas):
    mtl = {k: sum(t[k] for t in taus) for k in taus[0]}
    masks = [{k: np.abs(t[k]) > np.float32(lam) * np.abs(mtl[k] - t[k]) for k in t} for t, lam in zip(taus, lambdas)]
    return mtl, masks


def test_tall_retrieve_and_consensus_equal_naive_oracles_and_save_the_tall_masks(tmp_path):
    """TALL masks mₜ = 1[|τₜ| > λₜ|τ_MTL − τₜ|]: `tall` gives θ⁰ + m_r ⊙ τ_MTL for the retrieved model,
    `consensus` θ⁰ + λ·1[Σₜ mₜ ≥ k] ⊙ τ_MTL; --save-masks writes the mₜ."""
    from mergekit_sparse.storage.masks import MaskSet

    lambdas = [0.4, 0.2, 0.6]
    models = [{"model": t, "parameters": {"tall_lambda": lam}} for t, lam in zip("abc", lambdas)]
    tall = {"merge_method": "tall", "base_model": "base", "models": models, "parameters": {"retrieve": "b"}}
    merge(config_here(tmp_path, tall, "t.yml"), tmp_path / "tall", "--save-masks", str(tmp_path / "tm"))
    cons = {
        "merge_method": "consensus",
        "base_model": "base",
        "models": models,
        "parameters": {"consensus_k": 2, "lambda": 0.8},
    }
    merge(config_here(tmp_path, cons, "c.yml"), tmp_path / "cons")
    base, taus = _taus()
    mtl, masks = _tall_oracle(taus, lambdas)
    got_t, got_c = weights(tmp_path / "tall"), weights(tmp_path / "cons")
    agree = 0
    for k in base:
        np.testing.assert_allclose(got_t[k], base[k] + np.where(masks[1][k], mtl[k], 0), rtol=1e-6, atol=1e-7)
        count = sum(m[k].astype(int) for m in masks)
        np.testing.assert_allclose(got_c[k], base[k] + 0.8 * np.where(count >= 2, mtl[k], 0), rtol=1e-6, atol=1e-7)
        agree += int((count >= 2).sum())
        for t, m in zip("abc", masks):
            assert np.array_equal(MaskSet.load(tmp_path / "tm" / f"{t}.mask.safetensors").bits(k), m[k]), (t, k)
    assert 0 < agree < sum(v.size for v in base.values())  # the consensus is neither empty nor everything


def test_localize_stitch_is_global_by_default_and_averages_over_the_masks(tmp_path):
    """localize-stitch: γₜ = top-density |τₜ| over the whole model (ties by the §2 hash); stitched τ =
    Σₜ (γₜ / Σᵤ γᵤ) ⊙ τₜ, 0 where no γ holds."""
    base = _quantised_models(tmp_path)
    dens = [0.1, 0.2, 0.3]
    doc = {
        "merge_method": "localize_stitch",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / t), "parameters": {"density": d}} for t, d in zip("abc", dens)],
    }
    cfg = tmp_path / "ls.yml"
    cfg.write_text(yaml.safe_dump(doc))
    merge(cfg, tmp_path / "out")
    got = weights(tmp_path / "out")
    taus = [{k: weights(tmp_path / t)[k] - base[k] for k in base} for t in "abc"]
    n_all = sum(v.size for v in base.values())
    ranks = _ranks(tmp_path)
    gammas = [_global_top(tau, int(d * n_all), ranks) for tau, d in zip(taus, dens)]
    for k in base:
        total = sum(tau[k] * g[k] for tau, g in zip(taus, gammas))
        count = np.maximum(sum(g[k].astype(np.float32) for g in gammas), 1)
        np.testing.assert_allclose(got[k], base[k] + total / count, rtol=1e-6, atol=1e-7, err_msg=k)
    doc["models"] = [{"model": str(tmp_path / "a")}]
    cfg.write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(cli, ["merge", str(cfg), "-o", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "localize_stitch needs density" in r.output


def test_tall_and_consensus_config_errors(tmp_path):
    doc = {"merge_method": "tall", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "tall retrieves one model" in r.output
    doc["parameters"] = {"retrieve": "zzz"}
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "'zzz' is not one of the models" in r.output
    doc = {
        "merge_method": "consensus",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"tall_lambda": -1}}, {"model": "b"}],
        "parameters": {"consensus_k": 3},
    }
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0
    assert (
        "consensus_k: 3 is more than the 2 models" in r.output
        and "tall_lambda: -1 is not a number of at least 0" in r.output
    )


def test_cpi_ft_from_a_config_equals_sparsemerge_fuse(tmp_path):
    """merge_method: cpi_ft runs the fuse pipeline: the same bytes as `fuse a b --base base --p 2`."""
    doc = {
        "merge_method": "cpi_ft",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "a"}, {"model": "b"}],
        "parameters": {"p": 2},
    }
    merge(config_here(tmp_path, doc), tmp_path / "m")
    r = CliRunner().invoke(
        cli,
        ["fuse", str(DATA / "a"), str(DATA / "b"), "--base", str(DATA / "base"), "--p", "2", "-o", str(tmp_path / "f")],
    )
    assert r.exit_code == 0, r.output
    got, want = weights(tmp_path / "m"), weights(tmp_path / "f")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    base = weights(DATA / "base")
    assert any(not np.array_equal(got[k], base[k]) for k in got)
    doc["parameters"] = {"p": 0, "conflict": "loudest"}
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "x")])
    assert r.exit_code != 0
    assert (
        "p: 0 is not a percentage in (0, 100]" in r.output and "'loudest' is not max-delta or last or mean" in r.output
    )


def test_breadcrumbs_row_scope_keeps_the_window_of_every_row(tmp_path):
    """scope: row: in every row, ranks (⌊γ·c⌋, ⌊γ·c⌋ + ⌊density·c⌋] of |τ| (equal values by the §2 hash of the
    flat index); a 1-D tensor is one row."""
    from mergekit_sparse.selection.keys import tie_hash

    base = _quantised_models(tmp_path, step=1 / 32)
    density, gamma = 0.4, 0.1
    doc = {
        "merge_method": "breadcrumbs",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "a"), "parameters": {"density": density, "gamma": gamma}}],
        "parameters": {"scope": "row"},
    }
    cfg = tmp_path / "r.yml"
    cfg.write_text(yaml.safe_dump(doc))
    merge(cfg, tmp_path / "out", "--save-masks", str(tmp_path / "m"))
    got, ranks = weights(tmp_path / "out"), _ranks(tmp_path)
    a = weights(tmp_path / "a")
    ties = 0
    for k in base:
        tau = (a[k] - base[k]).reshape(-1, base[k].shape[-1])
        cols = tau.shape[1]
        lo, hi = int(gamma * cols), int(gamma * cols) + int(density * cols)
        h = tie_hash(0, ranks[k], np.arange(tau.size)).reshape(tau.shape)
        want = np.zeros(tau.shape, dtype=bool)
        for r in range(tau.shape[0]):
            order = sorted(range(cols), key=lambda j: (-abs(float(tau[r, j])), int(h[r, j])))
            want[r, order[lo:hi]] = True
            ties += len(set(np.abs(tau[r]).tolist())) < cols
        np.testing.assert_array_equal(got[k], (base[k] + (tau * want).reshape(base[k].shape)).astype(np.float32), k)
    assert ties > 10  # the quantised deltas tie inside rows
    doc = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}], "parameters": {"scope": "row"}}
    r = CliRunner().invoke(cli, ["merge", str(config_here(tmp_path, doc)), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "row is Breadcrumbs' scope" in r.output


def test_dry_run_at_global_scope_gives_an_upper_bound_of_memory(tmp_path):
    """Global scope's selection is bounded by its caps (sample, bracket values), whatever the tensors: the
    plan says "at most"."""
    doc = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": t, "parameters": {"density": 0.2}} for t in "ab"],
    }
    plans = {}
    for scope in ("tensor", "global"):
        doc["parameters"] = {"scope": scope}
        r = merge(config_here(tmp_path, doc, f"{scope}.yml"), tmp_path / "unused", "--dry-run", "--json")
        plans[scope] = json.loads(r.output)["plan"]
    assert not plans["tensor"]["peak_memory_is_bound"] and plans["global"]["peak_memory_is_bound"]
    from mergekit_sparse.selection.cuts import CANDIDATES

    assert 8 * CANDIDATES < plans["global"]["peak_memory_bytes"] < 2 * 8 * CANDIDATES + (200 << 20)
    r = merge(config_here(tmp_path, doc, "g.yml"), tmp_path / "unused", "--dry-run")
    assert "peak memory at most" in r.output and not (tmp_path / "unused").exists()


def _combine_oracle(taus, weights, *, consensus, normalize, semantics):
    """`methods.combine` as the definition reads, one np.where at a time (its first implementation)."""
    weighted = [t * np.float32(w) for t, w in zip(taus, weights)]
    if not consensus:
        mixed = weighted[0].copy()
        for x in weighted[1:]:
            mixed += x
        if normalize:
            d = float(np.float32(sum(np.float32(w) for w in weights)))
            mixed /= np.float32(1.0 if abs(d) < 1e-8 else d)
        return mixed
    elect = weighted if semantics == "mergekit" else taus
    total = elect[0].copy()
    for x in elect[1:]:
        total += x
    majority = np.where(total >= 0, np.float32(1), np.float32(-1))
    mixed, divisor = np.zeros_like(taus[0]), np.zeros_like(taus[0])
    for x, t, w in zip(weighted, taus, weights):
        agree = np.sign(x if semantics == "mergekit" else t) == majority
        mixed += np.where(agree, x, np.float32(0))
        divisor += np.where(agree, np.float32(w if semantics == "mergekit" else 1.0), np.float32(0))
    if normalize:
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


@pytest.mark.parametrize("semantics", ["mergekit", "reference"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 1.0, 0.7], [1.0, -0.5, 2.0], [1.0, 1.0]])
def test_the_ties_combine_equals_its_definition_bit_for_bit(semantics, weights):
    """The sign-bit TIES combine against the where-by-where definition: sparse deltas with exact zeros,
    -0.0, cancelling pairs (a zero sum elects +1) and bf16-like equal values."""
    from mergekit_sparse.fusion.methods import combine

    rng = np.random.default_rng(len(weights) + int(10 * abs(weights[1])))
    n = 20_000
    taus = []
    for _ in weights:
        t = (rng.integers(-4, 5, n) * 2.0**-10).astype(np.float32) * (rng.random(n) < 0.4)
        t[rng.random(n) < 0.05] = np.float32(-0.0)
        taus.append(t)
    taus[1][:500] = -taus[0][:500]  # sums of exactly zero
    for normalize in (True, False):
        got = combine(taus, weights, consensus=True, normalize=normalize, lam=1.0, semantics=semantics)
        want = _combine_oracle(taus, weights, consensus=True, normalize=normalize, semantics=semantics)
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), (semantics, weights, normalize)
