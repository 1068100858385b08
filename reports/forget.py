"""Figures for `sparsemerge forget` and the run reports: accuracy per task and run, the ID–OOD (Pareto)
view, forget ratio and collapse rate, and the summary table.

`doc` is the forget document: {"vanilla": {"accuracy": {task: acc}}, "runs": {name: run_metrics(…) +
"accuracy"}}, as `sparsemerge forget --json` prints it and as the pipelines' summaries hold it.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from .page import colorbar, esc, grid_heatmap, report_html, rows_height, table_html

RUN_COLORS = qualitative.Dark24  # 24 distinct colours: one per run in all but the largest studies


def trained_list(run: dict) -> list[str]:
    t = run["trained"]
    return [t] if isinstance(t, str) else list(t)


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_table(doc: dict) -> str:
    """The console table as HTML: per run its tasks, ID and OOD accuracy, forget ratio and collapse."""
    rows = []
    for name, r in doc["runs"].items():
        rows.append(
            [
                name,
                ", ".join(trained_list(r)),
                _fmt(r["id_accuracy"]),
                _fmt(r["ood_accuracy"]),
                _fmt(r.get("vanilla_ood_accuracy")),
                _fmt(r["forget_ratio"]),
                f"{r['collapse_rate']:.2f} ({r['collapse_count']} of {r['ood_tasks']})",
            ]
        )
    return table_html(
        ["run", "trained on", "ID acc", "OOD acc", "vanilla OOD acc", "forget ratio", "collapse rate"],
        rows,
        numeric=(2, 3, 4, 5, 6),
    )


def accuracy_figure(doc: dict) -> go.Figure:
    """Runs × tasks heatmap of accuracy, every cell annotated; bold cells are the tasks a run trained on.
    Stays readable with many tasks and runs (one row per run, one column per task)."""
    tasks = list(doc["vanilla"]["accuracy"])
    names = ["vanilla", *doc["runs"]]
    tables = [doc["vanilla"]["accuracy"], *(r["accuracy"] for r in doc["runs"].values())]
    trained = [[], *(trained_list(r) for r in doc["runs"].values())]
    z = [[t.get(task, np.nan) for task in tasks] for t in tables]
    text = [
        [("<b>{:.2f}</b>" if task in tr else "{:.2f}").format(v) if v == v else "" for task, v in zip(tasks, row)]
        for row, tr in zip(z, trained)
    ]
    return grid_heatmap(
        z,
        [esc(t) for t in tasks],
        [esc(n) for n in names],
        title="Accuracy per task (rows: vanilla and each run; bold: a task the run trained on)",
        colorscale="Blues",
        bar=colorbar("accuracy"),
        hover="%{y} on %{x}: %{z:.3f}",
        text=text if len(tasks) <= 24 else None,
        zmin=0,
        zmax=1,
        per_row=34,
        tickangle=-30 if len(tasks) > 8 else 0,
    )


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def pareto_figure(doc: dict) -> go.Figure:
    """ID accuracy (trained tasks) against OOD accuracy (the others), one point per run, an arrow from the
    vanilla model's point on the same tasks, and the Pareto front of the runs."""
    fig = go.Figure()
    names = [n for n, r in doc["runs"].items() if r["ood_accuracy"] is not None]
    vanilla = doc["vanilla"]["accuracy"]
    points = [(doc["runs"][n]["ood_accuracy"], doc["runs"][n]["id_accuracy"]) for n in names]
    front = _pareto(points)
    for k, name in enumerate(names):
        r = doc["runs"][name]
        v_id = float(np.mean([vanilla[t] for t in trained_list(r)]))
        v_ood = r.get("vanilla_ood_accuracy")
        x, y = points[k]
        color = RUN_COLORS[k % len(RUN_COLORS)]
        if v_ood is not None:
            fig.add_annotation(
                x=x,
                y=y,
                ax=v_ood,
                ay=v_id,
                xref="x",
                yref="y",
                axref="x",
                ayref="y",
                showarrow=True,
                arrowhead=2,
                arrowwidth=1.2,
                arrowcolor=color,
                opacity=0.45,
                text="",
            )
            fig.add_trace(
                go.Scatter(
                    x=[v_ood],
                    y=[v_id],
                    mode="markers",
                    marker={"symbol": "circle-open", "size": 9, "color": "#777"},
                    showlegend=k == 0,
                    name="vanilla (same tasks)",
                    hovertemplate=f"vanilla on {esc(', '.join(trained_list(r)))}: ID %{{y:.3f}}, OOD %{{x:.3f}}"
                    "<extra></extra>",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=[x],
                y=[y],
                mode="markers+text" if k in front else "markers",  # labels on the front only: no pile-ups
                text=[esc(name)],
                textposition="top center",
                marker={
                    "size": 12,
                    "color": color,
                    "symbol": ["circle", "diamond", "square"][k // len(RUN_COLORS) % 3],
                },
                name=esc(name),
                hovertemplate=f"{esc(name)}: ID %{{y:.3f}}, OOD %{{x:.3f}}<extra></extra>",
            )
        )
    if len(front) > 1:
        fig.add_trace(
            go.Scatter(
                x=[points[i][0] for i in front],
                y=[points[i][1] for i in front],
                mode="lines",
                line={"dash": "dot", "color": "#444"},
                name="Pareto front",
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title="ID vs OOD accuracy per run (up and right is better)",
        xaxis={"title": "OOD accuracy (tasks not trained on)", "range": [-0.05, 1.05]},
        yaxis={"title": "ID accuracy (tasks trained on)", "range": [-0.05, 1.1]},
        height=560,
    )
    return fig


def forget_figure(doc: dict) -> go.Figure:
    """Forget ratio and collapse rate per run, as horizontal bars (one row per run)."""
    names = list(doc["runs"])
    fr = [doc["runs"][n]["forget_ratio"] for n in names]
    cr = [doc["runs"][n]["collapse_rate"] for n in names]
    labels = [esc(n) for n in names]
    fig = go.Figure(
        [
            go.Bar(
                y=labels,
                x=[v if v is not None else 0 for v in fr],
                orientation="h",
                name="forget ratio",
                text=["n/a" if v is None else f"{v:.3f}" for v in fr],
                textposition="outside",
                marker_color="#d62728",
            ),
            go.Bar(
                y=labels,
                x=cr,
                orientation="h",
                name="collapse rate",
                text=[f"{v:.2f} ({doc['runs'][n]['collapse_count']})" for v, n in zip(cr, names)],
                textposition="outside",
                marker_color="#7f7f7f",
            ),
        ]
    )
    fig.update_layout(
        barmode="group",
        title="Forgetting per run (lower is better)",
        xaxis={"range": [0, 1.2]},
        yaxis={"autorange": "reversed"},
        height=rows_height(len(names), per_row=44),
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    return fig


NOTES = {
    "summary": "ID accuracy: mean over the tasks a run trained on. OOD accuracy: mean over the others. "
    "Forget ratio: max(0, 1 − OOD / vanilla OOD) (0: nothing forgotten, 1: everything). Collapse rate: the "
    "share of OOD tasks whose accuracy is below 1 % (their count in brackets).",
    "accuracy": "One row per model, one column per task; darker is better. Compare each column with the vanilla "
    "row to see what a run gained (bold: trained tasks) and what it lost (the rest).",
    "pareto": "Each run is a point: how well it does what it was trained for (up) against how much of "
    "the rest it kept (right). The faint arrow starts at the vanilla model on the same tasks; the dotted "
    "line joins the runs no other run beats on both (labelled; hover or see the legend for the others).",
    "forget": "Bars per run; a run with forget ratio n/a had a vanilla OOD accuracy of 0 (the ratio is "
    "undefined). The number in brackets counts the collapsed OOD tasks.",
}


def forget_sections(doc: dict) -> list:
    sections = [("Summary", NOTES["summary"], summary_table(doc))] if doc["runs"] else []
    sections.append(("Accuracy per task", NOTES["accuracy"], accuracy_figure(doc)))
    if doc["runs"]:
        sections += [
            ("ID vs OOD accuracy", NOTES["pareto"], pareto_figure(doc)),
            ("Forget ratio and collapse rate", NOTES["forget"], forget_figure(doc)),
        ]
    return sections


def forget_header(doc: dict) -> dict:
    inputs = [{"model": "vanilla", "accuracy table": doc["vanilla"].get("path", ""), "trained on": ""}]
    inputs += [
        {"model": n, "accuracy table": r.get("path", ""), "trained on": ", ".join(trained_list(r))}
        for n, r in doc["runs"].items()
    ]
    tasks = list(doc["vanilla"]["accuracy"])
    return {
        "compared": f"{len(doc['runs'])} run(s) against the vanilla model on {len(tasks)} tasks "
        f"({', '.join(tasks)}): what each gained on its own task and what it forgot elsewhere.",
        "settings": {"mean forget ratio": _fmt(doc.get("mean_forget_ratio"))},
        "inputs": inputs,
    }


def forget_report_html(doc: dict, *, plotly: str = "inline") -> str:
    sections = forget_sections(doc)
    if doc["warnings"]:
        sections.insert(0, ("Warnings", "", "<ul>" + "".join(f"<li>{esc(w)}</li>" for w in doc["warnings"]) + "</ul>"))
    if doc["sequential"]:
        rows = [[k, f"{v['delta_A']:+.3f}", f"{v['delta_B']:+.3f}"] for k, v in doc["sequential"].items()]
        sections.append(
            (
                "Sequential forgetting",
                "For A→B: ΔA is the change on A after then training on B (negative: forgotten); ΔB the gain on B.",
                table_html(["order", "ΔA", "ΔB"], rows),
            )
        )
    return report_html("Forgetting", sections, header=forget_header(doc), plotly=plotly)
