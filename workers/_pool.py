"""Ray actors that each hold a model resident, and a pool that keeps them all busy.

Ray listens on 127.0.0.1 only, with its auth mode set explicitly; a failed evaluation comes back
as a failed outcome with its reason, never as a swallowed error or a crashed search.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from budgetpress.evaluators import SessionSpec
from budgetpress.search import Outcome
from budgetpress.space import Plan, Result, Split

logger = logging.getLogger(__name__)

RAY_AUTH_MODE = "disabled"  # a loopback-only cluster started and owned by this process
START_TIMEOUT_S = 300


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What each worker loads (plain data, so it pickles to the actors), and how it runs."""

    session: SessionSpec
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)


@ray.remote
class EvaluatorActor:
    """Holds one model and its variants; evaluates one plan at a time."""

    def __init__(self, spec: WorkerSpec, worker_id: str) -> None:
        import torch

        from budgetpress.evaluators import open_session

        torch.set_num_threads(spec.threads)
        self._session = open_session(spec.session)
        self._worker_id = worker_id

    def evaluate(self, plan_json: str, split: str, max_tokens: int | None) -> Result:
        plan = Plan.from_json(plan_json)
        return self._session.evaluator.evaluate(plan, split=Split(split), max_tokens=max_tokens, worker=self._worker_id)

    def pid(self) -> int:
        return os.getpid()


def start_ray(n_cpus: int, env: dict[str, str]) -> bool:
    """Start a local, loopback-only Ray cluster unless one is running; True if this call started it."""
    if ray.is_initialized():
        return False
    os.environ["RAY_AUTH_MODE"] = RAY_AUTH_MODE
    ray.init(
        num_cpus=n_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {**env, "RAY_AUTH_MODE": RAY_AUTH_MODE}},
    )
    return True


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


class WorkerPool:
    """``n_workers`` evaluator actors; ``evaluate`` hands each plan to the next free actor."""

    def __init__(self, spec: WorkerSpec, *, n_workers: int) -> None:
        if n_workers < 1:
            raise ValueError(f"the pool needs at least 1 worker; got {n_workers}")
        self._spec = spec
        self._owns_ray = start_ray(n_workers * spec.threads, spec.env)
        self._actors = [
            EvaluatorActor.options(num_cpus=spec.threads, max_restarts=1).remote(spec, f"worker-{i}")  # type: ignore[attr-defined]
            for i in range(n_workers)
        ]
        # Surface a worker that cannot load the model now, with its own message, not at the first plan.
        try:
            ray.get([actor.pid.remote() for actor in self._actors], timeout=START_TIMEOUT_S)
        except RayActorError as error:
            self.close()
            raise RuntimeError(f"a worker could not start: {_root_cause(error)}") from error
        except GetTimeoutError as error:
            self.close()
            raise RuntimeError(
                f"{n_workers} worker(s) did not start within {START_TIMEOUT_S} s; the Ray "
                "cluster may have no free CPUs for them"
            ) from error

    @property
    def size(self) -> int:
        return len(self._actors)

    def worker_pids(self) -> list[int]:
        return list(ray.get([actor.pid.remote() for actor in self._actors]))

    def evaluate(
        self, plans: Sequence[Plan], *, split: Split = Split.CALIBRATION, max_tokens: int | None = None
    ) -> list[Outcome]:
        """Evaluate every plan; outcomes come back in the order of ``plans``."""
        outcomes: list[Outcome | None] = [None] * len(plans)
        waiting = list(enumerate(plans))
        free = list(self._actors)
        in_flight: dict[Any, tuple[int, Any]] = {}
        while waiting or in_flight:
            while waiting and free:
                index, plan = waiting.pop(0)
                actor = free.pop(0)
                in_flight[actor.evaluate.remote(plan.to_json(), split.value, max_tokens)] = (index, actor)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            index, actor = in_flight.pop(ready[0])
            outcomes[index] = self._collect(ready[0])
            free.append(actor)
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _collect(ref: Any) -> Outcome:
        try:
            return Outcome(result=ray.get(ref))
        except RayTaskError as error:
            return Outcome(failure=f"evaluation raised {_root_cause(error)}")
        except RayActorError as error:
            return Outcome(failure=f"worker died during the evaluation: {_root_cause(error)}")

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
