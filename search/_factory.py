"""Strategies by name, as jobs and benchmarks build them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from budgetpress.search._base import Strategy
from budgetpress.search._budget import CostedSpace
from budgetpress.search._evolution import DEFAULT_STAGES, EvolutionaryStrategy, Stage
from budgetpress.search._hybrid import HybridStrategy
from budgetpress.search._integer import IntegerProgramStrategy
from budgetpress.search._ledger import Ledger
from budgetpress.search._strategies import RandomStrategy, TPEStrategy, UniformStrategy
from budgetpress.space import Plan

STRATEGIES = ("tpe", "evolution", "integer", "hybrid", "random", "uniform")


@dataclass(frozen=True, kw_only=True)
class StrategySetup:
    """How a strategy starts, beyond its budget: what it shares with a study that holds more.

    ``initial_plans`` (e.g. the best uniform plan) start TPE, evolution and the hybrid's fallback.
    ``resume``: continue from what the study holds (evolution's stored generation and parent,
    the integer program's stored measurements; TPE's initial plans were enqueued by the first run
    already). ``scope`` names this search's state attributes in a study shared by the searches
    for several budgets, ``known_fitness`` is what those measured already, and ``base`` the
    integer program's common measurement base. ``stages`` are evolution's fidelities.
    """

    initial_plans: Sequence[Plan] = ()
    resume: bool = False
    stages: Sequence[Stage] = DEFAULT_STAGES
    scope: str = ""
    known_fitness: Mapping[tuple[str, int | None], float] = field(default_factory=dict)
    base: Mapping[str, int] | None = None
    measure_budget: int | None = None


def make_strategy(
    name: str, *, ledger: Ledger, costed: CostedSpace, budget_bytes: int, seed: int, setup: StrategySetup
) -> Strategy:
    """The strategy ``name`` for one budget, recording into ``ledger``'s study."""
    if name == "tpe":
        initial = () if setup.resume else setup.initial_plans
        return TPEStrategy(ledger=ledger, costed=costed, budget_bytes=budget_bytes, seed=seed, initial_plans=initial)
    if name == "random":
        return RandomStrategy(costed=costed, budget_bytes=budget_bytes, seed=seed)
    if name == "uniform":
        return UniformStrategy(costed=costed, budget_bytes=budget_bytes)
    study = ledger.study
    resume_from = study if setup.resume else None
    known = dict(setup.known_fitness)
    if name == "evolution":
        return EvolutionaryStrategy(
            costed=costed,
            budget_bytes=budget_bytes,
            seed=seed,
            study=study,
            resume_from=resume_from,
            scope=setup.scope,
            initial_plans=setup.initial_plans,
            stages=setup.stages,
            known_fitness=known,
        )
    if name == "integer":
        return IntegerProgramStrategy(
            costed=costed,
            budget_bytes=budget_bytes,
            seed=seed,
            study=study,
            resume_from=resume_from,
            scope=setup.scope,
            base=setup.base,
            measure_budget=setup.measure_budget,
            known_fitness=known,
        )
    if name == "hybrid":
        return HybridStrategy(
            costed=costed,
            budget_bytes=budget_bytes,
            seed=seed,
            study=study,
            resume_from=resume_from,
            scope=setup.scope,
            initial_plans=setup.initial_plans,
            stages=setup.stages,
            base=setup.base,
            measure_budget=setup.measure_budget,
            known_fitness=known,
        )
    raise ValueError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}")
