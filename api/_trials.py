"""Reading a job's trials from its Optuna study, and failing trials whose evaluation was abandoned."""

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

_STRUCTURAL = frozenset(
    {"plan_json", "plan_key", "memory_bytes", "budget_bytes", "strategy", "fidelity", "fail_reason"}
)
_STATE_NAMES = {
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


def _scalar(value: Any) -> Scalar:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def trial_dict(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    fidelity = attrs.get("fidelity")
    return {
        "number": trial.number,
        "state": _STATE_NAMES[trial.state],
        "plan_key": attrs.get("plan_key"),
        "params": {name: _scalar(value) for name, value in trial.params.items()},
        "memory_bytes": attrs.get("memory_bytes"),
        "budget_bytes": attrs.get("budget_bytes"),
        "fidelity": fidelity if isinstance(fidelity, int) else None,
        "value": trial.value if trial.state == TrialState.COMPLETE else None,
        "metrics": {k: _scalar(v) for k, v in sorted(attrs.items()) if k not in _STRUCTURAL},
        "strategy": attrs.get("strategy"),
        "fail_reason": attrs.get("fail_reason"),
        "started_at": _aware(trial.datetime_start),
        "completed_at": _aware(trial.datetime_complete),
    }


def _feasible(trial: FrozenTrial) -> bool:
    return trial.value is not None and "memory_bytes" in trial.user_attrs and "plan_key" in trial.user_attrs


def pareto_front(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    """Complete trials not dominated in (memory bytes, KL), by memory."""
    points = sorted(
        (int(t.user_attrs["memory_bytes"]), float(t.value or 0.0), t.number, str(t.user_attrs["plan_key"]))
        for t in trials
        if t.state == TrialState.COMPLETE and _feasible(t)
    )
    front: list[dict[str, Any]] = []
    best = float("inf")
    for memory, kl, number, key in points:
        if kl < best:
            best = kl
            front.append({"number": number, "plan_key": key, "memory_bytes": memory, "kl": kl})
    return front


@dataclass(frozen=True, kw_only=True)
class StudyProgress:
    complete: int
    best_kl: float | None


def study_progress(storage: RDBStorage, study_name: str) -> StudyProgress:
    complete = study_trials(storage, study_name, states=(TrialState.COMPLETE,))
    values = [t.value for t in complete if t.value is not None]
    return StudyProgress(complete=len(complete), best_kl=min(values) if values else None)


def fail_running_trials(storage: RDBStorage, study_name: str, reason: str) -> list[int]:
    """Fail every trial still running in the study (its evaluation was abandoned); their numbers."""
    failed = []
    for trial in study_trials(storage, study_name, states=(TrialState.RUNNING,)):
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished in the meantime; its result stands
        failed.append(trial.number)
    if failed:
        logger.info("study %s: failed abandoned trials %s (%s)", study_name, failed, reason)
    return failed
