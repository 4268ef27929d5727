"""docker-compose.yml against the Compose Specification's JSON schema (vendored; no Docker engine here),
and the deployment rules the schema cannot state."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:?message}`` with every variable set; ``$$`` stays a literal ``$``."""
    text = REQUIRED.sub(lambda m: env[m.group(1)], text)
    assert "${" not in text.replace("$${", ""), "only required ${VAR:?...} variables are used"
    return text.replace("$$", "$")


@pytest.fixture(scope="module")
def raw() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def compose(raw: str) -> dict[str, Any]:
    secrets = {name: f"secret-{name.lower()}" for name in set(REQUIRED.findall(raw))}
    return dict(yaml.safe_load(_interpolate(raw, secrets)))


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_compose_file(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "api": {**compose["services"]["api"], "ports": "8000"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()), cls=jsonschema.Draft202012Validator)


def test_required_secrets_fail_loudly(raw: str) -> None:
    assert set(REQUIRED.findall(raw)) == {"POSTGRES_PASSWORD", "DASHBOARD_DB_PASSWORD", "RAY_AUTH_TOKEN"}
    assert "password:" not in raw.lower().replace("_password:", "")  # no literal password anywhere


def test_services_and_their_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "api", "ray-head", "ray-gpu-worker", "dashboard"}
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"api"} and services["api"]["ports"] == ["8000:8000"]
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.startswith("pgdata:") for v in postgres["volumes"]) and "pgdata" in compose["volumes"]
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    gpu = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert "--address=ray-head:6379" in services["ray-gpu-worker"]["command"]
    assert "--dashboard-host=127.0.0.1" in services["ray-head"]["command"]
    assert all(services[s]["build"]["dockerfile"] == "Dockerfile" for s in ("api", "ray-head", "dashboard"))
    assert (ROOT / "Dockerfile").is_file()


def test_dashboard_reads_through_a_read_only_role(compose: dict[str, Any]) -> None:
    dashboard = compose["services"]["dashboard"]
    assert dashboard["environment"]["BUDGETPRESS_DATABASE_URL"].startswith("postgresql+psycopg://dashboard_ro:")
    assert dashboard["command"][:2] == ["budgetpress", "dashboard"] and "ports" not in dashboard
    assert all(v.endswith(":ro") for v in dashboard["volumes"])
    script = compose["configs"]["readonly-role"]["content"]
    assert "default_transaction_read_only = on" in script
    assert "GRANT SELECT ON TABLES TO dashboard_ro" in script
    assert not re.search(r"GRANT\s+(INSERT|UPDATE|DELETE|ALL)", script)
