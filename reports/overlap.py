"""Figures for `sparsemerge overlap`: pure functions from the groups document to plotly figures."""

from __future__ import annotations

import networkx as nx
import numpy as np
import plotly.graph_objects as go

from .page import esc, report_html

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _task_order(doc: dict) -> list[int]:
    """Tasks grouped in stage order; inside a group, a hierarchical (average-linkage) order on 1 − S."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    idx = {t: i for i, t in enumerate(doc["tasks"])}
    m = np.array(doc["matrix"])
    order = []
    for grp in doc["groups"]:
        ids = [idx[t] for t in grp]
        if len(ids) > 2:
            d = 1 - m[np.ix_(ids, ids)]
            np.fill_diagonal(d, 0)
            ids = [ids[k] for k in leaves_list(linkage(squareform(d, checks=False), "average"))]
        order += ids
    return order


def jaccard_heatmap(doc: dict) -> go.Figure:
    order = _task_order(doc)
    names = [esc(doc["tasks"][i]) for i in order]
    m, chance = np.array(doc["matrix"])[np.ix_(order, order)], np.array(doc["chance"])[np.ix_(order, order)]
    pv = np.array(doc["p_values"])[np.ix_(order, order)]
    inter = np.array(doc["intersections"])[np.ix_(order, order)]
    hover = [
        [
            f"{names[i]} ∩ {names[j]}<br>S = {m[i, j]:.4f}<br>chance S = {chance[i, j]:.4f}"
            f"<br>|∩| = {inter[i, j]:,}<br>p = {pv[i, j]:.3g}"
            for j in range(len(order))
        ]
        for i in range(len(order))
    ]
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=names,
            y=names,
            text=hover,
            hoverinfo="text",
            colorscale="Viridis",
            zmin=0,
            zmax=max(1e-9, float(m[~np.eye(len(m), dtype=bool)].max(initial=0))),
            colorbar={"title": "Jaccard"},
        )
    )
    pos = 0
    for g, grp in enumerate(doc["groups"]):  # outline each group's block
        n = len(grp)
        fig.add_shape(
            type="rect",
            x0=pos - 0.5,
            x1=pos + n - 0.5,
            y0=pos - 0.5,
            y1=pos + n - 0.5,
            line={"color": "red", "width": 3},
        )
        fig.add_annotation(
            x=pos + n / 2 - 0.5, y=pos - 0.5, text=f"stage {g + 1}", showarrow=False, yshift=10, font={"color": "red"}
        )
        pos += n
    off = chance[~np.eye(len(order), dtype=bool)]
    fig.update_layout(
        title=f"Jaccard overlap of core regions (τ = {doc['tau']}, chance level ≈ {off.mean() if off.size else 0:.4f})",
        yaxis={"autorange": "reversed"},
        height=520,
    )
    return fig


def task_graph_figure(doc: dict) -> go.Figure:
    tasks, m, tau = doc["tasks"], np.array(doc["matrix"]), doc["tau"]
    g = nx.Graph()
    g.add_nodes_from(range(len(tasks)))
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            if m[i, j] >= tau:
                g.add_edge(i, j, weight=float(m[i, j]))
    pos = nx.spring_layout(g, seed=0)
    group_of = {t: k for k, grp in enumerate(doc["groups"]) for t in grp}
    fig = go.Figure()
    for i, j in g.edges:
        (x0, y0), (x1, y1) = pos[i], pos[j]
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                hoverinfo="skip",
                showlegend=False,
                line={"width": 1 + 8 * m[i, j], "color": "#999"},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[(x0 + x1) / 2],
                y=[(y0 + y1) / 2],
                mode="markers",
                showlegend=False,
                marker={"size": 6, "color": "#999"},
                hoverinfo="text",
                text=[f"{esc(tasks[i])} — {esc(tasks[j])}: S = {m[i, j]:.4f}"],
            )
        )
    for k, grp in enumerate(doc["groups"]):
        ids = [tasks.index(t) for t in grp]
        fig.add_trace(
            go.Scatter(
                x=[pos[i][0] for i in ids],
                y=[pos[i][1] for i in ids],
                mode="markers+text",
                name=f"stage {k + 1}",
                text=[esc(tasks[i]) for i in ids],
                textposition="top center",
                marker={"size": 18, "color": PALETTE[group_of[tasks[ids[0]]] % len(PALETTE)]},
                hovertext=[f"{esc(tasks[i])}: group {k + 1}, core {doc['sizes'][i]:,}" for i in ids],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title=f"Task graph: edges where S ≥ τ = {tau}; colours are groups",
        xaxis={"visible": False},
        yaxis={"visible": False},
        height=450,
    )
    return fig


def layer_share_heatmap(doc: dict) -> go.Figure:
    tasks = doc["tasks"]
    layers = list(doc["per_layer"])
    z = [[doc["layer_share"][t].get(layer, 0.0) for layer in layers] for t in tasks]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"layer {layer}" for layer in layers],
            y=[esc(t) for t in tasks],
            colorscale="Magma",
            colorbar={"title": "share"},
            hovertemplate="%{y}, %{x}: %{z:.4%} of the layer in the core<extra></extra>",
        )
    )
    fig.update_layout(title="Share of each layer's parameters in each task's core", height=150 + 40 * len(tasks))
    return fig


def module_overlap_figure(doc: dict) -> go.Figure:
    tasks = doc["tasks"]
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    modules = list(doc["per_module"])
    z = [[doc["per_module"][mod]["jaccard"][i][j] for mod in modules] for i, j in pairs]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[esc(mod) for mod in modules],
            y=[f"{esc(tasks[i])} ∩ {esc(tasks[j])}" for i, j in pairs],
            colorscale="Viridis",
            hovertemplate="%{y} in %{x}: S = %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(title="Jaccard overlap per module type", height=150 + 35 * len(pairs))
    return fig


def tau_sweep_figure(doc: dict) -> go.Figure:
    taus, counts = zip(*doc["tau_sweep"])
    fig = go.Figure(
        go.Scatter(
            x=taus,
            y=counts,
            mode="lines+markers",
            line_shape="hv",
            hovertemplate="τ = %{x:.4f}: %{y} groups<extra></extra>",
        )
    )
    fig.add_vline(x=doc["tau"], line_dash="dash", annotation_text=f"τ = {doc['tau']}")
    fig.update_layout(title="Number of groups as τ varies", xaxis_title="τ", yaxis_title="groups", height=350)
    return fig


def overlap_figures(doc: dict) -> list[tuple[str, str, go.Figure]]:
    groups = "; ".join(f"stage {k + 1}: {', '.join(g)}" for k, g in enumerate(doc["groups"]))
    return [
        ("Jaccard overlap", f"Groups in stage order — {groups}", jaccard_heatmap(doc)),
        ("Task graph", "", task_graph_figure(doc)),
        ("Core share per layer", "", layer_share_heatmap(doc)),
        ("Overlap per module type", "", module_overlap_figure(doc)),
        ("τ sweep", "", tau_sweep_figure(doc)),
    ]


def overlap_report_html(doc: dict) -> str:
    return report_html("Core-region overlap and task groups", overlap_figures(doc))
