"""optuna-dashboard against the service's database (read-only), and the plots it and the CLI show:
the quality/memory Pareto front and the per-layer allocation of a plan."""

from budgetpress.dashboard._plots import allocation_of, allocation_png, pareto_png, pareto_points, study_points
from budgetpress.dashboard._server import (
    check_host,
    dashboard_app,
    readonly_storage,
    readonly_url,
    serve_dashboard,
)
from budgetpress.dashboard._study import (
    ARTIFACTS_ENV,
    PlotKind,
    artifact_root_for,
    attach_finished_study_plots,
    attach_plots,
    study_plot,
)

__all__ = [
    "ARTIFACTS_ENV",
    "PlotKind",
    "allocation_of",
    "allocation_png",
    "artifact_root_for",
    "attach_finished_study_plots",
    "attach_plots",
    "check_host",
    "dashboard_app",
    "pareto_png",
    "pareto_points",
    "readonly_storage",
    "readonly_url",
    "serve_dashboard",
    "study_plot",
    "study_points",
]
