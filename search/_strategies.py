"""TPE through Optuna, and the uniform baseline."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from budgetpress.search._base import Outcome, Strategy
from budgetpress.search._budget import CostedSpace, Sensitivity, fit_by_sensitivity, fit_to_budget
from budgetpress.search._ledger import Ledger
from budgetpress.space import Plan


def _rng_for(seed: int, *parts: object) -> np.random.Generator:
    """A generator derived from the seed and a context, so a re-run repairs the same way."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _distinct(choice_maps: Sequence[dict[str, int]]) -> list[dict[str, int]]:
    seen: set[tuple[tuple[str, int], ...]] = set()
    kept = []
    for choices in choice_maps:
        frozen = tuple(sorted(choices.items()))
        if frozen not in seen:
            seen.add(frozen)
            kept.append(choices)
    return kept


class TPEStrategy(Strategy):
    """Optuna's TPE over one categorical choice per group; asks are repaired onto the budget.

    The study's sampler must be a seeded TPESampler. Each of ``initial_plans`` (e.g. the best
    uniform plan) is enqueued as a first trial together with ``fills_per_plan`` variants of it
    that spend the budget it leaves unused on random upgrades: a uniform plan rarely lands on the
    budget, and TPE's random start-up trials alone seldom find the few good plans among many.

    Repair: an ask over the budget is moved onto it by random downgrades, unless ``sensitivity``
    (an integer program's measured table) is given: then every ask is projected onto the budget
    the way the table says hurts least (:func:`fit_by_sensitivity`: cheapest-harm downgrades
    until it fits, best-gain upgrades while they fit), so TPE chooses where to deviate and the
    measurements decide how the bytes balance.
    """

    name = "tpe"

    def __init__(
        self,
        *,
        ledger: Ledger,
        costed: CostedSpace,
        budget_bytes: int,
        seed: int,
        initial_plans: Sequence[Plan] = (),
        fills_per_plan: int = 3,
        sensitivity: Sensitivity | None = None,
    ) -> None:
        self._ledger = ledger
        self._sensitivity = sensitivity
        self._costed = costed
        self._budget = budget_bytes
        self._seed = seed
        for index, plan in enumerate(initial_plans):
            choices = costed.space.choices_of(plan)
            starts = [choices] + [
                fit_to_budget(costed, choices, budget_bytes, _rng_for(seed, "fill", index, fill))
                for fill in range(fills_per_plan)
            ]
            for start in _distinct(starts):
                ledger.study.enqueue_trial({g: ledger.labels(g)[i] for g, i in start.items()})

    def ask(self, n: int) -> list[Plan]:
        plans = []
        for _ in range(n):
            trial = self._ledger.study.ask()
            choices = {}
            for group in self._costed.groups:
                label = trial.suggest_categorical(group, self._ledger.labels(group))
                choices[group] = self._ledger.labels(group).index(label)
            repaired = self._repaired(choices, trial.number)
            if repaired != choices:
                choices = repaired
                trial.set_user_attr("repaired", True)
            plan = self._costed.space.plan_from_choices(choices)
            self._ledger.adopt(trial, plan)
            plans.append(plan)
        return plans

    def _repaired(self, choices: dict[str, int], number: int) -> dict[str, int]:
        if self._sensitivity is not None:
            return fit_by_sensitivity(self._costed, choices, self._budget, self._sensitivity)
        if self._costed.bytes_of(choices) > self._budget:
            return fit_to_budget(self._costed, choices, self._budget, _rng_for(self._seed, number))
        return choices

    def tell(self, plan: Plan, outcome: Outcome) -> None:
        # The ledger tells the study, which is all TPE learns from.
        return None


class UniformStrategy(Strategy):
    """Every unit at the same setting: each uniform plan that fits, dearest (best-quality) first."""

    name = "uniform"

    def __init__(self, *, costed: CostedSpace, budget_bytes: int) -> None:
        fitting = [
            p for p in costed.space.uniform_plans() if costed.bytes_of(costed.space.choices_of(p)) <= budget_bytes
        ]
        fitting.sort(key=lambda p: -costed.bytes_of(costed.space.choices_of(p)))
        self._queue = fitting
        self.best: tuple[Plan, float] | None = None

    def ask(self, n: int) -> list[Plan]:
        asked, self._queue = self._queue[:n], self._queue[n:]
        return asked

    def tell(self, plan: Plan, outcome: Outcome) -> None:
        fitness = outcome.fitness
        if fitness is not None and (self.best is None or fitness < self.best[1]):
            self.best = (plan, fitness)


class RandomStrategy(Strategy):
    """The random baseline: each plan draws every group's choice at random and is repaired onto the
    budget (downgrades until it fits, then upgrades that still fit); plans are distinct."""

    name = "random"

    def __init__(self, *, costed: CostedSpace, budget_bytes: int, seed: int, max_attempts: int = 1000) -> None:
        if costed.cheapest_bytes() > budget_bytes:
            raise ValueError(
                f"no plan fits {budget_bytes} bytes: the smallest possible plan needs {costed.cheapest_bytes()}"
            )
        self._costed = costed
        self._budget = budget_bytes
        self._rng = _rng_for(seed, "random")
        self._seen: set[str] = set()
        self._max_attempts = max_attempts

    def ask(self, n: int) -> list[Plan]:
        plans = []
        for _ in range(n):
            plan = self._draw()
            if plan is None:
                break
            plans.append(plan)
        return plans

    def _draw(self) -> Plan | None:
        """A plan not asked before, or None once ``max_attempts`` draws in a row repeated one."""
        space = self._costed.space
        for _ in range(self._max_attempts):
            raw = {g: int(self._rng.integers(len(space.choices(g)))) for g in self._costed.groups}
            plan = space.plan_from_choices(fit_to_budget(self._costed, raw, self._budget, self._rng))
            if plan.key not in self._seen:
                self._seen.add(plan.key)
                return plan
        return None

    def tell(self, plan: Plan, outcome: Outcome) -> None:
        return None
