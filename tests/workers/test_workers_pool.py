"""The pool on a real local Ray cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from budgetpress.search import Outcome
from budgetpress.space import LinearSetting, Plan, SearchSpace, Split, Workload
from budgetpress.workers import WorkerPool, WorkerSpec


def _spec(model_dir: Path) -> WorkerSpec:
    from budgetpress.evaluators import SessionSpec, TokenSpec, build_store, profile_source, resolve_model

    tokens = TokenSpec(seq_len=128, calibration_sequences=4, evaluation_sequences=4)
    session = SessionSpec(model=str(model_dir), workload=Workload(context=128), tokens=tokens)
    profile = profile_source(resolve_model(str(model_dir)))
    build_store(session, SearchSpace.bits_only(profile), progress=False)
    return WorkerSpec(session=session)


@pytest.fixture(scope="module")
def pool(micro_model_dir: Path) -> Iterator[WorkerPool]:
    with WorkerPool(_spec(micro_model_dir), n_workers=2) as started:
        yield started


def test_outcomes_come_back_in_order_from_both_workers(pool: WorkerPool, micro_model_dir: Path) -> None:
    from budgetpress.evaluators import profile_source, resolve_model

    units = profile_source(resolve_model(str(micro_model_dir))).linear_units
    plans = [Plan.uniform(units, linear=LinearSetting(bits=b, group_size=128)) for b in (2, 8, 3, 4)]
    outcomes = pool.evaluate(plans)
    kls = [o.result.kl for o in outcomes if o.result is not None]
    assert len(kls) == 4
    assert kls[0] > kls[2] > kls[3] > kls[1]
    assert {o.result.worker for o in outcomes if o.result is not None} == {"worker-0", "worker-1"}
    again = pool.evaluate(plans)
    assert [o.result.kl for o in again if o.result is not None] == kls


def test_failed_evaluation_is_a_failed_outcome_with_reason(pool: WorkerPool, micro_model_dir: Path) -> None:
    from budgetpress.evaluators import profile_source, resolve_model

    unit = profile_source(resolve_model(str(micro_model_dir))).linear_units[0].key
    good = Plan({unit: LinearSetting(bits=4, group_size=128)})
    bad = Plan({unit: LinearSetting(bits=4, rank=8)})  # not in the level store
    outcomes = pool.evaluate([bad, good], split=Split.EVALUATION)
    assert outcomes[0] == Outcome(failure=outcomes[0].failure)
    assert outcomes[0].failure is not None and "has no entry for unit" in outcomes[0].failure
    assert outcomes[1].result is not None and outcomes[1].result.split is Split.EVALUATION
