"""The Optuna study as the record of every trial, whichever strategy asked for it.

Every evaluated or refused plan becomes one trial with its plan JSON, plan key, memory, budget
and metrics as attributes and the memory constraint set, so optuna-dashboard shows all of them.
"""

from __future__ import annotations

from collections import defaultdict, deque

import optuna

from budgetpress.search._base import Outcome
from budgetpress.space import Plan, SearchSpace

MEMORY_CONSTRAINT = "memory_over_budget"


class Ledger:
    """Opens, completes and fails trials of one study for plans of one search space."""

    def __init__(self, *, study: optuna.Study, space: SearchSpace, budget_bytes: int) -> None:
        self.study = study
        self.space = space
        self.budget_bytes = budget_bytes
        self._pending: dict[str, deque[optuna.Trial]] = defaultdict(deque)
        self._labels = {name: [c.label() for c in space.choices(name)] for name, _ in space.groups()}

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
        trial.set_user_attr("plan_json", plan.to_json())
        trial.set_user_attr("plan_key", plan.key)
        trial.set_user_attr("memory_bytes", memory_bytes)
        trial.set_user_attr("budget_bytes", self.budget_bytes)
        trial.set_user_attr("strategy", strategy)
        trial.set_user_attr("fidelity", fidelity)
        trial.set_constraint(MEMORY_CONSTRAINT, float(memory_bytes - self.budget_bytes))
        return trial

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
