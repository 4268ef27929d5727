"""Ray actors that each hold a model resident, and a pool that keeps them all busy.

Ray listens on 127.0.0.1 only, with its auth mode set explicitly; a failed evaluation comes back
as a failed outcome with its reason, never as a swallowed error or a crashed search.

Every evaluation in flight holds a lease (``WorkerSpec.lease_s``, from ``BUDGETPRESS_EVAL_LEASE_S``;
600 s unless set). An evaluation whose worker died, or that overran its lease (its worker hung or
was stopped), is run once more on a fresh worker: the lost worker is killed and replaced, and a late
result of the lost attempt is never read. Only a second loss fails the evaluation, with its reason.
Evaluations have no side effect but their result, so running one twice is safe; the caller commits
the one outcome it gets back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from budgetpress.evaluators import SessionSpec
from budgetpress.search import Outcome
from budgetpress.space import Plan, Result, Split

logger = logging.getLogger(__name__)

RAY_AUTH_MODE = "disabled"  # a loopback-only cluster started and owned by this process
RAY_ADDRESS_ENV = "RAY_ADDRESS"
START_TIMEOUT_S = 300
LEASE_ENV = "BUDGETPRESS_EVAL_LEASE_S"
DEFAULT_LEASE_S = 600.0
WORKER_NICENESS = 10  # added to an evaluator's CPU niceness (lower priority than the service's API)
MAX_ATTEMPTS = 2  # an evaluation whose worker was lost runs once more; a second loss fails it


def eval_lease_s() -> float:
    """Seconds one evaluation may take before its worker is presumed hung: ``BUDGETPRESS_EVAL_LEASE_S``."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError as error:
        raise ValueError(f"{LEASE_ENV} must be a number of seconds; got {raw!r}") from error
    _check_lease(value)
    return value


def _check_lease(value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"an evaluation lease must be a positive number of seconds; got {value}")


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What each worker loads (plain data, so it pickles to the actors), and how it runs."""

    session: SessionSpec
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)
    lease_s: float = field(default_factory=eval_lease_s)


@ray.remote
class EvaluatorActor:
    """Holds one model and its variants; evaluates one plan at a time."""

    def __init__(self, spec: WorkerSpec, worker_id: str) -> None:
        import torch

        from budgetpress.evaluators import open_session

        torch.set_num_threads(spec.threads)
        # Evaluations soak up every core they are given; on a machine shared with the API they
        # must yield to it, so that polling clients are answered while a search runs.
        os.nice(WORKER_NICENESS)
        self._session = open_session(spec.session)
        self._worker_id = worker_id

    def evaluate(self, plan_json: str, split: str, max_tokens: int | None) -> Result:
        plan = Plan.from_json(plan_json)
        return self._session.evaluator.evaluate(plan, split=Split(split), max_tokens=max_tokens, worker=self._worker_id)

    def pid(self) -> int:
        return os.getpid()

    def identity(self) -> tuple[int, str]:
        """This worker's process id and the id of the Ray node it runs on."""
        return os.getpid(), ray.get_runtime_context().get_node_id()


def start_ray(n_cpus: int, env: dict[str, str]) -> bool:
    """Connect to the Ray cluster at ``$RAY_ADDRESS`` (a deployment's head node) if set, else start a
    local, loopback-only one; nothing if this process is already connected. True if this call
    connected (so ``ray.shutdown`` is this caller's to do: it stops a local cluster, and only
    disconnects from a deployment's)."""
    if ray.is_initialized():
        return False
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env={"env_vars": env})
        return True
    os.environ["RAY_AUTH_MODE"] = RAY_AUTH_MODE
    ray.init(
        # "local" always starts a cluster of our own: without it Ray joins whatever cluster its
        # /tmp/ray/ray_current_cluster file names, even one that has stopped.
        address="local",
        num_cpus=n_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {**env, "RAY_AUTH_MODE": RAY_AUTH_MODE}},
    )
    return True


def gpus_per_worker(cluster_gpus: float, n_workers: int) -> float:
    """A whole GPU for each worker where the cluster has enough; shares of them where it has fewer
    (evaluations are small beside a GPU's memory); none on a cluster without GPUs."""
    if cluster_gpus <= 0:
        return 0.0
    return min(1.0, math.floor(cluster_gpus) / n_workers) if cluster_gpus >= 1 else cluster_gpus / n_workers


def _root_cause(error: BaseException) -> str:
    """The innermost message of a Ray error, without Ray's multi-line wrapping."""
    cause: BaseException = error
    while True:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


class _Slot:
    """One worker place of the pool: its current actor, which a lost worker's replacement takes over."""

    def __init__(self, spec: WorkerSpec, worker_id: str, gpus: float) -> None:
        self.worker_id = worker_id
        self._spec = spec
        self._gpus = gpus
        self.actor: Any = None
        self.starting: Any = None  # the actor's identity call until it has started
        self.pid: int | None = None
        self._local = False
        self.start()

    def start(self) -> None:
        options = {"num_cpus": self._spec.threads, "num_gpus": self._gpus, "max_restarts": 0}
        self.actor = EvaluatorActor.options(**options).remote(self._spec, self.worker_id)  # type: ignore[attr-defined]
        self.starting = self.actor.identity.remote()
        self.pid = None

    def started(self, timeout: float | None = None) -> None:
        """Take the started actor's identity; raises the Ray error of an actor that could not start."""
        ref, self.starting = self.starting, None
        if ref is None:
            return
        self.pid, node = ray.get(ref, timeout=timeout)
        self._local = node == ray.get_runtime_context().get_node_id()

    def kill(self, *, alive: bool = True) -> None:
        """Kill the actor now. Ray alone waits a grace period for a stopped process (SIGSTOP); the
        process of a live actor on this node is also sent SIGKILL, so its CPU is free at once."""
        ray.kill(self.actor, no_restart=True)
        if alive and self.pid is not None and self._local:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None
        self.starting = None

    def replace(self, *, alive: bool) -> None:
        self.kill(alive=alive)
        self.start()


@dataclass(frozen=True, kw_only=True)
class _Attempt:
    index: int
    number: int
    slot: _Slot
    deadline: float


class WorkerPool:
    """``n_workers`` evaluator actors; ``evaluate`` hands each plan to the next free actor."""

    def __init__(self, spec: WorkerSpec, *, n_workers: int, lease_s: float | None = None) -> None:
        if n_workers < 1:
            raise ValueError(f"the pool needs at least 1 worker; got {n_workers}")
        self.lease_s = spec.lease_s if lease_s is None else lease_s
        _check_lease(self.lease_s)
        self._spec = spec
        self._owns_ray = start_ray(n_workers * spec.threads, spec.env)
        # Ray hides the GPUs from an actor that asks for none, so a GPU worker must ask for one.
        gpus = gpus_per_worker(float(ray.cluster_resources().get("GPU", 0.0)), n_workers)
        if gpus:
            logger.info("each of %d workers gets %.3g GPU", n_workers, gpus)
        self._slots = [_Slot(spec, f"worker-{i}", gpus) for i in range(n_workers)]
        # Surface a worker that cannot load the model now, with its own message, not at the first plan.
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            for slot in self._slots:
                slot.started(timeout=max(0.0, deadline - time.monotonic()))
        except RayActorError as error:
            self.close()
            raise RuntimeError(f"a worker could not start: {_root_cause(error)}") from error
        except GetTimeoutError as error:
            self.close()
            raise RuntimeError(
                f"{n_workers} worker(s) did not start within {START_TIMEOUT_S} s; the Ray "
                "cluster may have no free CPUs (or GPUs) for them"
            ) from error

    @property
    def size(self) -> int:
        return len(self._slots)

    def worker_pids(self) -> list[int]:
        return list(ray.get([slot.actor.pid.remote() for slot in self._slots]))

    def evaluate(
        self, plans: Sequence[Plan], *, split: Split = Split.CALIBRATION, max_tokens: int | None = None
    ) -> list[Outcome]:
        """Evaluate every plan; outcomes come back in the order of ``plans``."""
        return _Round(self, list(plans), split=split, max_tokens=max_tokens).run()

    @property
    def slots(self) -> list[_Slot]:
        return self._slots

    def close(self) -> None:
        for slot in self._slots:
            slot.kill()
        self._slots = []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Round:
    """One ``evaluate`` call: dispatch, collect, and run a lost attempt once more."""

    def __init__(self, pool: WorkerPool, plans: list[Plan], *, split: Split, max_tokens: int | None) -> None:
        self._pool = pool
        self._plans = plans
        self._args = (split.value, max_tokens)
        self._outcomes: list[Outcome | None] = [None] * len(plans)
        self._waiting: deque[tuple[int, int]] = deque((index, 1) for index in range(len(plans)))
        self._in_flight: dict[Any, _Attempt] = {}
        self._losses: dict[int, str] = {}

    def run(self) -> list[Outcome]:
        while self._waiting or self._in_flight:
            self._dispatch()
            ref = self._next_ready()
            if ref is not None:
                self._collect(ref)
            self._expire()
        return [outcome for outcome in self._outcomes if outcome is not None]

    def _dispatch(self) -> None:
        busy = {id(attempt.slot) for attempt in self._in_flight.values()}
        for slot in self._pool.slots:
            if not self._waiting:
                return
            if id(slot) in busy:
                continue
            index, number = self._waiting.popleft()
            ref = slot.actor.evaluate.remote(self._plans[index].to_json(), *self._args)
            self._in_flight[ref] = _Attempt(index=index, number=number, slot=slot, deadline=self._deadline(slot))

    def _deadline(self, slot: _Slot) -> float:
        """A lease from now; on a worker still starting, from its start (see ``_started``)."""
        return time.monotonic() + (START_TIMEOUT_S if slot.starting is not None else self._pool.lease_s)

    def _next_ready(self) -> Any:
        """The next finished evaluation, or None when a lease is due or a new worker started first."""
        starting = {a.slot.starting: a for a in self._in_flight.values() if a.slot.starting is not None}
        timeout = max(0.0, min(a.deadline for a in self._in_flight.values()) - time.monotonic())
        ready, _ = ray.wait([*self._in_flight, *starting], num_returns=1, timeout=timeout)
        if not ready:
            return None
        if ready[0] in starting:
            self._started(starting[ready[0]])
            return None
        return ready[0]

    def _started(self, attempt: _Attempt) -> None:
        """A replacement worker is up: the evaluation queued on it starts its lease now."""
        try:
            attempt.slot.started()
        except RayError:
            return  # it could not start; the evaluation queued on it fails with the reason
        for ref, queued in self._in_flight.items():
            if queued is attempt:
                self._in_flight[ref] = _Attempt(
                    index=attempt.index,
                    number=attempt.number,
                    slot=attempt.slot,
                    deadline=time.monotonic() + self._pool.lease_s,
                )

    def _collect(self, ref: Any) -> None:
        attempt = self._in_flight.pop(ref)
        try:
            self._outcomes[attempt.index] = Outcome(result=ray.get(ref))
        except RayTaskError as error:
            self._outcomes[attempt.index] = Outcome(failure=f"evaluation raised {_root_cause(error)}")
        except RayError as error:  # the worker died (killed, crashed, out of memory)
            self._lost(attempt, f"worker died during the evaluation: {_root_cause(error)}", alive=False)

    def _expire(self) -> None:
        now = time.monotonic()
        for ref, attempt in list(self._in_flight.items()):
            if attempt.deadline <= now:
                del self._in_flight[ref]  # never read again: a late result is dropped
                self._lost(
                    attempt,
                    f"the evaluation overran its lease of {self._pool.lease_s:g} s on {attempt.slot.worker_id}; "
                    "its worker was killed",
                    alive=True,
                )

    def _lost(self, attempt: _Attempt, reason: str, *, alive: bool) -> None:
        """Replace the lost worker; run the evaluation once more, or fail it after its second loss."""
        plan_key = self._plans[attempt.index].key[:12]
        attempt.slot.replace(alive=alive)
        if attempt.number < MAX_ATTEMPTS:
            logger.warning("plan %s: %s; evaluating it again on a fresh worker", plan_key, reason)
            self._losses[attempt.index] = reason
            self._waiting.appendleft((attempt.index, attempt.number + 1))
            return
        first = self._losses.get(attempt.index, "")
        logger.warning("plan %s: %s, for the second time; failing it", plan_key, reason)
        self._outcomes[attempt.index] = Outcome(failure=f"{reason} (attempt {attempt.number}; first attempt: {first})")
