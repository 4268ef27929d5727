"""The controller loop: ask → check the budget with the memory model → dispatch → tell → persist.

Plans are dispatched in batches of the pool's size and told back in the order they were asked,
so a search with a given seed asks the same plans however the workers interleave.

Multi-fidelity: a strategy names the token budget for each plan it asks (``Strategy.fidelity``);
the controller evaluates a batch in one call per fidelity. Every evaluation is its own trial with
its fidelity recorded, so one plan evaluated at two fidelities is two trials, kept apart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import optuna
import sqlalchemy.exc

from budgetpress.search._base import Outcome, Strategy
from budgetpress.search._ledger import Ledger
from budgetpress.space import ModelProfile, Plan, Workload, plan_bytes

logger = logging.getLogger(__name__)

# Asks in a row that found only plans already evaluated before a run gives up on its strategy.
_MAX_REUSED_ASKS = 1000


class Evaluate(Protocol):
    """Evaluates plans, outcomes in their order; ``max_tokens`` caps the tokens each scores.

    The controller passes ``max_tokens`` only for a fidelity other than the whole split, so a
    callable that takes just the plans serves every single-fidelity strategy.
    """

    def __call__(self, plans: Sequence[Plan], *, max_tokens: int | None = None) -> list[Outcome]: ...


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
        before_batch: Callable[[], None] | None = None,
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
        self._before_batch = before_batch

    def run(self, n_trials: int) -> list[TrialRecord]:
        """Run until ``n_trials`` plans have been evaluated (or refused), or the strategy is done.

        A plan the study holds a result for at the asked fidelity is not evaluated again: the
        strategy is told the stored outcome, and it counts as no trial. A strategy that only asks
        known plans for ``_MAX_REUSED_ASKS`` asks in a row has used its space up, and stops.
        """
        records: list[TrialRecord] = []
        reused_in_a_row = 0
        while len(records) < n_trials and reused_in_a_row < _MAX_REUSED_ASKS:
            if self._before_batch is not None:
                # Raises to stop the run (a cancel): checked before every batch, since a run of
                # reused plans opens no trial and so calls no ``on_trial``.
                self._before_batch()
            plans = self._strategy.ask(min(self._batch_size, n_trials - len(records)))
            if not plans:
                logger.info("strategy %s has no more plans after %d trials", self._strategy.name, len(records))
                break
            batch = self._run_batch(plans)
            reused_in_a_row = 0 if batch else reused_in_a_row + len(plans)
            records.extend(batch)
        return records

    def _run_batch(self, plans: list[Plan]) -> list[TrialRecord]:
        fidelities = [self._strategy.fidelity(plan) for plan in plans]
        opened: list[tuple[Plan, optuna.Trial, int]] = []
        to_run: list[int | None] = []
        for plan, fidelity in zip(plans, fidelities, strict=True):
            known = self._ledger.known(plan, fidelity)
            if known is not None:
                self._ledger.discard_adopted(plan, reason=f"not evaluated: trial {known[0]} holds its result")
                self._strategy.tell(plan, known[1])
                continue
            memory = plan_bytes(self._profile, plan, self._workload)
            trial = self._ledger.open(plan, memory_bytes=memory, strategy=self._strategy.name, fidelity=fidelity)
            opened.append((plan, trial, memory))
            to_run.append(fidelity)
        if not opened:
            return []
        outcomes = self._dispatch([(plan, memory) for plan, _, memory in opened], to_run)
        records = []
        for (plan, trial, memory), outcome in zip(opened, outcomes, strict=True):
            self._ledger.close(trial, outcome)
            self._strategy.tell(plan, outcome)
            record = TrialRecord(number=trial.number, plan=plan, memory_bytes=memory, outcome=outcome)
            records.append(record)
            if self._on_trial is not None:
                self._on_trial(record)
        return records

    def _dispatch(self, plans: list[tuple[Plan, int]], fidelities: list[int | None]) -> list[Outcome]:
        """Outcomes in the order of ``plans``: over-budget plans refused, the rest evaluated in one
        call per fidelity (in order of first appearance, so the calls are reproducible)."""
        budget = self._ledger.budget_bytes
        outcomes: list[Outcome | None] = [None] * len(plans)
        by_fidelity: dict[int | None, list[int]] = {}
        for index, ((_, memory), fidelity) in enumerate(zip(plans, fidelities, strict=True)):
            if memory > budget:
                outcomes[index] = Outcome(failure=f"plan needs {memory} bytes, over the budget of {budget}")
            else:
                by_fidelity.setdefault(fidelity, []).append(index)
        for fidelity, indices in by_fidelity.items():
            batch = [plans[i][0] for i in indices]
            # Full fidelity calls evaluate(plans) exactly as before fidelities existed.
            results = self._evaluate(batch) if fidelity is None else self._evaluate(batch, max_tokens=fidelity)
            if len(results) != len(batch):
                raise RuntimeError(f"the evaluator returned {len(results)} outcomes for {len(batch)} plans")
            for index, outcome in zip(indices, results, strict=True):
                outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]


def sampler_for(strategy: str, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler: TPE's own for TPE; for the others, which ask without it, a seeded random
    one (the ledger enqueues each of their plans, so it never samples)."""
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(*, storage: str, name: str, seed: int, strategy: str, resume: bool = False) -> optuna.Study:
    """A new study for one search; an existing study of the same name is an error unless ``resume``
    (then it is loaded, and a missing one is an error: a resume that started over would hide it)."""
    sampler = sampler_for(strategy, seed)
    try:
        if resume:
            return optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize")
    except KeyError as error:
        raise ValueError(f"no study {name!r} in {storage} to resume; leave out the resume to start it") from error
    except optuna.exceptions.DuplicatedStudyError as error:
        raise ValueError(f"study {name!r} already exists in {storage}; choose another --study name") from error
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, ModuleNotFoundError) as error:
        raise ValueError(
            f"cannot open storage {storage!r}: {error}; give a database URL such as "
            "sqlite:///budgetpress.db or postgresql+psycopg://user@host:5432/db"
        ) from error


def best_plan(study: optuna.Study, *, budget_bytes: int | None = None) -> tuple[Plan, optuna.trial.FrozenTrial]:
    """The feasible complete trial with the lowest objective at the highest fidelity, and its plan.

    With ``budget_bytes``, feasible means within that budget, whichever budget the trial was
    asked under: a study shared by the searches for several budgets holds trials of all of them.

    Objectives at different fidelities are measured on different numbers of tokens and do not
    compare (a low-fidelity KL is noisier, and can be lucky), so only trials at one fidelity
    compete: the full-fidelity ones (``fidelity`` None or absent: the whole split) when any exist,
    else those at the largest token budget evaluated. Ties go to the earlier trial.
    """
    trial = best_trial_of(study.get_trials(deepcopy=False), budget_bytes=budget_bytes)
    if trial is None:
        within = "" if budget_bytes is None else f" within {budget_bytes} bytes"
        raise ValueError(f"study {study.study_name!r} has no feasible complete trial{within}")
    return Plan.from_json(trial.user_attrs["plan_json"]), trial


def best_trial_of(
    trials: Sequence[optuna.trial.FrozenTrial], *, budget_bytes: int | None = None
) -> optuna.trial.FrozenTrial | None:
    """The trial ``best_plan`` picks among ``trials`` (see there); None if none is feasible and complete."""
    candidates = [
        t
        for t in trials
        if t.state is optuna.trial.TrialState.COMPLETE and t.value is not None and _feasible(t, budget_bytes)
    ]
    if not candidates:
        return None
    top = max(_fidelity_rank(t) for t in candidates)
    return min((t for t in candidates if _fidelity_rank(t) == top), key=lambda t: (t.value, t.number))


def _fidelity_rank(trial: optuna.trial.FrozenTrial) -> float:
    fidelity = trial.user_attrs.get("fidelity")
    return math.inf if fidelity is None else float(fidelity)


def _feasible(trial: optuna.trial.FrozenTrial, budget_bytes: int | None) -> bool:
    if budget_bytes is None:
        return all(v <= 0 for v in (trial.constraints or {}).values())
    return int(trial.user_attrs.get("memory_bytes", budget_bytes + 1)) <= budget_bytes
