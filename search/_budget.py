"""The search space with every choice's bytes precomputed, and repair of plans to a budget.

Costs add up per group, so checking or repairing a plan is integer arithmetic, not a call of
the memory model per unit; the controller still checks every plan with the memory model itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from budgetpress.space import Plan, SearchSpace, Workload, dense_bytes, plan_bytes


class CostedSpace:
    """A search space whose group choices carry their bytes at a workload."""

    def __init__(self, space: SearchSpace, workload: Workload) -> None:
        self.space = space
        self.workload = workload
        self.groups = [name for name, _ in space.groups()]
        empty = Plan({})
        self._fixed = plan_bytes(space.profile, empty, workload)
        self._costs: dict[str, list[int]] = {}
        members = dict(space.groups())
        for group in self.groups:
            dense_part = plan_bytes(space.profile, empty, workload)
            costs = []
            for choice in space.choices(group):
                plan = Plan(dict.fromkeys(members[group], choice))
                costs.append(plan_bytes(space.profile, plan, workload) - dense_part)
            self._costs[group] = costs
        self.dense_bytes = dense_bytes(space.profile, workload)

    def cost(self, group: str, index: int) -> int:
        """Bytes that choosing ``index`` for ``group`` adds to (or, negative, saves from) dense."""
        return self._costs[group][index]

    def bytes_of(self, choices: Mapping[str, int]) -> int:
        return self._fixed + sum(self._costs[g][i] for g, i in choices.items())

    def cheapest_bytes(self) -> int:
        return self._fixed + sum(min(costs) for costs in self._costs.values())

    def ordered(self, group: str) -> list[int]:
        """The group's choice indices from cheapest to dearest."""
        costs = self._costs[group]
        return sorted(range(len(costs)), key=lambda i: (costs[i], i))


def fit_to_budget(
    costed: CostedSpace, choices: Mapping[str, int], budget: int, rng: np.random.Generator
) -> dict[str, int]:
    """Move a choice vector onto the budget: random one-level downgrades until it fits, then random
    upgrades while they still fit, so the repaired plan neither exceeds nor wastes the budget."""
    if costed.cheapest_bytes() > budget:
        raise ValueError(f"no plan fits {budget} bytes: the smallest possible plan needs {costed.cheapest_bytes()}")
    current = dict(choices)
    rank = {g: costed.ordered(g) for g in costed.groups}
    level = {g: rank[g].index(current[g]) for g in costed.groups}
    total = costed.bytes_of(current)
    while total > budget:
        lowerable = [g for g in costed.groups if level[g] > 0]
        group = lowerable[int(rng.integers(len(lowerable)))]
        total += _step(costed, rank, level, current, group, -1)
    while True:
        raisable = [
            g
            for g in costed.groups
            if level[g] + 1 < len(rank[g])
            and total + costed.cost(g, rank[g][level[g] + 1]) - costed.cost(g, current[g]) <= budget
        ]
        if not raisable:
            return current
        group = raisable[int(rng.integers(len(raisable)))]
        total += _step(costed, rank, level, current, group, +1)


def _step(
    costed: CostedSpace,
    rank: dict[str, list[int]],
    level: dict[str, int],
    current: dict[str, int],
    group: str,
    direction: int,
) -> int:
    before = costed.cost(group, current[group])
    level[group] += direction
    current[group] = rank[group][level[group]]
    return costed.cost(group, current[group]) - before
