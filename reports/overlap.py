"""Figures for `sparsemerge overlap`: pure functions from the groups document to plotly figures."""

from __future__ import annotations

import networkx as nx
import numpy as np
import plotly.graph_objects as go

from mergekit_sparse.analysis.names import layer_label, layer_order

from .page import colorbar, esc, grid_heatmap, report_html, short_fingerprint

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
    """S per pair, the colour scale over the off-diagonal values (and τ), the diagonal grey with the core
    sizes; every cell annotated (up to 16 tasks), chance level and p-value in the hover."""
    order = _task_order(doc)
    n = len(order)
    names = [esc(doc["tasks"][i]) for i in order]
    m, chance = np.array(doc["matrix"])[np.ix_(order, order)], np.array(doc["chance"])[np.ix_(order, order)]
    pv = np.array(doc["p_values"])[np.ix_(order, order)]
    inter = np.array(doc["intersections"])[np.ix_(order, order)]
    sizes = [doc["sizes"][i] for i in order]
    diag = np.eye(n, dtype=bool)

    def hover(i: int, j: int) -> str:
        if i == j:
            return f"{names[i]}: core of {sizes[i]:,} entries"
        ratio = f" ({m[i, j] / chance[i, j]:.1f}× chance)" if chance[i, j] > 0 else ""
        return (
            f"{names[i]} ∩ {names[j]}<br>S = {m[i, j]:.4f}<br>chance S = {chance[i, j]:.4f}{ratio}"
            f"<br>|∩| = {inter[i, j]:,}<br>p = {pv[i, j]:.3g}"
        )

    hovers = [[hover(i, j) for j in range(n)] for i in range(n)]
    off = m[~diag]
    zmax = max(float(off.max(initial=0)), float(doc["tau"]) if doc["tau"] > 0 else 0.0, 1e-9)
    annotate = n <= 16
    fig = go.Figure(
        [
            go.Heatmap(  # the diagonal (S = 1 by definition): grey, labelled with the core size
                z=np.where(diag, 1.0, np.nan),
                x=names,
                y=names,
                colorscale=[[0, "#d9d9d9"], [1, "#d9d9d9"]],
                showscale=False,
                text=[[f"core<br>{sizes[i]:,}" if i == j else "" for j in range(n)] for i in range(n)],
                texttemplate="%{text}" if annotate else None,
                customdata=hovers,
                hovertemplate="%{customdata}<extra></extra>",
                xgap=2,
                ygap=2,
            ),
            go.Heatmap(
                z=np.where(diag, np.nan, m),
                x=names,
                y=names,
                colorscale="Viridis",
                zmin=0,
                zmax=zmax,
                text=[[f"{m[i, j]:.3f}" if i != j else "" for j in range(n)] for i in range(n)],
                texttemplate="%{text}" if annotate else None,
                customdata=hovers,
                hovertemplate="%{customdata}<extra></extra>",
                colorbar=colorbar("Jaccard S"),
                xgap=2,
                ygap=2,
            ),
        ]
    )
    pos = 0
    for g, grp in enumerate(doc["groups"]):  # outline each group's block
        size = len(grp)
        fig.add_shape(
            type="rect",
            x0=pos - 0.5,
            x1=pos + size - 0.5,
            y0=pos - 0.5,
            y1=pos + size - 0.5,
            line={"color": "red", "width": 3},
        )
        fig.add_annotation(  # inside the block's top-left corner, so no label lands on another block
            x=pos - 0.5,
            y=pos - 0.5,
            xanchor="left",
            yanchor="top",
            text=f"stage {g + 1}",
            showarrow=False,
            font={"color": "red"},
            bgcolor="rgba(255,255,255,0.85)",
        )
        pos += size
    off_chance = chance[~diag]
    fig.update_layout(
        title=f"Jaccard overlap of core regions (τ = {doc['tau']}, mean chance level "
        f"{off_chance.mean() if off_chance.size else 0:.4f})",
        yaxis={"autorange": "reversed"},
        height=(height := max(460, 160 + 60 * n) if n <= 16 else 160 + 30 * n),
        width=height + 260,
        plot_bgcolor="white",
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
    """Layers as rows (numeric order), tasks as columns: the share of each layer in each task's core."""
    tasks = doc["tasks"]
    layers = sorted(doc["per_layer"], key=layer_order)
    return grid_heatmap(
        [[doc["layer_share"][t].get(layer, 0.0) for t in tasks] for layer in layers],
        [esc(t) for t in tasks],
        [layer_label(layer) for layer in layers],
        title="Share of each layer's parameters in each task's core",
        colorscale="Magma",
        bar=colorbar("share of the layer", tickformat=".1%"),
        hover="%{x}, %{y}: %{z:.3%} of the layer in the core",
    )


def module_overlap_figure(doc: dict) -> go.Figure:
    """Module types as rows, task pairs as columns: S restricted to that module type's tensors."""
    tasks = doc["tasks"]
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    modules = list(doc["per_module"])
    z = [[doc["per_module"][mod]["jaccard"][i][j] for i, j in pairs] for mod in modules]
    return grid_heatmap(
        z,
        [f"{esc(tasks[i])} ∩ {esc(tasks[j])}" for i, j in pairs],
        [esc(mod) for mod in modules],
        title="Jaccard overlap per module type",
        colorscale="Viridis",
        bar=colorbar("Jaccard S"),
        hover="%{x} in %{y}: S = %{z:.4f}",
        text=np.round(z, 3) if len(pairs) <= 12 else None,
        zmin=0,
        per_row=30,
        tickangle=-35 if len(pairs) > 6 else 0,
    )


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
        (
            "Jaccard overlap",
            "Each cell is S = |A ∩ B| / |A ∪ B| between two tasks' cores (the colour scale spans the off-diagonal "
            "values and τ; the grey diagonal gives each core's size). Hover for the chance level of two random "
            "cores of the same sizes and the p-value: S far above chance means the tasks changed the same "
            f"parameters. Red boxes are the groups, in stage order — {groups}.",
            jaccard_heatmap(doc),
        ),
        (
            "Task graph",
            f"Tasks are nodes; an edge joins two tasks whose S is at least τ = {doc['tau']} (thicker: larger S). "
            "Connected tasks share a group and are retrained together; colours are the groups.",
            task_graph_figure(doc),
        ),
        (
            "Core share per layer",
            "The fraction of each layer's parameters that fall in each task's core. A uniform column means the "
            "task changed every layer alike; a bright band shows the layers the task relies on.",
            layer_share_heatmap(doc),
        ),
        (
            "Overlap per module type",
            "S computed only over one module type's tensors (all layers together), per pair of tasks: where "
            "the cores overlap (attention, MLP, embeddings).",
            module_overlap_figure(doc),
        ),
        (
            "τ sweep",
            "How many groups the overlap graph gives at each threshold τ; the dashed line is the τ used.",
            tau_sweep_figure(doc),
        ),
    ]


def overlap_header(doc: dict) -> dict:
    """The report header: the tasks compared, the settings, and per task its mask and fingerprints."""
    s = doc.get("settings") or {}
    base = s.get("base")
    inputs = [
        {
            "task": row["task"],
            "checkpoint": row.get("checkpoint") or "",
            "mask": row["mask"] or "(not saved)",
            "core": f"{row['criterion']} top {row['percent']} %" if row.get("percent") is not None else "",
            "selected": f"{row['selected']:,}" if isinstance(row.get("selected"), int) else "",
            "checkpoint fingerprint": short_fingerprint(row.get("fingerprint")),
            "base fingerprint": short_fingerprint(row.get("base_fingerprint")),
        }
        for row in doc.get("inputs") or []
    ]
    return {
        "compared": f"The core regions of {len(doc['tasks'])} tasks ({', '.join(doc['tasks'])}) over "
        f"{doc['numel']:,} parameters, and the groups they give for staged retraining.",
        "settings": {
            "τ": doc["tau"],
            "group order": doc["order"],
            "seed": doc["seed"],
            "p (%)": s.get("p"),
            "base": base.get("path") if isinstance(base, dict) else base,
        },
        "inputs": inputs,
    }


def overlap_report_html(doc: dict, *, plotly: str = "inline") -> str:
    return report_html(
        "Core-region overlap and task groups", overlap_figures(doc), header=overlap_header(doc), plotly=plotly
    )
