"""A finished study written through the real Ledger with synthetic results (no model, no Ray)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest

from budgetpress.search import CostedSpace, Ledger, Outcome, open_study
from budgetpress.space import Dimension, LinearSetting, Plan, Result, SearchSpace, Workload
from tests.search.conftest import synthetic_kl, toy_profile

STUDY = "dash-study"
ALL_DIMENSIONS = frozenset({Dimension.BITS, Dimension.SPARSITY, Dimension.RANK, Dimension.KV})


def toy_space() -> CostedSpace:
    workload = Workload(context=64)
    space = SearchSpace.for_dimensions(toy_profile(), ALL_DIMENSIONS, context=workload.context)
    return CostedSpace(space, workload)


def _random_plan(costed: CostedSpace, rng: np.random.Generator) -> Plan:
    space = costed.space
    return space.plan_from_choices({g: int(rng.integers(len(space.choices(g)))) for g, _ in space.groups()})


def _structure_kl(plan: Plan) -> float:
    """What sparsity, low rank and a smaller KV cache cost in the synthetic objective."""
    cost = 0.0
    for setting in plan.values():
        if isinstance(setting, LinearSetting):
            cost += 0.02 * setting.sparsity + (0.01 if setting.rank is not None else 0.0)
        else:
            cost += 0.004 * (16 - setting.bits) / 16 + (0.01 if setting.kept_tokens is not None else 0.0)
    return cost


def _record(ledger: Ledger, costed: CostedSpace, plan: Plan, strategy: str) -> None:
    memory = costed.bytes_of(costed.space.choices_of(plan))
    trial = ledger.open(plan, memory_bytes=memory, strategy=strategy)
    kl = synthetic_kl(plan) + _structure_kl(plan)
    result = Result(kl=kl, ppl=math.exp(kl), memory_bytes=memory, tokens=4096, seconds=0.01, worker="synthetic")
    ledger.close(trial, Outcome(result=result))


def write_study(storage: str, *, name: str = STUDY, n_random: int = 8, seed: int = 0) -> CostedSpace:
    """Every uniform plan and ``n_random`` random ones, each a complete trial, at 40% of dense."""
    costed = toy_space()
    budget = int(0.4 * costed.dense_bytes)
    memory = optuna.storages.InMemoryStorage()  # built in memory, then copied in a few commits
    study = open_study(storage=memory, name=name, seed=seed, strategy="random")  # type: ignore[arg-type]
    ledger = Ledger(study=study, space=costed.space, budget_bytes=budget)
    for plan in costed.space.uniform_plans()[::9]:
        _record(ledger, costed, plan, "uniform")
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        _record(ledger, costed, _random_plan(costed, rng), "random")
    study.set_user_attr("report", {"frontier": [{"budget_bytes": budget}]})
    optuna.copy_study(from_study_name=name, from_storage=memory, to_storage=storage)
    return costed


@pytest.fixture(scope="session")
def study_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finished study, written once per test run (each trial is a few dozen SQLite commits)."""
    path = tmp_path_factory.mktemp("dash-template") / "budgetpress.db"
    write_study(f"sqlite:///{path}")
    return path


@pytest.fixture
def study_db(study_template: Path, tmp_path: Path) -> str:
    """A SQLite storage URL holding one finished study named ``STUDY``, this test's own copy."""
    path = tmp_path / "budgetpress.db"
    shutil.copyfile(study_template, path)
    return f"sqlite:///{path}"


def load(storage: str, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(storage=storage, study_name=name)
