"""Trials read by plain SQL over Optuna's tables equal the same trials read through Optuna, on
SQLite and PostgreSQL: every state, parameter kind, attribute, infinite values, paging."""

from __future__ import annotations

import json

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from budgetpress.api import Database, migrate
from budgetpress.api._db import optuna_storage_url
from budgetpress.api._trials import pareto_front, study_trials, trial_dict
from budgetpress.api._trialsql import complete_points, plan_json_of, study_progress, trial_page

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _fill(study: optuna.Study) -> None:
    for number in range(7):
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_int("n", 1, 9)
        trial.suggest_categorical("c", ["a", "b", None])
        trial.set_user_attr("plan_key", f"key-{number % 5}")
        trial.set_user_attr("plan_json", json.dumps({"units": {"u": number}}))
        trial.set_user_attr("memory_bytes", 1000 - 10 * number)
        trial.set_user_attr("fidelity", 64 if number == 3 else None)
        trial.set_user_attr("extra", {"nested": [number]})
        if number == 2:
            trial.set_user_attr("fail_reason", "boom")
            study.tell(trial, state=TrialState.FAIL)
        elif number == 4:
            study.tell(trial, float("inf"))
        elif number != 6:  # 6 stays running
            study.tell(trial, 1.0 / (number + 1))


def test_sql_trials_equal_optuna_trials(db_url: str) -> None:
    db = Database.connect(db_url)
    migrate(db)
    storage = RDBStorage(optuna_storage_url(db_url))
    try:
        study = optuna.create_study(storage=storage, study_name="s", direction="minimize")
        _fill(study)
        optuna.create_study(storage=storage, study_name="other").enqueue_trial({"x": 0.5})
        frozen = study_trials(storage, "s")
        with db.read_connection() as session:
            items, total = trial_page(session, "s", limit=100, offset=0)
            page, _ = trial_page(session, "s", limit=3, offset=2)
            progress = study_progress(session, "s")
            points = complete_points(session, "s")
            plan = plan_json_of(session, "s", "key-1")
            assert trial_page(session, "missing", limit=5, offset=0) == ([], 0)
        assert total == 7 and items == [trial_dict(t) for t in frozen]
        assert page == items[2:5]
        complete = [t for t in frozen if t.state == TrialState.COMPLETE]
        assert progress.complete == len(complete) == 5
        assert progress.best_kl == min(t.value for t in complete if t.value is not None)
        assert len(points) == 5 and pareto_front(points)[0]["number"] == 5
        assert plan == {"units": {"u": 1}}
    finally:
        storage.engine.dispose()
        db.dispose()
