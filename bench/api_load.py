"""API latency while a job runs: p50/p95 of GET /v1/jobs/{id} and GET /v1/jobs/{id}/trials with 20
concurrent clients, on loopback, against a real `budgetpress serve` subprocess (SQLite by default).

The measurement starts once the job has a complete trial (past its start-up) and holds a bounded
number of requests; it stops by itself. With --json the last line is one JSON object
with p50_ms, p95_ms, requests and errors_5xx (and the per-route figures).

    .venv/bin/python bench/api_load.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

TARGET_P95_MS = 50.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the service did not answer within {timeout_s} s")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _client(base: str, key: str, paths: list[str], n: int, out: list[tuple[str, float, int]]) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for i in range(n):
            path = paths[i % len(paths)]
            started = time.perf_counter()
            status = client.get(path).status_code
            out.append((path.rsplit("/", 1)[-1], (time.perf_counter() - started) * 1000, status))


def _start(workdir: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    log = open(workdir / f"{args[0]}.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "budgetpress", *args], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT
    )


def _processes(workdir: Path, env: dict[str, str], port: int, split: bool) -> list[subprocess.Popen[bytes]]:
    """``budgetpress serve`` (API and runner in one process), or with ``split`` the API alone
    (``serve --no-runner``) beside a ``budgetpress runner`` process."""
    if not split:
        return [_start(workdir, env, "serve", "--port", str(port))]
    return [_start(workdir, env, "serve", "--port", str(port), "--no-runner"), _start(workdir, env, "runner")]


def _submit(base: str, key: str, args: argparse.Namespace) -> str:
    body = {"model": args.model, "budget": args.budget, "strategy": "random", "n_trials": args.trials, "seed": 0}
    response = httpx.post(f"{base}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    response.raise_for_status()
    job_id: str = response.json()["id"]
    return job_id


def _wait_trials(base: str, key: str, job_id: str, timeout_s: float) -> None:
    """Until the job runs its search proper: past start-up, with trials in its study."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if job["state"] != "running" and job["state"] != "queued":
            raise RuntimeError(f"the job ended {job['state']} before the measurement: {job['failure_reason']}")
        if job["progress"]["trials_done"] >= 1:
            return
        time.sleep(0.3)
    raise RuntimeError(f"the job had no complete trial within {timeout_s} s")


def _measure(base: str, key: str, job_id: str, args: argparse.Namespace) -> dict[str, Any]:
    paths = [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/trials"]
    samples: list[tuple[str, float, int]] = []
    per_client = args.requests // args.clients
    threads = [
        threading.Thread(target=_client, args=(base, key, paths[i % 2 :] + paths[: i % 2], per_client, samples))
        for i in range(args.clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = [ms for _, ms, _ in samples]
    job = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
    result: dict[str, Any] = {
        "clients": args.clients,
        "requests": len(samples),
        "errors_5xx": sum(status >= 500 for _, _, status in samples),
        "non_200": sum(status != 200 for _, _, status in samples),
        "p50_ms": round(statistics.median(latencies), 2),
        "p95_ms": round(_percentile(latencies, 0.95), 2),
        "seconds": round(elapsed, 2),
        "job_state_after": job["state"],
        "trials_done_after": job["progress"]["trials_done"],
        "target_p95_ms": TARGET_P95_MS,
    }
    for route in ("job", "trials"):
        chosen = [ms for name, ms, _ in samples if (name == "trials") == (route == "trials")]
        result[f"{route}_p50_ms"] = round(statistics.median(chosen), 2)
        result[f"{route}_p95_ms"] = round(_percentile(chosen, 0.95), 2)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bp-api-load-") as tmp:
        workdir = Path(tmp)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "BUDGETPRESS_DATABASE_URL": args.storage or f"sqlite:///{workdir / 'service.db'}"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["BUDGETPRESS_RATE_PER_S"] = "0"  # one tenant's 20 clients: measure latency, not the limiter
        done = subprocess.run(
            [sys.executable, "-m", "budgetpress", "keys", "create", "--tenant", "bench"],
            env=env,
            cwd=workdir,
            capture_output=True,
            check=True,
        )
        key = done.stdout.decode().strip().splitlines()[-1]
        processes = _processes(workdir, env, port, args.split)
        try:
            _wait_healthy(base, 120)
            job_id = _submit(base, key, args)
            _wait_trials(base, key, job_id, 600)
            time.sleep(args.warmup_s)
            return {
                "mode": "serve --no-runner + runner" if args.split else "serve",
                **_measure(base, key, job_id, args),
            }
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="total requests over all clients")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--budget", default="35%")
    parser.add_argument("--trials", type=int, default=200, help="enough that the job runs through the measurement")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="after the first complete trial")
    parser.add_argument(
        "--split", action="store_true", help="the API (serve --no-runner) and the runner in separate processes"
    )
    parser.add_argument("--storage", default=None, help="database URL (default: a SQLite file in a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
