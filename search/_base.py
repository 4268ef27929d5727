"""The one interface every strategy offers: ask for plans, tell how they did."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from budgetpress.space import Plan, Result


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What happened to one asked plan: a result, or a failure with its reason (never both)."""

    result: Result | None = None
    failure: str | None = None

    def __post_init__(self) -> None:
        if (self.result is None) == (self.failure is None):
            raise ValueError("an outcome holds exactly one of result and failure")

    @property
    def fitness(self) -> float | None:
        """The objective a strategy minimises, or None when the evaluation failed or is not finite."""
        if self.result is None or not self.result.is_finite:
            return None
        return self.result.kl


class Strategy(abc.ABC):
    """Proposes plans within the budget and learns from their outcomes."""

    name: str = ""

    @abc.abstractmethod
    def ask(self, n: int) -> list[Plan]:
        """Up to ``n`` plans to evaluate next, all within the budget; fewer when exhausted."""

    @abc.abstractmethod
    def tell(self, plan: Plan, outcome: Outcome) -> None:
        """Report the outcome of a plan that this strategy asked for."""

    def fidelity(self, plan: Plan) -> int | None:
        """The token budget at which ``plan``, just returned by ``ask``, is to be evaluated.

        None (the default) means the whole split. The controller calls this once per asked plan,
        right after ``ask`` and before any ``tell``, so a multi-fidelity strategy answers from the
        state of the stage it is asking for; single-fidelity strategies need not override it.
        """
        return None


def scoped(attribute: str, scope: str) -> str:
    """A study attribute's name within ``scope`` (e.g. one budget of a frontier search sharing its
    study with others); the unscoped name when ``scope`` is empty."""
    return f"{scope}.{attribute}" if scope else attribute
