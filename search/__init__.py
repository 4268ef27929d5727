"""Search strategies behind one ask/tell interface, and the controller that drives them."""

from budgetpress.search._base import Outcome, Strategy
from budgetpress.search._budget import CostedSpace, fit_to_budget
from budgetpress.search._controller import Controller, Evaluate, TrialRecord, best_plan, open_study
from budgetpress.search._evolution import EvolutionaryStrategy
from budgetpress.search._integer import IntegerProgramStrategy
from budgetpress.search._ledger import MEMORY_CONSTRAINT, Ledger
from budgetpress.search._mckp import solve_mckp
from budgetpress.search._strategies import TPEStrategy, UniformStrategy

STRATEGIES = ("tpe", "evolution", "uniform")

__all__ = [
    "MEMORY_CONSTRAINT",
    "STRATEGIES",
    "Controller",
    "CostedSpace",
    "Evaluate",
    "EvolutionaryStrategy",
    "IntegerProgramStrategy",
    "Ledger",
    "Outcome",
    "Strategy",
    "TPEStrategy",
    "TrialRecord",
    "UniformStrategy",
    "best_plan",
    "fit_to_budget",
    "open_study",
    "solve_mckp",
]
