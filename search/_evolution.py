"""Evolutionary search after EvoPress: level switches that keep the budget, and multi-stage
selection on growing token budgets.

Each generation mutates one parent into ``offspring`` distinct children. All children are
evaluated at the first (cheapest) fidelity and the best ``survivors`` of each stage go on to the
next; the parent joins the last stage with the fitness it won with, and the best of the last
stage becomes the next parent: the parent stays unless a child beats it there (elitism).
Generation 0 is the start: random plans repaired onto the budget go through the same stages, and
the given initial plans (the best uniform plan, an integer program's plans) join its last stage.

A fitness already known for a plan at a fidelity (told earlier in this run, or a complete trial of
the study being resumed) is reused instead of evaluated again: an evaluation at a fidelity is
deterministic, so a repeat would only cost time. Failed and non-finite outcomes rank last and are
not remembered, since a worker that died may succeed on a second try.

Restart: at the end of every generation the study records the next generation's number, the
parent and its fitness (user attribute ``evolution.state``), and a line for the generation
(``evolution.generation.NNNNN``). Each generation draws its random numbers from the seed and its
number, so a run resumed from that state with the same seed makes the same children as the
uninterrupted run would have, and reuses the trials the resumed study already holds.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna

from budgetpress.search._base import Outcome, Strategy, scoped
from budgetpress.search._budget import CostedSpace, fit_to_budget
from budgetpress.search._ledger import known_fitness_of
from budgetpress.search._strategies import _rng_for
from budgetpress.space import Plan

logger = logging.getLogger(__name__)

# (token budget or None for the whole split, how many candidates go on from this stage).
Stage = tuple[int | None, int]
# Sized for ``offspring=16`` and a calibration split of a few thousand tokens: 16 children on
# 1,024 tokens, 4 on 4,096, 2 (and the parent, known already) on the whole split.
DEFAULT_STAGES: tuple[Stage, ...] = ((1024, 4), (4096, 2), (None, 1))


def stages_for(full_tokens: int) -> tuple[Stage, ...]:
    """DEFAULT_STAGES scaled to a calibration split of ``full_tokens``: children on an eighth of it,
    survivors on half, the last two on all of it (a split too small to divide is one stage)."""
    eighth, half = full_tokens // 8, full_tokens // 2
    if eighth < 1:
        return ((None, 1),)
    return ((eighth, 4), (half, 2), (None, 1))


STATE_ATTR = "evolution.state"
GENERATION_ATTR = "evolution.generation.{:05d}"
_WORST = math.inf
# Mutation attempts per wanted child before a generation settles for fewer distinct children.
_ATTEMPTS_PER_CHILD = 20


def mutate(
    costed: CostedSpace,
    choices: Mapping[str, int],
    budget_bytes: int,
    rng: np.random.Generator,
    *,
    max_switches: int = 3,
    fill: bool = True,
) -> dict[str, int]:
    """A child of ``choices`` (a plan within the budget): min(U{1..k}, U{1..k}) level switches,
    then, with ``fill``, random one-level upgrades that spend what the switches left unused.

    A switch lowers one group by one level of its cost order and raises another by one level if
    that fits the budget. EvoPress switches layers of equal size, so its budget holds exactly;
    here groups differ in size, so the two moves rarely cost the same and the fill spends the
    difference. No move undoes another: a lowered group is neither raised by a later switch nor
    by the fill, and a raised one is not lowered, so a child always differs from its parent (the
    fill raising a lowered group back would mostly rebuild the parent). A level of a joint space
    is a combination (bits, sparsity, rank, KV), so one switch can move a group along several
    dimensions at once.
    """
    child = dict(choices)
    orders = {group: costed.ordered(group) for group in costed.groups}
    n_switches = min(int(rng.integers(1, max_switches + 1)), int(rng.integers(1, max_switches + 1)))
    lowered: set[str] = set()
    raised: set[str] = set()
    for _ in range(n_switches):
        _switch(costed, orders, child, budget_bytes, rng, lowered=lowered, raised=raised)
    if fill:
        while raisable := _raisable(costed, orders, child, budget_bytes, exclude=lowered):
            _step(orders, child, raisable[int(rng.integers(len(raisable)))], +1)
    return child


def _switch(
    costed: CostedSpace,
    orders: dict[str, list[int]],
    choices: dict[str, int],
    budget_bytes: int,
    rng: np.random.Generator,
    *,
    lowered: set[str],
    raised: set[str],
) -> None:
    """One switch, adding the groups it moves to ``lowered`` and ``raised``."""
    lowerable = [g for g in costed.groups if g not in raised and orders[g].index(choices[g]) > 0]
    if not lowerable:
        return
    down = lowerable[int(rng.integers(len(lowerable)))]
    _step(orders, choices, down, -1)
    lowered.add(down)
    raisable = _raisable(costed, orders, choices, budget_bytes, exclude=lowered)
    if raisable:
        up = raisable[int(rng.integers(len(raisable)))]
        _step(orders, choices, up, +1)
        raised.add(up)


def _raisable(
    costed: CostedSpace, orders: dict[str, list[int]], choices: dict[str, int], budget_bytes: int, exclude: set[str]
) -> list[str]:
    """The groups (but ``exclude``) whose next dearer level still fits the budget."""
    spare = budget_bytes - costed.bytes_of(choices)
    groups = []
    for group in costed.groups:
        level = orders[group].index(choices[group])
        if group in exclude or level + 1 == len(orders[group]):
            continue
        if costed.cost(group, orders[group][level + 1]) - costed.cost(group, choices[group]) <= spare:
            groups.append(group)
    return groups


def _step(orders: dict[str, list[int]], choices: dict[str, int], group: str, direction: int) -> None:
    choices[group] = orders[group][orders[group].index(choices[group]) + direction]


def _check_stages(stages: Sequence[Stage]) -> None:
    if not stages:
        raise ValueError("stages must hold at least one (fidelity, survivors) pair")
    for index, (fidelity, survivors) in enumerate(stages):
        if survivors < 1:
            raise ValueError(f"stage {index} keeps {survivors} survivors; each stage must keep at least 1")
        if fidelity is not None and fidelity < 1:
            raise ValueError(f"stage {index} has fidelity {fidelity}; give a positive token count or None")
        if fidelity is None and index != len(stages) - 1:
            raise ValueError("only the last stage may use the whole split (fidelity None)")
    if stages[-1][1] != 1:
        raise ValueError(f"the last stage picks the one next parent; it keeps {stages[-1][1]} survivors")
    sizes = [math.inf if f is None else f for f, _ in stages]
    if any(a >= b for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"stage fidelities must grow from stage to stage; got {[f for f, _ in stages]}")


class EvolutionaryStrategy(Strategy):
    """EvoPress-style (1 + λ) evolution with multi-stage selection; see the module docstring.

    ``ask`` returns the current stage's plans that still need an evaluation, up to ``n`` at a
    time; the next stage begins once every asked plan has been told (the controller tells a whole
    batch before it asks again), and ``ask`` returns [] only when the run is over: ``generations``
    reached, no child distinct from the parent can be made, or ``max_idle_generations`` in a row
    needed no new evaluation (every child already known: a small space is used up).
    ``scope`` prefixes the study attributes that hold the state, so that searches for several
    budgets can share one study (``scoped``). ``known_fitness`` maps (plan key, fidelity) to
    fitnesses measured before this search began (e.g. an integer program's verified plans),
    which are then used instead of evaluated again.
    """

    name = "evolution"

    def __init__(
        self,
        *,
        costed: CostedSpace,
        budget_bytes: int,
        seed: int,
        study: optuna.Study | None = None,
        resume_from: optuna.Study | None = None,
        initial_plans: Sequence[Plan] = (),
        known_fitness: Mapping[tuple[str, int | None], float] | None = None,
        offspring: int = 16,
        stages: Sequence[Stage] = DEFAULT_STAGES,
        n_random_starts: int = 8,
        max_switches: int = 3,
        fill: bool = True,
        generations: int | None = None,
        max_idle_generations: int = 100,
        scope: str = "",
    ) -> None:
        _check_stages(stages)
        if offspring < 1 or max_switches < 1 or n_random_starts < 0:
            raise ValueError("offspring and max_switches must be at least 1, n_random_starts at least 0")
        self._costed = costed
        self._budget = budget_bytes
        self._seed = seed
        self._study = study
        self._stages = tuple(stages)
        self._offspring = offspring
        self._max_switches = max_switches
        self._fill = fill
        self._generations = generations
        self._max_idle = max_idle_generations
        self._scope = scope
        self._known: dict[tuple[str, int | None], float] = dict(known_fitness or {})
        self._generation = 0
        self._parent: Plan | None = None
        self._parent_fitness = _WORST
        self._exhausted = False
        self._children: list[Plan] = []  # this generation's candidates still in the running
        self._elders: list[Plan] = []  # plans that join the last stage only: the parent, initial plans
        self._stage = 0
        self._queue: list[Plan] = []
        self._outstanding: set[str] = set()
        self._scores: dict[str, float] = {}  # fitness at the current stage's fidelity
        self._asked_this_generation = 0
        if resume_from is not None:
            self._resume(resume_from)
        if self._parent is None:
            self._start(initial_plans, n_random_starts)
        else:
            self._begin_generation()

    @property
    def generation(self) -> int:
        """The generation being run (0: the start)."""
        return self._generation

    @property
    def parent(self) -> tuple[Plan, float] | None:
        """The current parent and its fitness at the last stage's fidelity (inf: it failed)."""
        return None if self._parent is None else (self._parent, self._parent_fitness)

    def ask(self, n: int) -> list[Plan]:
        if self._outstanding:
            raise RuntimeError(
                f"ask() called with {len(self._outstanding)} plan(s) of the current stage not yet told; "
                "tell every asked plan first"
            )
        first = self._generation
        while not self._queue and not self._exhausted:
            if self._generation - first > self._max_idle:
                logger.info("evolution: %d generations needed no new evaluation; stopping", self._max_idle)
                self._exhausted = True
                break
            self._advance()
        asked, self._queue = self._queue[:n], self._queue[n:]
        self._outstanding.update(plan.key for plan in asked)
        self._asked_this_generation += len(asked)
        return asked

    def fidelity(self, plan: Plan) -> int | None:
        return self._stages[self._stage][0]

    def tell(self, plan: Plan, outcome: Outcome) -> None:
        if plan.key not in self._outstanding:
            raise ValueError(f"plan {plan.key[:12]} was not asked at this stage, or was told already")
        self._outstanding.remove(plan.key)
        fitness = outcome.fitness
        if fitness is None:
            self._scores[plan.key] = _WORST
            return
        self._scores[plan.key] = fitness
        self._known[(plan.key, self._stages[self._stage][0])] = fitness

    def _start(self, initial_plans: Sequence[Plan], n_random_starts: int) -> None:
        """Generation 0: random plans on the budget go through every stage; initial plans (repaired
        onto the budget if over it) join the last."""
        space, seen = self._costed.space, set()
        for index, plan in enumerate(initial_plans):
            choices = space.choices_of(plan)
            if self._costed.bytes_of(choices) > self._budget:
                fitted = fit_to_budget(self._costed, choices, self._budget, _rng_for(self._seed, "initial", index))
                plan = space.plan_from_choices(fitted)
            if plan.key not in seen:
                seen.add(plan.key)
                self._elders.append(plan)
        rng = _rng_for(self._seed, "start")
        for _ in range(n_random_starts):
            raw = {g: int(rng.integers(len(space.choices(g)))) for g in self._costed.groups}
            plan = space.plan_from_choices(fit_to_budget(self._costed, raw, self._budget, rng))
            if plan.key not in seen:
                seen.add(plan.key)
                self._children.append(plan)
        if not self._children and not self._elders:
            raise ValueError("the start needs n_random_starts > 0 or some initial_plans")
        self._begin_stage()

    def _begin_generation(self) -> None:
        if self._generations is not None and self._generation > self._generations:
            logger.info("evolution: %d generations done", self._generations)
            self._exhausted = True
            return
        assert self._parent is not None  # only generation 0 runs without one
        self._children = self._offspring_of(self._parent, _rng_for(self._seed, "generation", self._generation))
        if not self._children:
            logger.info("evolution: no child distinct from the parent can be made; stopping")
            self._exhausted = True
            return
        self._elders = [self._parent]
        self._stage = 0
        self._asked_this_generation = 0
        self._begin_stage()

    def _offspring_of(self, parent: Plan, rng: np.random.Generator) -> list[Plan]:
        """Up to ``offspring`` distinct children, none equal to the parent."""
        space = self._costed.space
        choices = space.choices_of(parent)
        seen, children = {parent.key}, list[Plan]()
        for _ in range(self._offspring * _ATTEMPTS_PER_CHILD):
            if len(children) == self._offspring:
                break
            mutated = mutate(self._costed, choices, self._budget, rng, max_switches=self._max_switches, fill=self._fill)
            child = space.plan_from_choices(mutated)
            if child.key not in seen:
                seen.add(child.key)
                children.append(child)
        return children

    def _begin_stage(self) -> None:
        """Queue the stage's candidates whose fitness at its fidelity is not known yet; skip a stage
        that would pass every candidate on anyway."""
        last = len(self._stages) - 1
        while self._stage < last and len(self._children) <= self._stages[self._stage][1]:
            self._stage += 1
        fidelity = self._stages[self._stage][0]
        self._scores, self._queue = {}, []
        for plan in self._candidates():
            known = self._known.get((plan.key, fidelity))
            if known is None:
                self._queue.append(plan)
            else:
                self._scores[plan.key] = known

    def _candidates(self) -> list[Plan]:
        # Elders first: a stable sort then keeps the parent when a child only ties it.
        return self._elders + self._children if self._stage == len(self._stages) - 1 else list(self._children)

    def _ranked(self, plans: list[Plan]) -> list[Plan]:
        return sorted(plans, key=lambda plan: self._scores.get(plan.key, _WORST))

    def _advance(self) -> None:
        """Close the current stage, every candidate scored: select its survivors into the next
        stage, or after the last stage crown the next parent and begin the next generation."""
        if self._stage < len(self._stages) - 1:
            self._children = self._ranked(self._children)[: self._stages[self._stage][1]]
            self._stage += 1
            self._begin_stage()
            return
        winner = self._ranked(self._candidates())[0]
        improved = self._parent is None or winner.key != self._parent.key
        self._parent, self._parent_fitness = winner, self._scores.get(winner.key, _WORST)
        logger.info(
            "evolution generation %d: parent %s, fitness %.6g%s",
            self._generation,
            winner.key[:12],
            self._parent_fitness,
            " (new)" if improved else "",
        )
        self._persist(improved)
        self._generation += 1
        self._begin_generation()

    def _persist(self, improved: bool) -> None:
        if self._study is None or self._parent is None:
            return
        fitness = self._parent_fitness if math.isfinite(self._parent_fitness) else None
        line = {"parent_key": self._parent.key, "fitness": fitness, "improved": improved}
        line["trials"] = self._asked_this_generation
        self._study.set_user_attr(scoped(GENERATION_ATTR.format(self._generation), self._scope), line)
        state: dict[str, Any] = {
            "generation": self._generation + 1,
            "parent": self._parent.to_json(),
            "parent_fitness": fitness,
            "fidelity": self._stages[-1][0],
            "seed": self._seed,
        }
        self._study.set_user_attr(scoped(STATE_ATTR, self._scope), state)

    def _resume(self, study: optuna.Study) -> None:
        """Continue from the state ``study`` holds, reusing its complete calibration trials."""
        self._known.update(known_fitness_of(study))
        state = study.user_attrs.get(scoped(STATE_ATTR, self._scope))
        if state is None:
            logger.warning("study %r holds no evolution state; starting again from generation 0", study.study_name)
            return
        parent = Plan.from_json(state["parent"])
        needs = self._costed.bytes_of(self._costed.space.choices_of(parent))
        if needs > self._budget:
            raise ValueError(f"the resumed parent needs {needs} bytes, over this search's budget of {self._budget}")
        self._parent, self._generation = parent, int(state["generation"])
        fitness = state["parent_fitness"]
        # A fitness at another fidelity does not compare: the parent is then evaluated again.
        if fitness is not None and state["fidelity"] == self._stages[-1][0]:
            self._parent_fitness = float(fitness)
            self._known[(parent.key, self._stages[-1][0])] = self._parent_fitness
        logger.info("evolution resumed at generation %d from study %r", self._generation, study.study_name)
