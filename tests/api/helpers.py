"""Waiting on jobs, reading studies and finding Ray worker processes in the service tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import optuna
import psutil

from budgetpress.api._db import optuna_storage_url


def wait_for(condition: Callable[[], Any], *, timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def study_trials(url: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(optuna_storage_url(url))
    try:
        return storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=True)
    finally:
        storage.engine.dispose()


def evaluator_processes(root: int | None = None) -> list[psutil.Process]:
    """Ray actor processes of the evaluators (their titles read ``ray::EvaluatorActor...``) under
    ``root`` (this test process by default: a local cluster's processes are its descendants), so
    no test ever signals a process of anything else running on the machine."""
    found = []
    try:
        descendants = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            if "EvaluatorActor" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


def complete_keys(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    return [t.user_attrs["plan_key"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
