"""Applying a plan to a model in place with real packed modules (torchao's ``quantize_`` style).

Unlike ``PlanEvaluator``'s weight swapping for search, this replaces each compressed
``nn.Linear`` with a module that holds only the packed representation, so the bytes the model
holds are the bytes the memory model counts.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from budgetpress.evaluators._rtn import rtn_quantize
from budgetpress.kernels import QuantLinear
from budgetpress.space import LinearSetting, Plan


def _packed_linear(linear: nn.Linear, setting: LinearSetting) -> QuantLinear:
    if setting.sparsity or setting.rank is not None:
        raise ValueError(
            f"packed modules for {setting.label()} (sparsity or low rank) are not available yet; "
            "accepted: bit-width settings"
        )
    quantized = rtn_quantize(linear.weight.detach(), bits=setting.bits, group_size=setting.group_size)
    bias = None if linear.bias is None else linear.bias.detach()
    return QuantLinear.from_codes(
        quantized.codes, quantized.scales, quantized.zeros, bits=setting.bits, group_size=setting.group_size, bias=bias
    )


def apply_plan_(model: PreTrainedModel, plan: Plan) -> PreTrainedModel:
    """Replace every linear unit the plan compresses with its packed module; returns ``model``."""
    for key, setting in plan.items():
        if not isinstance(setting, LinearSetting) or setting.is_dense:
            continue
        parent_name, _, child = key.rpartition(".")
        module = model.get_submodule(key)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"unit {key!r} is a {type(module).__name__}, not an nn.Linear to compress")
        setattr(model.get_submodule(parent_name), child, _packed_linear(module, setting))
    return model
