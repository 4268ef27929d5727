"""Alembic environment for the service's tables; run only through ``budgetpress.api.migrate``."""

from __future__ import annotations

from alembic import context

from budgetpress.api._tables import Base

VERSION_TABLE = "bp_alembic_version"  # Optuna keeps its own schema version in alembic_version


def _run() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


_run()
