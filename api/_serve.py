"""Process entry points: the service (API + runner), a runner alone, and key management."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from budgetpress.api._app import create_app
from budgetpress.api._auth import create_key, revoke_key
from budgetpress.api._db import Database
from budgetpress.api._migrate import migrate
from budgetpress.api._runner import Runner
from budgetpress.api._settings import ServiceSettings

logger = logging.getLogger(__name__)


def open_database(settings: ServiceSettings) -> Database:
    """Connect and migrate: every entry point runs the migrations before anything else."""
    db = Database.connect(settings.database_url)
    migrate(db)
    return db


def serve(settings: ServiceSettings, *, host: str, port: int, with_runner: bool = True) -> None:
    """Reap and re-attach unfinished jobs, then serve the API until SIGINT/SIGTERM."""
    db = open_database(settings)
    runner = Runner(db=db, settings=settings) if with_runner else None
    if runner is not None:
        runner.start()
    try:
        uvicorn.run(create_app(settings, db), host=host, port=port, log_config=None, access_log=False)
    finally:
        if runner is not None:
            runner.stop()
        db.dispose()


def run_runner(settings: ServiceSettings) -> None:
    """A runner alone, until SIGINT/SIGTERM; several may share a PostgreSQL queue."""
    db = open_database(settings)
    runner = Runner(db=db, settings=settings)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping the runner", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    runner.start()
    stop.wait()
    runner.stop()
    db.dispose()


def new_key(settings: ServiceSettings, tenant: str) -> str:
    db = open_database(settings)
    try:
        return create_key(db, tenant)
    finally:
        db.dispose()


def drop_key(settings: ServiceSettings, raw: str) -> bool:
    db = open_database(settings)
    try:
        return revoke_key(db, raw)
    finally:
        db.dispose()
