"""The hybrid: an integer program's plans seed an evolutionary search.

The integer program assumes that errors add up across units, which they only roughly do; its
plans are good starting points that evolution then corrects with real evaluations. The integer
program's verified plans enter evolution's generation 0 with the fitness they were verified at,
so none is evaluated twice. Should every verified plan have failed, evolution starts as it would
alone: from ``initial_plans`` and random plans at the budget.

Restart: both phases keep their state in the study (sensitivity measurements and solutions as
trials and a user attribute; the evolution's generation and parent as user attributes), so a
hybrid resumed from the study re-solves the same knapsack from the stored measurements without
evaluating any of them again, and continues the evolution where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from budgetpress.search._base import Outcome, Strategy
from budgetpress.search._budget import CostedSpace
from budgetpress.search._controller import sampler_for
from budgetpress.search._evolution import DEFAULT_STAGES, EvolutionaryStrategy, Stage
from budgetpress.search._integer import IntegerProgramStrategy
from budgetpress.search._ledger import Ledger
from budgetpress.search._strategies import TPEStrategy
from budgetpress.space import Plan

logger = logging.getLogger(__name__)

# Random starts when the integer program gave no usable plan: as many as evolution alone uses.
_FALLBACK_RANDOM_STARTS = 8


class HybridStrategy(Strategy):
    """Integer program first (measure, solve, verify), then evolution from its verified plans.

    With ``then="tpe"`` (and the ``ledger``) the second phase is TPE instead: its sampler then sees
    every trial of the study, measurements and verified plans included, as its history, so it
    starts from the integer program's knowledge of which units matter rather than from nothing,
    and its asks are projected onto the budget by the integer program's measured table.
    ``n_solutions``, ``measure_fidelity``, ``base`` and ``measure_budget`` go to the integer program, ``offspring``,
    ``stages`` and ``max_switches`` to the evolution; ``study``, ``resume_from``, ``scope`` and
    ``known_fitness`` to both.
    """

    name = "hybrid"

    def __init__(
        self,
        *,
        costed: CostedSpace,
        budget_bytes: int,
        seed: int,
        study: optuna.Study | None = None,
        resume_from: optuna.Study | None = None,
        initial_plans: Sequence[Plan] = (),
        n_solutions: int = 4,
        measure_fidelity: int | None = None,
        offspring: int = 16,
        stages: Sequence[Stage] = DEFAULT_STAGES,
        max_switches: int = 3,
        time_limit: float | None = 60.0,
        scope: str = "",
        base: Mapping[str, int] | None = None,
        measure_budget: int | None = None,
        known_fitness: Mapping[tuple[str, int | None], float] | None = None,
        then: str = "evolution",
        ledger: Ledger | None = None,
    ) -> None:
        if then not in ("evolution", "tpe"):
            raise ValueError(f"then must be 'evolution' or 'tpe'; got {then!r}")
        if then == "tpe" and ledger is None:
            raise ValueError("then='tpe' needs the ledger: TPE asks its study for trials")
        self.integer = IntegerProgramStrategy(
            costed=costed,
            budget_bytes=budget_bytes,
            seed=seed,
            n_solutions=n_solutions,
            measure_fidelity=measure_fidelity,
            study=study,
            resume_from=resume_from,
            time_limit=time_limit,
            scope=scope,
            base=base,
            measure_budget=measure_budget,
            known_fitness=known_fitness,
        )
        self.evolution: EvolutionaryStrategy | None = None
        self.tpe: TPEStrategy | None = None
        self._then = then
        self._ledger = ledger
        self._initial_plans = tuple(initial_plans)
        self._evolution_args: dict[str, Any] = {
            "costed": costed,
            "budget_bytes": budget_bytes,
            "seed": seed,
            "study": study,
            "resume_from": resume_from,
            "offspring": offspring,
            "stages": tuple(stages),
            "max_switches": max_switches,
            "scope": scope,
        }
        self._known = dict(known_fitness or {})

    def ask(self, n: int) -> list[Plan]:
        second = self._second_phase()
        if second is None:
            plans = self.integer.ask(n)
            if plans:
                return plans
            second = self._start_second_phase()
        return second.ask(n)

    def fidelity(self, plan: Plan) -> int | None:
        return self._phase().fidelity(plan)

    def tell(self, plan: Plan, outcome: Outcome) -> None:
        self._phase().tell(plan, outcome)

    def _second_phase(self) -> Strategy | None:
        return self.evolution if self.evolution is not None else self.tpe

    def _phase(self) -> Strategy:
        return self._second_phase() or self.integer

    def _start_second_phase(self) -> Strategy:
        if self._then == "evolution":
            self.evolution = self._seeded_evolution()
            return self.evolution
        assert self._ledger is not None  # checked in __init__
        study = self._ledger.study
        seed = self._evolution_args["seed"]
        study.sampler = sampler_for("tpe", seed)
        logger.info("hybrid: TPE starts with the %d trials of the integer program as its history", len(study.trials))
        self.tpe = TPEStrategy(
            ledger=self._ledger,
            costed=self._evolution_args["costed"],
            budget_bytes=self._evolution_args["budget_bytes"],
            seed=seed,
            sensitivity=self.integer.sensitivity,
        )
        return self.tpe

    def _seeded_evolution(self) -> EvolutionaryStrategy:
        """Evolution whose generation 0 holds the integer program's verified plans, best first."""
        verified = [
            (fitness, plan)
            for plan, _ in self.integer.solutions
            if (fitness := self.integer.verified.get(plan.key)) is not None
        ]
        verified.sort(key=lambda pair: pair[0])
        seeds = [plan for _, plan in verified]
        if seeds:
            logger.info("hybrid: evolution starts from %d verified integer-program plan(s)", len(seeds))
            return EvolutionaryStrategy(
                **self._evolution_args,
                initial_plans=seeds,
                known_fitness={**self._known, **{(plan.key, None): fitness for fitness, plan in verified}},
                n_random_starts=0,
            )
        logger.warning("hybrid: the integer program gave no verified plan; evolution starts on its own")
        return EvolutionaryStrategy(
            **self._evolution_args,
            initial_plans=self._initial_plans,
            known_fitness=self._known,
            n_random_starts=_FALLBACK_RANDOM_STARTS,
        )
