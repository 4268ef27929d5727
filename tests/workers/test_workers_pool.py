"""The pool on a real local Ray cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from budgetpress.search import Outcome
from budgetpress.space import LinearSetting, Plan, SearchSpace, Split, Workload
from budgetpress.workers import WorkerPool, WorkerSpec


def _spec(model_dir: Path) -> WorkerSpec:
    from budgetpress.evaluators import SessionSpec, TokenSpec, build_store, profile_source, resolve_model

    tokens = TokenSpec(seq_len=128, calibration_sequences=4, evaluation_sequences=4)
    session = SessionSpec(model=str(model_dir), workload=Workload(context=128), tokens=tokens)
    profile = profile_source(resolve_model(str(model_dir)))
    build_store(session, SearchSpace.bits_only(profile), progress=False)
    return WorkerSpec(session=session)


@pytest.fixture(scope="module")
def pool(micro_model_dir: Path) -> Iterator[WorkerPool]:
    with WorkerPool(_spec(micro_model_dir), n_workers=2) as started:
        yield started


def test_outcomes_come_back_in_order_from_both_workers(pool: WorkerPool, micro_model_dir: Path) -> None:
    from budgetpress.evaluators import profile_source, resolve_model

    units = profile_source(resolve_model(str(micro_model_dir))).linear_units
    plans = [Plan.uniform(units, linear=LinearSetting(bits=b, group_size=128)) for b in (2, 8, 3, 4)]
    outcomes = pool.evaluate(plans)
    kls = [o.result.kl for o in outcomes if o.result is not None]
    assert len(kls) == 4
    assert kls[0] > kls[2] > kls[3] > kls[1]
    assert {o.result.worker for o in outcomes if o.result is not None} == {"worker-0", "worker-1"}
    again = pool.evaluate(plans)
    assert [o.result.kl for o in again if o.result is not None] == kls


def test_failed_evaluation_is_a_failed_outcome_with_reason(pool: WorkerPool, micro_model_dir: Path) -> None:
    from budgetpress.evaluators import profile_source, resolve_model

    unit = profile_source(resolve_model(str(micro_model_dir))).linear_units[0].key
    good = Plan({unit: LinearSetting(bits=4, group_size=128)})
    bad = Plan({unit: LinearSetting(bits=4, rank=8)})  # not in the level store
    outcomes = pool.evaluate([bad, good], split=Split.EVALUATION)
    assert outcomes[0] == Outcome(failure=outcomes[0].failure)
    assert outcomes[0].failure is not None and "has no entry for unit" in outcomes[0].failure
    assert outcomes[1].result is not None and outcomes[1].result.split is Split.EVALUATION


def _plans(micro_model_dir: Path, bits: tuple[int, ...]) -> list[Plan]:
    from budgetpress.evaluators import profile_source, resolve_model

    units = profile_source(resolve_model(str(micro_model_dir))).linear_units
    return [Plan.uniform(units, linear=LinearSetting(bits=b, group_size=128)) for b in bits]


def _evaluator_pids() -> set[int]:
    """This test process's Ray evaluator actors (the local cluster's processes are its descendants)."""
    found = set()
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EvaluatorActor" in " ".join(process.cmdline()):
                found.add(process.pid)
    return found


def _in_background(pool: WorkerPool, plans: list[Plan]) -> tuple[threading.Thread, list[list[Outcome]]]:
    out: list[list[Outcome]] = []
    thread = threading.Thread(target=lambda: out.append(pool.evaluate(plans)), daemon=True)
    thread.start()
    return thread, out


def _wait_new_pid(known: set[int], timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = _evaluator_pids() - known
        if new:
            return new.pop()
        time.sleep(0.02)
    raise AssertionError("no new evaluator process appeared")


def _gone(pid: int, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_killed_worker_is_replaced_and_its_evaluation_run_again(pool: WorkerPool, micro_model_dir: Path) -> None:
    plans = _plans(micro_model_dir, (2, 8, 3, 4))
    expected = [o.result.kl for o in pool.evaluate(plans) if o.result is not None]
    known = set(pool.worker_pids())
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)  # it takes its next plan and hangs on it until killed
    thread, out = _in_background(pool, plans)
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    assert _wait_new_pid(known)
    thread.join(120)
    assert [o.result.kl for o in out[0] if o.result is not None] == expected
    assert victim not in pool.worker_pids() and len(set(pool.worker_pids())) == 2


def test_a_second_death_fails_the_evaluation_with_its_reason(pool: WorkerPool, micro_model_dir: Path) -> None:
    pids = pool.worker_pids()
    os.kill(pids[0], signal.SIGSTOP)
    thread, out = _in_background(pool, _plans(micro_model_dir, (4,)))  # one plan: it goes to worker-0
    time.sleep(0.5)
    os.kill(pids[0], signal.SIGKILL)
    os.kill(_wait_new_pid(set(pids)), signal.SIGKILL)  # the replacement dies while it loads the model
    thread.join(120)
    [outcome] = out[0]
    assert outcome.failure is not None and outcome.failure.count("worker died during the evaluation") == 2
    assert len(pool.evaluate(_plans(micro_model_dir, (8, 4)))) == 2  # the pool works on


def test_a_stopped_worker_past_its_lease_is_killed_and_its_plan_run_again(
    pool: WorkerPool, micro_model_dir: Path
) -> None:
    plans = _plans(micro_model_dir, (8, 4, 3, 2))
    expected = [o.result.kl for o in pool.evaluate(plans) if o.result is not None]
    victim = pool.worker_pids()[1]
    lease, pool.lease_s = pool.lease_s, 2.0
    try:
        os.kill(victim, signal.SIGSTOP)
        started = time.monotonic()
        outcomes = pool.evaluate(plans)
        elapsed = time.monotonic() - started
    finally:
        pool.lease_s = lease
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)  # a late result, if any came, is never read
    assert [o.result.kl for o in outcomes if o.result is not None] == expected
    assert _gone(victim, timeout_s=10)  # killed, not left stopped
    assert elapsed < 60, elapsed
    assert len(pool.evaluate(plans[:2])) == 2


def test_the_lease_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, micro_model_dir: Path) -> None:
    from budgetpress.evaluators import SessionSpec
    from budgetpress.workers._pool import DEFAULT_LEASE_S, LEASE_ENV

    session = SessionSpec(model=str(micro_model_dir), workload=Workload(context=128))
    monkeypatch.delenv(LEASE_ENV, raising=False)
    assert WorkerSpec(session=session).lease_s == DEFAULT_LEASE_S
    monkeypatch.setenv(LEASE_ENV, "7.5")
    assert WorkerSpec(session=session).lease_s == 7.5
    monkeypatch.setenv(LEASE_ENV, "soon")
    with pytest.raises(ValueError, match=LEASE_ENV):
        WorkerSpec(session=session)


@pytest.mark.parametrize(
    ("cluster_gpus", "n_workers", "each"),
    [(0, 3, 0.0), (1, 1, 1.0), (1, 2, 0.5), (4, 2, 1.0), (3, 2, 1.0), (2, 3, 2 / 3), (0.5, 2, 0.25)],
)
def test_workers_ask_for_gpus_only_where_the_cluster_has_them(cluster_gpus: float, n_workers: int, each: float) -> None:
    from budgetpress.workers._pool import gpus_per_worker

    assert gpus_per_worker(cluster_gpus, n_workers) == pytest.approx(each)
    assert gpus_per_worker(cluster_gpus, n_workers) * n_workers <= max(cluster_gpus, 0) + 1e-9


_CONNECT = """
import sys, ray
from budgetpress.evaluators import SessionSpec, TokenSpec
from budgetpress.space import Plan, Workload
from budgetpress.workers import WorkerPool, WorkerSpec

tokens = TokenSpec(seq_len=128, calibration_sequences=4, evaluation_sequences=4)
session = SessionSpec(model=sys.argv[1], workload=Workload(context=128), tokens=tokens, store_root=sys.argv[2])
with WorkerPool(WorkerSpec(session=session), n_workers=1) as pool:
    [outcome] = pool.evaluate([Plan({})])
    print("cluster", sorted(ray.cluster_resources()), "kl", outcome.result.kl, flush=True)
"""


def _wait_listening(port: int, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")


def test_a_pool_joins_the_cluster_named_by_ray_address(tmp_path: Path, micro_model_dir: Path) -> None:
    """What docker-compose does: a Ray head runs apart; the service connects to it as a Ray client
    (``RAY_ADDRESS=ray://host:port``), runs its workers there, and leaves it running when it is done."""
    import socket
    import subprocess
    import sys

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    gcs_port, client_port = ports
    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
         "--num-cpus=1", "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
         '--resources={"the_deployments_head": 1}'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )  # fmt: skip
    try:
        _wait_listening(client_port, timeout_s=120)
        client_env = {**env, "RAY_ADDRESS": f"ray://127.0.0.1:{client_port}", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-c", _CONNECT, str(micro_model_dir), str(tmp_path / "store")]
        done = subprocess.run(command, env=client_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        # The head's own resource shows the workers ran on it, not on a cluster of the pool's own.
        assert "'the_deployments_head'" in done.stdout and "kl 0.0" in done.stdout, done.stdout
        assert head.poll() is None, "disconnecting must leave the deployment's cluster running"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        # `ray start` named this head the machine's current cluster; it is gone now.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()


def test_evaluators_yield_the_cpu_to_the_service(pool: WorkerPool) -> None:
    from budgetpress.workers._pool import WORKER_NICENESS

    mine = psutil.Process().nice()
    assert all(psutil.Process(pid).nice() >= min(19, mine + WORKER_NICENESS) for pid in pool.worker_pids())
