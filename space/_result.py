"""The outcome of evaluating one plan: what a worker returns and what a strategy is told."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class Split(StrEnum):
    """Which token set an evaluation used: search fitness uses calibration, reports use evaluation."""

    CALIBRATION = "calibration"
    EVALUATION = "evaluation"


@dataclass(frozen=True, kw_only=True)
class Result:
    """Quality and cost of one plan, measured at one fidelity (split and token count)."""

    kl: float
    ppl: float
    memory_bytes: int
    tokens: int
    seconds: float
    split: Split = Split.CALIBRATION
    worker: str = ""
    # The token budget the evaluation was asked for (None: the whole split). Results of one plan at
    # different fidelities are different results and are kept apart.
    fidelity: int | None = None
    extra: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    @property
    def is_finite(self) -> bool:
        return math.isfinite(self.kl) and math.isfinite(self.ppl)

    def metrics(self) -> dict[str, float]:
        """The quality figures as a flat dict, for trial attributes and JSON output."""
        return {"kl": self.kl, "ppl": self.ppl, **dict(self.extra)}
