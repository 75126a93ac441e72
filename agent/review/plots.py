"""The excursion plots, with matplotlib (the ``report`` extra), imported only when a report draws:
``json`` needs none of it."""

from __future__ import annotations

import io
from typing import Any

from agent.review.exceptions import Plot
from cleanroom_common.plotting import agg_pyplot

EXTRA = "pip install 'cleanroom-edge[report]'"


class ExtraMissing(RuntimeError):
    """matplotlib is not installed: html and pdf reports need the ``report`` extra."""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display on a gateway or a CI machine)."""
    try:
        return agg_pyplot()
    except ImportError:
        raise ExtraMissing(
            f"html and pdf reports draw plots with matplotlib, which is not installed: {EXTRA} "
            "(or use --format json)"
        ) from None


def figure(plot: Plot, caption: str) -> Any:
    """The readings of the excursion's tag around it, the limit line, the excursion shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.8))
    t0 = plot.from_ts
    minutes = [(t - t0) / 60e9 for t in plot.ts]
    ax.plot(minutes, plot.values, lw=0.9, color="tab:blue", marker=".", ms=2, label=plot.tag)
    if plot.limit is not None:
        ax.axhline(plot.limit, color="tab:red", lw=0.9, ls="--", label=f"limit {plot.limit:g}")
    ax.axvspan(10.0, max(10.0, (plot.to_ts - t0) / 60e9 - 10.0), color="tab:orange", alpha=0.2)
    ax.set_xlabel("minutes from 10 min before the excursion")
    ax.set_ylabel(plot.unit or "")
    ax.set_title(caption, fontsize=8)
    if not plot.ts:
        ax.text(0.5, 0.5, "no good readings in this window", transform=ax.transAxes, ha="center")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


def png(plot: Plot, caption: str) -> bytes:
    plt = pyplot()
    fig = figure(plot, caption)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
