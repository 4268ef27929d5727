"""The hybrid (integer program seeding evolution), the random baseline, the factory by name, and
searches for several budgets sharing one study."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import optuna
import pytest

from budgetpress.search import (
    STRATEGIES,
    Controller,
    CostedSpace,
    HybridStrategy,
    IntegerProgramStrategy,
    Ledger,
    Outcome,
    RandomStrategy,
    Strategy,
    StrategySetup,
    best_plan,
    known_fitness_of,
    make_strategy,
    measurement_base,
    open_study,
    scoped,
)
from budgetpress.search._evolution import STATE_ATTR
from budgetpress.search._integer import SOLUTIONS_ATTR
from budgetpress.space import LinearSetting, Plan, plan_bytes

from .conftest import SyntheticEvaluator, noisy_kl, synthetic_kl

STAGES = ((256, 2), (None, 1))


def _budget(costed: CostedSpace, fraction: float = 0.35) -> int:
    return int(costed.dense_bytes * fraction)


def _run(
    strategy: Strategy,
    costed: CostedSpace,
    budget: int,
    *,
    study: optuna.Study,
    n_trials: int,
    evaluator: SyntheticEvaluator | None = None,
) -> SyntheticEvaluator:
    evaluator = evaluator or SyntheticEvaluator()
    Controller(
        strategy=strategy,
        ledger=Ledger(study=study, space=costed.space, budget_bytes=budget),
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluator,
        batch_size=4,
    ).run(n_trials)
    return evaluator


def _memory_study() -> optuna.Study:
    return optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))


def _hybrid(costed: CostedSpace, budget: int, study: optuna.Study, **options: object) -> HybridStrategy:
    return HybridStrategy(
        costed=costed, budget_bytes=budget, seed=0, study=study, offspring=6, stages=STAGES, **options
    )  # type: ignore[arg-type]


def _n_measurements(costed: CostedSpace) -> int:
    return 1 + sum(len(costed.space.choices(g)) - 1 for g in costed.groups)


def test_hybrid_seeds_evolution_with_the_verified_integer_plans(costed: CostedSpace) -> None:
    budget = _budget(costed)
    study = _memory_study()
    hybrid = _hybrid(costed, budget, study)
    evaluator = _run(hybrid, costed, budget, study=study, n_trials=_n_measurements(costed) + 4 + 40)
    assert hybrid.evolution is not None
    verified = {p.key: hybrid.integer.verified[p.key] for p, _ in hybrid.integer.solutions}
    best_verified = min(verified.values(), key=lambda v: math.inf if v is None else v)
    parent = hybrid.evolution.parent
    assert parent is not None
    # Elitism from the integer program's best plan: evolution never ends worse than it began.
    assert parent[1] <= best_verified
    # No plan is evaluated twice at one fidelity: the verified plans enter evolution as known.
    asked = list(zip((p.key for p in evaluator.seen), evaluator.fidelities, strict=True))
    assert len(asked) == len(set(asked))
    assert any(f == STAGES[0][0] for f in evaluator.fidelities)  # evolution ran its stages
    for plan in evaluator.seen:
        assert plan_bytes(costed.space.profile, plan, costed.workload) <= budget


def _non_additive_kl(plan: Plan) -> float:
    """``synthetic_kl`` plus an interaction: two neighbouring low-bit layers hurt more together,
    which single-unit sensitivities cannot see."""
    low = sorted(
        int(key.split(".")[2])
        for key, s in plan.items()
        if isinstance(s, LinearSetting) and s.bits <= 3 and "q_proj" in key
    )
    pairs = sum(1 for a, b in itertools.pairwise(low) if b == a + 1)
    return synthetic_kl(plan) * (1.0 + 0.5 * pairs)


class _InteractingEvaluator(SyntheticEvaluator):
    def __call__(self, plans: Sequence[Plan], *, max_tokens: int | None = None) -> list[Outcome]:
        outcomes = super().__call__(plans, max_tokens=max_tokens)
        fixed = []
        for plan, outcome in zip(plans, outcomes, strict=True):
            assert outcome.result is not None
            factor = _non_additive_kl(plan) / synthetic_kl(plan) if synthetic_kl(plan) else 1.0
            kl = noisy_kl(plan, max_tokens) * factor
            fixed.append(Outcome(result=dataclasses.replace(outcome.result, kl=kl)))
        return fixed


def test_hybrid_is_never_worse_than_the_integer_program_alone(costed: CostedSpace) -> None:
    budget = _budget(costed, 0.3)
    alone_study, hybrid_study = _memory_study(), _memory_study()
    alone = IntegerProgramStrategy(costed=costed, budget_bytes=budget, seed=0)
    _run(alone, costed, budget, study=alone_study, n_trials=10_000, evaluator=_InteractingEvaluator())
    hybrid = _hybrid(costed, budget, hybrid_study)
    _run(
        hybrid,
        costed,
        budget,
        study=hybrid_study,
        n_trials=len(alone_study.trials) + 120,
        evaluator=_InteractingEvaluator(),
    )
    assert best_plan(hybrid_study)[1].value <= best_plan(alone_study)[1].value


def test_hybrid_resumes_without_measuring_again(costed: CostedSpace, tmp_path: object) -> None:
    budget = _budget(costed)
    storage = f"sqlite:///{tmp_path}/hybrid.db"
    n_first = _n_measurements(costed) + 4 + 12
    study = open_study(storage=storage, name="h", seed=0, strategy="hybrid")
    first = _run(_hybrid(costed, budget, study), costed, budget, study=study, n_trials=n_first)
    loaded = open_study(storage=storage, name="h", seed=0, strategy="hybrid", resume=True)
    assert STATE_ATTR in loaded.user_attrs and SOLUTIONS_ATTR in loaded.user_attrs
    resumed = _hybrid(costed, budget, loaded, resume_from=loaded)
    second = _run(resumed, costed, budget, study=loaded, n_trials=12)
    measured = {p.key for p in first.seen[: _n_measurements(costed)]}
    assert not measured & {p.key for p in second.seen}
    assert resumed.evolution is not None and resumed.evolution.generation > 1


def test_resuming_a_study_that_does_not_exist_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="no study 'missing'"):
        open_study(storage=f"sqlite:///{tmp_path}/x.db", name="missing", seed=0, strategy="tpe", resume=True)


def test_random_plans_are_distinct_within_budget_and_fill_it(costed: CostedSpace) -> None:
    budget = _budget(costed)
    strategy = RandomStrategy(costed=costed, budget_bytes=budget, seed=3)
    plans = strategy.ask(40)
    assert len({p.key for p in plans}) == 40
    cheapest_step = min(
        costed.cost(g, b) - costed.cost(g, a)
        for g in costed.groups
        for a, b in zip(costed.ordered(g), costed.ordered(g)[1:], strict=False)
    )
    for plan in plans:
        used = costed.bytes_of(costed.space.choices_of(plan))
        assert budget - cheapest_step < used <= budget or _no_upgrade_fits(costed, plan, budget)


def _no_upgrade_fits(costed: CostedSpace, plan: Plan, budget: int) -> bool:
    choices = costed.space.choices_of(plan)
    used = costed.bytes_of(choices)
    for group in costed.groups:
        order = costed.ordered(group)
        level = order.index(choices[group])
        if (
            level + 1 < len(order)
            and used - costed.cost(group, choices[group]) + costed.cost(group, order[level + 1]) <= budget
        ):
            return False
    return True


def test_random_stops_when_the_space_is_used_up(costed: CostedSpace) -> None:
    cheapest = costed.cheapest_bytes()
    strategy = RandomStrategy(costed=costed, budget_bytes=cheapest, seed=0, max_attempts=50)
    assert len(strategy.ask(5)) == 1  # only the cheapest plan fits
    assert strategy.ask(5) == []


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_named_strategy_is_made_and_asks_within_budget(name: str, costed: CostedSpace) -> None:
    budget = _budget(costed)
    study = _memory_study()
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    strategy = make_strategy(name, ledger=ledger, costed=costed, budget_bytes=budget, seed=0, setup=StrategySetup())
    plans = strategy.ask(3)
    assert plans
    assert all(costed.bytes_of(costed.space.choices_of(p)) <= budget for p in plans)


def test_an_unknown_strategy_name_is_refused(costed: CostedSpace) -> None:
    ledger = Ledger(study=_memory_study(), space=costed.space, budget_bytes=_budget(costed))
    with pytest.raises(ValueError, match="unknown strategy 'annealing'; accepted: tpe, evolution"):
        make_strategy("annealing", ledger=ledger, costed=costed, budget_bytes=1, seed=0, setup=StrategySetup())


def test_budgets_sharing_one_study_share_measurements_and_keep_their_state_apart(costed: CostedSpace) -> None:
    budgets = [_budget(costed, f) for f in (0.3, 0.4)]
    study = _memory_study()
    base = measurement_base(costed, min(budgets))
    seen: list[SyntheticEvaluator] = []
    for budget in budgets:
        ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
        setup = StrategySetup(scope=f"budget.{budget}", base=base, known_fitness=known_fitness_of(study), stages=STAGES)
        strategy = make_strategy("hybrid", ledger=ledger, costed=costed, budget_bytes=budget, seed=0, setup=setup)
        seen.append(_run(strategy, costed, budget, study=study, n_trials=_n_measurements(costed) + 40))
    first_measured = {p.key for p in seen[0].seen[: _n_measurements(costed)]}
    assert not first_measured & {p.key for p in seen[1].seen}  # the second budget measured nothing again
    for budget in budgets:
        assert scoped(SOLUTIONS_ATTR, f"budget.{budget}") in study.user_attrs
        assert scoped(STATE_ATTR, f"budget.{budget}") in study.user_attrs
        _, trial = best_plan(study, budget_bytes=budget)
        assert trial.user_attrs["memory_bytes"] <= budget
    assert best_plan(study, budget_bytes=budgets[1])[1].value <= best_plan(study, budget_bytes=budgets[0])[1].value


def test_tpe_after_the_integer_program_projects_its_asks_with_the_measured_table(costed: CostedSpace) -> None:
    budget = _budget(costed, 0.3)
    study = _memory_study()
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    warm = HybridStrategy(costed=costed, budget_bytes=budget, seed=0, study=study, then="tpe", ledger=ledger)
    evaluator = _InteractingEvaluator()
    Controller(
        strategy=warm,
        ledger=ledger,
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluator,
        batch_size=1,
    ).run(_n_measurements(costed) + 4 + 30)
    assert warm.tpe is not None
    verified = [v for v in warm.integer.verified.values() if v is not None]
    first_tpe = _n_measurements(costed) + 4
    tpe_trials = [t for t in study.trials[first_tpe:] if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(tpe_trials) >= 20
    # TPE's asks were projected onto the budget by the table, not left where TPE drew them.
    assert any(t.user_attrs.get("repaired") for t in tpe_trials)
    for trial in tpe_trials:
        assert trial.user_attrs["memory_bytes"] <= budget
    assert all(plan_bytes(costed.space.profile, p, costed.workload) <= budget for p in evaluator.seen)
    assert best_plan(study)[1].value <= min(verified)
