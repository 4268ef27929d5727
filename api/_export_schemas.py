"""Request and response models of the export routes: strict (unknown fields refused), numbers ranged."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from budgetpress.api._exports import ExportRecord
from budgetpress.evaluators import ExportFormat

MAX_TRIAL_NUMBER = 1_000_000


def _whole(value: Any) -> Any:
    """JSON's 3.0 is the integer 3 (as JSON Schema says); strings and booleans stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


TrialNumber = Annotated[StrictInt, Field(ge=0, le=MAX_TRIAL_NUMBER), BeforeValidator(_whole)]
ExportStateName = Literal["queued", "running", "succeeded", "failed"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExportCreate(_Strict):
    """Which trial of a succeeded job to export, and how."""

    trial: Literal["best"] | TrialNumber = Field(
        "best", description="'best' (the search's best feasible trial) or a complete trial's number"
    )
    format: ExportFormat = Field(
        ExportFormat.NATIVE,
        description="'native' (every dimension; budgetpress.load_compressed reads it) or 'compressed-tensors' "
        "(plain transformers and vLLM read it; weight bits only)",
    )


class ExportFileOut(_Strict):
    path: str
    bytes: int
    sha256: str


class ExportOut(_Strict):
    """An export; its files and figures once it succeeded."""

    id: str
    job_id: str
    trial: Literal["best"] | int = Field(description="the trial as asked")
    trial_number: int | None = Field(description="the trial exported, once known")
    format: ExportFormat
    state: ExportStateName
    failure_reason: str | None
    attempts: int
    files: list[ExportFileOut] = Field(description="every file but manifest.json, as its manifest lists them")
    total_bytes: int | None = Field(description="the listed files' bytes together")
    archive_bytes: int | None = Field(description="the size of the download: the export as one tar")
    plan_key: str | None
    manifest_sha256: str | None
    memory_bytes: int | None = Field(description="the plan's bytes by the memory model, at the job's workload")
    evaluated_kl: float | None = Field(description="the KL the search measured for the trial")
    reloaded_kl: float | None = Field(description="the KL of the export loaded back, on the same tokens")
    kl_abs_diff: float | None
    weight_bytes_on_disk: int | None
    disk_ratio: float | None = Field(description="weight file bytes over the memory model's weight bytes")
    notes: list[str]
    recomputed_units: list[str] = Field(description="units whose variants the level store lacked and were rebuilt")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExportPage(_Strict):
    items: list[ExportOut]
    total: int
    limit: int
    offset: int


def export_out(record: ExportRecord) -> ExportOut:
    report: dict[str, Any] = record.report or {}
    listed: dict[str, Any] = report.get("files") or {}
    files = [ExportFileOut(path=name, bytes=e["bytes"], sha256=e["sha256"]) for name, e in sorted(listed.items())]
    return ExportOut(
        id=record.id,
        job_id=record.job_id,
        trial=record.trial if isinstance(record.trial, int) else "best",
        trial_number=record.trial_number,
        format=ExportFormat(record.format),
        state=record.state.value,
        failure_reason=record.failure_reason,
        attempts=record.attempts,
        files=files,
        total_bytes=sum(f.bytes for f in files) if record.report is not None else None,
        archive_bytes=record.archive_bytes,
        plan_key=report.get("plan_key"),
        manifest_sha256=report.get("manifest_sha256"),
        memory_bytes=report.get("memory_bytes"),
        evaluated_kl=report.get("evaluated_kl"),
        reloaded_kl=report.get("reloaded_kl"),
        kl_abs_diff=report.get("kl_abs_diff"),
        weight_bytes_on_disk=report.get("weight_bytes_on_disk"),
        disk_ratio=report.get("disk_ratio"),
        notes=list(report.get("notes", [])),
        recomputed_units=list(report.get("recomputed_units", [])),
        created_at=record.created_at,
        updated_at=record.updated_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
    )
