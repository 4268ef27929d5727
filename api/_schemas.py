"""Request and response models of the REST API: strict (unknown fields refused), every number ranged."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from budgetpress.search import STRATEGIES

_BUDGET_PATTERN = r"^(?:[0-9]{1,18}(?:\.[0-9]{0,6})?|\.[0-9]{1,6})(?:[eE][+]?[0-9]{1,2})?\s?(?:%|[KMGTkmgt]i?B|B)?$"
BudgetText = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=_BUDGET_PATTERN)]
MAX_BUDGETS = 8
DimensionName = Literal["bits", "sparsity", "rank", "kv"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PageQuery(_Strict):
    """Pagination; unknown query parameters are refused."""

    limit: int = Field(50, ge=1, le=200, description="items per page")
    offset: int = Field(0, ge=0, le=1_000_000_000, description="items to skip")


class WorkloadIn(_Strict):
    batch: int = Field(1, ge=1, le=4096, description="rows decoded together")
    context: int = Field(512, ge=16, le=131072, description="tokens of context per row")


class JobCreate(_Strict):
    """A search job. ``budget`` is one budget, or up to 8 for a frontier search."""

    model: str = Field(
        "builtin",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="'builtin', an allowed hub id, or a directory relative to the service's model root",
    )
    budget: BudgetText | Annotated[list[BudgetText], Field(min_length=1, max_length=MAX_BUDGETS)] = Field(
        description="'35%' of the dense model, a size such as '6GiB', or bytes; a list for a frontier search"
    )
    workload: WorkloadIn = Field(default_factory=WorkloadIn)  # type: ignore[arg-type]
    space: Annotated[list[DimensionName], Field(min_length=1, max_length=4)] = Field(
        default_factory=lambda: ["bits"],  # type: ignore[arg-type]
        json_schema_extra={"uniqueItems": True},
        description="what to search: any of bits, sparsity, rank, kv, each at most once",
    )
    methods: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[a-z]+=[a-z-]+(?:,[a-z]+=[a-z-]+)*$")
    strategy: str = Field("tpe", json_schema_extra={"enum": list(STRATEGIES)})
    n_trials: int = Field(20, ge=1, le=10000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    grouping: Literal["unit", "layer", "role"] = "unit"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; accepted: {', '.join(STRATEGIES)}")
        return value

    @field_validator("space")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("space names a dimension twice")
        return value

    def budgets(self) -> list[str]:
        return [self.budget] if isinstance(self.budget, str) else list(self.budget)


JobStateName = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class ProgressOut(_Strict):
    trials_done: int
    n_trials: int
    best_kl: float | None


class JobOut(_Strict):
    id: str
    state: JobStateName
    model: str
    budget: list[str]
    workload: WorkloadIn
    space: list[str]
    methods: str | None
    strategy: str
    n_trials: int
    seed: int
    grouping: str
    progress: ProgressOut
    stage: str | None
    failure_reason: str | None
    attempts: int
    study_name: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(_Strict):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


Scalar = float | int | str | bool | None


class TrialOut(_Strict):
    number: int
    state: Literal["running", "complete", "failed", "pruned", "waiting"]
    plan_key: str | None
    params: dict[str, Scalar]
    memory_bytes: int | None
    budget_bytes: int | None
    fidelity: int | None
    value: float | None
    metrics: dict[str, Scalar]
    strategy: str | None
    fail_reason: str | None
    started_at: datetime | None
    completed_at: datetime | None


class TrialPage(_Strict):
    items: list[TrialOut]
    total: int
    limit: int
    offset: int


class BestOut(_Strict):
    job_id: str
    plan_key: str
    plan: dict[str, Any] = Field(description="the plan's canonical JSON: unit → setting")
    labels: dict[str, str]
    memory_bytes: int
    budget_bytes: int
    dense_bytes: int
    kl: float
    ppl: float
    uniform: dict[str, Any]
    dense: dict[str, Any]
    report: dict[str, Any]


class FrontierPoint(_Strict):
    number: int
    plan_key: str
    memory_bytes: int
    kl: float


class FrontierOut(_Strict):
    job_id: str
    items: list[FrontierPoint] = Field(description="complete feasible trials not dominated in (memory, KL)")
    report: dict[str, Any] | None = Field(description="the frontier search's report, once the job succeeded")


class ErrorOut(_Strict):
    detail: str


class HealthOut(_Strict):
    status: Literal["ok"]
