"""Integer programming on measured sensitivities: measure how much each group's choices cost in
quality on their own, then solve the multiple-choice knapsack under the budget exactly.

Phase 1 (measure) asks one plan per group and non-base choice: a *base* plan with only that group
changed (and, where that change does not fit, other groups lowered to make room; see below). Its
fitness minus the base's is the sensitivity ``s[g][c]`` (0 at the base's own choice).
Phase 2 solves ``min sum s[g][x_g]`` subject to the plan's bytes fitting the budget with
:func:`solve_mckp` (HiGHS), takes the optimum and the next-best distinct plans (no-good cuts), and
asks them, so the controller verifies them by real evaluation. Then the strategy is exhausted.
If errors add up, the optimum is the best plan in the space; where they do not (LLMs), it is a
strong start for a local search such as evolution.

Measuring near the operating point: the textbook sensitivity is the error with only that group
compressed (the dense model otherwise), but such a plan weighs nearly as much as the dense model,
over any useful budget, and the controller refuses every plan over the budget without evaluating
it. So the base is the operating point, the dearest uniform plan that fits (or the best uniform
plan, when the caller evaluated them: ``base``), and each sensitivity is measured there, inside
the budget:

- a change that fits from the base (a cheaper choice, or a dearer one where the base leaves
  room) is measured directly: the base with only that group changed;
- a dearer choice that does not fit is measured *with donors*: the base with that group raised
  and the fewest-harm set of other groups lowered to make room (chosen exactly, by the same
  knapsack, from the cheaper choices measured first, and from the dimensions already in play
  where those can make room); its sensitivity is the measured change minus the donors' own
  measured sensitivities. So a joint space measures its bits-only part exactly as a bits-only
  search does.

For additive errors this gives the exact table whatever the base; for real models, whose errors
only roughly add up, it measures every change next to the plans the search will pick between
rather than from a broken base (a base cheap enough for every raise to fit on its own is, at
useful budgets, a model at its lowest setting everywhere).

Restart: every measurement is an ordinary trial (plan JSON and key, fidelity, split as user
attributes), so ``resume_from`` rebuilds the table from a study's complete trials and asks only
what is missing. The solved plans are written to the study as user attribute
``integer_program.solutions``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from budgetpress.search._base import Outcome, Strategy, scoped
from budgetpress.search._budget import CostedSpace
from budgetpress.search._ledger import known_fitness_of
from budgetpress.search._mckp import Solution, solve_mckp
from budgetpress.space import Plan, setting_dimensions

logger = logging.getLogger(__name__)

SOLUTIONS_ATTR = "integer_program.solutions"
# Every sensitivity is relative to the base: one lost evaluation of it would waste all the others.
_BASE_ATTEMPTS = 2
# Added to each donor's harm (as a fraction of the largest) so that ties go to fewer donors.
_DONOR_TIE = 1e-6
_MEASURE, _MEASURE_RAISES, _VERIFY, _DONE = "measure", "measure-raises", "verify", "done"


class IntegerProgramStrategy(Strategy):
    """Measures single-group sensitivities, then asks the ``n_solutions`` best plans of the knapsack.

    ``measure_fidelity`` is the token budget of the measurements (None: the whole split); the
    solved plans are always verified on the whole split. ``time_limit`` bounds the solver (seconds;
    past it the best plans found are used, with a warning). ``study`` receives the solved plans
    (user attribute ``integer_program.solutions``); ``resume_from`` is a study whose complete
    trials already measured some plans, which are then not asked again; ``scope`` prefixes the
    solutions' attribute name (see ``scoped``); ``base`` replaces the measurement base (searches
    for several budgets measure from one base, the smallest budget's, and so share measurements);
    ``measure_budget`` (at most ``budget_bytes``) is the budget the measurement plans are made to fit
    (searches for several budgets measure against the smallest and so ask the same plans);
    ``known_fitness`` (plan key, fidelity → fitness) holds measurements made before, not asked
    again. ``seed`` is accepted like every strategy's, but nothing here is random: plans are asked
    in the groups' and choices' order.
    ``ask`` raises if called while asked plans are still untold: a phase ends when all are told.
    After it, ``solutions`` holds (plan, predicted fitness) best first and ``verified`` the
    fitness each got on the whole split (None: its evaluation failed).
    """

    name = "integer"

    def __init__(
        self,
        *,
        costed: CostedSpace,
        budget_bytes: int,
        seed: int,
        n_solutions: int = 4,
        measure_fidelity: int | None = None,
        study: optuna.Study | None = None,
        resume_from: optuna.Study | None = None,
        time_limit: float | None = 60.0,
        scope: str = "",
        base: Mapping[str, int] | None = None,
        measure_budget: int | None = None,
        known_fitness: Mapping[tuple[str, int | None], float] | None = None,
    ) -> None:
        if n_solutions < 1:
            raise ValueError(f"n_solutions must be at least 1; got {n_solutions}")
        if costed.cheapest_bytes() > budget_bytes:
            raise ValueError(
                f"no plan fits {budget_bytes} bytes: the smallest possible plan needs {costed.cheapest_bytes()}"
            )
        self._costed = costed
        self._budget = budget_bytes
        self._seed = seed
        self._n_solutions = n_solutions
        self._fidelity = measure_fidelity
        self._study = study
        self._time_limit = time_limit
        self._scope = scope
        self._measure_budget = budget_bytes if measure_budget is None else min(measure_budget, budget_bytes)
        self._base = dict(base) if base is not None else measurement_base(costed, self._measure_budget)
        if costed.bytes_of(self._base) > self._measure_budget:
            raise ValueError(
                f"the measurement base needs {costed.bytes_of(self._base)} bytes, over {self._measure_budget}"
            )
        self._base_plan = costed.space.plan_from_choices(self._base)
        self._base_fitness: float | None = None
        self._base_attempts = 0
        self._base_estimated = False
        self._targets: dict[str, tuple[str, int]] = {}  # measurement plan key -> (group, choice)
        self._measured: dict[tuple[str, int], float] = {}  # fitness of the base with one group changed
        # Groups lowered to make room for a raise that does not fit from the base on its own.
        self._donors: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {}
        self._raises: list[tuple[str, int]] = []  # dearer choices waiting for donors
        self._excluded: dict[tuple[str, int], str] = {}
        self._phase = _MEASURE
        self._queue: list[Plan] = []
        self._outstanding: set[str] = set()
        self.solutions: list[tuple[Plan, float]] = []
        self.verified: dict[str, float | None] = {}
        self._known = dict(known_fitness or {})
        if resume_from is not None:
            self._known.update(known_fitness_of(resume_from))
        self._plan_measurements(self._known)

    @property
    def base(self) -> Plan:
        """The plan every sensitivity is measured from."""
        return self._base_plan

    @property
    def base_fitness(self) -> float | None:
        return self._base_fitness

    @property
    def sensitivity(self) -> dict[str, list[float | None]]:
        """Per group, per choice: the fitness change from the base (0 at the base's own choice);
        None where not measured (yet), failed, or unreachable within the budget (see ``excluded``)."""
        table: dict[str, list[float | None]] = {}
        for group in self._costed.groups:
            row: list[float | None] = []
            for choice in range(len(self._costed.space.choices(group))):
                row.append(self._value(group, choice))
            table[group] = row
        return table

    @property
    def excluded(self) -> dict[tuple[str, int], str]:
        """Choices left out of the knapsack, with the reason."""
        return dict(self._excluded)

    def ask(self, n: int) -> list[Plan]:
        if self._outstanding:
            raise RuntimeError(
                f"ask() called with {len(self._outstanding)} asked plan(s) not yet told; tell them first"
            )
        if self._phase == _MEASURE and not self._queue:
            self._phase = _MEASURE_RAISES
            self._queue = self._raise_measurements()
        if self._phase == _MEASURE_RAISES and not self._queue:
            self._solve()
        if self._phase == _VERIFY and not self._queue:
            self._phase = _DONE
        asked, self._queue = self._queue[:n], self._queue[n:]
        self._outstanding.update(plan.key for plan in asked)
        return asked

    def fidelity(self, plan: Plan) -> int | None:
        return self._fidelity if self._phase in (_MEASURE, _MEASURE_RAISES) else None

    def tell(self, plan: Plan, outcome: Outcome) -> None:
        if plan.key not in self._outstanding:
            raise ValueError(f"plan {plan.key[:12]} was not asked, or was told already")
        self._outstanding.remove(plan.key)
        if self._phase == _VERIFY:
            self.verified[plan.key] = outcome.fitness
            self._persist()
        else:
            self._record(plan, outcome)

    def _plan_measurements(self, known: Mapping[tuple[str, int | None], float]) -> None:
        """Queue the base and every reachable single-group change, minus those ``known`` at the fidelity."""
        costed, space = self._costed, self._costed.space
        self._base_fitness = known.get((self._base_plan.key, self._fidelity))
        plans = [] if self._base_fitness is not None else [self._base_plan]
        slack = self._budget - costed.cheapest_bytes()
        for group in costed.groups:
            lowest = min(costed.cost(group, c) for c in range(len(space.choices(group))))
            for choice in range(len(space.choices(group))):
                if choice == self._base[group]:
                    continue
                if costed.cost(group, choice) - lowest > slack:
                    self._excluded[(group, choice)] = "fits the budget in no plan"
                    continue
                if costed.bytes_of({**self._base, group: choice}) > self._measure_budget:
                    self._raises.append((group, choice))
                    continue
                plans += self._target(group, choice, {**self._base, group: choice}, ())
        self._queue = plans
        logger.info(
            "integer program: %d measurement(s) to ask, %d known from the study, %d choice(s) unreachable, "
            "%d raise(s) to measure with donors",
            len(plans),
            len(self._measured) + (self._base_fitness is not None),
            len(self._excluded),
            len(self._raises),
        )

    def _target(
        self, group: str, choice: int, choices: Mapping[str, int], donors: tuple[tuple[str, int], ...]
    ) -> list[Plan]:
        """Register the plan measuring (group, choice); it is returned when it still needs asking."""
        plan = self._costed.space.plan_from_choices(choices)
        self._targets[plan.key] = (group, choice)
        self._donors[(group, choice)] = donors
        known = self._known.get((plan.key, self._fidelity))
        if known is None:
            return [plan]
        self._measured[(group, choice)] = known
        return []

    def _raise_measurements(self) -> list[Plan]:
        """Plans measuring the raises that do not fit from the base: each with the fewest-harm donors
        that make room under the measurement budget (else under the search's own budget)."""
        if self._base_fitness is None:
            self._base_fitness = self._estimated_base_fitness()
            self._base_estimated = self._base_fitness is not None
        plans: list[Plan] = []
        for group, choice in self._raises:
            raised = {**self._base, group: choice}
            for limit in dict.fromkeys((self._measure_budget, self._budget)):
                if self._costed.bytes_of(raised) <= limit:
                    plans += self._target(group, choice, raised, ())
                    break
                donors = self._donors_for(group, choice, self._costed.bytes_of(raised) - limit)
                if donors is not None:
                    plans += self._target(group, choice, {**raised, **dict(donors)}, donors)
                    break
            else:
                self._excluded[(group, choice)] = "no set of other groups' measured cheaper choices makes room for it"
        logger.info("integer program: %d raise(s) to measure with donors", len(plans))
        return plans

    def _donors_for(self, group: str, choice: int, needed: int) -> tuple[tuple[str, int], ...] | None:
        """Donors for raising ``group`` to ``choice``, from the dimensions already in play where they
        can make room (a raise in bits lowers other groups in bits): a joint space then measures its
        single-dimension part exactly as the single-dimension search does. Else from any dimension."""
        raised = setting_dimensions(self._costed.space.choices(group)[choice])

        def in_play(donor: str, lowered: int) -> bool:
            base = setting_dimensions(self._costed.space.choices(donor)[self._base[donor]])
            return setting_dimensions(self._costed.space.choices(donor)[lowered]) <= raised | base

        return self._fewest_harm_donors(group, needed, in_play) or self._fewest_harm_donors(
            group, needed, lambda donor, lowered: True
        )

    def _fewest_harm_donors(
        self, group: str, needed: int, allowed: Callable[[str, int], bool]
    ) -> tuple[tuple[str, int], ...] | None:
        """Cheaper ``allowed`` choices of groups other than ``group`` (one each, measured from the base)
        that free at least ``needed`` bytes at the least total measured harm; None if none can."""
        donors = [g for g in self._costed.groups if g != group]
        savings: list[list[int]] = []
        harms: list[list[float]] = []
        options: list[list[int]] = []
        for donor in donors:
            here = self._costed.cost(donor, self._base[donor])
            row = [self._base[donor]] + [
                c
                for c in range(len(self._costed.space.choices(donor)))
                if self._costed.cost(donor, c) < here and self._value(donor, c) is not None and allowed(donor, c)
            ]
            options.append(row)
            savings.append([self._costed.cost(donor, c) - here for c in row])
            harms.append([0.0] + [max(_or_inf(self._value(donor, c)), 0.0) for c in row[1:]])
        if -sum(min(row) for row in savings) < needed:
            return None
        # A donor is a measurement error of its own: among equal harms, fewer donors win.
        tie = _DONOR_TIE * max((h for row in harms for h in row), default=0.0)
        harms = [[h + (tie if i else 0.0) for i, h in enumerate(row)] for row in harms]
        (picked, _), *_ = solve_mckp(savings, harms, -needed)
        return tuple((d, row[i]) for d, row, i in zip(donors, options, picked, strict=True) if i)

    def _record(self, plan: Plan, outcome: Outcome) -> None:
        fitness = outcome.fitness
        reason = outcome.failure or f"non-finite result {outcome.result}"
        if plan.key == self._base_plan.key:
            self._base_attempts += 1
            if fitness is not None:
                self._base_fitness = fitness
            elif self._base_attempts < _BASE_ATTEMPTS:
                logger.warning("integer program: the base plan failed (%s); asking it once more", reason)
                self._queue.append(plan)
            else:
                logger.warning("integer program: the base plan failed again (%s)", reason)
            return
        group, choice = self._targets[plan.key]
        if fitness is None:
            label = self._costed.space.choices(group)[choice].label()
            logger.warning("integer program: excluding %s at %s: its measurement failed (%s)", group, label, reason)
            self._excluded[(group, choice)] = f"measurement failed: {reason}"
        else:
            self._measured[(group, choice)] = fitness

    def _value(self, group: str, choice: int) -> float | None:
        if self._base_fitness is None:
            return None
        if choice == self._base[group]:
            return 0.0
        measured = self._measured.get((group, choice))
        if measured is None:
            return None
        donors = self._donors.get((group, choice), ())
        harm = sum(_or_inf(self._value(donor, lowered)) for donor, lowered in donors)
        return measured - self._base_fitness - harm

    def _solve(self) -> None:
        """Solve the knapsack on the table and queue its plans for verification."""
        self._phase = _VERIFY
        if self._base_fitness is None:
            self._base_fitness = self._estimated_base_fitness()
            self._base_estimated = True
            if self._base_fitness is None:
                logger.error("integer program: no measurement succeeded; nothing to solve")
                return
        costed = self._costed
        costs, values = [], []
        for group in costed.groups:
            n_choices = len(costed.space.choices(group))
            costs.append([costed.cost(group, c) for c in range(n_choices)])
            values.append([_or_inf(self._value(group, c)) for c in range(n_choices)])
        capacity = self._budget - costed.bytes_of({})
        found = solve_mckp(costs, values, capacity, n_solutions=self._n_solutions, time_limit=self._time_limit)
        found += self._single_dimension_optima(costs, values, capacity, found)
        for picked, total in found:
            choices = dict(zip(costed.groups, picked, strict=True))
            if costed.bytes_of(choices) > self._budget:  # solve_mckp checks in integers; this is a bug
                raise RuntimeError(f"the knapsack returned a plan of {costed.bytes_of(choices)} bytes")
            self.solutions.append((costed.space.plan_from_choices(choices), self._base_fitness + total))
        self._queue = self._unverified()
        self._persist()
        logger.info(
            "integer program: %d plan(s) solved, predicted fitness %s",
            len(self.solutions),
            ", ".join(f"{p:.4g}" for _, p in self.solutions),
        )

    def _single_dimension_optima(
        self, costs: list[list[int]], values: list[list[float]], capacity: int, found: list[Solution]
    ) -> list[Solution]:
        """In a space of several dimensions, the knapsack's optimum within each dimension alone (its
        choices and dense), where that fits and is not among ``found``. A joint search then verifies
        the plan each single-dimension search on the same table would pick: the joint optimum of an
        additive table is never worse, but real errors do not add up, and a joint search must at
        least match the best single-dimension search it contains."""
        dimensions = [[setting_dimensions(c) for c in self._costed.space.choices(g)] for g in self._costed.groups]
        every = frozenset().union(*(d for row in dimensions for d in row))
        if len(every) < 2:
            return []
        seen, extra = {tuple(picked) for picked, _ in found}, []
        for dimension in sorted(every):
            within = [
                [v if d <= {dimension} else math.inf for v, d in zip(row, dims, strict=True)]
                for row, dims in zip(values, dimensions, strict=True)
            ]
            admissible = [
                [c for c, v in zip(cost, row, strict=True) if math.isfinite(v)]
                for cost, row in zip(costs, within, strict=True)
            ]
            if not all(admissible) or sum(min(row) for row in admissible) > capacity:
                continue
            (picked, total), *_ = solve_mckp(costs, within, capacity, time_limit=self._time_limit)
            if tuple(picked) not in seen:
                seen.add(tuple(picked))
                extra.append((picked, total))
                logger.info("integer program: also verifying the best %s-only plan", dimension.value)
        return extra

    def _estimated_base_fitness(self) -> float | None:
        """The base's fitness when it could not be measured: an upgrade from the base is no worse
        than it and a downgrade no better, so the worst upgrade (else the best downgrade) bounds it."""
        costed = self._costed
        upgrades: list[float] = []
        downgrades: list[float] = []
        for (group, choice), fitness in self._measured.items():
            dearer = costed.cost(group, choice) > costed.cost(group, self._base[group])
            (upgrades if dearer else downgrades).append(fitness)
        estimate = max(upgrades) if upgrades else min(downgrades) if downgrades else None
        if estimate is not None:
            logger.warning(
                "integer program: the base plan could not be measured; estimating its fitness as %g", estimate
            )
        return estimate

    def _unverified(self) -> list[Plan]:
        """The solved plans not yet evaluated on the whole split (a whole-split measurement counts)."""
        plans = []
        for plan, _ in self.solutions:
            known = self._known.get((plan.key, None))
            if known is None and self._fidelity is None:
                measured = plan.key == self._base_plan.key and not self._base_estimated
                known = self._base_fitness if measured else None
                if plan.key in self._targets:
                    known = self._measured.get(self._targets[plan.key])
            if known is not None:
                self.verified[plan.key] = known
            else:
                plans.append(plan)
        return plans

    def _persist(self) -> None:
        if self._study is None:
            return
        record: dict[str, Any] = {
            "base_key": self._base_plan.key,
            "base_fitness": self._base_fitness,
            "measure_fidelity": self._fidelity,
            "solutions": [
                {"plan_key": plan.key, "predicted": predicted, "verified": self.verified.get(plan.key)}
                for plan, predicted in self.solutions
            ],
        }
        self._study.set_user_attr(scoped(SOLUTIONS_ATTR, self._scope), record)


def measurement_base(costed: CostedSpace, budget_bytes: int) -> dict[str, int]:
    """The operating point to measure from: the dearest uniform plan (every linear group at one
    choice, every KV group at one) that fits the budget, the first of equals in the space's order;
    the cheapest plan when no uniform plan fits."""
    fitting = []
    for plan in costed.space.uniform_plans():
        choices = costed.space.choices_of(plan)
        if costed.bytes_of(choices) <= budget_bytes:
            fitting.append(choices)
    if fitting:
        return max(fitting, key=costed.bytes_of)
    if costed.cheapest_bytes() > budget_bytes:
        raise ValueError(
            f"no plan fits {budget_bytes} bytes: the smallest possible plan needs {costed.cheapest_bytes()}"
        )
    return {g: costed.ordered(g)[0] for g in costed.groups}


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value
