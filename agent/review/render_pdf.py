"""The report as a PDF, with matplotlib alone (the ``report`` extra): text pages of the same
sections as the HTML, then one page per excursion plot, then the sign-off page."""

from __future__ import annotations

import io
from typing import Any

from agent.review import layout, plots
from agent.review.exceptions import BatchReport

LINES_PER_PAGE = 70
WIDTH = 110
"""Characters per line of monospace text on an A4 page at 7 pt."""


def render(report: BatchReport) -> bytes:
    """:class:`~agent.review.plots.ExtraMissing` without matplotlib."""
    plt = plots.pyplot()
    from matplotlib.backends.backend_pdf import PdfPages

    lines = [layout.title(report), ""]
    for s in layout.sections(report):
        lines += [*layout.text_lines(s, WIDTH), ""]
    sign_off = ["SIGN-OFF", "", *(f"{k}: {'_' * 60}\n" for k in layout.SIGN_OFF)]
    out = io.BytesIO()
    with PdfPages(out) as pdf:
        for start in range(0, len(lines), LINES_PER_PAGE):
            _text_page(plt, pdf, lines[start : start + LINES_PER_PAGE])
        for n, p in enumerate(report.plots):
            fig = plots.figure(p, layout.plot_caption(report, n))
            pdf.savefig(fig)
            plt.close(fig)
        _text_page(plt, pdf, sign_off)
        info = pdf.infodict()
        info["Title"] = layout.title(report)
        info["CreationDate"] = None  # the same report, the same bytes
    return out.getvalue()


def _text_page(plt: Any, pdf: Any, lines: list[str]) -> None:
    fig = plt.figure(figsize=(8.27, 11.69))  # A4
    fig.text(0.05, 0.97, "\n".join(lines), family="monospace", fontsize=7, va="top")
    pdf.savefig(fig)
    plt.close(fig)
