from __future__ import annotations

import numpy as np
import pytest

from budgetpress.search import CostedSpace, fit_by_sensitivity, fit_to_budget
from budgetpress.space import LinearSetting, Plan, plan_bytes

from .conftest import synthetic_kl


def test_costs_agree_with_the_memory_model(costed: CostedSpace) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        choices = {g: int(rng.integers(len(costed.space.choices(g)))) for g in costed.groups}
        plan = costed.space.plan_from_choices(choices)
        assert costed.bytes_of(choices) == plan_bytes(costed.space.profile, plan, costed.workload)
    assert costed.dense_bytes == plan_bytes(costed.space.profile, Plan({}), costed.workload)


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.7])
def test_fit_to_budget_fits_and_leaves_no_upgrade(costed: CostedSpace, fraction: float) -> None:
    budget = int(costed.dense_bytes * fraction)
    rng = np.random.default_rng(1)
    top = {g: costed.ordered(g)[-1] for g in costed.groups}
    fitted = fit_to_budget(costed, top, budget, rng)
    total = costed.bytes_of(fitted)
    assert total <= budget
    for group in costed.groups:
        order = costed.ordered(group)
        level = order.index(fitted[group])
        if level + 1 < len(order):
            assert total - costed.cost(group, fitted[group]) + costed.cost(group, order[level + 1]) > budget


def test_fit_to_budget_is_seeded(costed: CostedSpace) -> None:
    budget = int(costed.dense_bytes * 0.4)
    start = {g: 0 for g in costed.groups}
    a = fit_to_budget(costed, start, budget, np.random.default_rng(3))
    b = fit_to_budget(costed, start, budget, np.random.default_rng(3))
    assert a == b


def test_impossible_budget_is_a_clear_error(costed: CostedSpace) -> None:
    with pytest.raises(ValueError, match="smallest possible plan"):
        fit_to_budget(costed, {g: 0 for g in costed.groups}, costed.cheapest_bytes() - 1, np.random.default_rng(0))


def test_uniform_plans_cost_as_expected(costed: CostedSpace) -> None:
    plans = costed.space.uniform_plans()
    bits = [next(s.bits for s in p.values() if isinstance(s, LinearSetting)) for p in plans]
    costs = [costed.bytes_of(costed.space.choices_of(p)) for p in plans]
    assert [c for _, c in sorted(zip(bits, costs, strict=True))] == sorted(costs)


def _table(costed: CostedSpace) -> dict[str, list[float | None]]:
    """The exact single-group error change from dense of each choice (synthetic_kl adds up)."""
    dense = {g: costed.ordered(g)[-1] for g in costed.groups}
    base = synthetic_kl(costed.space.plan_from_choices(dense))
    return {
        g: [synthetic_kl(costed.space.plan_from_choices({**dense, g: c})) - base for c in range(len(row))]
        for g, row in ((g, costed.space.choices(g)) for g in costed.groups)
    }


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.7])
def test_fit_by_sensitivity_fits_fills_and_beats_random_repair(costed: CostedSpace, fraction: float) -> None:
    budget = int(costed.dense_bytes * fraction)
    table = _table(costed)
    top = {g: costed.ordered(g)[-1] for g in costed.groups}
    fitted = fit_by_sensitivity(costed, top, budget, table)
    total = costed.bytes_of(fitted)
    assert total <= budget
    for group in costed.groups:  # no raise that removes error still fits
        order = costed.ordered(group)
        higher = order[order.index(fitted[group]) + 1 :]
        assert all(
            total - costed.cost(group, fitted[group]) + costed.cost(group, c) > budget
            for c in higher
            if table[group][c] < table[group][fitted[group]]  # type: ignore[operator]
        )
    guided = synthetic_kl(costed.space.plan_from_choices(fitted))
    randomly = [
        synthetic_kl(costed.space.plan_from_choices(fit_to_budget(costed, top, budget, np.random.default_rng(s))))
        for s in range(20)
    ]
    assert guided <= min(randomly)
    # From a cheap start it spends the budget the same way: the table, not the start, decides.
    cheapest = {g: costed.ordered(g)[0] for g in costed.groups}
    assert costed.bytes_of(fit_by_sensitivity(costed, cheapest, budget, table)) <= budget


def test_fit_by_sensitivity_never_moves_to_an_unmeasured_choice(costed: CostedSpace) -> None:
    budget = int(costed.dense_bytes * 0.45)
    table = _table(costed)
    group = costed.groups[0]
    unmeasured = costed.ordered(group)[1]
    table[group][unmeasured] = None
    fitted = fit_by_sensitivity(costed, {g: costed.ordered(g)[-1] for g in costed.groups}, budget, table)
    assert fitted[group] != unmeasured
    assert costed.bytes_of(fitted) <= budget
