"""Whole searches through real Ray workers, recorded in SQLite and PostgreSQL; no workers left after."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from budgetpress.space import Budget, Plan, Workload
from budgetpress.workers import SearchRequest, run_search

from ..conftest import POSTGRES_URL


def _request(
    model_dir: Path,
    storage: str,
    seed: int = 3,
    strategy: str = "tpe",
    n_trials: int = 6,
    budgets: tuple[str, ...] = ("60%",),
    study_name: str | None = None,
    resume: bool = False,
) -> SearchRequest:
    return SearchRequest(
        model=str(model_dir),
        budgets=tuple(Budget.parse(b) for b in budgets),
        resume=resume,
        workload=Workload(context=128),
        strategy=strategy,
        n_trials=n_trials,
        storage=storage,
        study_name=study_name or f"test-{uuid.uuid4().hex[:8]}",
        n_workers=2,
        seed=seed,
        seq_len=128,
        calibration_sequences=4,
        evaluation_sequences=4,
    )


def _check_study(storage: str, name: str, n_trials: int, budget_bytes: int) -> None:
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == n_trials
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.user_attrs["memory_bytes"] <= budget_bytes
        assert Plan.from_json(trial.user_attrs["plan_json"]).key == trial.user_attrs["plan_key"]
    assert study.user_attrs["report"]["n_trials"] == n_trials


def test_search_is_recorded_and_reproducible(tmp_path: Path, micro_model_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    first = run_search(_request(micro_model_dir, storage))
    second = run_search(_request(micro_model_dir, storage))
    _check_study(storage, first.request.study_name, 6, first.budget_bytes)
    assert first.best.memory_bytes <= first.budget_bytes
    assert first.best.plan.key == second.best.plan.key
    assert first.best.kl == second.best.kl
    # The search's promise is on its fitness (calibration tokens): the uniform plan is one of its
    # trials, so the best is no worse there. On held-out tokens it may be (4 windows of 128 here).
    calibration = {
        t.user_attrs["plan_key"]: t.value
        for t in optuna.load_study(study_name=first.request.study_name, storage=storage).trials
    }
    assert calibration[first.best.plan.key] <= calibration[first.uniform.plan.key]


def test_evolution_runs_through_real_workers_at_several_fidelities(tmp_path: Path, micro_model_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'evolution.db'}"
    # Eight random starts screened at the first stage's fidelity, then survivors at the next.
    report = run_search(_request(micro_model_dir, storage, strategy="evolution", n_trials=14))
    _check_study(storage, report.request.study_name, 14, report.budget_bytes)
    study = optuna.load_study(study_name=report.request.study_name, storage=storage)
    fidelities = {trial.user_attrs["fidelity"] for trial in study.trials}
    assert len(fidelities) > 1  # offspring are screened on few tokens first
    # The best plan is the best at full fidelity (None) if any trial has it, else at the largest budget.
    top = None if None in fidelities else max(fidelities)
    at_top = [t for t in study.trials if t.user_attrs["fidelity"] == top]
    assert report.best.plan.key == min(at_top, key=lambda t: t.value).user_attrs["plan_key"]


def test_frontier_search_shares_evaluations_across_budgets(tmp_path: Path, micro_model_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'frontier.db'}"
    # Enough trials for the integer program to measure, solve and verify at each budget.
    report = run_search(_request(micro_model_dir, storage, strategy="integer", n_trials=200, budgets=("45%", "70%")))
    study = optuna.load_study(study_name=report.request.study_name, storage=storage)
    keys = {
        b.budget_bytes: [
            t.user_attrs["plan_key"] for t in study.trials if t.user_attrs["budget_bytes"] == b.budget_bytes
        ]
        for b in report.budgets
    }
    small, large = (b.budget_bytes for b in report.budgets)
    assert keys[small] and keys[large]
    # The second budget measured from the first's base: its measurements were known already.
    assert not set(keys[small]) & set(keys[large])
    assert len(keys[large]) < len(keys[small])
    values = {}
    for budget in report.budgets:
        assert budget.best.memory_bytes <= budget.budget_bytes
        values[budget.budget_bytes] = study.trials[budget.best_trial].value
    assert values[large] <= values[small]
    front = report.pareto
    assert front and all(a.memory_bytes < b.memory_bytes and a.kl > b.kl for a, b in itertools.pairwise(front))
    saved = study.user_attrs["report"]
    assert [f["budget_bytes"] for f in saved["frontier"]] == [small, large]


def test_a_resumed_search_continues_its_study(tmp_path: Path, micro_model_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'resume.db'}"
    # Generation 0 (8 random starts on 3 stages, and the uniform plan) takes 15 trials.
    first = run_search(_request(micro_model_dir, storage, strategy="evolution", n_trials=20))
    name = first.request.study_name
    study = optuna.load_study(study_name=name, storage=storage)
    generation = study.user_attrs["evolution.state"]["generation"]
    before = {t.number: (t.state, t.value) for t in study.trials}
    study.ask()  # what a killed run leaves behind: a trial opened, never told
    resumed = run_search(
        _request(micro_model_dir, storage, strategy="evolution", n_trials=44, study_name=name, resume=True)
    )
    study = optuna.load_study(study_name=name, storage=storage)
    # The interrupted trial was not run: the resumed search ran 24 more (generation 1 takes 16 + 4 + 2).
    assert len([t for t in study.trials if not t.user_attrs.get("not_evaluated")]) == 44
    complete = [(t.user_attrs["plan_key"], t.user_attrs["fidelity"]) for t in study.trials if t.value is not None]
    assert len(complete) == len(set(complete))
    assert {t.number: (t.state, t.value) for t in study.trials if t.number in before} == before
    interrupted = study.trials[20]
    assert interrupted.state == optuna.trial.TrialState.FAIL and "interrupted" in interrupted.user_attrs["fail_reason"]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert study.user_attrs["evolution.state"]["generation"] > generation
    assert resumed.best.kl <= first.best.kl or resumed.best.plan.key == first.best.plan.key


def test_resuming_a_missing_study_is_refused(tmp_path: Path, micro_model_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(ValueError, match="no study 'absent'"):
        run_search(_request(micro_model_dir, storage, study_name="absent", resume=True))


def _postgres_reachable() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(POSTGRES_URL).connect():
            return True
    except Exception:
        return False


@pytest.mark.skipif(not _postgres_reachable() and not os.environ.get("CI"), reason="no PostgreSQL on 127.0.0.1:5432")
def test_search_recorded_in_postgresql(micro_model_dir: Path) -> None:
    report = run_search(_request(micro_model_dir, POSTGRES_URL, seed=4))
    _check_study(POSTGRES_URL, report.request.study_name, 6, report.budget_bytes)
    optuna.delete_study(study_name=report.request.study_name, storage=POSTGRES_URL)


_POOL_SCRIPT = """
import json, sys
from budgetpress.evaluators import SessionSpec, TokenSpec
from budgetpress.space import Workload
from budgetpress.workers import WorkerPool, WorkerSpec
tokens = TokenSpec(seq_len=128, calibration_sequences=2, evaluation_sequences=2)
spec = WorkerSpec(session=SessionSpec(model=sys.argv[1], workload=Workload(context=128), tokens=tokens))
pool = WorkerPool(spec, n_workers=2)
print(json.dumps(pool.worker_pids()))
pool.close()
"""


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text().lower()


def test_no_worker_processes_left_after_close(micro_model_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _POOL_SCRIPT, str(micro_model_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    pids = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(set(pids)) == 2
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
