"""The runner's side of the jobs table: claim, renew leases, record progress, finish, reap.

Every change is a compare-and-set on the state (and the owner or lease it expects), so two runners
or two reapers racing change a job at most once, and terminal states never change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from budgetpress.api._db import Database
from budgetpress.api._jobs import JobRecord, to_record
from budgetpress.api._tables import Export, Job, JobState, utcnow

logger = logging.getLogger(__name__)

_HELD = (JobState.RUNNING.value, JobState.CANCELLING.value)


def claim(db: Database, *, owner: str, lease_s: float) -> JobRecord | None:
    """Take the oldest queued job: running, owned by ``owner``, attempt + 1, under a fresh lease."""
    with db.writing() as session:
        job_id = claim_oldest(session, Job, owner=owner, lease_s=lease_s)
        return None if job_id is None else to_record(session.get_one(Job, job_id, populate_existing=True))


def claim_oldest(session: Session, table: type[Job] | type[Export], *, owner: str, lease_s: float) -> str | None:
    """In ``session``, move the oldest queued row of a queue table (jobs, exports) to running, owned by
    ``owner``, attempt + 1, under a fresh lease; its id, or None when nothing is queued. (Both
    tables' state enums spell ``queued`` and ``running`` alike.)"""
    now = utcnow()
    # SKIP LOCKED on PostgreSQL; on SQLite the whole transaction holds the write lock.
    row_id = session.scalar(
        select(table.id)
        .where(table.state == "queued")
        .order_by(table.created_at, table.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if row_id is None:
        return None
    result = session.execute(
        update(table)
        .where(table.id == row_id, table.state == "queued")
        .values(
            state="running",
            owner=owner,
            attempts=table.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=now,
            updated_at=now,
        )
    )
    return row_id if getattr(result, "rowcount", 0) else None


def renew(db: Database, *, owner: str, job_ids: list[str], lease_s: float) -> dict[str, JobState]:
    """Extend the leases of ``owner``'s jobs; the state of each job it still holds."""
    if not job_ids:
        return {}
    now = utcnow()
    with db.writing() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.owner == owner, Job.state.in_(_HELD))
            .values(lease_expires_at=now + timedelta(seconds=lease_s))
        )
        rows = session.execute(
            select(Job.id, Job.state).where(Job.id.in_(job_ids), Job.owner == owner, Job.state.in_(_HELD))
        ).all()
    return {row.id: JobState(row.state) for row in rows}


def record_progress(db: Database, *, job_id: str, owner: str, **values: Any) -> JobState | None:
    """Write progress fields of a held job; its state, or None if ``owner`` no longer holds it."""
    with db.writing() as session:
        held = Job.id == job_id, Job.owner == owner, Job.state.in_(_HELD)
        session.execute(update(Job).where(*held).values(**values, updated_at=utcnow()))
        state = session.scalar(select(Job.state).where(*held))
    return None if state is None else JobState(state)


def finish(
    db: Database, *, job_id: str, owner: str, state: JobState, reason: str | None = None, report: Any = None
) -> JobState | None:
    """Move a held job to a terminal state; a success of a job being cancelled ends cancelled."""
    now = utcnow()
    values: dict[str, Any] = {"owner": None, "lease_expires_at": None, "updated_at": now, "finished_at": now}
    if report is not None:
        values["report_json"] = json.dumps(report, sort_keys=True)
    with db.writing() as session:
        held = Job.id == job_id, Job.owner == owner
        current = session.scalar(select(Job.state).where(*held, Job.state.in_(_HELD)))
        if current is None:
            return None
        final = JobState.CANCELLED if current == JobState.CANCELLING.value and state is JobState.SUCCEEDED else state
        reason = "cancelled" if final is JobState.CANCELLED else reason
        session.execute(
            update(Job).where(*held, Job.state == current).values(**values, state=final.value, failure_reason=reason)
        )
    return final


def release(db: Database, *, job_id: str, owner: str) -> None:
    """Give a held job back on shutdown: running → queued without spending an attempt."""
    now = utcnow()
    with db.writing() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.owner == owner, Job.state == JobState.RUNNING.value)
            .values(
                state=JobState.QUEUED.value,
                owner=None,
                lease_expires_at=None,
                attempts=Job.attempts - 1,
                updated_at=now,
            )
        )
    finish(db, job_id=job_id, owner=owner, state=JobState.CANCELLED)


@dataclass(frozen=True, kw_only=True)
class Reaped:
    job_id: str
    study_name: str
    state: JobState


def reap(db: Database, *, max_attempts: int) -> list[Reaped]:
    """Return jobs whose lease expired to the queue, or fail them past the attempt limit; a job
    being cancelled ends cancelled. Safe when several reapers run at once."""
    now = utcnow()
    reaped = []
    with db.writing() as session:
        rows = session.execute(
            select(Job.id, Job.state, Job.attempts, Job.lease_expires_at, Job.study_name).where(
                Job.state.in_(_HELD), Job.lease_expires_at < now
            )
        ).all()
        for row in rows:
            values = _reaped_values(row.state, row.attempts, max_attempts)
            result = session.execute(
                update(Job)
                .where(Job.id == row.id, Job.state == row.state, Job.lease_expires_at == row.lease_expires_at)
                .values(**values, owner=None, lease_expires_at=None, updated_at=now)
            )
            if getattr(result, "rowcount", 0):
                reaped.append(Reaped(job_id=row.id, study_name=row.study_name, state=JobState(values["state"])))
    for item in reaped:
        logger.warning("job %s: lease expired; now %s", item.job_id, item.state.value)
    return reaped


def _reaped_values(state: str, attempts: int, max_attempts: int) -> dict[str, Any]:
    now = utcnow()
    if state == JobState.CANCELLING.value:
        return {"state": JobState.CANCELLED.value, "failure_reason": "cancelled", "finished_at": now}
    if attempts >= max_attempts:
        reason = f"the job's runner was lost {attempts} times (attempt limit {max_attempts})"
        return {"state": JobState.FAILED.value, "failure_reason": reason, "finished_at": now}
    return {"state": JobState.QUEUED.value}
