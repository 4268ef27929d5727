"""The dashboard reads the service's database and never writes it: a search writing the same SQLite
file beside it never fails with "database is locked"."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

import optuna
import pytest

from budgetpress.dashboard import check_host, dashboard_app, readonly_storage, readonly_url
from budgetpress.dashboard._server import _Handler, _Server
from budgetpress.search import best_plan
from tests.dashboard.conftest import STUDY, load


@pytest.fixture
def served(study_db: str) -> Iterator[str]:
    """The dashboard app on a free loopback port, in this process; yields its base URL."""
    server: WSGIServer = make_server("127.0.0.1", 0, dashboard_app(study_db), _Server, _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_readonly_url_forms(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    db.write_bytes(b"")
    assert readonly_url(f"sqlite:///{db}") == f"sqlite:///file:{db}?mode=ro&uri=true"
    assert readonly_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(ValueError, match="no SQLite database"):
        readonly_url(f"sqlite:///{tmp_path / 'missing.db'}")
    with pytest.raises(ValueError, match="database file or server"):
        readonly_url("sqlite:///:memory:")


def test_check_host() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        check_host(host, expose=False)
    check_host("0.0.0.0", expose=True)
    with pytest.raises(ValueError, match="no authentication"):
        check_host("0.0.0.0", expose=False)


def test_readonly_storage_cannot_write(study_db: str) -> None:
    storage = readonly_storage(study_db)
    study = optuna.load_study(storage=storage, study_name=STUDY)
    assert len(study.trials) > 10
    with pytest.raises(optuna.exceptions.StorageInternalError):
        study.set_user_attr("written", True)
    assert "written" not in load(study_db).user_attrs


def test_dashboard_shows_trials_and_refuses_writes(served: str, study_db: str) -> None:
    studies = _get(f"{served}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [STUDY]
    detail = _get(f"{served}/api/studies/{studies[0]['study_id']}")
    trials = detail["trials"]
    assert len(trials) == len(load(study_db).trials)
    attrs = {a["key"] for a in trials[0]["user_attrs"]}
    assert {"plan_json", "plan_key", "memory_bytes", "budget_bytes", "strategy", "kl", "ppl"} <= attrs
    assert {"memory_over_budget"} <= attrs
    over = {t["number"]: t["constraints"] for t in trials}
    assert over == {t.number: [t.constraints["memory_over_budget"]] for t in load(study_db).trials}
    # The "best trial" badge is the search's pick, which fits the budget, not the lowest KL overall.
    chosen = best_plan(load(study_db))[1]
    assert [t["number"] for t in detail["best_trials"]] == [chosen.number]
    assert chosen.constraints["memory_over_budget"] <= 0
    request = urllib.request.Request(f"{served}/api/studies/{studies[0]['study_id']}", method="DELETE")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=60)
    assert load(study_db).trials  # still there


def _poll(url: str, stop: threading.Event, errors: list[str], count: list[int]) -> None:
    while not stop.is_set():
        try:
            _get(url)
            count[0] += 1
        except (urllib.error.URLError, OSError, ValueError) as error:
            errors.append(repr(error))


def test_search_writing_beside_the_dashboard_never_sees_a_locked_database(served: str, study_db: str) -> None:
    study_id = _get(f"{served}/api/studies")["study_summaries"][0]["study_id"]
    writer = optuna.create_study(storage=study_db, study_name="writing", direction="minimize")
    stop, errors, count = threading.Event(), [], [0]
    urls = [f"{served}/api/studies", f"{served}/api/studies/{study_id}", f"{served}/api/studies/{study_id + 1}"]
    readers = [threading.Thread(target=_poll, args=(url, stop, errors, count)) for url in urls]
    for reader in readers:
        reader.start()
    try:
        for i in range(25):  # a search's writes: open a trial, set its attributes, complete it
            trial = writer.ask()
            trial.suggest_categorical("g", ["4b", "8b"])
            for key in ("plan_json", "memory_bytes", "budget_bytes", "kl"):
                trial.set_user_attr(key, i)
            writer.tell(trial, float(i))
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert len(load(study_db, "writing").trials) == 25
    assert count[0] > 10 and not errors, errors[:3]
