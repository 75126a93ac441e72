"""The operating envelope (``Manifest.envelope``) applied to closed slots.

A window is scored only when each of its slots lies inside the envelope (an unknown
envelope signal counts as outside), so a model is never asked about a state it was not
built for; the state is then ``out_of_envelope``, which, like an incomplete window,
neither raises nor clears an alarm.
"""

from __future__ import annotations

from agent.transforms.anomaly.manifest import EnvelopeCondition


class Envelope:
    """Which closed slots lie inside a model's operating envelope, and which windows lie
    inside it entirely (the ones that may be scored). Slot rows carry the envelope signals
    after the model's inputs (:attr:`Manifest.data_names`)."""

    def __init__(self, conditions: list[EnvelopeCondition], names: list[str], window: int) -> None:
        self.window = window
        self.conditions = [(names.index(c.signal), c) for c in conditions]
        self._run_from: int | None = None
        """First slot of the current unbroken run of slots inside the envelope."""
        self._run_last: int | None = None

    def check(self, ids: list[int], means: list[list[float]]) -> tuple[list[bool], list[bool]]:
        """(inside, eligible) per slot. A few slots without samples do not break a run (the
        windower's completeness rule judges them); a gap longer than a window does, as it
        restarts the windower's warm-up: the state in between is unknown."""
        inside, eligible = [], []
        for sid, row in zip(ids, means, strict=True):
            ok = all(c.holds(row[j]) for j, c in self.conditions)
            if not ok:
                self._run_from = None
            elif self._run_from is None or self._run_last is None or sid - self._run_last > self.window:
                self._run_from = sid
            self._run_last = sid
            inside.append(ok)
            eligible.append(ok and self._run_from is not None and sid - self._run_from + 1 >= self.window)
        return inside, eligible
