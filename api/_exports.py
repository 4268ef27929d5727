"""The exports table: requests (one live export per job, trial and format), reads scoped to a job,
and the runner's side of it as a queue — claim, renew leases, finish, release, reap.

Every state change is a compare-and-set on the state (and the owner or lease it expects), as for
jobs: two runners or two reapers racing change an export at most once, and ``succeeded`` and
``failed`` never change. An export that lost its runner is run again from the start; that is safe
because an export directory is written atomically and the same trial gives the same files.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from budgetpress.api._db import Database
from budgetpress.api._queue import claim_oldest
from budgetpress.api._tables import Export, ExportState, Job, utcnow

logger = logging.getLogger(__name__)

_LIVE = Export.state != ExportState.FAILED.value


@dataclass(frozen=True, kw_only=True)
class ExportRecord:
    id: str
    job_id: str
    trial: str | int
    format: str
    state: ExportState
    trial_number: int | None
    failure_reason: str | None
    attempts: int
    owner: str | None
    lease_expires_at: datetime | None
    report: dict[str, Any] | None
    archive_bytes: int | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class ClaimedExport:
    """An export a runner holds, with the study its job's search wrote."""

    record: ExportRecord
    study_name: str


def trial_text(trial: str | int) -> str:
    """How a trial as asked is stored: ``best`` or the number in decimal."""
    return trial if isinstance(trial, str) else str(trial)


def _trial_value(text: str) -> str | int:
    return int(text) if text.isdecimal() else text


def to_export_record(row: Export) -> ExportRecord:
    return ExportRecord(
        id=row.id,
        job_id=row.job_id,
        trial=_trial_value(row.trial),
        format=row.format,
        state=ExportState(row.state),
        trial_number=row.trial_number,
        failure_reason=row.failure_reason,
        attempts=row.attempts,
        owner=row.owner,
        lease_expires_at=row.lease_expires_at,
        report=None if row.report_json is None else json.loads(row.report_json),
        archive_bytes=row.archive_bytes,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


# -- the API's side ------------------------------------------------------------------------------------------------


def live_export(db: Database, *, job_id: str, trial: str | int, export_format: str) -> ExportRecord | None:
    """The job's export of this trial and format that is queued, running or succeeded, if any."""
    with db.reading() as session:
        return _live(session, job_id, trial_text(trial), export_format)


def _live(session: Session, job_id: str, trial: str, export_format: str) -> ExportRecord | None:
    row = session.execute(
        select(Export).where(Export.job_id == job_id, Export.trial == trial, Export.format == export_format, _LIVE)
    ).scalar()
    return None if row is None else to_export_record(row)


def request_export(
    db: Database, *, job_id: str, trial: str | int, export_format: str, trial_number: int | None
) -> tuple[ExportRecord, bool]:
    """A new queued export, or the live one of the same (job, trial, format) and False. Concurrent
    requests make one export: the partial unique index refuses a second live row."""
    text = trial_text(trial)
    for attempt in range(2):
        try:
            with db.writing() as session:
                found = _live(session, job_id, text, export_format)
                if found is not None:
                    return found, False
                return _insert(session, job_id, text, export_format, trial_number), True
        except IntegrityError:
            if attempt:
                raise
            logger.info("export of job %s trial %s: a concurrent request made it; reading it back", job_id, text)
    raise AssertionError("unreachable")


def _insert(session: Session, job_id: str, trial: str, export_format: str, trial_number: int | None) -> ExportRecord:
    now = utcnow()
    row = Export(
        id=str(uuid.uuid4()),
        job_id=job_id,
        trial=trial,
        format=export_format,
        state=ExportState.QUEUED.value,
        trial_number=trial_number,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return to_export_record(row)


def get_export(db: Database, *, job_id: str, export_id: str) -> ExportRecord | None:
    """The export, if it is one of this job's (the job's tenancy is checked by the caller)."""
    with db.reading() as session:
        row = session.execute(select(Export).where(Export.id == export_id, Export.job_id == job_id)).scalar()
        return None if row is None else to_export_record(row)


def list_exports(db: Database, *, job_id: str, limit: int, offset: int) -> tuple[list[ExportRecord], int]:
    with db.reading() as session:
        total = session.scalar(select(func.count()).select_from(Export).where(Export.job_id == job_id)) or 0
        rows = session.execute(
            select(Export)
            .where(Export.job_id == job_id)
            .order_by(Export.created_at.desc(), Export.id)
            .limit(limit)
            .offset(offset)
        ).scalars()
        return [to_export_record(row) for row in rows], total


# -- the runner's side ---------------------------------------------------------------------------------------------


def claim_export(db: Database, *, owner: str, lease_s: float) -> ClaimedExport | None:
    """Take the oldest queued export: running, owned by ``owner``, attempt + 1, under a fresh lease."""
    with db.writing() as session:
        export_id = claim_oldest(session, Export, owner=owner, lease_s=lease_s)
        if export_id is None:
            return None
        row = session.get_one(Export, export_id, populate_existing=True)
        study_name = session.scalar(select(Job.study_name).where(Job.id == row.job_id))
        return ClaimedExport(record=to_export_record(row), study_name=str(study_name))


def _held(export_id: str, owner: str) -> tuple[Any, ...]:
    return Export.id == export_id, Export.owner == owner, Export.state == ExportState.RUNNING.value


def renew_exports(db: Database, *, owner: str, export_ids: list[str], lease_s: float) -> set[str]:
    """Extend the leases of ``owner``'s running exports; the ids it still holds."""
    if not export_ids:
        return set()
    held = Export.id.in_(export_ids), Export.owner == owner, Export.state == ExportState.RUNNING.value
    with db.writing() as session:
        session.execute(update(Export).where(*held).values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
        return set(session.scalars(select(Export.id).where(*held)))


def succeed_export(
    db: Database, *, export_id: str, owner: str, trial_number: int, report: dict[str, Any], archive_bytes: int
) -> bool:
    """Record a held export's result; False if ``owner`` no longer holds it (the result is dropped)."""
    return _finish(
        db,
        export_id,
        owner,
        state=ExportState.SUCCEEDED.value,
        trial_number=trial_number,
        report_json=json.dumps(report, sort_keys=True),
        archive_bytes=archive_bytes,
        failure_reason=None,
    )


def fail_export(db: Database, *, export_id: str, owner: str, reason: str) -> bool:
    """Fail a held export with its reason; False if ``owner`` no longer holds it."""
    return _finish(db, export_id, owner, state=ExportState.FAILED.value, failure_reason=reason)


def _finish(db: Database, export_id: str, owner: str, **values: Any) -> bool:
    now = utcnow()
    with db.writing() as session:
        result = session.execute(
            update(Export)
            .where(*_held(export_id, owner))
            .values(**values, owner=None, lease_expires_at=None, updated_at=now, finished_at=now)
        )
        return bool(getattr(result, "rowcount", 0))


def release_export(db: Database, *, export_id: str, owner: str) -> bool:
    """Give a held export back on shutdown: running → queued without spending an attempt."""
    with db.writing() as session:
        result = session.execute(
            update(Export)
            .where(*_held(export_id, owner))
            .values(
                state=ExportState.QUEUED.value,
                owner=None,
                lease_expires_at=None,
                attempts=Export.attempts - 1,
                updated_at=utcnow(),
            )
        )
        return bool(getattr(result, "rowcount", 0))


def reap_exports(db: Database, *, max_attempts: int) -> list[tuple[str, ExportState]]:
    """Return running exports whose lease expired to the queue, or fail them past the attempt limit.
    Safe when several reapers run at once."""
    now = utcnow()
    reaped = []
    with db.writing() as session:
        rows = session.execute(
            select(Export.id, Export.attempts, Export.lease_expires_at).where(
                Export.state == ExportState.RUNNING.value, Export.lease_expires_at < now
            )
        ).all()
        for row in rows:
            values = _reaped_values(row.attempts, max_attempts)
            result = session.execute(
                update(Export)
                .where(
                    Export.id == row.id,
                    Export.state == ExportState.RUNNING.value,
                    Export.lease_expires_at == row.lease_expires_at,
                )
                .values(**values, owner=None, lease_expires_at=None, updated_at=now)
            )
            if getattr(result, "rowcount", 0):
                reaped.append((row.id, ExportState(values["state"])))
    for export_id, state in reaped:
        logger.warning("export %s: lease expired; now %s", export_id, state.value)
    return reaped


def _reaped_values(attempts: int, max_attempts: int) -> dict[str, Any]:
    if attempts >= max_attempts:
        reason = f"the export's runner was lost {attempts} times (attempt limit {max_attempts})"
        return {"state": ExportState.FAILED.value, "failure_reason": reason, "finished_at": utcnow()}
    return {"state": ExportState.QUEUED.value}
