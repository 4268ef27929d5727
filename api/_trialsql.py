"""Read-only SQL over Optuna's own tables (studies, trials, trial_values, trial_user_attributes,
trial_params) in the service's database: a page of trials, a study's progress and its Pareto points,
in a few indexed queries, without loading every trial through Optuna.

Only the columns read are declared here; Optuna owns and migrates the tables. The trials a page
shows are built exactly as ``trial_dict`` builds them from Optuna's frozen trials.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import datetime
from functools import lru_cache
from typing import Any

from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.trial import TrialState
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Enum,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    select,
)

from budgetpress.api._trials import STATE_NAMES, STRUCTURAL_ATTRS, StudyProgress, aware, scalar

_meta = MetaData()
_studies = Table("studies", _meta, Column("study_id", Integer), Column("study_name", String))
_trials = Table(
    "trials",
    _meta,
    Column("trial_id", Integer),
    Column("number", Integer),
    Column("study_id", Integer),
    Column("state", Enum(*(state.name for state in TrialState), name="trialstate", create_constraint=False)),
    Column("datetime_start", DateTime),
    Column("datetime_complete", DateTime),
)
_values = Table(
    "trial_values",
    _meta,
    Column("trial_id", Integer),
    Column("objective", Integer),
    Column("value", Float),
    Column("value_type", Enum("FINITE", "INF_POS", "INF_NEG", name="trialvaluetype", create_constraint=False)),
)
_attrs = Table(
    "trial_user_attributes", _meta, Column("trial_id", Integer), Column("key", String), Column("value_json", Text)
)
_params = Table(
    "trial_params",
    _meta,
    Column("trial_id", Integer),
    Column("param_name", String),
    Column("param_value", Float),
    Column("distribution_json", Text),
)
_STATES = {state.name: name for state, name in STATE_NAMES.items()}
_INFINITE = {"INF_POS": math.inf, "INF_NEG": -math.inf}
_PAGE_ATTRS_SKIPPED = ("plan_json",)  # large, and never part of a trial's item


_STUDY_ID = select(_studies.c.study_id).where(_studies.c.study_name == bindparam("study_name"))


def study_id(session: Connection, study_name: str) -> int | None:
    found: int | None = session.scalar(_STUDY_ID, {"study_name": study_name})
    return found


def _value(value: float | None, value_type: str | None) -> float | None:
    if value_type in _INFINITE:
        return _INFINITE[value_type]
    return value


def _first_value() -> Any:
    """trials LEFT JOIN their first objective's value."""
    return _trials.outerjoin(_values, and_(_values.c.trial_id == _trials.c.trial_id, _values.c.objective == 0))


_COUNT = select(func.count()).select_from(_trials).where(_trials.c.study_id == bindparam("study_id"))
_PAGE = (
    select(
        _trials.c.trial_id,
        _trials.c.number,
        _trials.c.state,
        _trials.c.datetime_start,
        _trials.c.datetime_complete,
        _values.c.value,
        _values.c.value_type,
    )
    .select_from(_first_value())
    .where(_trials.c.study_id == bindparam("study_id"))
    .order_by(_trials.c.number)
    .limit(bindparam("limit"))
    .offset(bindparam("offset"))
)
_PAGE_ATTRS = select(_attrs.c.trial_id, _attrs.c.key, _attrs.c.value_json).where(
    _attrs.c.trial_id.in_(bindparam("ids", expanding=True)), _attrs.c.key.not_in(_PAGE_ATTRS_SKIPPED)
)
_PAGE_PARAMS = select(
    _params.c.trial_id, _params.c.param_name, _params.c.param_value, _params.c.distribution_json
).where(_params.c.trial_id.in_(bindparam("ids", expanding=True)))


def trial_page(session: Connection, study_name: str, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """One page of the study's trials by number (as ``trial_dict`` makes them), and their total."""
    found = study_id(session, study_name)
    if found is None:
        return [], 0
    total = session.scalar(_COUNT, {"study_id": found}) or 0
    rows = session.execute(_PAGE, {"study_id": found, "limit": limit, "offset": offset}).all()
    ids = [row.trial_id for row in rows]
    attrs, params = _attrs_of(session, ids), _params_of(session, ids)
    items = [_item(row, attrs[row.trial_id], params[row.trial_id]) for row in rows]
    return items, int(total)


def _attrs_of(session: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = defaultdict(dict)
    if ids:
        rows = session.execute(_PAGE_ATTRS, {"ids": ids})
        for trial_id, key, value_json in rows:
            found[trial_id][key] = json.loads(value_json)
    return found


@lru_cache(maxsize=4096)
def _distribution(distribution_json: str) -> BaseDistribution:
    return json_to_distribution(distribution_json)


def _params_of(session: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = defaultdict(dict)
    if ids:
        rows = session.execute(_PAGE_PARAMS, {"ids": ids})
        for trial_id, name, internal, distribution_json in rows:
            found[trial_id][name] = _distribution(distribution_json).to_external_repr(internal)
    return found


def _item(row: Any, attrs: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    state = _STATES[row.state]
    fidelity = attrs.get("fidelity")
    return {
        "number": row.number,
        "state": state,
        "plan_key": attrs.get("plan_key"),
        "params": {name: scalar(params[name]) for name in sorted(params)},
        "memory_bytes": attrs.get("memory_bytes"),
        "budget_bytes": attrs.get("budget_bytes"),
        "fidelity": fidelity if isinstance(fidelity, int) else None,
        "value": _value(row.value, row.value_type) if state == "complete" else None,
        "metrics": {k: scalar(v) for k, v in sorted(attrs.items()) if k not in STRUCTURAL_ATTRS},
        "strategy": attrs.get("strategy"),
        "fail_reason": attrs.get("fail_reason"),
        "started_at": aware(_datetime(row.datetime_start)),
        "completed_at": aware(_datetime(row.datetime_complete)),
    }


def _datetime(value: Any) -> datetime | None:
    return value if isinstance(value, datetime) else None


def study_progress(session: Connection, study_name: str) -> StudyProgress:
    """Complete trials and the lowest objective among them, in one aggregate query."""
    row = session.execute(
        select(func.count(), func.min(_values.c.value))
        .select_from(_first_value())
        .join(_studies, _studies.c.study_id == _trials.c.study_id)
        .where(_studies.c.study_name == study_name, _trials.c.state == "COMPLETE")
    ).one()
    count, best = row
    return StudyProgress(complete=int(count or 0), best_kl=None if best is None else float(best))


def complete_points(session: Connection, study_name: str) -> list[tuple[int, float, int, str]]:
    """(memory bytes, objective, number, plan key) of every complete trial that records a plan."""
    memory = _attrs.alias("memory")
    key = _attrs.alias("plan_key")
    rows = session.execute(
        select(_trials.c.number, _values.c.value, _values.c.value_type, memory.c.value_json, key.c.value_json)
        .select_from(_first_value())
        .join(_studies, _studies.c.study_id == _trials.c.study_id)
        .join(memory, and_(memory.c.trial_id == _trials.c.trial_id, memory.c.key == "memory_bytes"))
        .join(key, and_(key.c.trial_id == _trials.c.trial_id, key.c.key == "plan_key"))
        .where(_studies.c.study_name == study_name, _trials.c.state == "COMPLETE")
    ).all()
    points = []
    for number, value, value_type, memory_json, key_json in rows:
        objective = _value(value, value_type)
        if objective is not None:
            points.append((int(json.loads(memory_json)), float(objective), int(number), str(json.loads(key_json))))
    return points


def plan_json_of(session: Connection, study_name: str, plan_key: str) -> dict[str, Any]:
    """The canonical plan JSON recorded by a complete trial of ``plan_key``; {} if there is none."""
    key = _attrs.alias("plan_key")
    plan = _attrs.alias("plan_json")
    text = session.scalar(
        select(plan.c.value_json)
        .select_from(_trials)
        .join(_studies, _studies.c.study_id == _trials.c.study_id)
        .join(key, and_(key.c.trial_id == _trials.c.trial_id, key.c.key == "plan_key"))
        .join(plan, and_(plan.c.trial_id == _trials.c.trial_id, plan.c.key == "plan_json"))
        .where(
            _studies.c.study_name == study_name,
            _trials.c.state == "COMPLETE",
            key.c.value_json == json.dumps(plan_key),
        )
        .order_by(_trials.c.number)
        .limit(1)
    )
    if text is None:
        return {}
    found: dict[str, Any] = json.loads(json.loads(text))
    return found
