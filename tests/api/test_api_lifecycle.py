"""Check 6: a Hypothesis state machine over the job lifecycle and trial commits, on SQLite and
PostgreSQL. Whatever the interleaving of submissions, cancels, claims by two runners, finishes,
lease expiries with reaping, result deliveries and late results, terminal states never change,
one (tenant, key) gives one job, and no plan key has two complete results."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule, run_state_machine_as_test
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy import delete, func, select, update

from budgetpress.api import Database, JobState, migrate
from budgetpress.api._auth import Caller, _tenant_id
from budgetpress.api._db import optuna_storage_url
from budgetpress.api._jobs import IdempotencyConflict, QuotaExceeded, cancel_job, request_hash, submit
from budgetpress.api._queue import claim, finish, reap
from budgetpress.api._tables import TERMINAL_STATES, ApiKey, IdempotencyRecord, Job, Tenant, utcnow
from budgetpress.api._trials import fail_running_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
RUNNERS = ("runner-a", "runner-b")
PLANS = ("plan-a", "plan-b", "plan-c")


def _machine(db: Database, storage: RDBStorage) -> type[RuleBasedStateMachine]:
    class Lifecycle(RuleBasedStateMachine):
        jobs = Bundle("jobs")

        def __init__(self) -> None:
            super().__init__()
            with db.writing() as session:
                for table in (IdempotencyRecord, Job, ApiKey, Tenant):
                    session.execute(delete(table))
            self.callers = [Caller(tenant_id=_tenant_id(db, name), tenant_name=name) for name in ("t0", "t1")]
            self.terminal: dict[str, str] = {}
            self.results: dict[tuple[str, int], float] = {}

        def _spec(self, seed: int) -> dict[str, Any]:
            return {"n_trials": 3, "seed": seed}

        @rule(target=jobs, tenant=st.integers(0, 1), key=st.sampled_from([None, "k1", "k2"]), seed=st.integers(0, 1))
        def submit(self, tenant: int, key: str | None, seed: int) -> Any:
            spec = self._spec(seed)
            try:
                job, _ = submit(db, self.callers[tenant], spec=spec, body_hash=request_hash(spec), key=key, quota=3)
            except (IdempotencyConflict, QuotaExceeded):
                return multiple()
            return (tenant, job.id)

        @rule(job=jobs)
        def cancel(self, job: tuple[int, str]) -> None:
            tenant, job_id = job
            assert cancel_job(db, self.callers[1 - tenant], job_id) is None  # never another tenant's
            cancel_job(db, self.callers[tenant], job_id)

        @rule(runner=st.sampled_from(RUNNERS))
        def claim(self, runner: str) -> None:
            claim(db, owner=runner, lease_s=60)

        @rule(job=jobs, runner=st.sampled_from(RUNNERS), state=st.sampled_from(sorted(TERMINAL_STATES)))
        def finish(self, job: tuple[int, str], runner: str, state: JobState) -> None:
            finish(db, job_id=job[1], owner=runner, state=state, reason="test")

        @rule()
        def leases_expire_and_reapers_race(self) -> None:
            with db.writing() as session:
                session.execute(
                    update(Job)
                    .where(Job.lease_expires_at.is_not(None))
                    .values(lease_expires_at=utcnow() - timedelta(1))
                )
            reap(db, max_attempts=2)
            reap(db, max_attempts=2)

        def _study(self, job_id: str) -> optuna.Study | None:
            with db.reading() as session:
                row = session.execute(select(Job.state, Job.study_name).where(Job.id == job_id)).one()
            if row.state != JobState.RUNNING.value:
                return None
            return optuna.create_study(storage=storage, study_name=row.study_name, load_if_exists=True)

        @rule(job=jobs, plan=st.sampled_from(PLANS), twice=st.booleans())
        def deliver_result(self, job: tuple[int, str], plan: str, twice: bool) -> None:
            """A result for (job, plan): told to the plan's one trial; a re-delivery is dropped."""
            study = self._study(job[1])
            if study is None:
                return
            trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("plan_key") == plan]
            if trials:
                number = trials[0].number
            else:
                trial = study.ask()
                trial.set_user_attr("plan_key", plan)
                number = trial.number
            for _ in range(2 if twice else 1):
                study.tell(number, float(PLANS.index(plan)), skip_if_finished=True)

        @rule(job=jobs, plan=st.sampled_from(PLANS))
        def late_result_after_lease_expiry(self, job: tuple[int, str], plan: str) -> None:
            study = self._study(job[1])
            if study is None or any(t.user_attrs.get("plan_key") == plan for t in study.trials):
                return
            trial = study.ask()
            trial.set_user_attr("plan_key", plan)
            fail_running_trials(storage, study.study_name, "lease expired")
            study.tell(trial.number, 0.5, skip_if_finished=True)  # dropped, not raised

        @invariant()
        def terminal_states_never_change(self) -> None:
            with db.reading() as session:
                rows = session.execute(select(Job.id, Job.state)).all()
            for row in rows:
                if row.id in self.terminal:
                    assert row.state == self.terminal[row.id]
                elif row.state in TERMINAL_STATES:
                    self.terminal[row.id] = row.state

        @invariant()
        def one_job_per_tenant_and_key(self) -> None:
            with db.reading() as session:
                counts = session.execute(
                    select(func.count())
                    .select_from(IdempotencyRecord)
                    .group_by(IdempotencyRecord.tenant_id, IdempotencyRecord.key)
                ).scalars()
                assert all(count == 1 for count in counts)

        @invariant()
        def one_complete_result_per_plan_key(self) -> None:
            for summary in storage.get_all_studies():
                trials = storage.get_all_trials(summary._study_id, deepcopy=False)
                complete = [t.user_attrs["plan_key"] for t in trials if t.state == TrialState.COMPLETE]
                assert len(complete) == len(set(complete))
                for trial in trials:
                    if trial.state.is_finished():
                        finished = (trial.state.name, trial.value)
                        assert self.results.setdefault((summary.study_name, trial.number), finished) == finished

    return Lifecycle


@pytest.mark.slow
def test_job_lifecycle_state_machine(db_url: str) -> None:
    db = Database.connect(db_url)
    migrate(db)
    storage = RDBStorage(optuna_storage_url(db_url))
    machine = _machine(db, storage)
    machine.TestCase.settings = settings(
        max_examples=20, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    try:
        run_state_machine_as_test(machine, settings=machine.TestCase.settings)
    finally:
        storage.engine.dispose()
        db.dispose()
