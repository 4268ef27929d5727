"""The runner with real Ray workers on the built-in model: a job under 20 polling clients on SQLite
(check 7), a killed worker (check 2) and a stopped one (check 3) on the same SQLite service and
runner, a cancel with evaluations in flight on PostgreSQL (check 5), and two runners claiming one
PostgreSQL queue. One Ray cluster serves the whole module."""

from __future__ import annotations

import contextlib
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
import ray
from optuna.artifacts import get_all_artifact_meta

from budgetpress.api import Runner
from budgetpress.api._jobs import request_hash, submit
from budgetpress.api._queue import claim
from budgetpress.dashboard import PlotKind
from budgetpress.dashboard._study import plot_name
from budgetpress.workers import start_ray
from budgetpress.workers._pool import LEASE_ENV

from .conftest import Service, make_service, runner_job
from .helpers import complete_keys, evaluator_processes, study_trials, wait_for

EVAL_LEASE_S = 3.0


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local cluster for every runner here (each runner then leaves it running)."""
    owned = start_ray(6, {"HF_HUB_OFFLINE": "1"})
    yield
    if owned:
        ray.shutdown()


@pytest.fixture(scope="module")
def sqlite_service(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[Service]:
    """A SQLite service and its one runner (two workers per job), shared by the tests that run jobs on it."""
    url = f"sqlite:///{tmp_path_factory.mktemp('runner') / 'service.db'}"
    service = make_service(url, model_root, workers_per_job=2, lease_s=6, rate_per_s=0)
    runner = Runner(db=service.db, settings=service.settings)
    runner.start()
    yield service
    runner.stop()
    service.db.dispose()


def _job(service: Service, job_id: str) -> dict[str, Any]:
    response = service.client.get(f"/v1/jobs/{job_id}", headers=service.auth("alice"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _finished(service: Service, job_id: str, timeout_s: float = 240) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (job := _job(service, job_id))["state"] in ("succeeded", "failed", "cancelled") and job,
        timeout_s=timeout_s,
        what="the job to finish",
    )
    return found


def _committed_once(url: str, job: dict[str, Any], n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """The job succeeded with exactly ``n_trials`` trials, each complete, each plan key once."""
    assert job["state"] == "succeeded", job["failure_reason"]
    trials = study_trials(url, job["study_name"])
    keys = complete_keys(trials)
    assert len(trials) == len(keys) == n_trials, [(t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert len(set(keys)) == len(keys)
    return trials


@pytest.mark.slow
def test_a_job_under_polling_clients_on_sqlite(sqlite_service: Service) -> None:
    """Check 7: one runner, two evaluations in flight, 20 clients polling: no 5xx, nothing locked."""
    service = sqlite_service
    job_id = service.submit("alice", runner_job(n_trials=6)).json()["id"]
    statuses: list[int] = []
    done = threading.Event()

    def poll(index: int) -> None:
        path = f"/v1/jobs/{job_id}" if index % 2 else f"/v1/jobs/{job_id}/trials"
        while not done.is_set():
            statuses.append(service.client.get(path, headers=service.auth("alice")).status_code)
            time.sleep(0.2)

    with ThreadPoolExecutor(max_workers=20) as pool:
        for index in range(20):
            pool.submit(poll, index)
        final = _finished(service, job_id)
        done.set()
    assert final["progress"]["trials_done"] == 6 and final["progress"]["best_kl"] is not None
    assert statuses and all(code == 200 for code in statuses)
    trials = _committed_once(service.settings.database_url, final, 6)
    assert not [t for t in trials if "locked" in str(t.user_attrs.get("fail_reason", ""))]
    auth = service.auth("alice")
    page = service.client.get(f"/v1/jobs/{job_id}/trials", headers=auth).json()
    assert page["total"] == len(trials) and {i["state"] for i in page["items"]} == {"complete"}
    best = service.client.get(f"/v1/jobs/{job_id}/best", headers=auth).json()
    assert best["plan_key"] in complete_keys(trials) and best["memory_bytes"] <= best["budget_bytes"]
    assert best["plan"]["units"]
    frontier = service.client.get(f"/v1/jobs/{job_id}/frontier", headers=auth).json()
    assert frontier["items"] and frontier["report"]["frontier"][0]["best"]["plan_key"] == best["plan_key"]
    # The dashboard shows the job's plots: the runner attached them to its study as artifacts.
    study = optuna.load_study(storage=service.settings.database_url, study_name=final["study_name"])
    attached = {meta.filename: meta.mimetype for meta in get_all_artifact_meta(study)}
    assert attached == {plot_name(study, kind): "image/png" for kind in PlotKind}


def _stop_a_worker_mid_search(service: Service, job_id: str, among: set[int] | None = None) -> tuple[int, float]:
    """SIGSTOP one of the job's evaluators once its search has a complete trial: the evaluation it
    holds, or the next one it takes, hangs. Its pid and when it stopped; ``among`` (filled in)
    the evaluator pids at that moment."""
    wait_for(lambda: _job(service, job_id)["progress"]["trials_done"] >= 1, timeout_s=180, what="a first trial")
    found = wait_for(evaluator_processes, timeout_s=30, what="an evaluator process")
    victim = found[0]
    if among is not None:
        among.update(p.pid for p in found)
    os.kill(victim.pid, signal.SIGSTOP)
    return victim.pid, time.monotonic()


@pytest.mark.slow
def test_a_killed_worker_is_retried_once(sqlite_service: Service) -> None:
    """Check 2: SIGKILL the worker of a running evaluation; the job still succeeds; the killed
    trial is retried once and committed once; no worker processes are left after the job."""
    service = sqlite_service
    job_id = service.submit("alice", runner_job(n_trials=8, seed=2)).json()["id"]
    victim, _ = _stop_a_worker_mid_search(service, job_id)
    time.sleep(0.5)  # the search dispatches to the stopped worker and waits on it
    os.kill(victim, signal.SIGKILL)
    trials = _committed_once(service.settings.database_url, _finished(service, job_id), 8)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]  # retried, not failed
    wait_for(lambda: not evaluator_processes(), timeout_s=10, what="the job's Ray workers to exit")


@pytest.mark.slow
def test_a_stopped_worker_past_its_lease_is_replaced(sqlite_service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check 3: SIGSTOP a worker past its lease; its evaluation is failed and retried within two
    lease periods, on a fresh worker; after SIGCONT nothing crashes and the job commits every
    trial once."""
    monkeypatch.setenv(LEASE_ENV, str(EVAL_LEASE_S))  # read when the job's worker pool starts
    service = sqlite_service
    job_id = service.submit("alice", runner_job(n_trials=8, seed=3)).json()["id"]
    known: set[int] = set()
    victim, stopped_at = _stop_a_worker_mid_search(service, job_id, among=known)
    try:
        wait_for(
            lambda: {p.pid for p in evaluator_processes()} - known,
            timeout_s=2 * EVAL_LEASE_S,
            what="the stopped worker's replacement",
            every_s=0.05,
        )
        retried_after = time.monotonic() - stopped_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)  # killed by the pool; were it not, its late result is never read
    assert retried_after <= 2 * EVAL_LEASE_S
    wait_for(
        lambda: victim not in {p.pid for p in evaluator_processes()}, timeout_s=10, what="the stopped worker killed"
    )
    trials = _committed_once(service.settings.database_url, _finished(service, job_id), 8)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    wait_for(lambda: not evaluator_processes(), timeout_s=10, what="the job's Ray workers to exit")


@pytest.mark.slow
def test_cancel_with_evaluations_in_flight_on_postgres(ray_cluster: None, pg_url: str, model_root: Path) -> None:
    """Check 5: cancelled within 10 s, no task of it still running, no trial created after the
    cancel; a second cancel answers the same state."""
    # Longer evaluations (16 windows) keep the search's gap between reading the job's state after a
    # trial and opening the next trial small beside them: the search only stops at a trial's end.
    service = make_service(pg_url, model_root, lease_s=6, calibration_sequences=16)
    runner = Runner(db=service.db, settings=service.settings)
    runner.start()
    try:
        _cancel_in_flight(service, pg_url)
    finally:
        runner.stop()
        service.db.dispose()


def _cancel_in_flight(service: Service, pg_url: str) -> None:
    job_id = service.submit("alice", runner_job(n_trials=500)).json()["id"]
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
    assert len(trials) < 500
    wait_for(lambda: not evaluator_processes(), timeout_s=10, what="the job's Ray workers to exit")


def test_two_runners_share_a_postgres_queue(pg_url: str, model_root: Path) -> None:
    """FOR UPDATE SKIP LOCKED: two runners claiming at once never take the same job."""
    service = make_service(pg_url, model_root, max_concurrent_jobs=40)
    from budgetpress.api._auth import authenticate

    who = authenticate(service.db, service.key("alice"))
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
