"""The search space with every choice's bytes precomputed, and repair of plans to a budget.

Costs add up per group, so checking or repairing a plan is integer arithmetic, not a call of
the memory model per unit; the controller still checks every plan with the memory model itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


Sensitivity = Mapping[str, Sequence[float | None]]


def fit_by_sensitivity(
    costed: CostedSpace, choices: Mapping[str, int], budget: int, sensitivity: Sensitivity
) -> dict[str, int]:
    """Move a choice vector onto the budget the way a measured table says hurts least: one-level
    downgrades with the least added error per byte saved until it fits, then one-level upgrades
    with the most error removed per byte while they fit. ``sensitivity`` holds, per group and
    choice, the error change of that choice (an integer program's table); choices it lacks (None)
    are never moved to. Deterministic: ties go to the earlier group."""
    if costed.cheapest_bytes() > budget:
        raise ValueError(f"no plan fits {budget} bytes: the smallest possible plan needs {costed.cheapest_bytes()}")
    current = dict(choices)
    total = costed.bytes_of(current)
    while total > budget:
        move = _best_move(costed, current, sensitivity, direction=-1, room=None)
        if move is None:  # only unmeasured cheaper choices are left: take the cheapest of each group
            return fit_to_budget(costed, current, budget, np.random.default_rng(0))
        total += costed.cost(move[0], move[1]) - costed.cost(move[0], current[move[0]])
        current[move[0]] = move[1]
    while (move := _best_move(costed, current, sensitivity, direction=+1, room=budget - total)) is not None:
        total += costed.cost(move[0], move[1]) - costed.cost(move[0], current[move[0]])
        current[move[0]] = move[1]
    return current


def _best_move(
    costed: CostedSpace, current: Mapping[str, int], sensitivity: Sensitivity, *, direction: int, room: int | None
) -> tuple[str, int] | None:
    """The one-level move (to the next measured choice in cost order) with the best error change per
    byte: down, the least added error per byte saved; up (within ``room``), the most removed."""
    best: tuple[float, str, int] | None = None
    for group in costed.groups:
        order, row = costed.ordered(group), sensitivity.get(group)
        if row is None or row[current[group]] is None:
            continue
        here = float(row[current[group]])  # type: ignore[arg-type]
        position = order.index(current[group])
        steps = order[position + 1 :] if direction > 0 else order[:position][::-1]
        target = next((c for c in steps if row[c] is not None), None)
        if target is None:
            continue
        delta_bytes = costed.cost(group, target) - costed.cost(group, current[group])
        if room is not None and delta_bytes > room:
            continue
        # Error added per byte saved (down) or error removed per byte spent (up), both to minimize.
        score = (float(row[target]) - here) / max(abs(delta_bytes), 1)  # type: ignore[arg-type]
        if direction > 0 and score >= 0:  # a raise that removes no error only spends bytes
            continue
        if best is None or score < best[0]:
            best = (score, group, target)
    return None if best is None else (best[1], best[2])
