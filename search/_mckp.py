"""The multiple-choice knapsack, solved exactly with scipy's ``milp`` (HiGHS), with k-best by no-good cuts.

One choice per group, total cost within a capacity, least total value. HiGHS alone needs minutes
to prove optimality on 10,000 groups of 32 choices, so the problem is first reduced without losing
any of the ``k`` best selections:

1. choices dominated (no cheaper and no better) by at least ``k`` others of their group go;
2. a Lagrangian bound ``L`` (the LP relaxation's, by bisection on the capacity's multiplier) and
   ``k`` distinct feasible selections found greedily (the worst worth ``U``) remove every choice
   whose reduced cost exceeds ``U - L``: no selection using it is worth ``U`` or less;
3. a core of the choices with reduced cost at most a fraction of that gap is solved first; its
   ``k``-th best value ``U'`` is an upper bound too, and when ``U' - L`` is within the core's
   threshold the core held every choice that matters. Otherwise the core grows to ``U' - L``.

Groups left with one choice are fixed; the rest (usually a few dozen groups) goes to ``milp`` as a
sparse formulation: one column per choice, one row per group, one capacity row, one row per cut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp

logger = logging.getLogger(__name__)

Solution = tuple[list[int], float]
IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

# HiGHS accepts a capacity row violated by its feasibility tolerance; costs are bytes, so a
# selection is re-checked in integers and the row tightened by the excess a few times at most.
_TIGHTEN_ATTEMPTS = 4
# Bounds the (groups × choices × choices) dominance arrays to a few tens of MB at a time.
_DOMINANCE_CHUNK = 4096
# Slack on reduced-cost tests (values are scaled to [0, 1]): far above rounding, far below a choice.
_REDUCED_COST_MARGIN = 1e-7
_BISECTION_STEPS = 100
# The first core keeps choices within this fraction of the bound gap: small enough that a few
# dozen groups stay free, large enough that it usually proves itself.
_CORE_FRACTION = 1 / 16


def solve_mckp(
    costs: Sequence[Sequence[int]],
    values: Sequence[Sequence[float]],
    capacity: int,
    *,
    n_solutions: int = 1,
    time_limit: float | None = None,
) -> list[Solution]:
    """The ``n_solutions`` best distinct selections, best first: (choice index per group, total value).

    Minimises ``sum(values[g][x[g]])`` subject to ``sum(costs[g][x[g]]) <= capacity``. Groups may
    have different numbers of choices; a non-finite value marks a choice as excluded. Fewer
    selections come back when fewer distinct ones fit. Raises ValueError when nothing fits.
    Optimal to HiGHS's absolute gap: 1e-6 of the largest difference between two values of a group.
    ``time_limit`` (seconds, for all solves together): past it, the best selections found so far
    are returned with a warning, optimality unproven.
    """
    if n_solutions < 1:
        raise ValueError(f"n_solutions must be at least 1; got {n_solutions}")
    deadline = None if time_limit is None else time.monotonic() + time_limit
    cost, value, admissible = _padded(costs, values)
    admissible = _reachable(cost, admissible, int(capacity))
    admissible &= _dominators(cost, value, admissible) < n_solutions
    bound = _Bound.of(cost, value, admissible, int(capacity), n_solutions)
    threshold = bound.gap * _CORE_FRACTION
    kept = admissible & bound.within(threshold)
    fallback = [bound.incumbent(value)]
    while True:
        found, complete = _Problem.build(cost, value, kept, int(capacity)).best(n_solutions, deadline)
        # HiGHS ranks within its absolute gap (1e-6 of the largest value difference); exact sums
        # order what it found.
        found.sort(key=lambda solution: solution[1])
        if not complete:
            if not found:
                logger.warning("time limit reached before the solver found a selection; returning the best known")
            return found or fallback
        kth = bound.scaled_value(found[-1][0]) if len(found) == n_solutions else np.inf
        # Every selection among the best is worth at most ``kth``, so its choices' reduced costs
        # sum to at most ``kth - L``: a core holding every choice within that held them all.
        needed = min(kth - bound.lower, bound.gap)
        grown = admissible & bound.within(needed)
        if needed <= threshold or np.array_equal(grown, kept):
            return found
        logger.debug("core at %.3g did not prove itself; growing it to %.3g", threshold, needed)
        threshold, kept, fallback = needed, grown, found


@dataclass(frozen=True)
class _Problem:
    """A knapsack's columns, numbered by free group; groups with one choice left are fixed."""

    n_groups: int
    fixed: IntArray  # per group: its only remaining choice, or -1 where the solver decides
    free_groups: IntArray  # original index of each free group
    group: IntArray  # per column: index into free_groups
    choice: IntArray
    cost: IntArray
    value: FloatArray
    capacity: int  # what the free groups may spend
    fixed_value: float  # what the fixed groups are worth

    @classmethod
    def build(cls, cost: IntArray, value: FloatArray, admissible: BoolArray, capacity: int) -> _Problem:
        counts = admissible.sum(axis=1)
        fixed = np.where(counts == 1, admissible.argmax(axis=1), -1)
        held = np.flatnonzero(fixed >= 0)
        free_groups = np.flatnonzero(fixed < 0)
        group, choice = np.nonzero(admissible[free_groups])
        logger.debug("knapsack core: %d columns in %d free groups", group.size, free_groups.size)
        return cls(
            n_groups=cost.shape[0],
            fixed=fixed.astype(np.int64),
            free_groups=free_groups.astype(np.int64),
            group=group.astype(np.int64),
            choice=choice.astype(np.int64),
            cost=cost[free_groups[group], choice],
            value=value[free_groups[group], choice],
            capacity=capacity - int(cost[held, fixed[held]].sum()),
            fixed_value=float(value[held, fixed[held]].sum()),
        )

    def best(self, n: int, deadline: float | None) -> tuple[list[Solution], bool]:
        """Up to ``n`` best distinct selections, and whether the search ended before the deadline."""
        found: list[Solution] = []
        cuts: list[IntArray] = []
        for _ in range(n):
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            columns, optimal = self.solve(cuts, remaining, first=not found)
            if columns is None:
                return found, optimal
            found.append(self.selection(columns))
            if not optimal:
                return found, False
            cuts.append(columns)
        return found, True

    def selection(self, columns: IntArray) -> Solution:
        picked = self.fixed.copy()
        picked[self.free_groups[self.group[columns]]] = self.choice[columns]
        return [int(i) for i in picked], self.fixed_value + float(self.value[columns].sum())

    def solve(self, cuts: list[IntArray], time_limit: float | None, *, first: bool) -> tuple[IntArray | None, bool]:
        """The chosen columns of the best selection not cut off (None when there is none), and
        whether that is proven (False: the time limit cut the search short)."""
        if not self.free_groups.size:  # everything is fixed: one selection, no second
            return (np.zeros(0, dtype=np.int64) if first else None), True
        bound = self.capacity
        for _ in range(_TIGHTEN_ATTEMPTS):
            columns, optimal = self._solve_once(cuts, bound, time_limit)
            if columns is None:
                return None, optimal
            excess = int(self.cost[columns].sum()) - self.capacity
            if excess <= 0:
                return columns, optimal
            logger.debug("the solver's selection exceeds the capacity by %d; tightening", excess)
            bound -= excess
        raise RuntimeError(f"the solver kept exceeding the capacity {self.capacity} within its tolerance")

    def _solve_once(self, cuts: list[IntArray], bound: int, time_limit: float | None) -> tuple[IntArray | None, bool]:
        n, n_free = self.group.size, self.free_groups.size
        lowest = _group_min(self.group, self.cost, n_free)
        constraints = [
            LinearConstraint(sp.csr_array((np.ones(n), (self.group, np.arange(n))), shape=(n_free, n)), 1, 1),
            # Shifted so every group's cheapest choice costs 0: smaller numbers for HiGHS's tolerances.
            LinearConstraint(
                (self.cost - lowest[self.group]).astype(np.float64)[None, :], -np.inf, float(bound - lowest.sum())
            ),
        ]
        if cuts:
            rows = np.repeat(np.arange(len(cuts)), n_free)
            matrix = sp.csr_array((np.ones(rows.size), (rows, np.concatenate(cuts))), shape=(len(cuts), n))
            constraints.append(LinearConstraint(matrix, -np.inf, n_free - 1))
        options: dict[str, float] = {"mip_rel_gap": 0.0}
        if time_limit is not None:
            options["time_limit"] = time_limit
        result = milp(
            _normalised(self.group, self.value, n_free),
            integrality=np.ones(n),
            bounds=Bounds(0.0, 1.0),
            constraints=constraints,
            options=options,
        )
        return self._columns_of(result)

    def _columns_of(self, result: OptimizeResult) -> tuple[IntArray | None, bool]:
        if result.status == 2:  # infeasible: every distinct selection has been cut off
            return None, True
        if result.x is None:
            if result.status == 1:
                logger.warning("time limit reached: returning the selections found so far")
                return None, False
            raise RuntimeError(f"the knapsack solver stopped without a selection: {result.message}")
        if result.status == 1:
            logger.warning("time limit reached: the selection returned is feasible but not proven optimal")
        columns = np.flatnonzero(np.asarray(result.x) > 0.5).astype(np.int64)
        per_group = np.bincount(self.group[columns], minlength=self.free_groups.size)
        if not np.all(per_group == 1):
            raise RuntimeError("the knapsack solver returned a selection without exactly one choice per group")
        return columns, result.status == 0


def _padded(
    costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]]
) -> tuple[IntArray, FloatArray, BoolArray]:
    """Costs and values as (groups × most choices) arrays, and which entries are admissible."""
    if len(costs) != len(values):
        raise ValueError(f"costs has {len(costs)} groups but values has {len(values)}")
    if not costs:
        raise ValueError("the knapsack needs at least one group")
    widths = [len(row) for row in costs]
    for index, (row_cost, row_value) in enumerate(zip(costs, values, strict=True)):
        if len(row_cost) != len(row_value) or not row_cost:
            raise ValueError(
                f"group {index} has {len(row_cost)} costs and {len(row_value)} values; "
                "each group needs the same positive number of both"
            )
    width = max(widths)
    if min(widths) == width:  # rectangular: numpy converts it in one call
        cost, value = np.asarray(costs, dtype=np.int64), np.asarray(values, dtype=np.float64)
        present = np.ones(cost.shape, dtype=bool)
    else:
        cost = np.zeros((len(costs), width), dtype=np.int64)
        value = np.full((len(costs), width), np.inf)
        present = np.zeros((len(costs), width), dtype=bool)
        for index, (row_cost, row_value) in enumerate(zip(costs, values, strict=True)):
            cost[index, : len(row_cost)] = row_cost
            value[index, : len(row_value)] = row_value
            present[index, : len(row_cost)] = True
    admissible = present & np.isfinite(value)
    empty = np.flatnonzero(~admissible.any(axis=1))
    if empty.size:
        raise ValueError(f"group {int(empty[0])} has no admissible choice: every value is excluded (not finite)")
    return cost, np.where(admissible, value, np.inf), admissible


def _reachable(cost: IntArray, admissible: BoolArray, capacity: int) -> BoolArray:
    """Admissible choices that fit in some selection; ValueError when even the cheapest does not fit."""
    lowest = np.where(admissible, cost, np.iinfo(np.int64).max).min(axis=1)
    base = int(lowest.sum())
    if base > capacity:
        raise ValueError(f"no selection fits the capacity {capacity}: the cheapest admissible one needs {base}")
    reachable: BoolArray = admissible & ((cost - lowest[:, None]) <= capacity - base)
    return reachable


def _dominators(cost: IntArray, value: FloatArray, admissible: BoolArray) -> IntArray:
    """For each choice, how many admissible choices of its group dominate it.

    ``j`` dominates ``i`` when it costs no more and is worth no more, ties broken by index so twins
    do not remove each other. A selection using a choice with ``k`` dominators has ``k`` distinct
    selections at least as good (swap in any dominator), so a choice with at least as many
    dominators as selections sought is in none of the best ones.
    """
    counts = np.zeros(cost.shape, dtype=np.int64)
    index = np.arange(cost.shape[1])
    earlier = index[None, :] < index[:, None]  # [i, j]: j comes before i
    for start in range(0, cost.shape[0], _DOMINANCE_CHUNK):
        stop = start + _DOMINANCE_CHUNK
        c, v, ok = cost[start:stop], value[start:stop], admissible[start:stop]
        ci, cj, vi, vj = c[:, :, None], c[:, None, :], v[:, :, None], v[:, None, :]
        dominated = (cj <= ci) & (vj <= vi) & ((cj < ci) | (vj < vi) | earlier[None]) & ok[:, None, :]
        counts[start:stop] = dominated.sum(axis=2)
    return counts


@dataclass(frozen=True)
class _Scaled:
    """A knapsack shifted so each group's cheapest and best choices are 0, values scaled to [0, 1]."""

    cost: IntArray  # exact, for feasibility; inadmissible entries are far over any slack
    value: FloatArray  # inadmissible entries are +inf
    slack: int
    cost_unit: float  # costs are divided by it where they meet a multiplier

    @classmethod
    def of(cls, cost: IntArray, value: FloatArray, admissible: BoolArray, capacity: int) -> _Scaled:
        lowest = np.where(admissible, cost, np.iinfo(np.int64).max).min(axis=1)
        shifted = np.where(admissible, cost - lowest[:, None], np.iinfo(np.int64).max // 4)
        v = np.where(admissible, value, np.inf)
        v = v - v.min(axis=1, keepdims=True)
        top = float(np.where(admissible, v, 0.0).max())
        unit = float(np.where(admissible, shifted, 0).max())
        return cls(shifted, v / top if top > 0 else v, capacity - int(lowest.sum()), unit if unit > 0 else 1.0)

    def best_at(self, multiplier: float) -> tuple[IntArray, FloatArray]:
        """Each group's choice minimising value + multiplier·cost, and that minimum."""
        priced = self.value + multiplier * (self.cost / self.cost_unit)
        picked = priced.argmin(axis=1)
        return picked, priced[np.arange(len(picked)), picked]

    def spent(self, picked: IntArray) -> int:
        return int(self.cost[np.arange(len(picked)), picked].sum())


@dataclass(frozen=True)
class _Bound:
    """A Lagrangian lower bound, an upper bound on the ``k``-th best value, and every choice's reduced
    cost, all in the scaled units of :class:`_Scaled`."""

    scaled: _Scaled
    lower: float
    upper: float
    reduced: FloatArray
    margin: float
    best_known: IntArray  # a feasible selection found greedily

    @classmethod
    def of(cls, cost: IntArray, value: FloatArray, admissible: BoolArray, capacity: int, n_best: int) -> _Bound:
        scaled = _Scaled.of(cost, value, admissible, capacity)
        multiplier, feasible = _multiplier(scaled)
        _, minima = scaled.best_at(multiplier)
        priced = scaled.value + multiplier * (scaled.cost / scaled.cost_unit)
        best_known = _improved(scaled, feasible)
        return cls(
            scaled=scaled,
            lower=float(minima.sum()) - multiplier * scaled.slack / scaled.cost_unit,
            upper=_kth_upper_bound(scaled, best_known, n_best),
            reduced=priced - minima[:, None],
            # Rounding grows with the multiplier, which scales costs into the priced values.
            margin=_REDUCED_COST_MARGIN * (1.0 + multiplier),
            best_known=best_known,
        )

    @property
    def gap(self) -> float:
        return self.upper - self.lower

    def within(self, threshold: float) -> BoolArray:
        return self.reduced <= threshold + self.margin

    def incumbent(self, value: FloatArray) -> Solution:
        """The greedy feasible selection, valued in ``value`` (the unscaled table)."""
        rows = np.arange(len(self.best_known))
        return [int(i) for i in self.best_known], float(value[rows, self.best_known].sum())

    def scaled_value(self, picked: Sequence[int]) -> float:
        rows = np.arange(len(picked))
        return float(self.scaled.value[rows, np.asarray(picked)].sum())


def _multiplier(scaled: _Scaled) -> tuple[float, IntArray]:
    """The capacity's Lagrange multiplier (near the LP relaxation's), and a feasible selection it prices."""
    picked, _ = scaled.best_at(0.0)
    if scaled.spent(picked) <= scaled.slack:
        return 0.0, picked
    high = 1.0
    while scaled.spent(scaled.best_at(high)[0]) > scaled.slack:
        high *= 2.0
    # Bisection in log space: the multiplier may be anywhere in many decades below ``high``.
    low = high * 1e-15
    if scaled.spent(scaled.best_at(low)[0]) <= scaled.slack:
        return low, scaled.best_at(low)[0]
    for _ in range(_BISECTION_STEPS):
        middle = float(np.sqrt(low * high))
        if scaled.spent(scaled.best_at(middle)[0]) <= scaled.slack:
            high = middle
        else:
            low = middle
    return high, scaled.best_at(high)[0]


def _improved(scaled: _Scaled, picked: IntArray) -> IntArray:
    """A feasible selection improved greedily: each group's best move that still fits, best moves first."""
    picked = picked.copy()
    rows = np.arange(len(picked))
    for _ in range(3):
        room = scaled.slack - scaled.spent(picked)
        delta_cost = scaled.cost - scaled.cost[rows, picked][:, None]
        gain = np.where(delta_cost <= room, scaled.value - scaled.value[rows, picked][:, None], np.inf)
        moves = gain.argmin(axis=1)
        best = gain[rows, moves]
        moved = False
        for group in np.flatnonzero(best < 0)[np.argsort(best[best < 0], kind="stable")]:
            extra = int(delta_cost[group, moves[group]])
            if extra <= room:
                picked[group], room, moved = moves[group], room - extra, True
        if not moved:
            break
    return picked


def _kth_upper_bound(scaled: _Scaled, picked: IntArray, n_best: int) -> float:
    """An upper bound on the ``n_best``-th best value: ``picked`` and its best single-group changes."""
    rows = np.arange(len(picked))
    value = float(scaled.value[rows, picked].sum())
    if n_best == 1:
        return value
    room = scaled.slack - scaled.spent(picked)
    delta_cost = scaled.cost - scaled.cost[rows, picked][:, None]
    gain = np.where(delta_cost <= room, scaled.value - scaled.value[rows, picked][:, None], np.inf)
    gain[rows, picked] = np.inf
    gains = gain.ravel()
    if np.count_nonzero(np.isfinite(gains)) < n_best - 1:
        return np.inf  # too few distinct selections in reach to bound with: keep every choice
    worst = float(np.partition(gains, n_best - 2)[: n_best - 1].max())
    return value + max(worst, 0.0)


def _group_min(group: IntArray, data: IntArray, n_groups: int) -> IntArray:
    lowest = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(lowest, group, data)
    return lowest


def _normalised(group: IntArray, value: FloatArray, n_groups: int) -> FloatArray:
    """Values shifted by their group's least and scaled to [0, 1]: the same argmin, and HiGHS's
    absolute gap (1e-6) stays small against the differences that decide the order."""
    lowest = np.full(n_groups, np.inf)
    np.minimum.at(lowest, group, value)
    shifted: FloatArray = value - lowest[group]
    top = float(shifted.max()) if shifted.size else 0.0
    return shifted / top if top > 0 else shifted
