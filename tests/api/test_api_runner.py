"""The runner with real Ray workers: a job under 20 polling clients on SQLite (check 7), a cancel
with evaluations in flight on PostgreSQL (check 5), a killed worker (check 2), and two runners
claiming one PostgreSQL queue."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import pytest

from budgetpress.api import Runner
from budgetpress.api._jobs import request_hash, submit
from budgetpress.api._queue import claim

from .conftest import Service, job_body, make_service
from .helpers import complete_keys, evaluator_processes, study_trials, wait_for


@pytest.fixture
def running(request: pytest.FixtureRequest) -> Iterator[list[Runner]]:
    """Runners started by a test; stopped (and their Ray cluster shut down) afterwards."""
    started: list[Runner] = []
    yield started
    for runner in started:
        runner.stop()


def _start(service: Service, running: list[Runner]) -> Runner:
    runner = Runner(db=service.db, settings=service.settings)
    runner.start()
    running.append(runner)
    return runner


def _job(service: Service, job_id: str) -> dict[str, Any]:
    response = service.client.get(f"/v1/jobs/{job_id}", headers=service.auth("alice"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.slow
def test_a_job_under_polling_clients_on_sqlite(
    sqlite_url: str, model_root: Path, micro_model_dir: Path, running: list[Runner]
) -> None:
    """Check 7: one runner, two evaluations in flight, 20 clients polling: no 5xx, nothing locked."""
    service = make_service(sqlite_url, model_root, workers_per_job=2, lease_s=6)
    job_id = service.submit("alice", job_body(micro_model_dir.name, n_trials=4)).json()["id"]
    _start(service, running)
    statuses: list[int] = []
    done = threading.Event()

    def poll(index: int) -> None:
        path = f"/v1/jobs/{job_id}" if index % 2 else f"/v1/jobs/{job_id}/trials"
        while not done.is_set():
            statuses.append(service.client.get(path, headers=service.auth("alice")).status_code)
            time.sleep(0.25)

    with ThreadPoolExecutor(max_workers=20) as pool:
        for index in range(20):
            pool.submit(poll, index)
        final = wait_for(
            lambda: (job := _job(service, job_id))["state"] in ("succeeded", "failed") and job,
            timeout_s=240,
            what="the job to finish",
        )
        done.set()
    assert final["state"] == "succeeded", final["failure_reason"]
    assert final["progress"]["trials_done"] == 4 and final["progress"]["best_kl"] is not None
    assert statuses and all(code == 200 for code in statuses)
    trials = study_trials(sqlite_url, final["study_name"])
    assert len(complete_keys(trials)) == 4
    assert not [t for t in trials if "locked" in str(t.user_attrs.get("fail_reason", ""))]
    auth = service.auth("alice")
    page = service.client.get(f"/v1/jobs/{job_id}/trials", headers=auth).json()
    assert page["total"] == len(trials) and {i["state"] for i in page["items"]} == {"complete"}
    best = service.client.get(f"/v1/jobs/{job_id}/best", headers=auth).json()
    assert best["plan_key"] in complete_keys(trials) and best["memory_bytes"] <= best["budget_bytes"]
    assert best["plan"]["units"]
    frontier = service.client.get(f"/v1/jobs/{job_id}/frontier", headers=auth).json()
    assert frontier["items"] and frontier["report"]["frontier"][0]["best"]["plan_key"] == best["plan_key"]


@pytest.mark.slow
def test_cancel_with_evaluations_in_flight_on_postgres(
    pg_url: str, model_root: Path, micro_model_dir: Path, running: list[Runner]
) -> None:
    """Check 5: cancelled within 10 s, no task of it still running, no trial created after the
    cancel; a second cancel answers the same state."""
    service = make_service(pg_url, model_root, lease_s=6)
    job_id = service.submit("alice", job_body(micro_model_dir.name, n_trials=200)).json()["id"]
    _start(service, running)
    wait_for(lambda: _job(service, job_id)["progress"]["trials_done"] >= 1, timeout_s=180, what="a first trial")
    cancelled_at = datetime.now(UTC)
    first = service.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.auth("alice")).json()
    assert first["state"] in ("cancelling", "cancelled")
    final = wait_for(
        lambda: (job := _job(service, job_id))["state"] == "cancelled" and job, timeout_s=10, what="cancelled"
    )
    assert (datetime.now(UTC) - cancelled_at).total_seconds() < 10
    again = service.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.auth("alice"))
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert final["failure_reason"] == "cancelled"
    trials = study_trials(pg_url, final["study_name"])
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
    assert all(t.datetime_start is not None and t.datetime_start.replace(tzinfo=UTC) <= cancelled_at for t in trials)
    assert len(trials) < 200
    wait_for(lambda: not evaluator_processes(), timeout_s=10, what="the job's Ray workers to exit")


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="workers/_pool.py fails an evaluation whose worker died instead of retrying it once",
)
def test_a_killed_worker_is_retried_once(
    sqlite_url: str, model_root: Path, micro_model_dir: Path, running: list[Runner]
) -> None:
    """Check 2: SIGKILL the worker of a running evaluation; the job still succeeds; the killed
    trial is retried once and committed once; no worker processes are left after the job."""
    service = make_service(sqlite_url, model_root, lease_s=6)
    job_id = service.submit("alice", job_body(micro_model_dir.name, n_trials=4)).json()["id"]
    _start(service, running)
    wait_for(lambda: _job(service, job_id)["progress"]["trials_done"] >= 1, timeout_s=180, what="a first trial")
    victim = wait_for(evaluator_processes, timeout_s=30, what="an evaluator process")[0]
    os.kill(victim.pid, signal.SIGKILL)
    final = wait_for(
        lambda: (job := _job(service, job_id))["state"] in ("succeeded", "failed") and job,
        timeout_s=240,
        what="the job to finish",
    )
    assert final["state"] == "succeeded", final["failure_reason"]
    trials = study_trials(sqlite_url, final["study_name"])
    keys = complete_keys(trials)
    assert len(keys) == 4 and len(keys) == len(set(keys))
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]  # retried, not failed
    wait_for(lambda: not evaluator_processes(), timeout_s=10, what="the job's Ray workers to exit")


def test_two_runners_share_a_postgres_queue(pg_url: str, model_root: Path, micro_model_dir: Path) -> None:
    """FOR UPDATE SKIP LOCKED: two runners claiming at once never take the same job."""
    service = make_service(pg_url, model_root, max_concurrent_jobs=40)
    caller = service.client.app.state.ctx  # the app's database is the one the runners use
    from budgetpress.api._auth import authenticate

    who = authenticate(caller.db, service.key("alice"))
    assert who is not None
    ids = set()
    for seed in range(30):
        spec = {"n_trials": 1, "seed": seed}
        ids.add(submit(service.db, who, spec=spec, body_hash=request_hash(spec), key=None, quota=40)[0].id)
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    def drain(owner: str) -> None:
        while (job := claim(service.db, owner=owner, lease_s=60)) is not None:
            claimed[owner].append(job.id)

    threads = [threading.Thread(target=drain, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed["a"] + claimed["b"]) == sorted(ids)
    assert not set(claimed["a"]) & set(claimed["b"])
    service.db.dispose()
