"""Figures for `sparsemerge gallop`: the (|θ|, |g|) density with the selected region, per-layer
selected share per criterion, and the overlap between the criteria's masks."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from .page import esc, report_html

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
    fig = go.Figure()
    for c, summ in doc["criteria"].items():
        layers = list(summ["per_layer"])
        fig.add_trace(
            go.Bar(
                x=[f"layer {x}" for x in layers],
                y=[summ["per_layer"][x] for x in layers],
                name=esc(c),
                marker_color=COLORS.get(c),
                hovertemplate=f"{esc(c)} %{{x}}: %{{y:.3%}} selected<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="group", title="Selected share per layer, per criterion", yaxis_tickformat=".1%", height=400
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
    return [
        ("GaLLoP score map", "Grey: density of all parameters (sampled); dots: selected entries.", density_figure(doc)),
        ("Selected share per layer", "", layer_share_figure(doc)),
        ("Overlap between criteria", "", criteria_overlap_figure(doc)),
    ]


def gallop_report_html(doc: dict) -> str:
    return report_html(f"GaLLoP selection (ρ = {doc['rho']} %)", gallop_figures(doc))
