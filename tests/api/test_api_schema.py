"""Check 8: schemathesis over the OpenAPI spec, every check, positive and negative data.

Each operation's cases come from schemathesis's own strategies and are run through Hypothesis
here (its pytest plug-in's lazy loader does not run under pytest 9); every response goes through
``call_and_validate``, which runs all of schemathesis's checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import make_service

EXAMPLES = 25


def _operations(app: Any) -> list[Any]:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in loaded.get_all_operations()]


def _call(case: Any, headers: dict[str, str], mode: GenerationMode) -> None:
    """Every check; a new job's model and budget are checked against the model, which no schema
    can say, so positive data may get a 422 there, but only with a semantic reason, never for
    a field the schema admits (those errors name their location: body., query., header.)."""
    semantic = mode is GenerationMode.POSITIVE and case.operation.label == "POST /v1/jobs"
    excluded = [schemathesis.specs.openapi.checks.positive_data_acceptance] if semantic else []
    response = case.call_and_validate(headers=headers, excluded_checks=excluded)
    if semantic:
        assert response.status_code in (201, 422, 429), response.text
        if response.status_code == 422:
            assert not response.json()["detail"].startswith(("body.", "query.", "header.")), response.text


def _checker(strategy: Any, headers: dict[str, str], mode: GenerationMode) -> Any:
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        _call(case, headers, mode)

    return check


@pytest.mark.slow
def test_the_openapi_spec_holds(tmp_path: Path, model_root: Path, micro_model_dir: Path) -> None:
    service = make_service(f"sqlite:///{tmp_path / 'service.db'}", model_root)
    headers = service.auth("alice")
    # A real job to read, so that job routes see an existing id as well as generated ones.
    job_id = service.submit("alice", {"model": micro_model_dir.name, "budget": "60%"}).json()["id"]
    operations = _operations(service.client.app)
    assert len(operations) == 13  # the plot and export routes included
    unsatisfiable: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            path_parameters = (
                {"job_id": job_id} if "{job_id}" in operation.path and mode is GenerationMode.POSITIVE else None
            )
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            check = _checker(strategy, headers, mode)

            try:
                check()
            except Unsatisfiable:
                # Nothing of this operation can be made invalid (no body, no constrained parameter).
                assert mode is GenerationMode.NEGATIVE, operation.label
                unsatisfiable.append(operation.label)
    assert set(unsatisfiable) <= {"GET /healthz"}
    service.db.dispose()
