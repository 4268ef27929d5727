"""Trials as the API shows them, and failing trials whose evaluation was abandoned.

The routes read trials through plain SQL (``_trialsql``); ``trial_dict`` is the same item built
from an Optuna frozen trial, the reference that the SQL reading is tested against.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

STRUCTURAL_ATTRS = frozenset(
    {"plan_json", "plan_key", "memory_bytes", "budget_bytes", "strategy", "fidelity", "fail_reason", "not_evaluated"}
)
STATE_NAMES = {
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.FAIL: "failed",
    TrialState.PRUNED: "pruned",
    TrialState.WAITING: "waiting",
}
Scalar = float | int | str | bool | None


def study_trials(
    storage: RDBStorage, study_name: str, states: tuple[TrialState, ...] | None = None
) -> list[FrozenTrial]:
    """The study's trials by number; none while the study does not exist yet."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False, states=states)


def scalar(value: Any) -> Scalar:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def trial_dict(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    fidelity = attrs.get("fidelity")
    return {
        "number": trial.number,
        "state": STATE_NAMES[trial.state],
        "plan_key": attrs.get("plan_key"),
        "params": {name: scalar(trial.params[name]) for name in sorted(trial.params)},
        "memory_bytes": attrs.get("memory_bytes"),
        "budget_bytes": attrs.get("budget_bytes"),
        "fidelity": fidelity if isinstance(fidelity, int) else None,
        "value": trial.value if trial.state == TrialState.COMPLETE else None,
        "metrics": {k: scalar(v) for k, v in sorted(attrs.items()) if k not in STRUCTURAL_ATTRS},
        "strategy": attrs.get("strategy"),
        "fail_reason": attrs.get("fail_reason"),
        "started_at": aware(trial.datetime_start),
        "completed_at": aware(trial.datetime_complete),
    }


def pareto_front(points: list[tuple[int, float, int, str]]) -> list[dict[str, Any]]:
    """Of (memory bytes, KL, number, plan key) points, those not dominated in memory and KL, by memory."""
    front: list[dict[str, Any]] = []
    best = float("inf")
    for memory, kl, number, key in sorted(points):
        if kl < best:
            best = kl
            front.append({"number": number, "plan_key": key, "memory_bytes": memory, "kl": kl})
    return front


@dataclass(frozen=True, kw_only=True)
class StudyProgress:
    complete: int
    best_kl: float | None


def fail_running_trials(storage: RDBStorage, study_name: str, reason: str) -> list[int]:
    """Fail every trial still running in the study; their numbers. Their evaluations were abandoned,
    so they are marked ``not_evaluated``: a resumed search does not count them as trials run."""
    failed = []
    for trial in study_trials(storage, study_name, states=(TrialState.RUNNING,)):
        try:
            storage.set_trial_user_attr(trial._trial_id, "not_evaluated", True)
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished in the meantime; its result stands
        failed.append(trial.number)
    if failed:
        logger.info("study %s: failed abandoned trials %s (%s)", study_name, failed, reason)
    return failed
