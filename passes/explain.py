"""Why a rewrite fired or did not: every pattern pass reports through an ``Explainer``.

Guarantees: ``--explain`` prints these records; they are also logged at DEBUG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("smelt.passes")


def _where(expr) -> str:
    op = getattr(getattr(expr, "op", None), "name", type(expr).__name__)
    return op.removeprefix("relax.")


@dataclass
class Explainer:
    """Collects (fired, what, why) records of one pass."""

    pass_name: str
    records: list[tuple[bool, str, str]] = field(default_factory=list)
    # (expr, fired, why) already recorded: TVM's rewrite_call matches again until nothing
    # changes, which would repeat a "left" record for the same node on every round.
    _seen: set = field(default_factory=set, repr=False)

    def _record(self, fired: bool, expr, why: str) -> None:
        key = (expr, fired, why)
        if key in self._seen:
            return
        self._seen.add(key)
        self.records.append((fired, _where(expr), why))
        log.debug("%s: %s %s: %s", self.pass_name, "rewrote" if fired else "left", _where(expr), why)

    def fired(self, expr, why: str) -> None:
        self._record(True, expr, why)

    def skip(self, expr, why: str) -> None:
        self._record(False, expr, why)

    @property
    def num_fired(self) -> int:
        return sum(1 for f, _, _ in self.records if f)

    def lines(self) -> list[str]:
        return [f"{self.pass_name}: {'rewrote' if f else 'left'} {what}: {why}" for f, what, why in self.records]
