"""Response bodies built from job records and their Optuna studies."""

from __future__ import annotations

from typing import Any

from budgetpress.api._db import Database
from budgetpress.api._jobs import JobRecord
from budgetpress.api._schemas import (
    BestOut,
    FrontierOut,
    FrontierPoint,
    JobOut,
    ProgressOut,
    TrialOut,
    TrialPage,
    WorkloadIn,
)
from budgetpress.api._tables import JobState
from budgetpress.api._trials import pareto_front
from budgetpress.api._trialsql import complete_points, plan_json_of
from budgetpress.api._trialsql import trial_page as trial_items


def job_out(job: JobRecord) -> JobOut:
    spec = job.spec
    return JobOut(
        id=job.id,
        state=job.state.value,
        model=spec["model"],
        budget=list(spec["budget"]),
        workload=WorkloadIn(**spec["workload"]),
        space=list(spec["space"]),
        methods=spec.get("methods"),
        strategy=spec["strategy"],
        n_trials=job.n_trials,
        seed=spec["seed"],
        grouping=spec["grouping"],
        progress=ProgressOut(trials_done=job.trials_done, n_trials=job.n_trials, best_kl=job.best_kl),
        stage=job.stage,
        failure_reason=job.failure_reason,
        attempts=job.attempts,
        study_name=job.study_name,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def trial_page(db: Database, job: JobRecord, *, limit: int, offset: int) -> TrialPage:
    """One page of the job's trials, read by SQL from its study's tables in one read transaction."""
    with db.read_connection() as session:
        items, total = trial_items(session, job.study_name, limit=limit, offset=offset)
    return TrialPage(items=[TrialOut(**item) for item in items], total=total, limit=limit, offset=offset)


def best_out(db: Database, job: JobRecord) -> BestOut | None:
    """The best plan of a succeeded job: its canonical plan JSON, labels and held-out metrics."""
    report = job.report or {}
    best = report.get("best")
    if job.state is not JobState.SUCCEEDED or not isinstance(best, dict) or "plan_key" not in best:
        return None
    return BestOut(
        job_id=job.id,
        plan_key=best["plan_key"],
        plan=_plan_json(db, job.study_name, best["plan_key"]),
        labels=dict(best.get("plan", {})),
        memory_bytes=best["memory_bytes"],
        budget_bytes=report["budget_bytes"],
        dense_bytes=report["dense_bytes"],
        kl=best["kl"],
        ppl=best["ppl"],
        uniform=dict(report.get("uniform", {})),
        dense=dict(report.get("dense", {})),
        report=report,
    )


def _plan_json(db: Database, study_name: str, plan_key: str) -> dict[str, Any]:
    with db.read_connection() as session:
        return plan_json_of(session, study_name, plan_key)


def frontier_out(db: Database, job: JobRecord) -> FrontierOut:
    """Complete trials not dominated in (memory, KL) so far; the frontier report once succeeded."""
    with db.read_connection() as session:
        front = pareto_front(complete_points(session, job.study_name))
    report = job.report or {}
    extra: dict[str, Any] = {k: report[k] for k in ("frontier", "pareto") if k in report}
    return FrontierOut(
        job_id=job.id,
        items=[FrontierPoint(**point) for point in front],
        report=extra or None,
    )
