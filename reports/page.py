"""One self-contained HTML file from plotly figures, with a header saying what was compared and how.

plotly.js is inlined once by default (no network: the report opens offline and years later); `plotly="cdn"`
links the release on cdn.plot.ly instead, for a report of a few hundred kB.

Every user-provided string (task names, paths, titles) is escaped before it reaches the page or a
figure: `esc()` for text, and figures built by this package escape their labels the same way.
"""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from mergekit_sparse.storage import atomic

PLOTLY_MODES = ("inline", "cdn")

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.3em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.lead{font-size:1.05em;margin:.3em 0 1em}.note{color:#444;font-size:.92em;max-width:75em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{padding:3px 9px;border:1px solid #ddd;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.settings span{display:inline-block;background:#f4f4f4;border-radius:3px;padding:1px 7px;margin:2px 4px 2px 0}
code{font-size:.9em}"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def rows_height(rows: int, *, per_row: int = 26, extra: int = 170, minimum: int = 360) -> int:
    """Pixel height of a figure with `rows` rows (heatmap rows, horizontal bars): readable, never a strip."""
    return max(minimum, extra + per_row * rows)


def colorbar(title: str, *, tickformat: str | None = None) -> dict:
    """A colourbar with few, non-overlapping ticks whatever the figure's height."""
    bar = {"title": {"text": title, "side": "right"}, "thickness": 14, "nticks": 6, "outlinewidth": 0}
    if tickformat:
        bar["tickformat"] = tickformat
    return bar


def grid_heatmap(
    z,
    x: list[str],
    y: list[str],
    *,
    title: str,
    colorscale: str,
    bar: dict,
    hover: str,
    text=None,
    zmin: float | None = None,
    zmax: float | None = None,
    per_row: int = 26,
    tickangle: int = 0,
) -> go.Figure:
    """A heatmap with one row per `y` label, top to bottom, cells apart, as tall as its rows need."""
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=y,
            zmin=zmin,
            zmax=zmax,
            colorscale=colorscale,
            colorbar=bar,
            text=text,
            texttemplate="%{text}" if text is not None else None,
            hovertemplate=hover + "<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=title,
        yaxis={"autorange": "reversed"},
        xaxis={"tickangle": tickangle},
        height=rows_height(len(y), per_row=per_row),
    )
    return fig


def short_fingerprint(fp) -> str:
    """`sha256-tensors-v1:0123…` -> `0123456789ab` (the full value is in the JSON output)."""
    if not fp:
        return "—"
    return str(fp).rsplit(":", 1)[-1][:12]


def write_report(
    path: Path,
    title: str,
    sections: list[tuple[str, str, go.Figure | str]],
    *,
    header: dict | None = None,
    plotly: str = "inline",
) -> Path:
    """Write `sections` = [(heading, note, figure or trusted HTML)] to one HTML file."""
    path = Path(path)
    atomic.write_text(path, report_html(title, sections, header=header, plotly=plotly))
    return path


def _header_html(header: dict) -> str:
    """What was compared (a sentence), the settings (key = value) and the inputs (a table)."""
    parts = []
    if header.get("compared"):
        parts.append(f"<p class='lead'>{esc(header['compared'])}</p>")
    settings = {k: v for k, v in (header.get("settings") or {}).items() if v is not None}
    if settings:
        chips = "".join(f"<span>{esc(k)} = {esc(v)}</span>" for k, v in settings.items())
        parts.append(f"<div class='settings'><b>Settings</b> {chips}</div>")
    inputs = header.get("inputs") or []
    if inputs:
        cols = [  # columns no input has a value for are left out
            c
            for c in dict.fromkeys(k for row in inputs for k in row)
            if any(row.get(c) not in (None, "", "—") for row in inputs)
        ]
        parts.append("<p><b>Inputs</b></p>" + table_html(cols, [[row.get(c, "") for c in cols] for row in inputs]))
    if header.get("details"):  # trusted HTML from the report's own builder (already escaped)
        parts.append(header["details"])
    return "".join(parts)


def report_html(
    title: str,
    sections: list[tuple[str, str, go.Figure | str]],
    *,
    header: dict | None = None,
    plotly: str = "inline",
) -> str:
    """The text of one HTML report (for a caller that commits it with other outputs).

    Headings, notes and the header are escaped here; a section body given as a string must already be
    safe HTML. `plotly`: "inline" (default; offline) or "cdn" (a script tag for cdn.plot.ly).
    """
    if plotly not in PLOTLY_MODES:
        raise ValueError(f"plotly must be one of {PLOTLY_MODES}, got {plotly!r}; this is a bug in the caller")
    if plotly == "inline":
        script = f"<script type='text/javascript'>{get_plotlyjs()}</script>"
    else:
        version = get_plotlyjs_version()
        script = f"<script src='https://cdn.plot.ly/plotly-{version}.min.js' charset='utf-8'></script>"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{CSS}</style>{script}</head><body><h1>{esc(title)}</h1>",
    ]
    if header:
        parts.append(f"<header>{_header_html(header)}</header>")
    for i, (heading, note, body) in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{esc(heading)}</h2>")
        if note:
            parts.append(f"<p class='note'>{esc(note)}</p>")
        if isinstance(body, go.Figure):
            parts.append(
                body.to_html(
                    full_html=False,
                    include_plotlyjs=False,
                    div_id=f"fig{i}",
                    config={"displaylogo": False, "responsive": True},
                )
            )
        else:
            parts.append(body)
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def table_html(header: list[str], rows: list[list], *, numeric: tuple[int, ...] = ()) -> str:
    """A plain table, every cell escaped; numbers and the `numeric` columns right-aligned."""

    def cell(k: int, c) -> str:
        num = k in numeric or (isinstance(c, (int, float)) and not isinstance(c, bool))
        return f"<td class='num'>{esc(c)}</td>" if num else f"<td>{esc(c)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(k, c) for k, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
