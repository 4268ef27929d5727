"""Check 1: kill -9 the service (a real subprocess) while 3 jobs run; restart it; all 3 finish
with exactly their n_trials complete trials, every trial complete before the kill unchanged, no
plan key with two complete results, nothing left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest

from .conftest import runner_job
from .helpers import complete_keys, study_trials, wait_for

N_TRIALS = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Served:
    def __init__(self, url: str, model_root: Path, workdir: Path) -> None:
        self.url = url
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BUDGETPRESS_DATABASE_URL": url,
            "BUDGETPRESS_MODEL_ROOT": str(model_root),
            "BUDGETPRESS_LEASE_S": "4",
            "BUDGETPRESS_RUNNER_SLOTS": "3",
            "BUDGETPRESS_SEQ_LEN": "128",
            "BUDGETPRESS_CALIBRATION_SEQUENCES": "4",
            "BUDGETPRESS_EVALUATION_SEQUENCES": "4",
        }
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "budgetpress", *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            check=True,
        )
        return done.stdout.decode()

    def start(self) -> None:
        log = open(self.workdir / "serve.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "budgetpress", "serve", "--port", str(self.port)],
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._healthy, timeout_s=60, what="the service to answer")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(60)


@pytest.fixture
def served(sqlite_url: str, model_root: Path, tmp_path: Path) -> Iterator[_Served]:
    service = _Served(sqlite_url, model_root, tmp_path)
    yield service
    service.stop(signal.SIGTERM)


@pytest.mark.slow
def test_kill_9_while_three_jobs_run(served: _Served) -> None:
    key = served.cli("keys", "create", "--tenant", "alice").strip().splitlines()[-1]
    client = httpx.Client(base_url=served.base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    served.start()
    ids = [client.post("/v1/jobs", json=runner_job(n_trials=N_TRIALS, seed=seed)).json()["id"] for seed in range(3)]

    def jobs() -> list[dict[str, Any]]:
        return [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]

    def all_running() -> bool:
        found = jobs()
        return all(j["state"] == "running" for j in found) and any(j["progress"]["trials_done"] for j in found)

    wait_for(all_running, timeout_s=240, what="all three jobs running, one with a complete trial")
    before = {job["id"]: _complete(served.url, job["study_name"]) for job in jobs()}
    assert served.process is not None
    served.process.kill()  # SIGKILL
    served.process.wait(10)
    served.start()

    def all_finished() -> list[dict[str, Any]] | None:
        found = jobs()
        return found if all(j["state"] in ("succeeded", "failed", "cancelled") for j in found) else None

    finished = wait_for(all_finished, timeout_s=300, what="all three jobs to finish")
    for job in finished:
        assert job["state"] == "succeeded", job["failure_reason"]
        trials = study_trials(served.url, job["study_name"])
        assert all(t.state != optuna.trial.TrialState.RUNNING for t in trials)
        keys = complete_keys(trials)
        assert len(keys) == len(set(keys))
        after = _complete(served.url, job["study_name"])
        assert {n: after[n] for n in before[job["id"]]} == before[job["id"]]
        assert job["attempts"] == 2
        assert len(keys) == N_TRIALS


def _complete(url: str, study_name: str) -> dict[int, tuple[str, float | None]]:
    return {
        t.number: (t.user_attrs["plan_key"], t.value)
        for t in study_trials(url, study_name)
        if t.state == optuna.trial.TrialState.COMPLETE
    }
