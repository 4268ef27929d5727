"""Exports of a succeeded job's trial: request one, read it, list them, download it as a tar.

Mount with ``app.include_router(exports_router)``; the routes use the app's context, auth and
tenancy (another tenant's job is 404, as on every job route). The runner does the exporting.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import optuna
from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import FileResponse

from budgetpress.api._app import _JOB, Context, Owned, Page, _errors, _json
from budgetpress.api._export_runs import archive_path
from budgetpress.api._export_schemas import ExportCreate, ExportOut, ExportPage, export_out
from budgetpress.api._exports import ExportRecord, get_export, list_exports, live_export, request_export
from budgetpress.api._jobs import JobRecord
from budgetpress.api._tables import ExportState, JobState
from budgetpress.workers import study_session
from budgetpress.workers._export_job import select_trial

logger = logging.getLogger(__name__)

exports_router = APIRouter(tags=["exports"])

_TAR: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the export directory as one uncompressed tar archive",
    }
}
_EXISTING: dict[int | str, dict[str, Any]] = {
    200: {"model": ExportOut, "description": "an export of this trial and format was already asked for: that one"}
}


@exports_router.post(
    "/v1/jobs/{job_id}/exports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExportOut,
    responses={**_EXISTING, **_errors(*_JOB, 400, 409, 413)},
    summary="Export a trial of a succeeded job",
)
def create_export(body: ExportCreate, ctx: Context, owned: Owned, response: Response) -> ExportOut:
    """Queue an export (202); the same trial and format again answers the export already queued,
    running or succeeded (200); a failed one is tried anew. 422 for a trial that is not a complete
    evaluated plan."""
    if owned.state is not JobState.SUCCEEDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job is {owned.state.value}; only a succeeded job can be exported"
        )
    found = live_export(ctx.db, job_id=owned.id, trial=body.trial, export_format=body.format.value)
    if found is None:
        number = _checked_trial(ctx, owned, body.trial)
        found, created = request_export(
            ctx.db, job_id=owned.id, trial=body.trial, export_format=body.format.value, trial_number=number
        )
        if created:
            logger.info("export %s queued: job %s, trial %s, %s", found.id, owned.id, body.trial, body.format.value)
            return export_out(found)
    response.status_code = status.HTTP_200_OK
    return export_out(found)


def _checked_trial(ctx: Context, job: JobRecord, trial: str | int) -> int:
    """The number of the trial to export; 422 with the reason when it cannot be exported."""
    try:
        study = optuna.load_study(storage=ctx.storage, study_name=job.study_name)
        study_session(study)
        return select_trial(study, trial).number
    except KeyError:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the job's study does not exist") from None
    except ValueError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, " ".join(str(error).split())) from None


@exports_router.get(
    "/v1/jobs/{job_id}/exports", response_model=ExportPage, responses=_errors(*_JOB), summary="A job's exports"
)
def exports(ctx: Context, owned: Owned, page: Page) -> Response:
    records, total = list_exports(ctx.db, job_id=owned.id, limit=page.limit, offset=page.offset)
    return _json(ExportPage(items=[export_out(r) for r in records], total=total, limit=page.limit, offset=page.offset))


def _export_of(ctx: Context, job: JobRecord, export_id: uuid.UUID) -> ExportRecord:
    record = get_export(ctx.db, job_id=job.id, export_id=str(export_id))
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such export")
    return record


@exports_router.get(
    "/v1/jobs/{job_id}/exports/{export_id}",
    response_model=ExportOut,
    responses=_errors(*_JOB),
    summary="An export",
)
def export(ctx: Context, owned: Owned, export_id: uuid.UUID) -> Response:
    return _json(export_out(_export_of(ctx, owned, export_id)))


@exports_router.get(
    "/v1/jobs/{job_id}/exports/{export_id}/download",
    response_class=Response,
    responses={**_TAR, **_errors(*_JOB, 409, 410)},
    summary="Download an export as a tar archive",
)
def download(ctx: Context, owned: Owned, export_id: uuid.UUID) -> Response:
    """The export directory (its files and manifest.json under one folder named by the export id)
    as one uncompressed tar, once the export succeeded (409 before)."""
    record = _export_of(ctx, owned, export_id)
    if record.state is not ExportState.SUCCEEDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"export is {record.state.value}; it can be downloaded once it succeeded"
        )
    root = ctx.settings.export_dir()
    path = archive_path(root, record.id)
    if not path.resolve().is_relative_to(root) or not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, "the export's archive is no longer on this server")
    return FileResponse(
        path,
        media_type="application/x-tar",
        filename=f"budgetpress-export-{record.id}.tar",
        headers={"Cache-Control": "no-store"},
    )
