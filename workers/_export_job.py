"""Exporting a trial of a search's Optuna study: study → plan and session → the evaluators' export.

A search records, in its study's user attributes, what its workers loaded (``SESSION_ATTR``: the
model, token specs, level store and methods, written by ``session_record``); each trial records its
plan JSON, KL, split and fidelity. ``export_from_study`` reads both, rebuilds the session and calls
``evaluators.export_trial``. The CLI's ``export`` runs it, and so can the service.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc

from budgetpress.evaluators import (
    EvaluatedPlan,
    ExportFormat,
    KVTokenSpec,
    SessionSpec,
    TokenSpec,
    TrialExport,
    export_trial,
)
from budgetpress.search import best_plan
from budgetpress.space import Plan, Split, Workload

logger = logging.getLogger(__name__)

SESSION_ATTR = "session"
SESSION_VERSION = 1
_SESSION_KEYS = ("version", "model", "workload", "tokens", "store_root", "methods", "kv_tokens")


def session_record(spec: SessionSpec) -> dict[str, Any]:
    """The JSON-able record of a session spec, as a search stores it under ``SESSION_ATTR``."""
    return {
        "version": SESSION_VERSION,
        "model": spec.model,
        "workload": {"batch": spec.workload.batch, "context": spec.workload.context},
        "tokens": _plain(asdict(spec.tokens)),
        "store_root": spec.store_root,
        "methods": spec.methods,
        "kv_tokens": None if spec.kv_tokens is None else _plain(asdict(spec.kv_tokens)),
    }


def _plain(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _spec_fields(record: Mapping[str, Any], name: str) -> dict[str, Any]:
    fields = record[name]
    if not isinstance(fields, Mapping):
        raise ValueError(f"session record {name!r} must be an object; got {fields!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def session_from_record(record: Any) -> SessionSpec:
    """Inverse of ``session_record``; a malformed record raises ValueError saying what is wrong."""
    if not isinstance(record, Mapping) or set(record) != set(_SESSION_KEYS):
        keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"session record must have exactly the keys {list(_SESSION_KEYS)}; got {keys}")
    if record["version"] != SESSION_VERSION:
        raise ValueError(f"session record version {record['version']!r} is not {SESSION_VERSION}")
    try:
        kv = None if record["kv_tokens"] is None else KVTokenSpec(**_spec_fields(record, "kv_tokens"))
        return SessionSpec(
            model=str(record["model"]),
            workload=Workload(**record["workload"]),
            tokens=TokenSpec(**_spec_fields(record, "tokens")),
            store_root=str(record["store_root"]),
            methods=str(record["methods"]),
            kv_tokens=kv,
        )
    except TypeError as error:
        raise ValueError(f"malformed session record: {error}") from error


def load_study(storage: str, study_name: str) -> optuna.Study:
    try:
        return optuna.load_study(storage=storage, study_name=study_name)
    except KeyError as error:
        raise ValueError(f"no study {study_name!r} in {storage}") from error
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, ModuleNotFoundError) as error:
        raise ValueError(f"cannot open storage {storage!r}: {error}") from error


def study_session(study: optuna.Study) -> SessionSpec:
    """The session the study's search evaluated with, from its ``SESSION_ATTR`` record."""
    record = study.user_attrs.get(SESSION_ATTR)
    if record is None:
        raise ValueError(
            f"study {study.study_name!r} does not record its session (user attribute {SESSION_ATTR!r}: "
            "model, token sets, level store, methods), so its variants cannot be rebuilt; "
            "run the search again with this version of budgetpress"
        )
    return session_from_record(record)


def select_trial(study: optuna.Study, trial: str | int) -> optuna.trial.FrozenTrial:
    """``"best"`` (the controller's best feasible trial) or a trial number, which must be complete."""
    if trial == "best":
        return best_plan(study)[1]
    number = _trial_number(trial)
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ValueError(f"study {study.study_name!r} has trials 0..{len(trials) - 1}; got trial {number}")
    chosen = trials[number]
    if chosen.state is not optuna.trial.TrialState.COMPLETE or "plan_json" not in chosen.user_attrs:
        reason = chosen.user_attrs.get("fail_reason", "")
        raise ValueError(
            f"trial {number} of study {study.study_name!r} is {chosen.state.name}, not a complete "
            f"evaluated plan{': ' + reason if reason else ''}"
        )
    return chosen


def _trial_number(trial: str | int) -> int:
    if isinstance(trial, int):
        return trial
    if not trial.isdecimal():
        raise ValueError(f"trial must be 'best' or a trial number; got {trial!r}")
    return int(trial)


def evaluated_plan(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> EvaluatedPlan:
    """The trial's plan with what its evaluation recorded (KL, split, fidelity, memory)."""
    attrs = trial.user_attrs
    kl = attrs.get("kl")
    return EvaluatedPlan(
        plan=Plan.from_json(attrs["plan_json"]),
        kl=None if kl is None else float(kl),
        split=Split(attrs.get("split", Split.CALIBRATION.value)),
        fidelity=attrs.get("fidelity"),
        memory_bytes=attrs.get("memory_bytes"),
        provenance={"study": study.study_name, "trial": trial.number, "kl": kl, "ppl": attrs.get("ppl")},
    )


def export_from_study(
    *,
    storage: str,
    study_name: str,
    out: Path | str,
    trial: str | int = "best",
    export_format: ExportFormat | str = ExportFormat.NATIVE,
    verify: bool = True,
    root: Path | None = None,
    overwrite: bool = False,
    densify_sparse: bool = False,
) -> tuple[int, TrialExport]:
    """Export one trial's plan of a study (default: its best); returns the trial number and the export."""
    study = load_study(storage, study_name)
    chosen = select_trial(study, trial)
    spec = study_session(study)
    logger.info("exporting trial %d of study %s (%s)", chosen.number, study_name, ExportFormat(export_format).value)
    exported = export_trial(
        spec,
        evaluated_plan(study, chosen),
        out=out,
        export_format=export_format,
        verify=verify,
        root=root,
        overwrite=overwrite,
        densify_sparse=densify_sparse,
    )
    return chosen.number, exported
