"""Applying a plan to a model in place with real packed modules (torchao's ``quantize_`` style).

Unlike ``PlanEvaluator``'s weight swapping for search, this replaces each compressed
``nn.Linear`` with a module that holds only the packed representation — quantized, sparse or
low-rank — so the bytes the model holds are the bytes the memory model counts.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from transformers import PreTrainedModel

from budgetpress.evaluators._calibration import InputStats
from budgetpress.evaluators._methods import Methods, compress_weight, pack_variant
from budgetpress.kernels import use_plan_kv_attention_
from budgetpress.space import KVSetting, LinearSetting, Plan

DEFAULT_METHODS = Methods()


def apply_plan_(
    model: PreTrainedModel,
    plan: Plan,
    *,
    methods: Methods = DEFAULT_METHODS,
    stats: Mapping[str, InputStats] | None = None,
) -> PreTrainedModel:
    """Replace every linear unit the plan compresses with its packed module; returns ``model``.

    ``stats`` (from ``collect_input_stats``) is needed where ``methods`` names a calibration
    method (GPTQ, Wanda, SparseGPT, SVD-LLM). KV settings are not module state: when the plan
    compresses a KV cache the model's attention is wired for ``PlanKVCache.from_plan(plan, ...)``,
    which callers pass to ``generate`` or a forward as ``past_key_values``.
    """
    if any(isinstance(s, KVSetting) and not s.is_dense for s in plan.values()):
        use_plan_kv_attention_(model)
    for key, setting in plan.items():
        if not isinstance(setting, LinearSetting) or setting.is_dense:
            continue
        parent_name, _, child = key.rpartition(".")
        module = model.get_submodule(key)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"unit {key!r} is a {type(module).__name__}, not an nn.Linear to compress")
        unit_stats = None if stats is None else stats.get(key)
        variant = compress_weight(module.weight, setting, methods=methods, stats=unit_stats)
        bias = None if module.bias is None else module.bias.detach()
        packed = pack_variant(variant, setting, bias=bias).to(module.weight.device)
        setattr(model.get_submodule(parent_name), child, packed)
    return model
