"""The jobs table as a queue of records: submission (idempotent, within quota), reads scoped to one
tenant, and cancellation. Every state change is a compare-and-set on the current state; terminal
states never change.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from budgetpress.api._auth import Caller, caller_of, key_digest, key_query_by_param
from budgetpress.api._db import Database
from budgetpress.api._tables import ACTIVE_STATES, IdempotencyRecord, Job, JobState, Tenant, utcnow


class IdempotencyConflict(ValueError):
    """The same Idempotency-Key was used with a different request body."""


class QuotaExceeded(Exception):
    """The tenant already has its quota of unfinished jobs."""


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    id: str
    tenant_id: int
    state: JobState
    spec: dict[str, Any]
    study_name: str
    n_trials: int
    trials_done: int
    best_kl: float | None
    stage: str | None
    failure_reason: str | None
    attempts: int
    owner: str | None
    lease_expires_at: datetime | None
    report: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def to_record(row: Job | SimpleNamespace) -> JobRecord:
    return JobRecord(
        id=row.id,
        tenant_id=row.tenant_id,
        state=JobState(row.state),
        spec=json.loads(row.spec_json),
        study_name=row.study_name,
        n_trials=row.n_trials,
        trials_done=row.trials_done,
        best_kl=row.best_kl,
        stage=row.stage,
        failure_reason=row.failure_reason,
        attempts=row.attempts,
        owner=row.owner,
        lease_expires_at=row.lease_expires_at,
        report=None if row.report_json is None else json.loads(row.report_json),
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def study_name_for(tenant_name: str, job_id: str) -> str:
    return f"bp-{tenant_name}-{job_id}"


def submit(
    db: Database, caller: Caller, *, spec: dict[str, Any], body_hash: str, key: str | None, quota: int
) -> tuple[JobRecord, bool]:
    """The job for this submission and whether it is new; an existing one for a replayed key."""
    for attempt in range(2):
        try:
            with db.writing() as session:
                return _submit(session, caller, spec=spec, body_hash=body_hash, key=key, quota=quota, db=db)
        except IntegrityError:
            if attempt:  # a concurrent submission with the same key won the insert; read it back
                raise
    raise AssertionError("unreachable")


def _submit(
    session: Session, caller: Caller, *, spec: dict[str, Any], body_hash: str, key: str | None, quota: int, db: Database
) -> tuple[JobRecord, bool]:
    if not db.sqlite:  # serialise this tenant's submissions (SQLite's BEGIN IMMEDIATE already does)
        session.execute(select(Tenant.id).where(Tenant.id == caller.tenant_id).with_for_update())
    if key is not None:
        existing = session.execute(
            select(IdempotencyRecord).where(
                IdempotencyRecord.tenant_id == caller.tenant_id, IdempotencyRecord.key == key
            )
        ).scalar_one_or_none()
        if existing is not None:
            if existing.request_hash != body_hash:
                raise IdempotencyConflict("this Idempotency-Key was already used with a different request body")
            return to_record(session.get_one(Job, existing.job_id)), False
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == caller.tenant_id, Job.state.in_([s.value for s in ACTIVE_STATES]))
    )
    if (active or 0) >= quota:
        raise QuotaExceeded(f"tenant has {active} unfinished jobs; the quota is {quota}")
    now = utcnow()
    job_id = str(uuid.uuid4())
    row = Job(
        id=job_id,
        tenant_id=caller.tenant_id,
        state=JobState.QUEUED.value,
        spec_json=json.dumps(spec, sort_keys=True),
        study_name=study_name_for(caller.tenant_name, job_id),
        n_trials=int(spec["n_trials"]),
        trials_done=0,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    if key is not None:
        session.add(
            IdempotencyRecord(
                tenant_id=caller.tenant_id, key=key, request_hash=body_hash, job_id=job_id, created_at=now
            )
        )
        session.flush()
    return to_record(row), True


_JOBS = Job.__table__
_CALLER_AND_JOB = (
    key_query_by_param()
    .add_columns(*(column.label(f"job_{column.name}") for column in _JOBS.columns))
    .outerjoin(_JOBS, (_JOBS.c.tenant_id == Tenant.id) & (_JOBS.c.id == bindparam("job_id")))
)


def caller_and_job(db: Database, raw_key: str, job_id: str) -> tuple[Caller | None, JobRecord | None]:
    """Authenticate a key and read the caller's job in one prepared query (the hot path of every
    job route); (None, None) for a bad key, and no job for one that does not exist or belongs to
    another tenant."""
    digest = key_digest(raw_key)
    if digest is None:
        return None, None
    with db.read_connection() as connection:
        row = connection.execute(_CALLER_AND_JOB, {"digest": digest, "job_id": job_id}).first()
    caller = caller_of(row, digest)
    if caller is None or row is None or row.job_id is None:
        return caller, None
    mapping = row._mapping
    return caller, to_record(SimpleNamespace(**{c.name: mapping[f"job_{c.name}"] for c in _JOBS.columns}))


def get_job(db: Database, caller: Caller, job_id: str) -> JobRecord | None:
    """The caller's job; None for a job that does not exist or belongs to another tenant."""
    with db.reading() as session:
        row = session.execute(select(Job).where(Job.id == job_id, Job.tenant_id == caller.tenant_id)).scalar()
        return None if row is None else to_record(row)


def list_jobs(db: Database, caller: Caller, *, limit: int, offset: int) -> tuple[list[JobRecord], int]:
    with db.reading() as session:
        total = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == caller.tenant_id)) or 0
        rows = session.execute(
            select(Job)
            .where(Job.tenant_id == caller.tenant_id)
            .order_by(Job.created_at.desc(), Job.id)
            .limit(limit)
            .offset(offset)
        ).scalars()
        return [to_record(row) for row in rows], total


def cancel_job(db: Database, caller: Caller, job_id: str) -> JobRecord | None:
    """Queued → cancelled; running → cancelling (the runner finishes it); otherwise unchanged."""
    now = utcnow()
    with db.writing() as session:
        owned = Job.id == job_id, Job.tenant_id == caller.tenant_id
        session.execute(
            update(Job)
            .where(*owned, Job.state == JobState.QUEUED.value)
            .values(state=JobState.CANCELLED.value, failure_reason="cancelled", updated_at=now, finished_at=now)
        )
        session.execute(
            update(Job)
            .where(*owned, Job.state == JobState.RUNNING.value)
            .values(state=JobState.CANCELLING.value, updated_at=now)
        )
        row = session.execute(select(Job).where(*owned)).scalar()
        return None if row is None else to_record(row)
