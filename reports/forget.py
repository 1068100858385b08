"""Figures for `sparsemerge forget`: per-task accuracy vanilla vs each run, forget ratio and collapse."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from .page import esc, table_html, write_report


def accuracy_figure(doc: dict) -> go.Figure:
    tasks = list(doc["vanilla"]["accuracy"])
    fig = go.Figure(
        go.Bar(
            x=[esc(t) for t in tasks],
            y=[doc["vanilla"]["accuracy"][t] for t in tasks],
            name="vanilla",
            marker_color="#7f7f7f",
        )
    )
    for name, r in doc["runs"].items():
        fig.add_trace(
            go.Bar(
                x=[esc(t) for t in tasks],
                y=[r["accuracy"][t] for t in tasks],
                name=f"{esc(name)} (trained on {esc(r['trained'])})",
                hovertemplate="%{x}: %{y:.3f}<extra>" + esc(name) + "</extra>",
            )
        )
    fig.update_layout(barmode="group", title="Accuracy per task", yaxis={"range": [0, 1]}, height=420)
    return fig


def forget_figure(doc: dict) -> go.Figure:
    names = list(doc["runs"])
    fr = [doc["runs"][n]["forget_ratio"] for n in names]
    cr = [doc["runs"][n]["collapse_rate"] for n in names]
    fig = go.Figure(
        [
            go.Bar(
                x=[esc(n) for n in names],
                y=[v if v is not None else 0 for v in fr],
                name="forget ratio",
                text=["n/a" if v is None else f"{v:.3f}" for v in fr],
                textposition="outside",
            ),
            go.Bar(
                x=[esc(n) for n in names],
                y=cr,
                name="collapse rate",
                text=[f"{v:.2f} ({doc['runs'][n]['collapse_count']})" for v, n in zip(cr, names)],
                textposition="outside",
            ),
        ]
    )
    fig.update_layout(
        barmode="group", title="Forgetting per run (lower is better)", yaxis={"range": [0, 1.1]}, height=400
    )
    return fig


def write_forget_report(doc: dict, path: Path) -> Path:
    sections = [("Accuracy", "", accuracy_figure(doc))]
    if doc["runs"]:
        sections.append(("Forget ratio and collapse rate", "; ".join(doc["warnings"]), forget_figure(doc)))
    if doc["sequential"]:
        rows = [[k, f"{v['delta_A']:+.3f}", f"{v['delta_B']:+.3f}"] for k, v in doc["sequential"].items()]
        sections.append(
            (
                "Sequential forgetting",
                "ΔA: change on A after training B; ΔB: gain on B.",
                table_html(["order", "ΔA", "ΔB"], rows),
            )
        )
    return write_report(path, "Forgetting", sections)
