"""A study's plots: made from its trials, attached to it as dashboard artifacts, written as files."""

from __future__ import annotations

import logging
import os
import tempfile
from enum import StrEnum
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from sqlalchemy.engine import make_url

from budgetpress.dashboard._plots import allocation_png, pareto_png
from budgetpress.search import best_plan

logger = logging.getLogger(__name__)

ARTIFACTS_ENV = "BUDGETPRESS_ARTIFACTS"


class PlotKind(StrEnum):
    PARETO = "pareto"
    ALLOCATION = "allocation"


def artifact_root_for(storage_url: str) -> Path:
    """Where a study's plot artifacts live: ``$BUDGETPRESS_ARTIFACTS``, else beside a SQLite file
    (``<file>.artifacts/``), else ``budgetpress-artifacts/`` in the working directory."""
    configured = os.environ.get(ARTIFACTS_ENV)
    if configured:
        return Path(configured)
    parsed = make_url(storage_url)
    database = (parsed.database or "").removeprefix("file:")
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
        path = Path(database.split("?")[0]).resolve()
        return path.with_name(path.name + ".artifacts")
    return Path.cwd() / "budgetpress-artifacts"


def study_plot(study: optuna.Study, kind: PlotKind | str) -> bytes:
    """The study's Pareto front, or the per-layer allocation of its best feasible plan, as PNG."""
    if PlotKind(kind) is PlotKind.PARETO:
        return pareto_png(study)
    plan, trial = best_plan(study)
    attrs = trial.user_attrs
    title = (
        f"study {study.study_name}, best trial {trial.number}: KL {trial.value:.4g}, "
        f"{int(attrs.get('memory_bytes', 0)):,} of {int(attrs.get('budget_bytes', 0)):,} bytes"
    )
    return allocation_png(plan, title=title)


def plot_name(study: optuna.Study, kind: PlotKind) -> str:
    return f"{study.study_name}-{kind.value}.png"


def attach_plots(study: optuna.Study, artifact_root: Path) -> dict[str, str]:
    """Upload the study's plots as study artifacts (shown in optuna-dashboard's study page).

    Plots the study holds already (by file name) are kept; returns artifact ids by plot kind.
    A study with no feasible complete trial gets the Pareto plot only."""
    artifact_root.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_root))
    existing = {meta.filename: meta.artifact_id for meta in get_all_artifact_meta(study)}
    ids: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="budgetpress-plots-") as tmp:
        for kind in PlotKind:
            name = plot_name(study, kind)
            if name in existing:
                ids[kind.value] = existing[name]
                continue
            try:
                data = study_plot(study, kind)
            except ValueError as error:
                logger.info("study %s has no %s plot: %s", study.study_name, kind.value, error)
                continue
            path = Path(tmp) / name
            path.write_bytes(data)
            ids[kind.value] = upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=study, mimetype="image/png"
            )
            logger.info("attached %s to study %s", name, study.study_name)
    return ids


def attach_finished_study_plots(storage_url: str, study_name: str) -> dict[str, str]:
    """``attach_plots`` for a search that has just finished, under ``artifact_root_for(storage_url)``.

    A failure to write them is logged, not raised: the search itself is complete and recorded, and
    the plots can be made again (``budgetpress plot``, the API's plot routes) from its trials.
    """
    root = artifact_root_for(storage_url)
    try:
        return attach_plots(optuna.load_study(storage=storage_url, study_name=study_name), root)
    except OSError as error:
        logger.warning("could not attach the plots of study %s under %s: %s", study_name, root, error)
        return {}
