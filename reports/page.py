"""One self-contained HTML file from plotly figures: plotly.js inlined once, no CDN, works offline.

Every user-provided string (task names, paths, titles) is escaped before it reaches the page or a
figure: `esc()` for text, and figures built by this package escape their labels the same way.
"""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline

from mergekit_sparse.storage import atomic

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.note{color:#555;font-size:.9em}table{border-collapse:collapse}td,th{padding:2px 8px;border:1px solid #ddd}"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def write_report(path: Path, title: str, sections: list[tuple[str, str, go.Figure | str]]) -> Path:
    """Write `sections` = [(heading, note, figure or trusted HTML)] to one offline HTML file."""
    path = Path(path)
    atomic.write_text(path, report_html(title, sections))
    return path


def report_html(title: str, sections: list[tuple[str, str, go.Figure | str]]) -> str:
    """The text of one offline HTML report (for a caller that commits it with other outputs).

    Headings and notes are escaped here; a section body given as a string must already be safe HTML.
    """
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{CSS}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>",
        f"</head><body><h1>{esc(title)}</h1>",
    ]
    for i, (heading, note, body) in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{esc(heading)}</h2>")
        if note:
            parts.append(f"<p class='note'>{esc(note)}</p>")
        if isinstance(body, go.Figure):
            parts.append(
                body.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{i}", config={"displaylogo": False})
            )
        else:
            parts.append(body)
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def table_html(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
