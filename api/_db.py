"""Engines and transactions: SQLite in WAL mode with a busy timeout and ``BEGIN IMMEDIATE`` writes,
PostgreSQL with ordinary pooled connections.

Reads and writes go through separate engines so that on SQLite a read never takes the write lock,
and every write transaction takes it at its start, where the busy timeout waits for it (a deferred
transaction upgraded to a write can fail at once with "database is locked").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def optuna_storage_url(url: str) -> str:
    """The URL the Optuna study is opened with: on SQLite with the same busy timeout as ours."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or "timeout" in parsed.query:
        return url
    return parsed.update_query_dict({"timeout": str(SQLITE_BUSY_TIMEOUT_MS // 1000)}).render_as_string(
        hide_password=False
    )


def _sqlite_engine(url: str, *, begin: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver opens no transactions; "begin" does
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


@dataclass(frozen=True, kw_only=True)
class Database:
    """The service's database: a read engine and a write engine (the same one on PostgreSQL)."""

    url: str
    read_engine: Engine
    write_engine: Engine

    @classmethod
    def connect(cls, url: str) -> Database:
        if is_sqlite(url):
            return cls(
                url=url,
                read_engine=_sqlite_engine(url, begin="BEGIN"),
                write_engine=_sqlite_engine(url, begin="BEGIN IMMEDIATE"),
            )
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        return cls(url=url, read_engine=engine, write_engine=engine)

    @property
    def sqlite(self) -> bool:
        return is_sqlite(self.url)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with Session(self.read_engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A Core connection in one read transaction: cheaper than a Session for hot reads."""
        with self.read_engine.connect() as connection, connection.begin():
            yield connection

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any error."""
        with Session(self.write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.read_engine.dispose()
        if self.write_engine is not self.read_engine:
            self.write_engine.dispose()
