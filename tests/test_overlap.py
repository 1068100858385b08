"""Overlap and grouping against a naive computation on unpacked masks; the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mergekit_sparse.analysis.names import layer_key, module_of
from mergekit_sparse.analysis.overlap import compute_overlap, group_tasks
from mergekit_sparse.cli.main import cli
from mergekit_sparse.storage.masks import MaskSet, save_masks

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (8, 5),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (8, 5),
    "lm_head.weight": (3, 7),
}


def random_masks(tmp_path, n, density, seed=0, hot=None):
    """n random mask files; tasks listed in `hot` get their layer-`hot[i]` tensors fully selected."""
    g = torch.Generator().manual_seed(seed)
    paths, raw = [], []
    for i in range(n):
        masks = {k: torch.rand(s, generator=g) < density for k, s in SHAPES.items()}
        if hot and i in hot:
            for k in masks:
                if f"layers.{hot[i]}." in k:
                    masks[k][:] = True
        p = save_masks(tmp_path / f"t{i}.mask.safetensors", masks, {"criterion": "random"})
        paths.append(p)
        raw.append(masks)
    return paths, raw


def naive_jaccard(a: dict, b: dict, keys) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in keys)
    union = sum(int((a[k] | b[k]).sum()) for k in keys)
    return inter / union if union else 0.0


def test_jaccard_and_breakdowns_equal_naive_on_unpacked_masks(tmp_path):
    paths, raw = random_masks(tmp_path, 4, 0.3)
    res = compute_overlap([MaskSet.load(p) for p in paths], ["a", "b", "c", "d"])
    m = res.matrix
    for i in range(4):
        assert m[i, i] == pytest.approx(1.0)
        for j in range(4):
            assert m[i, j] == pytest.approx(naive_jaccard(raw[i], raw[j], SHAPES))
    for layer, counts in res.per_layer.items():
        keys = [k for k in SHAPES if layer_key(k) == layer]
        from mergekit_sparse.analysis.overlap import jaccard_matrix

        jm = jaccard_matrix(counts.inter, np.diag(counts.inter))
        assert jm[0, 1] == pytest.approx(naive_jaccard(raw[0], raw[1], keys))
    assert set(res.per_module) == {module_of(k) for k in SHAPES} == {"q_proj", "up_proj", "lm_head"}
    jm = res.per_tensor["lm_head.weight"]
    assert jm.inter[2, 3] == int((raw[2]["lm_head.weight"] & raw[3]["lm_head.weight"]).sum())


def test_empty_masks_have_jaccard_zero(tmp_path):
    for i in range(2):
        save_masks(
            tmp_path / f"e{i}.mask.safetensors", {k: torch.zeros(s, dtype=torch.bool) for k, s in SHAPES.items()}, {}
        )
    res = compute_overlap([MaskSet.load(tmp_path / f"e{i}.mask.safetensors") for i in range(2)], ["x", "y"])
    assert res.matrix[0, 1] == 0.0


def test_tau_zero_gives_one_group_and_tau_above_every_s_gives_singletons():
    m = np.array([[1, 0.2, 0.05], [0.2, 1, 0.01], [0.05, 0.01, 1]])
    assert group_tasks(m, ["a", "b", "c"], tau=0.0, order="input") == [["a", "b", "c"]]
    assert group_tasks(m, ["a", "b", "c"], tau=0.5, order="input") == [["a"], ["b"], ["c"]]
    assert group_tasks(m, ["a", "b", "c"], tau=0.1, order="input") == [["a", "b"], ["c"]]


def test_random_order_is_seeded_and_least_overlap_puts_isolated_first():
    m = np.array([[1, 0.3, 0.1], [0.3, 1, 0.0], [0.1, 0.0, 1]])
    a = group_tasks(m, list("abc"), tau=0.2, order="random", seed=3)
    assert a == group_tasks(m, list("abc"), tau=0.2, order="random", seed=3)
    assert sorted(map(tuple, a)) == [("a", "b"), ("c",)]
    m4 = np.array([[1, 0.3, 0.01, 0.15], [0.3, 1, 0.01, 0.0], [0.01, 0.01, 1, 0.01], [0.15, 0.0, 0.01, 1]])
    # mean S to the outside: {c} 0.01 < {a, b} 0.0425 < {d} 0.053
    assert group_tasks(m4, list("abcd"), tau=0.2, order="least-overlap") == [["c"], ["a", "b"], ["d"]]


def test_planted_structure_tasks_sharing_hot_layers_form_one_group(tmp_path):
    paths, _ = random_masks(tmp_path, 4, 0.02, seed=1, hot={0: 0, 1: 0, 2: 1, 3: 1})
    r = CliRunner().invoke(
        cli, ["overlap", *map(str, paths), "--tau", "0.3", "--order", "input", "-o", str(tmp_path / "g.json"), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["groups"] == [["t0", "t1"], ["t2", "t3"]]
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["tau"] == 0.3 and len(doc["matrix"]) == 4 and doc["chance"][0][1] < doc["matrix"][0][1]
    assert doc["p_values"][0][1] < 1e-6 and set(doc["per_layer"]) == {"0", "1", "other"}


def test_overlap_from_checkpoints_with_base(tiny_base, tiny_tasks, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "overlap",
            "--base",
            str(tiny_base),
            *map(str, tiny_tasks),
            "--p",
            "5",
            "--tau",
            "0.2",
            "--order",
            "input",
            "-o",
            str(tmp_path / "g.json"),
            "--json",
            "--save-masks",
            str(tmp_path / "m"),
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["groups"] == [["math", "code"], ["chat"]]  # the planted hot modules
    assert (tmp_path / "m" / "chat.mask.safetensors").is_file()


def test_report_is_offline_and_escapes_task_names(tmp_path):
    paths, _ = random_masks(tmp_path, 2, 0.2)
    evil = tmp_path / "<script>alert(1)<%2Fscript>.mask.safetensors"
    paths[1].rename(evil)
    html = tmp_path / "r.html"
    r = CliRunner().invoke(
        cli, ["overlap", str(paths[0]), str(evil), "-o", str(tmp_path / "g.json"), "--html", str(html)]
    )
    assert r.exit_code == 0, r.output
    text = html.read_text()
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    import plotly.offline

    assert "<script src" not in text and "<link" not in text  # nothing fetched from outside
    assert text.count(plotly.offline.get_plotlyjs()[:200]) == 1  # plotly.js inlined once
    assert text.count("Plotly.newPlot") == 5


def test_overlap_user_errors(tmp_path):
    paths, _ = random_masks(tmp_path, 2, 0.2)
    r = CliRunner().invoke(cli, ["overlap", str(paths[0]), "--tau", "2", "-o", str(tmp_path / "g.json")])
    assert r.exit_code == 2 and "Invalid value for '--tau'" in r.output
    r = CliRunner().invoke(cli, ["overlap", str(paths[0]), str(paths[0]), "-o", str(tmp_path / "g.json")])
    assert r.exit_code == 1 and "two inputs have the task name 't0'" in r.output


def test_report_for_eight_planted_tasks_renders_offline_in_chromium(tmp_path):
    from browser import assert_renders, figure_colours

    paths, _ = random_masks(tmp_path, 8, 0.02, seed=1, hot={i: i // 4 for i in range(8)})
    html = tmp_path / "overlap.html"
    r = CliRunner().invoke(
        cli, ["overlap", *map(str, paths), "--tau", "0.3", "-o", str(tmp_path / "g.json"), "--html", str(html)]
    )
    assert r.exit_code == 0, r.output
    dom = assert_renders(html, "overlap-report-8-tasks", tmp_path, figures=5)
    assert "stage 1" in dom and "stage 2" in dom and "stage 3" not in dom  # the two planted groups
    assert len(figure_colours(dom, 0)) >= 3  # in-group S, across-group S and the grey diagonal differ


def test_two_task_report_from_real_cores_is_readable_and_names_its_inputs(tiny_base, tiny_tasks, tmp_path):
    """The commonest case: two tasks. The heatmap's scale covers the off-diagonal S (not the diagonal's 1.0),
    every figure is at least a readable height, the header names the inputs and their fingerprints."""
    from browser import assert_renders, figure_colours

    from mergekit_sparse.reports.overlap import jaccard_heatmap
    from mergekit_sparse.storage.checkpoint import Checkpoint

    html = tmp_path / "overlap2.html"
    args = ["overlap", "--base", str(tiny_base), *map(str, tiny_tasks[:2]), "--p", "5", "--tau", "0.2"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "g.json"), "--html", str(html)])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "g.json").read_text())
    s = doc["matrix"][0][1]
    assert 0 < s < 1
    heat = [t for t in jaccard_heatmap(doc).data if t.showscale is not False][0]
    assert heat.zmax == pytest.approx(max(s, 0.2)) and heat.zmin == 0  # not 1.0: the diagonal is drawn apart
    assert [row["task"] for row in doc["inputs"]] == ["math", "code"]
    fp = Checkpoint.open(tiny_tasks[0]).content_fingerprint()
    assert doc["inputs"][0]["fingerprint"] == fp
    dom = assert_renders(html, "overlap-report-2-tasks", tmp_path, figures=5)
    assert len(figure_colours(dom, 0)) >= 2  # the heatmap is not one uniform colour
    text = html.read_text()
    assert fp.rsplit(":", 1)[-1][:12] in text and "math" in text  # the header: inputs and fingerprints
    assert f"{s:.3f}" in text  # the off-diagonal cell is annotated with S
    assert "chance S" in text


def test_report_plotly_inline_has_no_network_reference_and_cdn_links_it(tmp_path):
    import re

    import plotly.offline

    paths, _ = random_masks(tmp_path, 2, 0.2)
    for mode in ("inline", "cdn"):
        html = tmp_path / f"{mode}.html"
        r = CliRunner().invoke(
            cli,
            ["overlap", *map(str, paths), "-o", str(tmp_path / f"{mode}.json"), "--html", str(html), "--plotly", mode],
        )
        assert r.exit_code == 0, r.output
        text = html.read_text()
        tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", text)
        if mode == "inline":
            assert all("src=" not in t and "href=" not in t for t in tags), tags  # nothing fetched from outside
            assert plotly.offline.get_plotlyjs()[:200] in text
        else:
            version = plotly.offline.get_plotlyjs_version()
            assert f"<script src='https://cdn.plot.ly/plotly-{version}.min.js'" in text
            assert plotly.offline.get_plotlyjs()[:200] not in text and len(text) < 500_000
    r = CliRunner().invoke(cli, ["overlap", *map(str, paths), "-o", str(tmp_path / "x.json"), "--plotly", "web"])
    assert r.exit_code == 2 and "Invalid value for '--plotly'" in r.output


def test_layers_are_in_numeric_order_everywhere():
    from mergekit_sparse.analysis.names import layer_order, sorted_layers
    from mergekit_sparse.reports.gallop import layer_share_figure
    from mergekit_sparse.reports.overlap import layer_share_heatmap

    keys = ["10", "other", "2", "0", "1"]
    assert sorted(keys, key=layer_order) == ["0", "1", "2", "10", "other"]
    assert list(sorted_layers({k: 0 for k in keys})) == ["0", "1", "2", "10", "other"]
    want = ["layer 0", "layer 1", "layer 2", "layer 10", "outside the blocks"]
    doc = {"tasks": ["a"], "per_layer": {k: {} for k in keys}, "layer_share": {"a": {k: 0.1 for k in keys}}}
    assert list(layer_share_heatmap(doc).data[0].y) == want
    gal = {"criteria": {"gallop": {"per_layer": {k: 0.1 for k in keys}}}}
    assert list(layer_share_figure(gal).data[0].x) == want
