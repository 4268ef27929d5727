"""Ray workers that hold a model and evaluate plans, the pool that dispatches, and the search job."""

from budgetpress.workers._export_job import (
    SESSION_ATTR,
    export_from_study,
    session_from_record,
    session_record,
    study_session,
)
from budgetpress.workers._job import (
    PlanReport,
    Progress,
    SearchReport,
    SearchRequest,
    check_request,
    run_search,
)
from budgetpress.workers._pool import RAY_AUTH_MODE, EvaluatorActor, WorkerPool, WorkerSpec, start_ray

__all__ = [
    "RAY_AUTH_MODE",
    "SESSION_ATTR",
    "EvaluatorActor",
    "PlanReport",
    "Progress",
    "SearchReport",
    "SearchRequest",
    "WorkerPool",
    "WorkerSpec",
    "check_request",
    "export_from_study",
    "run_search",
    "session_from_record",
    "session_record",
    "start_ray",
    "study_session",
]
