"""The contract every strategy keeps, run against each one through the real controller and study."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from budgetpress.search import (
    MEMORY_CONSTRAINT,
    STRATEGIES,
    Controller,
    CostedSpace,
    EvolutionaryStrategy,
    HybridStrategy,
    IntegerProgramStrategy,
    Ledger,
    RandomStrategy,
    Strategy,
    StrategySetup,
    TPEStrategy,
    UniformStrategy,
    best_plan,
    make_strategy,
    open_study,
)
from budgetpress.space import plan_bytes

from .conftest import SyntheticEvaluator, synthetic_kl

StrategyFactory = Callable[[Ledger, CostedSpace, int, int], Strategy]


def _tpe(ledger: Ledger, costed: CostedSpace, budget: int, seed: int) -> Strategy:
    return TPEStrategy(ledger=ledger, costed=costed, budget_bytes=budget, seed=seed)


def _uniform(ledger: Ledger, costed: CostedSpace, budget: int, seed: int) -> Strategy:
    return UniformStrategy(costed=costed, budget_bytes=budget)


def _evolution(ledger: Ledger, costed: CostedSpace, budget: int, seed: int) -> Strategy:
    # Small stages, so that a contract run of 16 trials goes through several generations.
    return EvolutionaryStrategy(
        costed=costed,
        budget_bytes=budget,
        seed=seed,
        study=ledger.study,
        offspring=4,
        stages=((64, 2), (None, 1)),
        n_random_starts=4,
    )


def _integer(ledger: Ledger, costed: CostedSpace, budget: int, seed: int) -> Strategy:
    # 16 trials are all measurements (65 here); its solved plans are checked in its own tests.
    return IntegerProgramStrategy(costed=costed, budget_bytes=budget, seed=seed, study=ledger.study)


def _random(ledger: Ledger, costed: CostedSpace, budget: int, seed: int) -> Strategy:
    return RandomStrategy(costed=costed, budget_bytes=budget, seed=seed)


def _hybrid(ledger: Ledger, costed: CostedSpace, budget: int, seed: int) -> Strategy:
    # 16 trials are all measurements here; the evolution phase is checked in its own tests.
    return HybridStrategy(
        costed=costed, budget_bytes=budget, seed=seed, study=ledger.study, offspring=4, stages=((64, 2), (None, 1))
    )


FACTORIES = {
    "tpe": _tpe,
    "uniform": _uniform,
    "evolution": _evolution,
    "integer": _integer,
    "random": _random,
    "hybrid": _hybrid,
}


def _run(
    name: str,
    costed: CostedSpace,
    *,
    seed: int = 0,
    n_trials: int = 16,
    fraction: float = 0.35,
    evaluator: SyntheticEvaluator | None = None,
    batch_size: int = 2,
) -> tuple[optuna.Study, SyntheticEvaluator]:
    evaluator = evaluator or SyntheticEvaluator()
    study = open_study(storage="sqlite:///:memory:", name=f"{name}-{seed}", seed=seed, strategy=name)
    budget = int(costed.dense_bytes * fraction)
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    strategy = FACTORIES[name](ledger, costed, budget, seed)
    Controller(
        strategy=strategy,
        ledger=ledger,
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluator,
        batch_size=batch_size,
    ).run(n_trials)
    return study, evaluator


@pytest.mark.parametrize("name", FACTORIES)
def test_never_dispatches_a_plan_over_budget(name: str, costed: CostedSpace) -> None:
    study, evaluator = _run(name, costed)
    budget = study.trials[0].user_attrs["budget_bytes"]
    assert evaluator.seen
    for plan in evaluator.seen:
        assert plan_bytes(costed.space.profile, plan, costed.workload) <= budget
    for trial in study.trials:
        assert trial.constraints[MEMORY_CONSTRAINT] <= 0


@pytest.mark.parametrize("name", FACTORIES)
def test_same_seed_same_plans(name: str, costed: CostedSpace) -> None:
    _, first = _run(name, costed, seed=7)
    _, second = _run(name, costed, seed=7)
    assert [p.key for p in first.seen] == [p.key for p in second.seen]


def test_different_seeds_explore_differently(costed: CostedSpace) -> None:
    _, first = _run("tpe", costed, seed=1)
    _, second = _run("tpe", costed, seed=2)
    assert [p.key for p in first.seen] != [p.key for p in second.seen]


@pytest.mark.parametrize("name", FACTORIES)
def test_survives_failed_and_nan_evaluations(name: str, costed: CostedSpace) -> None:
    study, _ = _run(name, costed, evaluator=SyntheticEvaluator(fail_every=3, nan_every=4), fraction=0.6)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.FAIL in states
    assert optuna.trial.TrialState.COMPLETE in states
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.FAIL:
            assert trial.user_attrs["fail_reason"]


def test_stops_at_its_trial_count(costed: CostedSpace) -> None:
    study, evaluator = _run("tpe", costed, n_trials=11, batch_size=4)
    assert len(study.trials) == 11 == evaluator.calls


def test_uniform_stops_when_exhausted(costed: CostedSpace) -> None:
    study, evaluator = _run("uniform", costed, n_trials=50, fraction=1.0)
    assert len(study.trials) == len(costed.space.uniform_plans()) == evaluator.calls


def test_every_trial_records_its_plan(costed: CostedSpace) -> None:
    study, _ = _run("tpe", costed, n_trials=6)
    for trial in study.trials:
        attrs = trial.user_attrs
        assert {"plan_json", "plan_key", "memory_bytes", "budget_bytes", "kl", "ppl", "strategy"} <= set(attrs)
        assert set(trial.params) == {g for g, _ in costed.space.groups()}
    plan, trial = best_plan(study)
    assert plan.key == trial.user_attrs["plan_key"]
    assert synthetic_kl(plan) == pytest.approx(trial.value)


def test_tpe_beats_uniform_on_a_sensitivity_skewed_objective(costed: CostedSpace) -> None:
    uniform, _ = _run("uniform", costed, n_trials=10)
    tpe, _ = _run("tpe", costed, n_trials=60, batch_size=1)
    assert tpe.best_value < uniform.best_value


def test_existing_study_name_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    open_study(storage=storage, name="s", seed=0, strategy="tpe")
    with pytest.raises(ValueError, match="already exists"):
        open_study(storage=storage, name="s", seed=0, strategy="tpe")


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_resumed_run_commits_no_result_twice(name: str, costed: CostedSpace, tmp_path: Path) -> None:
    """A search stopped and resumed on its study (the strategy rebuilt from its seed, as after a
    kill) evaluates no plan again at a fidelity the study holds a result for."""
    storage = f"sqlite:///{tmp_path / 'resume.db'}"
    budget = int(costed.dense_bytes * 0.35)
    evaluator = SyntheticEvaluator()
    for resume in (False, True):
        study = open_study(storage=storage, name="s", seed=0, strategy=name, resume=resume)
        ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
        setup = StrategySetup(resume=resume, stages=((64, 2), (None, 1)))
        strategy = make_strategy(name, ledger=ledger, costed=costed, budget_bytes=budget, seed=0, setup=setup)
        Controller(
            strategy=strategy,
            ledger=ledger,
            profile=costed.space.profile,
            workload=costed.workload,
            evaluate=evaluator,
            batch_size=2,
        ).run(8)
    complete = [
        (t.user_attrs["plan_key"], t.user_attrs["fidelity"])
        for t in optuna.load_study(study_name="s", storage=storage).trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]
    assert len(complete) == len(set(complete))
    evaluated = list(zip((p.key for p in evaluator.seen), evaluator.fidelities, strict=True))
    assert len(evaluated) == len(set(evaluated))


def test_a_plan_the_study_holds_is_told_not_evaluated(costed: CostedSpace) -> None:
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    budget = int(costed.dense_bytes * 0.5)
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    uniform = UniformStrategy(costed=costed, budget_bytes=budget)
    evaluator = SyntheticEvaluator()
    controller_args = {"ledger": ledger, "profile": costed.space.profile, "workload": costed.workload}
    Controller(strategy=uniform, evaluate=evaluator, batch_size=2, **controller_args).run(50)  # type: ignore[arg-type]
    calls = evaluator.calls
    again = UniformStrategy(costed=costed, budget_bytes=budget)
    records = Controller(strategy=again, evaluate=evaluator, batch_size=2, **controller_args).run(50)  # type: ignore[arg-type]
    assert records == [] and evaluator.calls == calls
    assert again.best is not None and again.best[1] == uniform.best[1]  # type: ignore[index]
    assert len(study.trials) == calls


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", FACTORIES)
def test_a_stop_before_a_batch_ends_the_run_with_nothing_left_running(name: str, costed: CostedSpace) -> None:
    study = open_study(storage="sqlite:///:memory:", name=f"stop-{name}", seed=0, strategy=name)
    budget = int(costed.dense_bytes * 0.35)
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    evaluator = SyntheticEvaluator()
    checks = [0]

    def stop_at_the_second_batch() -> None:
        checks[0] += 1
        if checks[0] == 2:
            raise _Stop

    controller = Controller(
        strategy=FACTORIES[name](ledger, costed, budget, 0),
        ledger=ledger,
        profile=costed.space.profile,
        workload=costed.workload,
        evaluate=evaluator,
        batch_size=2,
        before_batch=stop_at_the_second_batch,
    )
    with pytest.raises(_Stop):
        controller.run(16)
    assert checks[0] == 2
    assert 1 <= len(evaluator.seen) <= 2  # one batch of at most two plans
    assert all(t.state is optuna.trial.TrialState.COMPLETE for t in study.trials)
