"""The report as one self-contained HTML page: inline CSS, plots as PNG data URIs, no script and
no external URL, so it opens offline and can be archived with the batch record as it is."""

from __future__ import annotations

import base64
from html import escape

from agent.review import layout, plots
from agent.review.exceptions import BatchReport

CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:2em;color:#111}
h1{font-size:20px}h2{font-size:15px;margin-top:1.6em;border-bottom:1px solid #999}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #bbb;padding:2px 6px;text-align:left;
vertical-align:top}th{background:#eee}.none{color:#555;font-style:italic}.bad{color:#b00;font-weight:bold}
.sign td{height:2.2em;min-width:22em}figure{margin:.8em 0}figcaption{font-size:12px;color:#333}
"""


def _table(s: layout.Section) -> str:
    if not s.rows:
        return f'<p class="none">{layout.NONE}</p>' if s.columns else ""
    head = "".join(f"<th>{escape(c)}</th>" for c in s.columns) if any(s.columns) else ""
    rows = "".join(
        "<tr>" + "".join(f"<td{_mark(v)}>{escape(v)}</td>" for v in row) + "</tr>" for row in s.rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{rows}</table>"


def _mark(v: str) -> str:
    return ' class="bad"' if v == "UNEXPLAINED" else ""


def render(report: BatchReport) -> bytes:
    """:class:`~agent.review.plots.ExtraMissing` without matplotlib."""
    figures = []
    for n, p in enumerate(report.plots):
        caption = layout.plot_caption(report, n)
        data = base64.b64encode(plots.png(p, caption)).decode("ascii")
        figures.append(
            f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>"
        )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(layout.title(report))}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(layout.title(report))}</h1>",
    ]
    for s in layout.sections(report):
        parts.append(f"<h2>{escape(s.title)}</h2>")
        if s.note:
            parts.append(f"<p>{escape(s.note)}</p>")
        parts.append(_table(s))
        if s.title == "Limit excursions":
            parts.append("<h2>Excursion plots</h2>")
            parts.append("".join(figures) or f'<p class="none">{layout.NONE}</p>')
    sign = "".join(f"<tr><th>{escape(k)}</th><td></td></tr>" for k in layout.SIGN_OFF)
    parts.append(f'<h2>Sign-off</h2><table class="sign">{sign}</table></body></html>\n')
    return "".join(parts).encode("utf-8")
