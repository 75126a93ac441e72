"""matplotlib for the reports that draw (batch review, model evaluation), one way for both."""

from __future__ import annotations

from typing import Any


def agg_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display on a gateway or a CI machine).

    ImportError when matplotlib is not installed: each caller names the extra that brings it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
