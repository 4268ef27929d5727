"""From a validated job body to the stored job spec, and from a stored spec to a SearchRequest."""

from __future__ import annotations

import logging
from typing import Any

from budgetpress.api._jobs import JobRecord
from budgetpress.api._locks import MODEL_WORK
from budgetpress.api._models import resolve_job_model
from budgetpress.api._schemas import JobCreate
from budgetpress.api._settings import ServiceSettings
from budgetpress.evaluators import SEARCH_METHODS, Methods, default_store_root, resolve_model
from budgetpress.space import Budget, Dimension, Grouping, Workload
from budgetpress.workers import SearchRequest, check_request

logger = logging.getLogger(__name__)
PRECHECK_WAIT_S = 1.0


def job_spec(body: JobCreate, settings: ServiceSettings) -> dict[str, Any]:
    """The spec stored on the job row; refuses (ValueError) what no search could run."""
    if body.n_trials > settings.max_trials:
        raise ValueError(f"n_trials {body.n_trials} is above this service's limit of {settings.max_trials}")
    budgets = body.budgets()
    for text in budgets:  # what the schema's pattern admits may still be no budget (say '0%')
        Budget.parse(text)
    spec: dict[str, Any] = {
        "model": body.model,
        "model_spec": resolve_job_model(body.model, settings),
        "budget": budgets,
        "workload": body.workload.model_dump(),
        "space": sorted(body.space),
        "methods": Methods.parse(body.methods or SEARCH_METHODS).to_text(),
        "strategy": body.strategy,
        "n_trials": body.n_trials,
        "seed": body.seed,
        "grouping": body.grouping,
    }
    if resolve_model(spec["model_spec"]).local_dir is not None:  # hub models are profiled by the runner
        _precheck(_request(spec, settings, storage="sqlite://", study_name="check", resume=False))
    return spec


def _precheck(request: SearchRequest) -> None:
    """Refuse now what the search would refuse (a budget below the smallest plan, ...). While this
    process's runner holds the model lock (building a level store) the check is left to the
    search itself, which fails the job with the same message, rather than keeping the caller waiting."""
    if not MODEL_WORK.acquire(timeout=PRECHECK_WAIT_S):
        logger.info("model lock busy; the search will check the request")
        return
    try:
        check_request(request)
    finally:
        MODEL_WORK.release()


def search_request(job: JobRecord, settings: ServiceSettings, *, storage: str, resume: bool) -> SearchRequest:
    return _request(job.spec, settings, storage=storage, study_name=job.study_name, resume=resume)


def _request(
    spec: dict[str, Any], settings: ServiceSettings, *, storage: str, study_name: str, resume: bool
) -> SearchRequest:
    return SearchRequest(
        model=spec["model_spec"],
        budgets=tuple(Budget.parse(text) for text in spec["budget"]),
        resume=resume,
        workload=Workload(**spec["workload"]),
        strategy=spec["strategy"],
        n_trials=spec["n_trials"],
        storage=storage,
        study_name=study_name,
        n_workers=settings.workers_per_job,
        seed=spec["seed"],
        grouping=Grouping(spec["grouping"]),
        dimensions=frozenset(Dimension(name) for name in spec["space"]),
        methods=spec["methods"],
        store_root=settings.store_root or str(default_store_root()),
        seq_len=settings.seq_len,
        calibration_sequences=settings.calibration_sequences,
        evaluation_sequences=settings.evaluation_sequences,
    )
