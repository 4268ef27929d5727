"""Search strategies behind one ask/tell interface, and the controller that drives them."""

from budgetpress.search._base import Outcome, Strategy, scoped
from budgetpress.search._budget import CostedSpace, Sensitivity, fit_by_sensitivity, fit_to_budget
from budgetpress.search._controller import (
    Controller,
    Evaluate,
    TrialRecord,
    best_plan,
    best_trial_of,
    open_study,
    sampler_for,
)
from budgetpress.search._evolution import DEFAULT_STAGES, EvolutionaryStrategy, Stage, stages_for
from budgetpress.search._factory import STRATEGIES, StrategySetup, make_strategy
from budgetpress.search._hybrid import HybridStrategy
from budgetpress.search._integer import IntegerProgramStrategy, measurement_base
from budgetpress.search._ledger import MEMORY_CONSTRAINT, Ledger, known_fitness_of
from budgetpress.search._mckp import solve_mckp
from budgetpress.search._strategies import RandomStrategy, TPEStrategy, UniformStrategy

__all__ = [
    "DEFAULT_STAGES",
    "MEMORY_CONSTRAINT",
    "STRATEGIES",
    "Controller",
    "CostedSpace",
    "Evaluate",
    "EvolutionaryStrategy",
    "HybridStrategy",
    "IntegerProgramStrategy",
    "Ledger",
    "Outcome",
    "RandomStrategy",
    "Sensitivity",
    "Stage",
    "Strategy",
    "StrategySetup",
    "TPEStrategy",
    "TrialRecord",
    "UniformStrategy",
    "best_plan",
    "best_trial_of",
    "fit_by_sensitivity",
    "fit_to_budget",
    "known_fitness_of",
    "make_strategy",
    "measurement_base",
    "open_study",
    "sampler_for",
    "scoped",
    "solve_mckp",
    "stages_for",
]
