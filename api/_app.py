"""The FastAPI application: versioned routes under /v1, bearer-key auth, strict models, exact schemas."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from optuna.storages import RDBStorage
from pydantic import BaseModel
from sqlalchemy import text

from budgetpress._version import __version__
from budgetpress.api._auth import Caller, authenticate
from budgetpress.api._db import Database, optuna_storage_url
from budgetpress.api._jobs import (
    IdempotencyConflict,
    JobRecord,
    QuotaExceeded,
    caller_and_job,
    cancel_job,
    list_jobs,
    request_hash,
    submit,
)
from budgetpress.api._limits import BodyLimit, RateLimiter
from budgetpress.api._requests import job_spec
from budgetpress.api._results import best_out, frontier_out, job_out, trial_page
from budgetpress.api._schemas import (
    BestOut,
    ErrorOut,
    FrontierOut,
    HealthOut,
    JobCreate,
    JobOut,
    JobPage,
    PageQuery,
    TrialPage,
)
from budgetpress.api._settings import ServiceSettings
from budgetpress.evaluators import ModelLoadError

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="an API key made by `budgetpress keys create`")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in codes}


_AUTH = (401, 422, 429)
_JOB = (*_AUTH, 404)
Page = Annotated[PageQuery, Query()]


class _Context:
    """What the routes share: the database, settings, the Optuna storage (plots) and the limiter."""

    def __init__(self, db: Database, settings: ServiceSettings) -> None:
        self.db = db
        self.settings = settings
        self.storage = RDBStorage(optuna_storage_url(db.url), skip_table_creation=True)
        self.limiter = RateLimiter(rate=settings.rate_per_s, burst=settings.rate_burst)


def _unauthorized() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
    )


async def _ctx(request: Request) -> _Context:
    ctx: _Context = request.app.state.ctx
    return ctx


Context = Annotated[_Context, Depends(_ctx)]


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _admit(ctx: _Context, found: Caller | None) -> Caller:
    """401 without an active key; 429 past the tenant's rate."""
    if found is None:
        raise _unauthorized()
    if not ctx.limiter.allow(found.tenant_id):
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many requests", headers={"Retry-After": "1"})
    return found


def _caller(ctx: Context, credentials: Credentials) -> Caller:
    return _admit(ctx, None if credentials is None else authenticate(ctx.db, credentials.credentials))


Who = Annotated[Caller, Depends(_caller)]


async def _owned_job(request: Request, ctx: Context, job_id: uuid.UUID, credentials: Credentials) -> JobRecord:
    """The caller's job, key and job read in one query; the caller is left on ``request.state.caller``.

    It runs on the event loop, as do the routes polled most (a job, its trials): each is one or a
    few indexed reads of bounded size, which on SQLite in WAL mode never wait for a writer, and a
    hop to a worker thread per request cost more than the reads (bench/api_load.py, 20 clients:
    p95 107 ms with the hops, 38 ms without).
    """
    if credentials is None:
        raise _unauthorized()
    found, job = caller_and_job(ctx.db, credentials.credentials, str(job_id))
    request.state.caller = _admit(ctx, found)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such job")
    return job


Owned = Annotated[JobRecord, Depends(_owned_job)]


def create_app(settings: ServiceSettings, db: Database | None = None) -> FastAPI:
    """The service's app; migrations must have run on ``settings.database_url`` (see ``migrate``)."""
    ctx = _Context(db or Database.connect(settings.database_url), settings)
    app = FastAPI(title="budgetpress", version=__version__, description="Compression search for language models.")
    app.state.ctx = ctx
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _install_handlers(app)
    _system_routes(app)
    _job_routes(app)
    # Imported here: the plot and export routes use this module's dependencies (context, auth, job lookup).
    from budgetpress.api._exports_routes import exports_router
    from budgetpress.api._plots_routes import plots_router

    app.include_router(plots_router)
    app.include_router(exports_router)
    return app


def _system_routes(app: FastAPI) -> None:
    @app.get("/healthz", response_model=HealthOut, tags=["system"], responses=_errors(503))
    def healthz(ctx: Context) -> HealthOut:
        with ctx.db.reading() as session:
            session.execute(text("SELECT 1"))
        return HealthOut(status="ok")


def _job_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/jobs",
        status_code=status.HTTP_201_CREATED,
        response_model=JobOut,
        tags=["jobs"],
        responses=_errors(*_AUTH, 400, 413),
    )
    def create_job(
        body: JobCreate,
        who: Who,
        ctx: Context,
        response: Response,
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[!-~]+$")
        ] = None,
    ) -> JobOut:
        try:
            spec = job_spec(body, ctx.settings)
            job, created = submit(
                ctx.db,
                who,
                spec=spec,
                body_hash=request_hash(body.model_dump(mode="json")),
                key=idempotency_key,
                quota=ctx.settings.max_concurrent_jobs,
            )
        except QuotaExceeded as error:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(error), headers={"Retry-After": "5"}) from error
        except (IdempotencyConflict, ModelLoadError, ValueError) as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, _one_line(error)) from error
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return job_out(job)

    @app.get("/v1/jobs", response_model=JobPage, tags=["jobs"], responses=_errors(*_AUTH))
    def jobs(ctx: Context, who: Who, page: Page) -> JobPage:
        records, total = list_jobs(ctx.db, who, limit=page.limit, offset=page.offset)
        return JobPage(items=[job_out(r) for r in records], total=total, limit=page.limit, offset=page.offset)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=_errors(*_JOB))
    async def job(owned: Owned) -> Response:  # no I/O left: it runs on the event loop, not in a thread
        return _json(job_out(owned))

    @app.get("/v1/jobs/{job_id}/trials", response_model=TrialPage, tags=["jobs"], responses=_errors(*_JOB))
    async def trials(ctx: Context, owned: Owned, page: Page) -> Response:
        return _json(trial_page(ctx.db, owned, limit=page.limit, offset=page.offset))

    @app.get("/v1/jobs/{job_id}/best", response_model=BestOut, tags=["jobs"], responses=_errors(*_JOB, 409))
    def best(ctx: Context, owned: Owned) -> BestOut:
        found = best_out(ctx.db, owned)
        if found is None:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"job is {owned.state.value}; the best plan comes with success"
            )
        return found

    @app.get("/v1/jobs/{job_id}/frontier", response_model=FrontierOut, tags=["jobs"], responses=_errors(*_JOB))
    def frontier(ctx: Context, owned: Owned) -> FrontierOut:
        return frontier_out(ctx.db, owned)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], responses=_errors(*_JOB, 413))
    def cancel(request: Request, ctx: Context, owned: Owned) -> JobOut:
        record = cancel_job(ctx.db, request.state.caller, owned.id)
        if record is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such job")
        return job_out(record)


def _json(body: BaseModel) -> Response:
    """A response model already validated, serialised once (the routes polled most skip FastAPI's
    second validation of what they return; ``response_model`` still documents them)."""
    return Response(content=body.model_dump_json(), media_type="application/json")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_text(error.errors())}, status_code=422)


def _validation_text(errors: Sequence[Any]) -> str:
    parts = []
    for item in errors[:10]:
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:2000]
