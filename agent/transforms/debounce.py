"""Raise-after / clear-after hysteresis: the one debounce both rule limits and anomaly models
use, so an excursion and an anomaly alarm start and end by the same rule."""

from __future__ import annotations


class Debounce:
    """Raise after ``raise_after`` consecutive "over" observations, clear after
    ``clear_after`` consecutive "under" ones; anything else keeps the state."""

    def __init__(self, raise_after: int, clear_after: int) -> None:
        self.raise_after = raise_after
        self.clear_after = clear_after
        self.active = False
        self.run = 0

    def update(self, over: bool) -> bool | None:
        """True when this observation raises, False when it clears, None otherwise."""
        if over != self.active:
            self.run += 1
            if self.run >= (self.raise_after if over else self.clear_after):
                self.active = over
                self.run = 0
                return over
        else:
            self.run = 0
        return None
