"""The PNG route of api/_plots_routes.py on a bare app whose context and job lookup are stand-ins."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient
from optuna.storages import RDBStorage

from budgetpress.api._app import _ctx, _owned_job
from budgetpress.api._plots_routes import plots_router
from tests.dashboard.conftest import STUDY

JOB = "00000000-0000-4000-8000-000000000001"


def _client(storage: str, study_name: str) -> TestClient:
    app = FastAPI()
    app.include_router(plots_router)
    app.dependency_overrides[_ctx] = lambda: SimpleNamespace(storage=RDBStorage(storage, skip_table_creation=True))
    app.dependency_overrides[_owned_job] = lambda: SimpleNamespace(
        study_name=study_name, state=SimpleNamespace(value="running")
    )
    return TestClient(app)


def test_job_plots_are_png(study_db: str) -> None:
    client = _client(study_db, STUDY)
    for kind in ("pareto", "allocation"):
        response = client.get(f"/v1/jobs/{JOB}/plots/{kind}.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG")
    assert client.get(f"/v1/jobs/{JOB}/plots/other.png").status_code == 422


def test_a_job_without_a_study_yet_is_409(study_db: str) -> None:
    assert _client(study_db, "not-started").get(f"/v1/jobs/{JOB}/plots/pareto.png").status_code == 409
