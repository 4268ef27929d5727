"""Alembic migrations of the service's tables, run at start-up (safe when two processes start at once)."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from alembic import command
from alembic.config import Config
from sqlalchemy import text

from budgetpress.api._db import Database, optuna_storage_url

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_PG_LOCK_ID = 0x62707265  # "bpre": one migration at a time across processes


def migrate(db: Database) -> None:
    """Bring the service's tables to the newest revision and create Optuna's tables."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.write_engine.connect() as connection:
        if not db.sqlite:  # SQLite serialises through BEGIN IMMEDIATE; PostgreSQL through a lock
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            connection.commit()
        try:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
            # Optuna creates or checks its own tables when a storage opens.
            optuna.storages.RDBStorage(optuna_storage_url(db.url)).engine.dispose()
        finally:
            if not db.sqlite:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                connection.commit()
    logger.info("database %s is at the newest revision", db.write_engine.url.render_as_string(hide_password=True))
