"""The evolutionary strategy (mutation, multi-stage selection, elitism, restart) and the controller's
per-plan fidelities, on the synthetic objective."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
import pytest

from budgetpress.search import (
    Controller,
    CostedSpace,
    EvolutionaryStrategy,
    Ledger,
    Outcome,
    Strategy,
    TPEStrategy,
    UniformStrategy,
    best_plan,
    fit_to_budget,
    open_study,
)
from budgetpress.search._evolution import GENERATION_ATTR, STATE_ATTR, mutate
from budgetpress.space import Dimension, Plan, Result, SearchSpace, Workload

from .conftest import SyntheticEvaluator, noisy_kl, synthetic_kl, toy_profile

STAGES = ((64, 4), (256, 2), (None, 1))
FRACTION = 0.35


def _budget(costed: CostedSpace, fraction: float = FRACTION) -> int:
    return int(costed.dense_bytes * fraction)


def _study(seed: int = 0) -> optuna.Study:
    # In-memory storage: these runs are long, and the contract suite covers the database path.
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="minimize")


def _run(
    costed: CostedSpace,
    *,
    n_trials: int,
    seed: int = 0,
    batch_size: int = 4,
    evaluator: SyntheticEvaluator | None = None,
    study: optuna.Study | None = None,
    **options: Any,
) -> tuple[optuna.Study, SyntheticEvaluator, EvolutionaryStrategy]:
    evaluator = evaluator or SyntheticEvaluator()
    study = study or _study(seed)
    budget = _budget(costed)
    options = {"offspring": 8, "stages": STAGES, "n_random_starts": 8, **options}
    strategy = EvolutionaryStrategy(costed=costed, budget_bytes=budget, seed=seed, study=study, **options)
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    Controller(
        strategy=strategy,
        ledger=ledger,
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluator,
        batch_size=batch_size,
    ).run(n_trials)
    return study, evaluator, strategy


def _generations(study: optuna.Study) -> list[dict[str, Any]]:
    """The per-generation records, in generation order."""
    records = []
    generation = 0
    while GENERATION_ATTR.format(generation) in study.user_attrs:
        records.append(study.user_attrs[GENERATION_ATTR.format(generation)])
        generation += 1
    return records


def _joint_costed() -> CostedSpace:
    dimensions = frozenset({Dimension.BITS, Dimension.SPARSITY, Dimension.RANK})
    space = SearchSpace.for_dimensions(toy_profile(), dimensions, context=32)
    return CostedSpace(space, Workload(context=32))


@pytest.mark.parametrize("joint", [False, True])
def test_mutation_keeps_the_budget_and_changes_the_plan(costed: CostedSpace, joint: bool) -> None:
    costed = _joint_costed() if joint else costed
    budget = _budget(costed)
    rng = np.random.default_rng(0)
    parent = fit_to_budget(costed, {g: costed.ordered(g)[-1] for g in costed.groups}, budget, rng)
    for _ in range(200):
        child = mutate(costed, parent, budget, rng)
        total = costed.bytes_of(child)
        assert total <= budget
        lowered = [g for g in costed.groups if _level(costed, child, g) < _level(costed, parent, g)]
        assert lowered  # every child lowers some group, so it differs from the parent
        # The fill leaves the child on the budget: a one-level upgrade that still fits is one of
        # a lowered group, which the fill must not raise back.
        for group in set(costed.groups) - set(lowered):
            order = costed.ordered(group)
            level = order.index(child[group])
            if level + 1 < len(order):
                assert total - costed.cost(group, child[group]) + costed.cost(group, order[level + 1]) > budget
        bare = mutate(costed, parent, budget, rng, fill=False)
        assert costed.bytes_of(bare) <= budget
        assert bare != parent


def _level(costed: CostedSpace, choices: dict[str, int], group: str) -> int:
    return costed.ordered(group).index(choices[group])


def test_same_seed_same_run_and_seeds_differ(costed: CostedSpace) -> None:
    runs = [_run(costed, n_trials=60, seed=seed)[1] for seed in (3, 3, 4)]
    keys = [[(p.key, f) for p, f in zip(run.seen, run.fidelities, strict=True)] for run in runs]
    assert keys[0] == keys[1]
    assert keys[0] != keys[2]


def test_offspring_are_screened_at_low_fidelity_and_survivors_at_higher(costed: CostedSpace) -> None:
    # One batch per stage, so each evaluator call is one stage of one generation.
    study, evaluator, _ = _run(costed, n_trials=300, batch_size=64)
    assert {t.user_attrs["fidelity"] for t in study.trials} == {64, 256, None}
    counts = Counter(evaluator.fidelities)
    assert counts[64] > counts[256] > counts[None] > 0
    # Each (plan, fidelity) is evaluated once: the parent joins the last stage with its known fitness.
    pairs = Counter((p.key, f) for p, f in zip(evaluator.seen, evaluator.fidelities, strict=True))
    assert max(pairs.values()) == 1
    screened = 0
    for (low, first), (high, second) in zip(evaluator.batches, evaluator.batches[1:], strict=False):
        if (low, high) == (64, 256) and len(first) >= 4:
            # Survivors come from the top 4 at 64 tokens; known children can only push the bar lower.
            bar = sorted(noisy_kl(p, 64) for p in first)[3]
            assert all(noisy_kl(p, 64) <= bar for p in second)
            assert len(second) <= 4
            screened += 1
    assert screened >= 5


def test_the_parent_never_gets_worse(costed: CostedSpace) -> None:
    study, _, strategy = _run(costed, n_trials=250)
    records = _generations(study)
    assert len(records) >= 5
    fitness = [r["fitness"] for r in records]
    assert all(b <= a for a, b in itertools.pairwise(fitness))
    assert fitness[-1] < fitness[0]
    assert sum(r["improved"] for r in records[1:]) >= 1
    # The parent's fitness is a full-fidelity one: the exact objective, not a noisy screen.
    assert strategy.parent is not None
    plan, value = strategy.parent
    assert value == pytest.approx(synthetic_kl(plan))
    assert study.user_attrs[STATE_ATTR]["parent_fitness"] == pytest.approx(value)


def test_beats_random_and_uniform_on_a_skewed_objective(costed: CostedSpace) -> None:
    n_trials = 300
    study, _, _ = _run(costed, n_trials=n_trials, seed=1, batch_size=8, offspring=16, stages=((64, 4), (None, 1)))
    evolved = best_plan(study)[1].value
    budget = _budget(costed)
    rng = np.random.default_rng(1)
    random_best = min(
        synthetic_kl(costed.space.plan_from_choices(fit_to_budget(costed, _random_choices(costed, rng), budget, rng)))
        for _ in range(n_trials)
    )
    uniform = UniformStrategy(costed=costed, budget_bytes=budget)
    uniform_best = min(synthetic_kl(p) for p in uniform.ask(100))
    assert evolved is not None
    assert evolved < 0.8 * random_best
    assert evolved < 0.8 * uniform_best


def _random_choices(costed: CostedSpace, rng: np.random.Generator) -> dict[str, int]:
    return {g: int(rng.integers(len(costed.space.choices(g)))) for g in costed.groups}


def test_survives_failed_and_nan_evaluations(costed: CostedSpace) -> None:
    study, _, strategy = _run(costed, n_trials=150, evaluator=SyntheticEvaluator(fail_every=3, nan_every=5))
    assert len(study.trials) == 150
    assert strategy.generation > 2
    assert strategy.parent is not None and math.isfinite(strategy.parent[1])
    plan, trial = best_plan(study)
    assert trial.value == pytest.approx(synthetic_kl(plan))


def test_runs_to_its_trial_count_when_every_evaluation_fails(costed: CostedSpace) -> None:
    study, evaluator, strategy = _run(costed, n_trials=40, evaluator=SyntheticEvaluator(fail_every=1))
    assert len(study.trials) == 40 == evaluator.calls
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
    assert strategy.generation >= 1


def test_stops_at_its_trial_count(costed: CostedSpace) -> None:
    study, evaluator, _ = _run(costed, n_trials=11, batch_size=4)
    assert len(study.trials) == 11 == evaluator.calls


def test_stops_after_its_generations(costed: CostedSpace) -> None:
    study, _, strategy = _run(costed, n_trials=1000, generations=2)
    assert len(_generations(study)) == 3  # the start and two generations
    assert len(study.trials) < 1000
    assert strategy.ask(4) == []


def test_initial_plans_join_the_last_stage(costed: CostedSpace) -> None:
    uniform = UniformStrategy(costed=costed, budget_bytes=_budget(costed)).ask(1)[0]
    _, evaluator, _ = _run(costed, n_trials=30, initial_plans=[uniform], batch_size=64)
    assert [f for p, f in zip(evaluator.seen, evaluator.fidelities, strict=True) if p.key == uniform.key] == [None]


def test_resume_continues_where_the_run_stopped(costed: CostedSpace) -> None:
    first, _, _ = _run(costed, n_trials=70, seed=5)
    state = first.user_attrs[STATE_ATTR]
    second, evaluator, _ = _run(costed, n_trials=70, seed=5, resume_from=first)
    resumed = {int(k.rsplit(".", 1)[1]): v for k, v in second.user_attrs.items() if k.startswith("evolution.gen")}
    assert min(resumed) == state["generation"]
    # What the first run evaluated is reused, not evaluated again.
    done = {(t.user_attrs["plan_key"], t.user_attrs["fidelity"]) for t in first.trials}
    assert not done & {(p.key, f) for p, f in zip(evaluator.seen, evaluator.fidelities, strict=True)}
    # And the resumed run picks the parents the uninterrupted run picks.
    whole, _, _ = _run(costed, n_trials=140, seed=5)
    uninterrupted = _generations(whole)
    common = [g for g in resumed if g < len(uninterrupted)]
    assert common
    assert [resumed[g]["parent_key"] for g in common] == [uninterrupted[g]["parent_key"] for g in common]


def test_resume_from_a_study_without_state_starts_over(costed: CostedSpace) -> None:
    _, evaluator, strategy = _run(costed, n_trials=10, resume_from=_study())
    assert strategy.generation == 0 and evaluator.calls == 10


def test_refuses_bad_settings_and_untold_plans(costed: CostedSpace) -> None:
    budget = _budget(costed)
    for stages in [(), ((64, 4), (None, 2)), ((None, 4), (None, 1)), ((256, 4), (64, 1)), ((64, 0), (None, 1))]:
        with pytest.raises(ValueError):
            EvolutionaryStrategy(costed=costed, budget_bytes=budget, seed=0, stages=stages)
    with pytest.raises(ValueError, match="start needs"):
        EvolutionaryStrategy(costed=costed, budget_bytes=budget, seed=0, n_random_starts=0)
    strategy = EvolutionaryStrategy(costed=costed, budget_bytes=budget, seed=0, stages=STAGES)
    asked = strategy.ask(2)
    with pytest.raises(RuntimeError, match="not yet told"):
        strategy.ask(2)
    with pytest.raises(ValueError, match="not asked"):
        strategy.tell(Plan({}), Outcome(failure="x"))
    assert strategy.fidelity(asked[0]) == 64


class _FixedFidelities(Strategy):
    """Asks the given plans once, each at its given fidelity."""

    name = "fixed"

    def __init__(self, plans: Sequence[tuple[Plan, int | None]]) -> None:
        self._plans = list(plans)
        self._fidelity = {plan.key: fidelity for plan, fidelity in plans}
        self.told: list[tuple[Plan, Outcome]] = []

    def ask(self, n: int) -> list[Plan]:
        asked, self._plans = self._plans[:n], self._plans[n:]
        return [plan for plan, _ in asked]

    def fidelity(self, plan: Plan) -> int | None:
        return self._fidelity[plan.key]

    def tell(self, plan: Plan, outcome: Outcome) -> None:
        self.told.append((plan, outcome))


def _distinct_plans(costed: CostedSpace, n: int) -> list[Plan]:
    rng = np.random.default_rng(0)
    plans: dict[str, Plan] = {}
    while len(plans) < n:
        choices = fit_to_budget(costed, _random_choices(costed, rng), _budget(costed), rng)
        plan = costed.space.plan_from_choices(choices)
        plans[plan.key] = plan
    return list(plans.values())


def test_controller_evaluates_a_batch_in_one_call_per_fidelity(costed: CostedSpace) -> None:
    p = _distinct_plans(costed, 4)
    strategy = _FixedFidelities([(p[0], 64), (p[1], None), (p[2], 64), (p[3], 128)])
    evaluator = SyntheticEvaluator(fail_every=4)
    study = _study()
    ledger = Ledger(study=study, space=costed.space, budget_bytes=_budget(costed))
    Controller(
        strategy=strategy,
        ledger=ledger,
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluator,
        batch_size=4,
    ).run(4)
    assert evaluator.batches == [(64, [p[0], p[2]]), (None, [p[1]]), (128, [p[3]])]
    assert [plan for plan, _ in strategy.told] == p
    results = [outcome.result for _, outcome in strategy.told]
    assert [r.fidelity if r else None for r in results] == [64, None, 64, None]
    # The fourth call (p[3]) failed; its trial still says which fidelity it was asked at.
    assert [t.user_attrs["fidelity"] for t in study.trials] == [64, None, 64, 128]
    assert study.trials[3].state == optuna.trial.TrialState.FAIL


@pytest.mark.parametrize("name", ["tpe", "uniform"])
def test_single_fidelity_strategies_call_a_plans_only_evaluator(costed: CostedSpace, name: str) -> None:
    calls: list[int] = []

    def evaluate(plans: Sequence[Plan]) -> list[Outcome]:
        calls.append(len(plans))
        return SyntheticEvaluator()(plans)

    study = open_study(storage="sqlite:///:memory:", name=name, seed=0, strategy=name)
    budget = _budget(costed, 1.0)
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    strategy: Strategy = (
        TPEStrategy(ledger=ledger, costed=costed, budget_bytes=budget, seed=0)
        if name == "tpe"
        else UniformStrategy(costed=costed, budget_bytes=budget)
    )
    Controller(
        strategy=strategy,
        ledger=ledger,
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluate,
        batch_size=2,
    ).run(4)
    assert calls == [2, 2]
    assert all(t.user_attrs["fidelity"] is None for t in study.trials)


def _record(ledger: Ledger, plan: Plan, kl: float, fidelity: int | None) -> None:
    trial = ledger.open(plan, memory_bytes=0, strategy="test", fidelity=fidelity)
    result = Result(kl=kl, ppl=math.exp(kl), memory_bytes=0, tokens=1, seconds=0.0, fidelity=fidelity)
    ledger.close(trial, Outcome(result=result))


def test_best_plan_prefers_full_fidelity_trials(costed: CostedSpace) -> None:
    p = _distinct_plans(costed, 4)
    ledger = Ledger(study=_study(), space=costed.space, budget_bytes=_budget(costed))
    _record(ledger, p[0], 0.01, 64)  # lucky at low fidelity: does not compare with full ones
    _record(ledger, p[1], 0.50, 1024)
    assert best_plan(ledger.study)[0] == p[1]  # no full trial yet: the largest token budget
    _record(ledger, p[2], 0.30, None)
    _record(ledger, p[3], 0.20, None)
    plan, trial = best_plan(ledger.study)
    assert plan == p[3] and trial.value == pytest.approx(0.20)


def test_best_plan_without_a_complete_trial_is_an_error() -> None:
    with pytest.raises(ValueError, match="no feasible complete trial"):
        best_plan(_study())
