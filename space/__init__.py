"""Search-space primitives for budgetpress: units, settings, plans, memory.

Pure standard-library Python so that planning never needs torch.
"""

from ._budget import Budget, BudgetKind
from ._memory import (
    KV_GROUP,
    KV_RESIDUAL,
    MemoryBreakdown,
    dense_bytes,
    effective_bits,
    kv_bytes,
    linear_bytes,
    plan_bytes,
    plan_memory,
)
from ._plan import PLAN_FORMAT_VERSION, Plan
from ._profile import ModelProfile
from ._result import Result, Split
from ._settings import (
    GROUP_SIZES,
    KV_BITS,
    WEIGHT_BITS,
    EvictionPolicy,
    KVSetting,
    LinearSetting,
    Setting,
    SparsityPattern,
)
from ._space import (
    Dimension,
    Grouping,
    SearchSpace,
    kv_choices_for,
    linear_choices_for,
    parse_dimensions,
    plan_dimensions,
    setting_dimensions,
)
from ._units import KVUnit, LinearUnit, Unit, UnitKind
from ._workload import Workload

__all__ = [
    "GROUP_SIZES",
    "KV_BITS",
    "KV_GROUP",
    "KV_RESIDUAL",
    "PLAN_FORMAT_VERSION",
    "WEIGHT_BITS",
    "Budget",
    "BudgetKind",
    "Dimension",
    "EvictionPolicy",
    "Grouping",
    "KVSetting",
    "KVUnit",
    "LinearSetting",
    "LinearUnit",
    "MemoryBreakdown",
    "ModelProfile",
    "Plan",
    "Result",
    "SearchSpace",
    "Setting",
    "SparsityPattern",
    "Split",
    "Unit",
    "UnitKind",
    "Workload",
    "dense_bytes",
    "effective_bits",
    "kv_bytes",
    "kv_choices_for",
    "linear_bytes",
    "linear_choices_for",
    "parse_dimensions",
    "plan_bytes",
    "plan_dimensions",
    "plan_memory",
    "setting_dimensions",
]
