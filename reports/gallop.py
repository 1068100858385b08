"""Figures for `sparsemerge gallop`: the (|θ|, |g|) density with the selected region, per-layer
selected share per criterion, and the overlap between the criteria's masks."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from mergekit_sparse.analysis.names import layer_label, layer_order

from .page import esc, report_html, short_fingerprint

COLORS = {"gallop": "#d62728", "saft": "#1f77b4", "pafi": "#2ca02c", "random": "#7f7f7f"}


def density_figure(doc: dict, criterion: str = "gallop") -> go.Figure:
    s = doc["sample"]
    lt, lg = np.array(s["log_theta"]), np.array(s["log_grad"])
    sel = np.array(s[criterion], dtype=bool)
    fig = go.Figure(
        go.Histogram2d(
            x=lt,
            y=lg,
            nbinsx=80,
            nbinsy=80,
            colorscale="Greys",
            name="all parameters",
            hovertemplate="log10|θ| %{x}, log10|g| %{y}: %{z} sampled<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=lt[sel],
            y=lg[sel],
            mode="markers",
            name=f"selected by {esc(criterion)}",
            marker={"size": 3, "color": COLORS.get(criterion, "#d62728"), "opacity": 0.6},
        )
    )
    t = doc["criteria"][criterion]["threshold"]
    if criterion == "gallop" and t > 0 and lt.size:  # boundary: |g| = T (|θ| + ε)
        xs = np.linspace(lt.min(), lt.max(), 50)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=math.log10(t) + np.log10(10**xs + 1e-8),
                mode="lines",
                name="|g| / (|θ| + ε) = threshold",
                line={"dash": "dash", "color": "black"},
            )
        )
    fig.update_layout(
        title=f"Where GaLLoP selects: {sel.sum():,} of a {lt.size:,}-entry seeded sample "
        f"(selected {doc['criteria'][criterion]['selected']:,} of {doc['criteria'][criterion]['total']:,})",
        xaxis_title="log10 |θ| (0 shown at −12)",
        yaxis_title="log10 |g| (0 shown at −12)",
        height=560,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def layer_share_figure(doc: dict) -> go.Figure:
    """Selected share per layer (numeric order), one bar per criterion."""
    fig = go.Figure()
    for c, summ in doc["criteria"].items():
        layers = sorted(summ["per_layer"], key=layer_order)
        fig.add_trace(
            go.Bar(
                x=[layer_label(x) for x in layers],
                y=[summ["per_layer"][x] for x in layers],
                name=esc(c),
                marker_color=COLORS.get(c),
                hovertemplate=f"{esc(c)} %{{x}}: %{{y:.3%}} selected<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="group",
        title="Selected share per layer, per criterion",
        yaxis_tickformat=".1%",
        height=440,
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    return fig


def criteria_overlap_figure(doc: dict) -> go.Figure:
    crit = list(doc["criteria"])
    z = [
        [1.0 if a == b else doc["jaccard"].get(f"{a}~{b}", doc["jaccard"].get(f"{b}~{a}", 0.0)) for b in crit]
        for a in crit
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=crit,
            y=crit,
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            text=np.round(z, 4),
            texttemplate="%{text}",
            hovertemplate="%{y} vs %{x}: S = %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(title="Jaccard overlap between the criteria's masks", height=420, yaxis={"autorange": "reversed"})
    return fig


def gallop_figures(doc: dict) -> list:
    rho = doc["rho"]
    return [
        (
            "GaLLoP score map",
            "Every parameter is a point at (log |θ|, log |g|); grey is the density of a seeded sample, dots are the "
            f"sampled entries GaLLoP trains (top {rho} % of |g| / (|θ| + ε)). The dashed line is the selection "
            "boundary: above it, the gradient is large for the parameter's size.",
            density_figure(doc),
        ),
        (
            "Selected share per layer",
            "The fraction of each layer's parameters each criterion selects (GaLLoP: gradient over magnitude; "
            "SAFT: |g|; PaFi: smallest |θ|; random: uniform). A flat profile spreads the trainable set over "
            "the model; a peak concentrates it.",
            layer_share_figure(doc),
        ),
        (
            "Overlap between criteria",
            "Jaccard S between the criteria's masks: near 0, two criteria train different parameters; near 1, "
            f"the same. Two random ρ = {rho} % masks overlap at about {rho / (200 - rho):.4f}.",
            criteria_overlap_figure(doc),
        ),
    ]


def gallop_header(doc: dict) -> dict:
    inputs = [
        {"role": role, "path": src.get("path"), "fingerprint": short_fingerprint(src.get("fingerprint"))}
        for role, src in (doc.get("inputs") or {}).items()
        if isinstance(src, dict)
    ]
    main = doc.get("main", "gallop")
    summ = doc["criteria"].get(main, {})
    return {
        "compared": f"Which parameters the sparse criteria would train at ρ = {doc['rho']} %: "
        f"{summ.get('selected', 0):,} of {summ.get('total', 0):,} under {main}"
        + (f" (mask: {doc['mask']})" if doc.get("mask") else "")
        + ".",
        "settings": {"ρ (%)": doc["rho"], "criterion": main, "criteria shown": ", ".join(doc["criteria"])}
        | ({"tie seed": summ["ties"].get("tie_seed")} if isinstance(summ.get("ties"), dict) else {}),
        "inputs": inputs,
    }


def gallop_report_html(doc: dict, *, plotly: str = "inline") -> str:
    return report_html(
        f"GaLLoP selection (ρ = {doc['rho']} %)", gallop_figures(doc), header=gallop_header(doc), plotly=plotly
    )
