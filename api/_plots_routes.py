"""PNG plots of a job's study: the quality/memory Pareto front and the best plan's per-layer allocation.

Mount with ``app.include_router(plots_router)``; the routes use the app's context, auth and tenancy
(another tenant's job is 404, as on every job route).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from fastapi import APIRouter, HTTPException, Response, status

from budgetpress.api._app import _JOB, Context, Owned, _errors
from budgetpress.dashboard import PlotKind, study_plot

logger = logging.getLogger(__name__)

plots_router = APIRouter(tags=["jobs"])

_PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "the plot as a PNG image"}}


@plots_router.get(
    "/v1/jobs/{job_id}/plots/{kind}.png",
    response_class=Response,
    responses={**_PNG, **_errors(*_JOB, 409)},
    summary="Plot of a job's study",
)
def job_plot(ctx: Context, owned: Owned, kind: PlotKind) -> Response:
    """``pareto``: KL against memory for every complete trial, the front and the uniform baselines;
    ``allocation``: the best feasible plan's bits / sparsity / rank per layer and KV settings."""
    try:
        study = optuna.load_study(storage=ctx.storage, study_name=owned.study_name)
    except KeyError:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {owned.state.value}; it has no trials yet") from None
    try:
        data = study_plot(study, kind)
    except ValueError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {owned.state.value}: {error}") from None
    return Response(content=data, media_type="image/png", headers={"Cache-Control": "no-store"})
