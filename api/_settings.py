"""The service's settings: one pydantic model at the edge, read from flags and environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import make_url

ENV_PREFIX = "BUDGETPRESS_"
DATABASE_ENV = "BUDGETPRESS_DATABASE_URL"
EXPORTS_FOLDER = "budgetpress-exports"


def default_database_url() -> str:
    """A SQLite file in the working directory, as the CLI's search uses."""
    return f"sqlite:///{Path.cwd() / 'budgetpress.db'}"


class ServiceSettings(BaseModel):
    """Everything the API and the runner are configured with; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str = Field(default_factory=default_database_url, min_length=1)
    model_root: Path | None = None
    allowed_hub_ids: tuple[str, ...] = ()
    store_root: str | None = None
    export_root: Path | None = None
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 2**20)
    max_concurrent_jobs: int = Field(4, ge=1, le=1000)
    max_trials: int = Field(2000, ge=1, le=100_000)
    rate_per_s: float = Field(200.0, ge=0.0, le=100_000.0)
    rate_burst: int = Field(400, ge=1, le=1_000_000)
    lease_s: float = Field(30.0, gt=0.0, le=3600.0)
    max_attempts: int = Field(3, ge=1, le=100)
    runner_slots: int = Field(3, ge=1, le=64)
    workers_per_job: int = Field(1, ge=1, le=64)
    poll_s: float = Field(0.5, gt=0.0, le=60.0)
    seq_len: int = Field(512, ge=16, le=65536)
    calibration_sequences: int = Field(16, ge=1, le=4096)
    evaluation_sequences: int = Field(16, ge=1, le=4096)

    def export_dir(self) -> Path:
        """Where exports go (each in ``<dir>/<export id>/``): ``export_root``, else a folder
        ``budgetpress-exports`` beside a SQLite database file, else in the working directory."""
        if self.export_root is not None:
            return self.export_root.expanduser().resolve()
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            return Path(url.database).expanduser().resolve().parent / EXPORTS_FOLDER
        return Path.cwd().resolve() / EXPORTS_FOLDER

    @classmethod
    def from_env(cls, **overrides: Any) -> ServiceSettings:
        """Settings from ``BUDGETPRESS_*`` variables; explicit ``overrides`` (not None) win."""
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            raw = os.environ.get(DATABASE_ENV if name == "database_url" else ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            values[name] = _split(raw) if info.annotation == tuple[str, ...] else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())
