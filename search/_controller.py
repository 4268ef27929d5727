"""The controller loop: ask → check the budget with the memory model → dispatch → tell → persist.

Plans are dispatched in batches of the pool's size and told back in the order they were asked,
so a search with a given seed asks the same plans however the workers interleave.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
import sqlalchemy.exc

from budgetpress.search._base import Outcome, Strategy
from budgetpress.search._ledger import Ledger
from budgetpress.space import ModelProfile, Plan, Workload, plan_bytes

logger = logging.getLogger(__name__)

Evaluate = Callable[[Sequence[Plan]], list[Outcome]]


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    number: int
    plan: Plan
    memory_bytes: int
    outcome: Outcome


class Controller:
    """Drives one strategy against one study until it has asked ``n_trials`` plans."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        ledger: Ledger,
        profile: ModelProfile,
        workload: Workload,
        evaluate: Evaluate,
        batch_size: int,
        on_trial: Callable[[TrialRecord], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self._strategy = strategy
        self._ledger = ledger
        self._profile = profile
        self._workload = workload
        self._evaluate = evaluate
        self._batch_size = batch_size
        self._on_trial = on_trial

    def run(self, n_trials: int) -> list[TrialRecord]:
        records: list[TrialRecord] = []
        while len(records) < n_trials:
            plans = self._strategy.ask(min(self._batch_size, n_trials - len(records)))
            if not plans:
                logger.info("strategy %s has no more plans after %d trials", self._strategy.name, len(records))
                break
            records.extend(self._run_batch(plans))
        return records

    def _run_batch(self, plans: list[Plan]) -> list[TrialRecord]:
        opened: list[tuple[Plan, optuna.Trial, int]] = []
        for plan in plans:
            memory = plan_bytes(self._profile, plan, self._workload)
            opened.append((plan, self._ledger.open(plan, memory_bytes=memory, strategy=self._strategy.name), memory))
        feasible = [plan for plan, _, memory in opened if memory <= self._ledger.budget_bytes]
        outcomes = iter(self._evaluate(feasible) if feasible else [])
        records = []
        for plan, trial, memory in opened:
            if memory > self._ledger.budget_bytes:
                outcome = Outcome(failure=f"plan needs {memory} bytes, over the budget of {self._ledger.budget_bytes}")
            else:
                outcome = next(outcomes)
            self._ledger.close(trial, outcome)
            self._strategy.tell(plan, outcome)
            record = TrialRecord(number=trial.number, plan=plan, memory_bytes=memory, outcome=outcome)
            records.append(record)
            if self._on_trial is not None:
                self._on_trial(record)
        return records


def open_study(*, storage: str, name: str, seed: int, strategy: str) -> optuna.Study:
    """A new study for one search; an existing study of the same name is an error, not a resume."""
    sampler: optuna.samplers.BaseSampler
    if strategy == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    try:
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError as error:
        raise ValueError(f"study {name!r} already exists in {storage}; choose another --study name") from error
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, ModuleNotFoundError) as error:
        raise ValueError(
            f"cannot open storage {storage!r}: {error}; give a database URL such as "
            "sqlite:///budgetpress.db or postgresql+psycopg://user@host:5432/db"
        ) from error


def best_plan(study: optuna.Study) -> tuple[Plan, optuna.trial.FrozenTrial]:
    """The feasible complete trial with the lowest objective, and its plan."""
    trial = study.best_trial
    return Plan.from_json(trial.user_attrs["plan_json"]), trial
