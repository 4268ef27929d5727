"""Exports through the service: the routes' rules (a succeeded job only, tenancy, strict bodies) and the
exports queue on SQLite and PostgreSQL, then one real job on the built-in model whose best trial a real
runner exports: the download is a tar that matches its manifest and loads back as a model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update

import budgetpress
from budgetpress.api import Runner
from budgetpress.api._auth import authenticate
from budgetpress.api._exports import (
    claim_export,
    fail_export,
    get_export,
    reap_exports,
    release_export,
    request_export,
    succeed_export,
)
from budgetpress.api._jobs import JobRecord, request_hash, submit
from budgetpress.api._queue import claim, finish
from budgetpress.api._tables import Export, ExportState, JobState, utcnow

from .conftest import Service, job_body, make_service, runner_job
from .helpers import wait_for

NO_SUCH_ID = "00000000-0000-4000-8000-000000000000"


def _succeeded_job(service: Service, tenant: str = "alice") -> JobRecord:
    """A job row taken through the queue to ``succeeded`` (no search: the queue tests need only the row)."""
    who = authenticate(service.db, service.key(tenant))
    assert who is not None
    spec = {"n_trials": 1, "seed": 0}
    job, _ = submit(service.db, who, spec=spec, body_hash=request_hash(spec), key=None, quota=10)
    claimed = claim(service.db, owner="test", lease_s=60)
    assert claimed is not None and claimed.id == job.id
    assert finish(service.db, job_id=job.id, owner="test", state=JobState.SUCCEEDED) is JobState.SUCCEEDED
    return job


def _expire_leases(service: Service) -> None:
    with service.db.writing() as session:
        session.execute(
            update(Export).where(Export.lease_expires_at.is_not(None)).values(lease_expires_at=utcnow() - timedelta(1))
        )


# -- the routes' rules, without a runner -----------------------------------------------------------------------


def test_export_routes_refuse_what_they_must(service: Service, micro_model_dir: Path) -> None:
    """Not succeeded → 409 naming the state; another tenant → 404 on every export route; unknown
    fields and bad trials → 422; an export not yet done → 409 on download."""
    job = service.submit("alice", job_body(micro_model_dir.name)).json()
    alice, bob = service.auth("alice"), service.auth("bob")
    exports = f"/v1/jobs/{job['id']}/exports"
    refused = service.client.post(exports, json={}, headers=alice)
    assert refused.status_code == 409 and "job is queued" in refused.json()["detail"], refused.text
    for body in ({"trial": "best", "verify": False}, {"trial": -1}, {"trial": "worst"}, {"trial": True}):
        response = service.client.post(exports, json=body, headers=alice)
        assert response.status_code == 422, (body, response.text)
    assert service.client.post(exports, json={"format": "gguf"}, headers=alice).status_code == 422
    # A queued export, made as the route would make it for a succeeded job.
    record, created = request_export(
        service.db, job_id=job["id"], trial="best", export_format="native", trial_number=None
    )
    assert created
    one = f"{exports}/{record.id}"
    body = service.client.get(one, headers=alice).json()
    assert body["state"] == "queued" and body["trial"] == "best" and body["trial_number"] is None
    assert body["files"] == [] and body["total_bytes"] is None and body["reloaded_kl"] is None
    page = service.client.get(exports, headers=alice).json()
    assert page["total"] == 1 and page["items"] == [body]
    download = service.client.get(f"{one}/download", headers=alice)
    assert download.status_code == 409 and "export is queued" in download.json()["detail"]
    assert service.client.get(f"{exports}/{NO_SUCH_ID}", headers=alice).status_code == 404
    for name in ("..", "%2e%2e", "..%2f..%2fetc", "x%00y", "%2Fetc%2Fpasswd"):
        assert 400 <= service.client.get(f"{exports}/{name}/download", headers=alice).status_code < 500, name
    for method, path in (("POST", exports), ("GET", exports), ("GET", one), ("GET", f"{one}/download")):
        response = service.client.request(method, path, headers=bob, json={})
        assert response.status_code == 404, (method, path, response.text)
        assert service.client.request(method, path, json={}).status_code == 401


def test_the_exports_queue(service: Service) -> None:
    """One live export per (job, trial, format), also under concurrent requests; two runners
    claiming at once never take the same export; compare-and-set finishes; the reaper requeues an
    expired export and fails it past the attempt limit; a failed export may be asked for again."""
    job = _succeeded_job(service)
    requests: list[str] = []

    def ask(_: int) -> None:
        requests.append(
            request_export(service.db, job_id=job.id, trial=0, export_format="native", trial_number=0)[0].id
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(requests) == 8 and len(set(requests)) == 1
    ids = set(requests)
    for trial, export_format in (("best", "native"), (0, "compressed-tensors"), (1, "native"), (2, "native")):
        ids.add(
            request_export(service.db, job_id=job.id, trial=trial, export_format=export_format, trial_number=None)[0].id
        )
    assert len(ids) == 5
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    def drain(owner: str) -> None:
        while (found := claim_export(service.db, owner=owner, lease_s=60)) is not None:
            assert found.study_name == job.study_name
            claimed[owner].append(found.record.id)

    drainers = [threading.Thread(target=drain, args=(owner,)) for owner in claimed]
    for thread in drainers:
        thread.start()
    for thread in drainers:
        thread.join()
    assert sorted(claimed["a"] + claimed["b"]) == sorted(ids) and not set(claimed["a"]) & set(claimed["b"])
    owner_of = {export_id: owner for owner, held in claimed.items() for export_id in held}
    first = requests[0]
    other = "b" if owner_of[first] == "a" else "a"
    assert not fail_export(service.db, export_id=first, owner=other, reason="not mine")
    assert fail_export(service.db, export_id=first, owner=owner_of[first], reason="it broke")
    assert not succeed_export(
        service.db, export_id=first, owner=owner_of[first], trial_number=0, report={}, archive_bytes=1
    )  # terminal: never changes
    again, created = request_export(service.db, job_id=job.id, trial=0, export_format="native", trial_number=0)
    assert created and again.id != first
    (released, *expiring) = sorted(ids - {first})
    assert release_export(service.db, export_id=released, owner=owner_of[released])
    assert get_export(service.db, job_id=job.id, export_id=released).attempts == 0  # type: ignore[union-attr]
    _expire_leases(service)
    assert sorted(reap_exports(service.db, max_attempts=2)) == [(e, ExportState.QUEUED) for e in expiring]
    while claim_export(service.db, owner="c", lease_s=60) is not None:
        pass
    _expire_leases(service)
    reaped = dict(reap_exports(service.db, max_attempts=2))
    assert {e: reaped[e] for e in expiring} == dict.fromkeys(expiring, ExportState.FAILED)
    assert reaped[released] is ExportState.QUEUED and reaped[again.id] is ExportState.QUEUED
    lost = get_export(service.db, job_id=job.id, export_id=expiring[0])
    assert lost is not None and lost.failure_reason is not None and "lost 2 times" in lost.failure_reason


# -- one real job, exported by a real runner --------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[tuple[Service, str]]:
    """A SQLite service with its runner, and one small job on the built-in model that succeeded."""
    url = f"sqlite:///{tmp_path_factory.mktemp('exports') / 'service.db'}"
    service = make_service(url, model_root, lease_s=6, rate_per_s=0)
    runner = Runner(db=service.db, settings=service.settings)
    runner.start()
    try:
        job_id = service.submit("alice", runner_job(n_trials=2)).json()["id"]
        job = wait_for(
            lambda: (j := _get(service, f"/v1/jobs/{job_id}"))["state"] in ("succeeded", "failed", "cancelled") and j,
            timeout_s=300,
            what="the job to finish",
        )
        assert job["state"] == "succeeded", job["failure_reason"]
        yield service, job_id
    finally:
        runner.stop()
        service.db.dispose()


def _get(service: Service, path: str) -> dict[str, Any]:
    response = service.client.get(path, headers=service.auth("alice"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _done(service: Service, path: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (e := _get(service, path))["state"] in ("succeeded", "failed") and e,
        timeout_s=300,
        what="the export to finish",
    )
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _members(archive: bytes, top: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = tar.getmembers()
        assert members[0].name == top and members[0].isdir()
        assert all(m.isfile() and m.name.startswith(f"{top}/") for m in members[1:])
        return {m.name.removeprefix(f"{top}/"): tar.extractfile(m).read() for m in members[1:]}  # type: ignore[union-attr]


@pytest.mark.slow
def test_the_best_trial_is_exported_downloaded_and_loads(finished: tuple[Service, str], tmp_path: Path) -> None:
    service, job_id = finished
    auth = service.auth("alice")
    exports = f"/v1/jobs/{job_id}/exports"
    posted = service.client.post(exports, json={}, headers=auth)
    assert posted.status_code == 202, posted.text
    again = service.client.post(exports, json={"trial": "best", "format": "native"}, headers=auth)
    assert again.status_code == 200 and again.json()["id"] == posted.json()["id"]
    export_id = posted.json()["id"]
    best = _get(service, f"/v1/jobs/{job_id}/best")
    done = _done(service, f"{exports}/{export_id}")
    assert done["state"] == "succeeded", done["failure_reason"]
    assert done["trial"] == "best" and done["format"] == "native" and done["plan_key"] == best["plan_key"]
    assert done["memory_bytes"] == best["memory_bytes"] and done["reloaded_kl"] == done["evaluated_kl"] is not None
    assert done["total_bytes"] == sum(f["bytes"] for f in done["files"]) > 0
    assert service.client.post(exports, json={}, headers=auth).json() == done  # still the same export

    response = service.client.get(f"{exports}/{export_id}/download", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-tar"
    assert response.headers["content-disposition"].startswith("attachment")
    assert int(response.headers["content-length"]) == len(response.content) == done["archive_bytes"]
    members = _members(response.content, export_id)
    manifest = json.loads(members.pop("manifest.json"))
    assert _sha256(json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n") == done["manifest_sha256"]
    assert {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in members.items()} == manifest["files"]
    assert [{"path": name, **entry} for name, entry in sorted(manifest["files"].items())] == done["files"]

    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    model: Any = budgetpress.load_compressed(tmp_path / export_id)  # a transformers model: generate is dynamic
    assert model.budgetpress_plan.key == best["plan_key"]
    ids = torch.tensor([list(b"def f(x):\n")])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
    assert (service.settings.export_dir() / export_id / "manifest.json").is_file()  # beside the database


@pytest.mark.slow
def test_a_bad_trial_is_refused_with_its_reason(finished: tuple[Service, str]) -> None:
    service, job_id = finished
    response = service.client.post(f"/v1/jobs/{job_id}/exports", json={"trial": 99}, headers=service.auth("alice"))
    assert response.status_code == 422
    assert "has trials 0..1; got trial 99" in response.json()["detail"]
    other = service.client.post(f"/v1/jobs/{job_id}/exports", json={}, headers=service.auth("bob"))
    assert other.status_code == 404


@pytest.mark.slow
def test_an_export_whose_runner_was_lost_is_run_again(finished: tuple[Service, str]) -> None:
    """An export left running by a lost runner (its lease expired) goes back to the queue and is run
    again; the same trial gives the same manifest as its other export."""
    service, job_id = finished
    exports = f"/v1/jobs/{job_id}/exports"
    best = _done(
        service, f"{exports}/{service.client.post(exports, json={}, headers=service.auth('alice')).json()['id']}"
    )
    number = best["trial_number"]
    assert best["state"] == "succeeded" and isinstance(number, int)
    lost = str(uuid.uuid4())
    with service.db.writing() as session:  # as a runner that then died would have left it
        now = utcnow()
        session.add(
            Export(
                id=lost,
                job_id=job_id,
                trial=str(number),
                format="native",
                state=ExportState.RUNNING.value,
                trial_number=number,
                attempts=1,
                owner="lost-runner",
                lease_expires_at=now - timedelta(seconds=1),
                created_at=now,
                updated_at=now,
                started_at=now,
            )
        )
    done = _done(service, f"{exports}/{lost}")
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    assert done["trial"] == number and done["plan_key"] == best["plan_key"]
    assert done["manifest_sha256"] == best["manifest_sha256"] and done["files"] == best["files"]
