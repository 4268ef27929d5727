"""The multiple-choice knapsack solver and the integer-programming strategy, on synthetic objectives."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import optuna
import pytest

from budgetpress.search import (
    Controller,
    CostedSpace,
    IntegerProgramStrategy,
    Ledger,
    Outcome,
    Strategy,
    TPEStrategy,
    UniformStrategy,
    open_study,
    solve_mckp,
)
from budgetpress.search._integer import SOLUTIONS_ATTR, measurement_base
from budgetpress.space import (
    Dimension,
    Plan,
    SearchSpace,
    Workload,
    plan_bytes,
    plan_dimensions,
    setting_dimensions,
)

from .conftest import SyntheticEvaluator, synthetic_kl, toy_profile

logger = logging.getLogger(__name__)

FRACTION = 0.35


# --- solve_mckp ----------------------------------------------------------------------------------


def _brute_force(
    costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int
) -> list[tuple[float, list[int]]]:
    """Every feasible selection with a finite value, best first."""
    found = []
    for picked in itertools.product(*(range(len(row)) for row in costs)):
        value = sum(values[g][i] for g, i in enumerate(picked))
        if math.isfinite(value) and sum(costs[g][i] for g, i in enumerate(picked)) <= capacity:
            found.append((value, list(picked)))
    return sorted(found, key=lambda item: item[0])


def _random_instance(seed: int) -> tuple[list[list[int]], list[list[float]], int, int]:
    """Ragged groups, some excluded (NaN) values, costs as bytes (negative: savings from dense) or
    small integers, values across magnitudes, and a capacity between the cheapest and dearest."""
    rng = np.random.default_rng(seed)
    widths = rng.integers(1, 5, size=int(rng.integers(1, 7)))
    scale = 10**9 if seed % 2 else 100
    costs = [sorted(int(c) for c in rng.integers(-scale, scale, size=w)) for w in widths]
    values = [[float(v) * 10.0 ** float(rng.integers(-4, 1)) for v in rng.random(w)] for w in widths]
    for row in values:
        if len(row) > 1 and rng.random() < 0.3:
            row[int(rng.integers(len(row)))] = math.nan
    lowest = sum(min(row) for row in costs)
    highest = sum(max(row) for row in costs)
    return costs, values, int(rng.integers(lowest, highest + 1)), int(rng.integers(1, 6))


@pytest.mark.parametrize("seed", range(40))
def test_solve_mckp_equals_brute_force(seed: int) -> None:
    costs, values, capacity, n_solutions = _random_instance(seed)
    expected = _brute_force(costs, values, capacity)[:n_solutions]
    if not expected:
        with pytest.raises(ValueError):
            solve_mckp(costs, values, capacity, n_solutions=n_solutions)
        return
    found = solve_mckp(costs, values, capacity, n_solutions=n_solutions)
    assert [picked for picked, _ in found] == [picked for _, picked in expected]
    assert [total for _, total in found] == pytest.approx([value for value, _ in expected], rel=1e-12)


def test_solve_mckp_next_best_are_distinct_ordered_and_fit() -> None:
    rng = np.random.default_rng(5)
    costs = rng.integers(0, 50, size=(6, 4)).tolist()
    values = rng.random((6, 4)).tolist()
    capacity = 120
    found = solve_mckp(costs, values, capacity, n_solutions=8)
    assert len(found) == 8
    assert len({tuple(picked) for picked, _ in found}) == 8
    assert [total for _, total in found] == sorted(total for _, total in found)
    for picked, total in found:
        assert sum(costs[g][i] for g, i in enumerate(picked)) <= capacity
        assert total == pytest.approx(sum(values[g][i] for g, i in enumerate(picked)))


def test_solve_mckp_returns_fewer_when_fewer_fit() -> None:
    found = solve_mckp([[0, 1], [0, 1]], [[1.0, 0.0], [1.0, 0.0]], 1, n_solutions=10)
    assert sorted(picked for picked, _ in found) == [[0, 0], [0, 1], [1, 0]]
    assert found[-1] == ([0, 0], 2.0)


def test_solve_mckp_infeasible_capacity_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no selection fits the capacity 5: the cheapest admissible one needs 6"):
        solve_mckp([[3, 4], [3, 9]], [[0.0, 0.0], [0.0, 0.0]], 5)


@pytest.mark.parametrize(
    ("costs", "values", "message"),
    [
        ([[1, 2]], [[math.nan, math.inf]], "group 0 has no admissible choice"),
        ([[1, 2]], [[0.0]], "group 0 has 2 costs and 1 values"),
        ([[1]], [[0.0], [1.0]], "costs has 1 groups but values has 2"),
        ([], [], "at least one group"),
    ],
)
def test_solve_mckp_refuses_malformed_tables(costs: list[list[int]], values: list[list[float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        solve_mckp(costs, values, 10)


def test_solve_mckp_scales_to_ten_thousand_groups(record_property: Callable[[str, object], None]) -> None:
    """10,000 groups × 32 choices, each group a trade-off (dearer is better). Timed, not asserted:
    ``pytest -k ten_thousand -o log_cli=true -o log_cli_level=INFO`` shows the time."""
    rng = np.random.default_rng(0)
    costs = np.sort(rng.integers(0, 10**8, size=(10_000, 32)), axis=1)
    values = np.sort(rng.random((10_000, 32)), axis=1)[:, ::-1]
    lowest, highest = int(costs[:, 0].sum()), int(costs[:, -1].sum())
    capacity = lowest + (highest - lowest) * 2 // 5
    cost_rows, value_rows = costs.tolist(), values.tolist()
    start = time.perf_counter()
    (picked, total), *_ = solve_mckp(cost_rows, value_rows, capacity)
    seconds = time.perf_counter() - start
    logger.info("solve_mckp on 10,000 x 32: %.3f s", seconds)
    record_property("solve_seconds", round(seconds, 3))
    rows = np.arange(10_000)
    assert int(costs[rows, picked].sum()) <= capacity
    assert total == pytest.approx(float(values[rows, picked].sum()))
    # The LP relaxation's greedy rounding is a feasible selection: the optimum is no worse.
    assert total <= _greedy_value(costs, values, capacity) + 1e-9


def test_solve_mckp_past_its_time_limit_returns_a_feasible_selection(caplog: pytest.LogCaptureFixture) -> None:
    # Few distinct weights make a knapsack hard to prove: HiGHS is stopped before it can.
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=(2000, 1)) * 1_000_000
    bits = np.linspace(1, 16, 8)[None, :]
    costs = -(sizes * (16 - bits) / 16).astype(np.int64)
    values = rng.random((2000, 1)) * np.power(4.0, -bits) * (1 + 0.1 * rng.random((2000, 8)))
    capacity = int(costs[:, 0].sum() + 0.4 * (costs[:, -1].sum() - costs[:, 0].sum()))
    with caplog.at_level(logging.WARNING, logger="budgetpress.search._mckp"):
        found = solve_mckp(costs.tolist(), values.tolist(), capacity, n_solutions=2, time_limit=0.0)
    assert "time limit reached" in caplog.text
    assert found
    for picked, _ in found:
        assert int(costs[np.arange(2000), picked].sum()) <= capacity


def _greedy_value(costs: np.ndarray, values: np.ndarray, capacity: int) -> float:
    """Start from the cheapest choices; take single-step upgrades by value gained per byte while they fit."""
    rows = np.arange(len(costs))
    level = np.zeros(len(costs), dtype=np.int64)
    room = capacity - int(costs[:, 0].sum())
    gain = (values[:, :-1] - values[:, 1:]) / np.maximum(np.diff(costs, axis=1), 1)
    for index in np.argsort(-gain, axis=None, kind="stable"):
        group, step = divmod(int(index), costs.shape[1] - 1)
        extra = int(costs[group, step + 1] - costs[group, step])
        if level[group] == step and extra <= room:
            level[group], room = step + 1, room - extra
    return float(values[rows, level].sum())


# --- the strategy -------------------------------------------------------------------------------


def _budget(costed: CostedSpace, fraction: float = FRACTION) -> int:
    return int(costed.dense_bytes * fraction)


def _run(
    strategy: Strategy,
    costed: CostedSpace,
    budget: int,
    *,
    study: optuna.Study | None = None,
    evaluator: SyntheticEvaluator | None = None,
    n_trials: int = 1000,
    batch_size: int = 4,
) -> tuple[optuna.Study, SyntheticEvaluator]:
    # Optuna's in-memory storage: the trials are the same as in a database, several times faster.
    study = study or optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    evaluator = evaluator or SyntheticEvaluator()
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    controller = Controller(
        strategy=strategy,
        ledger=ledger,
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluator,
        batch_size=batch_size,
    )
    controller.run(n_trials)
    return study, evaluator


def _integer(costed: CostedSpace, budget: int, **kwargs: object) -> IntegerProgramStrategy:
    return IntegerProgramStrategy(costed=costed, budget_bytes=budget, seed=0, **kwargs)  # type: ignore[arg-type]


def _n_measurements(costed: CostedSpace) -> int:
    """The base and one plan per group and non-base choice (all reachable at the budgets used)."""
    return 1 + sum(len(costed.space.choices(g)) - 1 for g in costed.groups)


@pytest.mark.parametrize("fraction", [0.35, 0.45, 0.7])
def test_finds_the_true_optimum_of_an_additive_objective(fraction: float) -> None:
    costed = CostedSpace(SearchSpace.bits_only(toy_profile(n_layers=2)), Workload(context=32))
    budget = _budget(costed, fraction)
    strategy = _integer(costed, budget)
    study, _ = _run(strategy, costed, budget)
    # synthetic_kl is a sum over units, so the brute force may price each group on its own.
    groups, space = costed.groups, costed.space
    dense = {g: costed.ordered(g)[-1] for g in groups}
    errors = [[synthetic_kl(space.plan_from_choices({**dense, g: c})) for c in _choices(costed, g)] for g in groups]
    costs = [[costed.cost(g, c) for c in _choices(costed, g)] for g in groups]
    best_value, _ = _brute_force(costs, errors, budget - costed.bytes_of({}))[0]
    # q and k projections of a layer weigh and cost the same, so the optimum may be one of twins.
    plan, predicted = strategy.solutions[0]
    assert predicted == pytest.approx(best_value, rel=1e-9, abs=1e-15)
    assert synthetic_kl(plan) == pytest.approx(best_value, rel=1e-9, abs=1e-15)
    assert study.best_value == pytest.approx(best_value, rel=1e-9, abs=1e-15)


def _choices(costed: CostedSpace, group: str) -> range:
    return range(len(costed.space.choices(group)))


def test_beats_uniform_and_tpe_on_a_skewed_objective(costed: CostedSpace) -> None:
    budget = _budget(costed)
    uniform, _ = _run(UniformStrategy(costed=costed, budget_bytes=budget), costed, budget)
    integer, evaluator = _run(_integer(costed, budget), costed, budget)
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True, n_startup_trials=10)
    tpe_study = optuna.create_study(direction="minimize", sampler=sampler)
    tpe = TPEStrategy(
        ledger=Ledger(study=tpe_study, space=costed.space, budget_bytes=budget),
        costed=costed,
        budget_bytes=budget,
        seed=0,
    )
    _run(tpe, costed, budget, study=tpe_study, n_trials=evaluator.calls, batch_size=1)
    assert integer.best_value < tpe_study.best_value < uniform.best_value
    logger.info("best KL: integer %g, tpe %g, uniform %g", integer.best_value, tpe_study.best_value, uniform.best_value)


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.6, 1.0])
def test_never_asks_a_plan_over_budget(costed: CostedSpace, fraction: float) -> None:
    budget = max(_budget(costed, fraction), costed.cheapest_bytes())
    strategy = _integer(costed, budget)
    study, evaluator = _run(strategy, costed, budget)
    assert evaluator.seen
    for plan in evaluator.seen:
        assert plan_bytes(costed.space.profile, plan, costed.workload) <= budget
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert strategy.solutions


def test_the_base_is_the_dearest_uniform_plan_that_fits(costed: CostedSpace) -> None:
    dense = {g: costed.ordered(g)[-1] for g in costed.groups}
    assert measurement_base(costed, costed.dense_bytes) == dense
    cheapest = {g: costed.ordered(g)[0] for g in costed.groups}
    assert measurement_base(costed, costed.cheapest_bytes() + 1) == cheapest
    budget = _budget(costed, 0.6)
    base = measurement_base(costed, budget)
    uniform = [costed.space.choices_of(p) for p in costed.space.uniform_plans()]
    assert base in uniform and costed.bytes_of(base) <= budget
    assert all(costed.bytes_of(u) <= costed.bytes_of(base) for u in uniform if costed.bytes_of(u) <= budget)


@pytest.mark.parametrize("fraction", [0.3, 0.35])
def test_raises_that_do_not_fit_are_measured_with_donors_exactly(costed: CostedSpace, fraction: float) -> None:
    budget = _budget(costed, fraction)
    strategy = _integer(costed, budget)
    _, evaluator = _run(strategy, costed, budget)
    base = costed.space.choices_of(strategy.base)
    # Raises from the base overflow the budget, so some measurements lower other groups to fit.
    lowered = [p for p in evaluator.seen[: _n_measurements(costed)] if _changed(costed, base, p) > 1]
    assert lowered
    assert all(plan_bytes(costed.space.profile, p, costed.workload) <= budget for p in evaluator.seen)
    assert set(strategy.excluded.values()) <= {"fits the budget in no plan"}
    # synthetic_kl adds up, so every entry, raise or not, is the single-group change from the base.
    for group, row in strategy.sensitivity.items():
        for choice, value in enumerate(row):
            if (group, choice) in strategy.excluded:
                continue
            single = synthetic_kl(costed.space.plan_from_choices({**base, group: choice})) - synthetic_kl(strategy.base)
            assert value == pytest.approx(single, rel=1e-9, abs=1e-15)


def _changed(costed: CostedSpace, base: dict[str, int], plan: Plan) -> int:
    return sum(1 for g, c in costed.space.choices_of(plan).items() if base[g] != c)


def test_choices_out_of_reach_are_excluded_not_measured(costed: CostedSpace) -> None:
    # Just above the cheapest plan: only the next-cheapest choice of each group can ever fit.
    steps = [costed.cost(g, o[1]) - costed.cost(g, o[0]) for g in costed.groups if len(o := costed.ordered(g)) > 1]
    budget = costed.cheapest_bytes() + 2 * max(steps)
    strategy = _integer(costed, budget)
    _, evaluator = _run(strategy, costed, budget)
    assert strategy.excluded
    assert set(strategy.excluded.values()) == {"fits the budget in no plan"}
    for group, choice in strategy.excluded:
        assert strategy.sensitivity[group][choice] is None
    assert len(evaluator.seen) < _n_measurements(costed)
    assert all(plan_bytes(costed.space.profile, p, costed.workload) <= budget for p in evaluator.seen)


def test_survives_failed_and_nan_sensitivities(costed: CostedSpace, caplog: pytest.LogCaptureFixture) -> None:
    budget = _budget(costed)
    strategy = _integer(costed, budget, n_solutions=3)
    evaluator = SyntheticEvaluator(fail_every=5, nan_every=7)
    with caplog.at_level(logging.WARNING, logger="budgetpress.search._integer"):
        study, _ = _run(strategy, costed, budget, evaluator=evaluator)
    reasons = [r for r in strategy.excluded.values() if r.startswith("measurement failed")]
    assert any("synthetic failure" in r for r in reasons)
    assert any("non-finite" in r for r in reasons)
    assert "excluding" in caplog.text
    for group, choice in strategy.excluded:
        assert strategy.sensitivity[group][choice] is None
    assert len(strategy.solutions) == 3
    for plan, _ in strategy.solutions:
        assert costed.bytes_of(costed.space.choices_of(plan)) <= budget
        assert not any(costed.space.choices_of(plan)[g] == c for g, c in strategy.excluded)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(t.user_attrs["fail_reason"] for t in failed)


class _BaseFails(SyntheticEvaluator):
    """Fails the first ``times`` evaluations of one plan."""

    def __init__(self, plan: Plan, times: int) -> None:
        super().__init__()
        self._plan, self._times = plan, times

    def __call__(self, plans: Sequence[Plan], *, max_tokens: int | None = None) -> list[Outcome]:
        outcomes = super().__call__(plans, max_tokens=max_tokens)
        for index, plan in enumerate(plans):
            if plan == self._plan and self._times > 0:
                self._times -= 1
                outcomes[index] = Outcome(failure="worker lost")
        return outcomes


@pytest.mark.parametrize("times", [1, 2])
def test_a_failed_base_is_asked_again_then_estimated(costed: CostedSpace, times: int) -> None:
    budget = _budget(costed, 0.6)
    strategy = _integer(costed, budget)
    _, evaluator = _run(strategy, costed, budget, evaluator=_BaseFails(strategy.base, times))
    assert [p.key for p in evaluator.seen].count(strategy.base.key) == 2
    assert strategy.base_fitness is not None
    if times == 1:
        assert strategy.base_fitness == pytest.approx(synthetic_kl(strategy.base))
    assert strategy.solutions


def test_same_seed_same_plans(costed: CostedSpace) -> None:
    budget = _budget(costed)
    first, second = _integer(costed, budget), _integer(costed, budget)
    _, one = _run(first, costed, budget)
    _, two = _run(second, costed, budget)
    assert [p.key for p in one.seen] == [p.key for p in two.seen]
    assert first.solutions == second.solutions
    assert first.sensitivity == second.sensitivity


def test_measures_at_its_fidelity_and_verifies_on_the_whole_split(costed: CostedSpace) -> None:
    budget = _budget(costed)
    strategy = _integer(costed, budget, measure_fidelity=256, n_solutions=2)
    _, evaluator = _run(strategy, costed, budget)
    n = _n_measurements(costed)
    assert evaluator.fidelities[:n] == [256] * n
    assert evaluator.fidelities[n:] == [None, None]
    assert [p.key for p in evaluator.seen[n:]] == [p.key for p, _ in strategy.solutions]
    assert all(value is not None for value in strategy.verified.values())


def test_resume_does_not_measure_again(costed: CostedSpace, tmp_path: object) -> None:
    budget = _budget(costed)
    storage = f"sqlite:///{tmp_path}/ip.db"
    study = open_study(storage=storage, name="ip", seed=0, strategy="integer")
    _, first = _run(_integer(costed, budget, study=study), costed, budget, study=study, n_trials=30)
    assert len(first.seen) == 30
    # A new process: the study loaded from the database, a new strategy rebuilt from its trials.
    loaded = optuna.load_study(study_name="ip", storage=storage)
    resumed = _integer(costed, budget, study=loaded, resume_from=loaded)
    _, second = _run(resumed, costed, budget, study=loaded)
    assert not {p.key for p in first.seen} & {p.key for p in second.seen}
    uninterrupted = _integer(costed, budget)
    _, whole = _run(uninterrupted, costed, budget)
    assert [p.key for p in first.seen + second.seen] == [p.key for p in whole.seen]
    assert resumed.solutions == uninterrupted.solutions
    record = loaded.user_attrs[SOLUTIONS_ATTR]
    assert [s["plan_key"] for s in record["solutions"]] == [p.key for p, _ in resumed.solutions]
    assert all(s["verified"] is not None for s in record["solutions"])


def test_resume_of_a_finished_search_asks_nothing(costed: CostedSpace) -> None:
    budget = _budget(costed)
    study, _ = _run(_integer(costed, budget), costed, budget)
    again = _integer(costed, budget, resume_from=study)
    assert again.ask(8) == []
    assert again.solutions and all(v is not None for v in again.verified.values())


def test_refuses_bad_settings_and_untold_plans(costed: CostedSpace) -> None:
    with pytest.raises(ValueError, match="n_solutions"):
        _integer(costed, _budget(costed), n_solutions=0)
    with pytest.raises(ValueError, match="smallest possible plan"):
        _integer(costed, costed.cheapest_bytes() - 1)
    strategy = _integer(costed, _budget(costed))
    plans = strategy.ask(2)
    with pytest.raises(RuntimeError, match="not yet told"):
        strategy.ask(1)
    strategy.tell(plans[0], Outcome(failure="x"))
    with pytest.raises(ValueError, match="not asked"):
        strategy.tell(plans[0], Outcome(failure="x"))


def test_a_joint_space_also_verifies_each_dimension_alone() -> None:
    dimensions = frozenset({Dimension.BITS, Dimension.SPARSITY})
    space = SearchSpace.for_dimensions(toy_profile(n_layers=2), dimensions, context=32)
    costed = CostedSpace(space, Workload(context=32))
    budget = _budget(costed, 0.4)
    strategy = _integer(costed, budget, n_solutions=2)
    _run(strategy, costed, budget)
    table = strategy.sensitivity
    capacity = budget - costed.bytes_of({})
    costs = [[costed.cost(g, c) for c in _choices(costed, g)] for g in costed.groups]
    solved = [costed.space.choices_of(plan) for plan, _ in strategy.solutions]
    for dimension in dimensions:
        within = [
            [
                v if v is not None and setting_dimensions(space.choices(g)[c]) <= {dimension} else math.inf
                for c, v in enumerate(table[g])
            ]
            for g in costed.groups
        ]
        cheapest = sum(
            min(c for c, v in zip(cost, row, strict=True) if v < math.inf)
            for cost, row in zip(costs, within, strict=True)
        )
        if dimension is Dimension.SPARSITY:  # sparsity alone cannot reach this budget: nothing to verify
            assert cheapest > capacity
            continue
        (picked, _), *_ = solve_mckp(costs, within, capacity)
        assert dict(zip(costed.groups, picked, strict=True)) in solved
    assert len(solved) == len({tuple(sorted(s.items())) for s in solved}) <= 2 + len(dimensions)
    assert all(value is not None for value in strategy.verified.values())


def test_a_joint_space_measures_its_bits_part_as_a_bits_only_search_does() -> None:
    profile = toy_profile(n_layers=2)
    bits_only = CostedSpace(SearchSpace.bits_only(profile), Workload(context=32))
    joint_space = SearchSpace.for_dimensions(profile, frozenset({Dimension.BITS, Dimension.RANK}), context=32)
    joint = CostedSpace(joint_space, Workload(context=32))
    budget = _budget(bits_only, 0.35)
    base_plan = bits_only.space.plan_from_choices(measurement_base(bits_only, budget))
    alone = _integer(bits_only, budget, base=bits_only.space.choices_of(base_plan))
    within = _integer(joint, budget, base=joint.space.choices_of(base_plan))
    _run(alone, bits_only, budget, evaluator=_InteractingSynthetic())
    _, joint_evaluator = _run(within, joint, budget, evaluator=_InteractingSynthetic())
    # The joint program lowers groups to low rank to make room where bits alone cannot.
    assert any(getattr(s, "rank", None) for p in joint_evaluator.seen for s in p.values())
    for group in bits_only.groups:
        for choice, setting in enumerate(bits_only.space.choices(group)):
            if alone.sensitivity[group][choice] is None:  # out of the bits-only space's reach
                continue
            same = joint.space.choices(group).index(setting)
            assert within.sensitivity[group][same] == pytest.approx(alone.sensitivity[group][choice], rel=1e-12)
    # ... so the joint program also verifies a plan as good as the bits-only program's optimum (by the
    # table: q and k projections weigh and cost the same, so that optimum may be either of twins).
    bits_plans = [predicted for plan, predicted in within.solutions if plan_dimensions(plan) <= {Dimension.BITS}]
    assert bits_plans and min(bits_plans) == pytest.approx(alone.solutions[0][1], rel=1e-12)


class _InteractingSynthetic(SyntheticEvaluator):
    """synthetic_kl with an interaction between low-bit units, so that donors' harm does not add up."""

    def __call__(self, plans: Sequence[Plan], *, max_tokens: int | None = None) -> list[Outcome]:
        outcomes = super().__call__(plans, max_tokens=max_tokens)
        for index, plan in enumerate(plans):
            result = outcomes[index].result
            assert result is not None
            low = sum(1 for s in plan.values() if getattr(s, "bits", 16) <= 3)
            outcomes[index] = Outcome(result=dataclasses.replace(result, kl=result.kl * (1 + 0.05 * low)))
        return outcomes
