"""The Optuna study as the record of every trial, whichever strategy asked for it.

Every evaluated or refused plan becomes one trial with its plan JSON, plan key, memory, budget
and metrics as attributes and the memory constraint set, so optuna-dashboard shows all of them.

A result is committed once: the ledger knows every complete calibration trial of its study (those
of an earlier, interrupted run included) by (plan key, fidelity), and the controller tells a
strategy that asks for one of them the stored outcome instead of evaluating the plan again.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Mapping
from typing import Any

import optuna

from budgetpress.search._base import Outcome
from budgetpress.space import Plan, Result, SearchSpace, Split

MEMORY_CONSTRAINT = "memory_over_budget"


class Ledger:
    """Opens, completes and fails trials of one study for plans of one search space."""

    def __init__(self, *, study: optuna.Study, space: SearchSpace, budget_bytes: int) -> None:
        self.study = study
        self.space = space
        self.budget_bytes = budget_bytes
        self._pending: dict[str, deque[optuna.Trial]] = defaultdict(deque)
        self._labels = {name: [c.label() for c in space.choices(name)] for name, _ in space.groups()}
        self._known: dict[tuple[str, int | None], tuple[int, Outcome]] = {}
        self._keys: dict[int, str] = {}  # plan key of each trial opened and not yet closed
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            self._remember(trial.number, trial.user_attrs, trial.value)

    def labels(self, group: str) -> list[str]:
        return self._labels[group]

    def adopt(self, trial: optuna.Trial, plan: Plan) -> None:
        """Register a trial that a strategy opened itself (TPE) as the one for ``plan``."""
        self._pending[plan.key].append(trial)

    def open(self, plan: Plan, *, memory_bytes: int, strategy: str, fidelity: int | None = None) -> optuna.Trial:
        """The trial for ``plan``: the one a strategy adopted, else a new one with the plan's params.

        ``fidelity`` is the token budget the plan is to be evaluated at (None: the whole split); it
        is recorded now so that a trial whose evaluation fails still says which fidelity it was.
        """
        queue = self._pending.get(plan.key)
        if queue:
            trial = queue.popleft()
        else:
            choices = self.space.choices_of(plan)
            self.study.enqueue_trial({g: self._labels[g][i] for g, i in choices.items()})
            trial = self.study.ask()
            for group, _ in self.space.groups():
                trial.suggest_categorical(group, self._labels[group])
        self._keys[trial.number] = plan.key
        trial.set_user_attr("plan_json", plan.to_json())
        trial.set_user_attr("plan_key", plan.key)
        trial.set_user_attr("memory_bytes", memory_bytes)
        trial.set_user_attr("budget_bytes", self.budget_bytes)
        trial.set_user_attr("strategy", strategy)
        trial.set_user_attr("fidelity", fidelity)
        trial.set_constraint(MEMORY_CONSTRAINT, float(memory_bytes - self.budget_bytes))
        return trial

    def known(self, plan: Plan, fidelity: int | None) -> tuple[int, Outcome] | None:
        """The trial number and outcome of ``plan`` committed at ``fidelity`` already, if any."""
        return self._known.get((plan.key, fidelity))

    def discard_adopted(self, plan: Plan, *, reason: str) -> None:
        """Fail the trial a strategy opened for ``plan`` (TPE) that will not be evaluated, if any.

        It is marked ``not_evaluated``, so that it counts as neither a result nor a trial run."""
        queue = self._pending.get(plan.key)
        if not queue:
            return
        trial = queue.popleft()
        trial.set_user_attr("not_evaluated", True)
        trial.set_user_attr("fail_reason", reason)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)

    def _remember(self, number: int, attrs: Mapping[str, Any], value: float | None) -> None:
        """Know a complete trial's outcome, as far as its attributes tell it (a strategy reads the
        fitness; the rest is for the record)."""
        if value is None or "plan_key" not in attrs or attrs.get("split") != Split.CALIBRATION.value:
            return
        result = Result(
            kl=float(value),
            ppl=float(attrs.get("ppl", math.nan)),
            memory_bytes=int(attrs.get("memory_bytes", 0)),
            tokens=int(attrs.get("tokens", 0)),
            seconds=0.0,
            worker=f"trial {number}",
            fidelity=attrs.get("fidelity"),
        )
        self._known[(attrs["plan_key"], result.fidelity)] = (number, Outcome(result=result))

    def close(self, trial: optuna.Trial, outcome: Outcome) -> None:
        """Record the outcome; a failed or non-finite evaluation is a failed trial with its reason."""
        if outcome.result is not None:
            result = outcome.result
            for name, value in result.metrics().items():
                trial.set_user_attr(name, value)
            trial.set_user_attr("tokens", result.tokens)
            trial.set_user_attr("seconds", round(result.seconds, 4))
            trial.set_user_attr("worker", result.worker)
            trial.set_user_attr("split", result.split.value)
            trial.set_user_attr("fidelity", result.fidelity)
        fitness = outcome.fitness
        if fitness is None:
            reason = outcome.failure or f"evaluation gave a non-finite result: {outcome.result}"
            trial.set_user_attr("fail_reason", reason)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            return
        self.study.tell(trial, fitness, skip_if_finished=True)
        if outcome.result is not None and outcome.result.split is Split.CALIBRATION:
            self._known[(self._keys.pop(trial.number), outcome.result.fidelity)] = (trial.number, outcome)


def known_fitness_of(study: optuna.Study) -> dict[tuple[str, int | None], float]:
    """Fitness by (plan key, fidelity) of a study's complete calibration trials: what a strategy
    resumed on the study, or sharing it with searches for other budgets, need not evaluate again."""
    known: dict[tuple[str, int | None], float] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "plan_key" not in attrs or trial.value is None:
            continue
        if attrs.get("split", Split.CALIBRATION.value) != Split.CALIBRATION.value:
            continue
        known[(attrs["plan_key"], attrs.get("fidelity"))] = float(trial.value)
    return known
