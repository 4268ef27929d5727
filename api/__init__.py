"""The REST service: jobs, trials and results over HTTP; auth and tenancy; the job runner."""

from budgetpress.api._app import create_app
from budgetpress.api._auth import Caller, create_key, revoke_key
from budgetpress.api._db import Database
from budgetpress.api._migrate import migrate
from budgetpress.api._models import ModelRefused, resolve_job_model
from budgetpress.api._runner import JobProgress, JobStopped, Runner
from budgetpress.api._serve import drop_key, new_key, open_database, run_runner, serve
from budgetpress.api._settings import ServiceSettings
from budgetpress.api._tables import JobState

__all__ = [
    "Caller",
    "Database",
    "JobProgress",
    "JobState",
    "JobStopped",
    "ModelRefused",
    "Runner",
    "ServiceSettings",
    "create_app",
    "create_key",
    "drop_key",
    "migrate",
    "new_key",
    "open_database",
    "resolve_job_model",
    "revoke_key",
    "run_runner",
    "serve",
]
