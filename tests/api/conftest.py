"""The service against real databases: SQLite files and PostgreSQL (a fresh schema per test)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from fastapi.testclient import TestClient

from budgetpress.api import Database, ServiceSettings, create_app, create_key, migrate

from ..conftest import POSTGRES_URL


def postgres_reachable() -> bool:
    try:
        with sqlalchemy.create_engine(POSTGRES_URL).connect():
            return True
    except sqlalchemy.exc.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_available() -> bool:
    return postgres_reachable()


def _pg_schema_url(schema: str) -> str:
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_available: bool) -> Iterator[str]:
    """A PostgreSQL URL whose every table lives in a schema of its own, dropped afterwards."""
    if not pg_available:
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    schema = f"bp_test_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_schema_url(schema)
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'service.db'}"


@pytest.fixture(scope="session")
def model_root(micro_model_dir: Path) -> Path:
    """The folder that holds the micro model; jobs name the model by its folder name."""
    return micro_model_dir.parent


@dataclass
class Service:
    """An app on a migrated database, with a key per tenant; requests go through a real ASGI client."""

    settings: ServiceSettings
    db: Database
    client: TestClient
    keys: dict[str, str] = field(default_factory=dict)

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            self.keys[tenant] = create_key(self.db, tenant)
        return self.keys[tenant]

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(tenant)}"}

    def submit(self, tenant: str, body: dict[str, Any], **headers: str) -> Any:
        return self.client.post("/v1/jobs", json=body, headers={**self.auth(tenant), **headers})


def service_settings(url: str, model_root: Path, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "database_url": url,
        "model_root": model_root,
        "seq_len": 128,
        "calibration_sequences": 4,
        "evaluation_sequences": 4,
        **overrides,
    }
    return ServiceSettings(**values)


def make_service(url: str, model_root: Path, **overrides: Any) -> Service:
    settings = service_settings(url, model_root, **overrides)
    db = Database.connect(url)
    migrate(db)
    return Service(settings=settings, db=db, client=TestClient(create_app(settings, db)))


@pytest.fixture
def service(db_url: str, model_root: Path) -> Iterator[Service]:
    made = make_service(db_url, model_root)
    yield made
    made.db.dispose()


def runner_job(**overrides: Any) -> dict[str, Any]:
    """A job the runner tests run for real: the built-in model (its byte-level tokens are read at
    once; the micro model's tokenizer encodes the whole corpus in each worker), RTN weights (no
    calibration pass), 128-token windows (the service settings above)."""
    return job_body("builtin", **{"methods": "bits=rtn", "budget": "40%", **overrides})


def job_body(model: str, **overrides: Any) -> dict[str, Any]:
    """A small job on the micro model."""
    body: dict[str, Any] = {
        "model": model,
        "budget": "60%",
        "workload": {"batch": 1, "context": 128},
        "strategy": "random",
        "n_trials": 3,
        "seed": 1,
    }
    body.update(overrides)
    return body
