"""Mixed-format plans applied with packed modules: bytes equal the memory model, logits equal fake-quant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from budgetpress.evaluators import (
    Methods,
    apply_plan_,
    collect_input_stats,
    compress_weight,
    load_model,
    profile_model,
    resolve_model,
    variant_weight,
)
from budgetpress.kernels import LowRankLinear, PlanKVCache, QuantLinear, SparseLinear
from budgetpress.space import (
    KVSetting,
    LinearSetting,
    ModelProfile,
    Plan,
    Setting,
    Workload,
    kv_bytes,
    plan_memory,
)

PACKED_TYPES = (QuantLinear, SparseLinear, LowRankLinear)
MIXED_CHOICES = [
    LinearSetting(),
    LinearSetting(bits=2, group_size=32),
    LinearSetting(bits=3, group_size=128),
    LinearSetting(bits=4, group_size=None),
    LinearSetting(bits=8, group_size=64),
    LinearSetting(bits=16, sparsity=0.5, pattern="unstructured"),
    LinearSetting(bits=4, group_size=128, sparsity=0.3, pattern="unstructured"),
    LinearSetting(bits=16, sparsity=0.5, pattern="2:4"),
    LinearSetting(bits=3, group_size=64, sparsity=0.5, pattern="2:4"),
    LinearSetting(bits=16, rank=48),
    LinearSetting(bits=8, group_size=32, rank=64),
]
PROMPT = (
    b"import os\nfrom pathlib import Path\n\ndef main():\n"
    b"    for path in Path(os.getcwd()).iterdir():\n        print(path.name, path.stat().st_size)\n"
)


KV_CHOICES = [
    KVSetting(bits=2),
    KVSetting(bits=4, kept_tokens=48, policy="sink_window"),
    KVSetting(bits=8, kept_tokens=100, policy="snapkv"),
    KVSetting(),
    KVSetting(bits=16, kept_tokens=70, policy="sink_window"),
    KVSetting(bits=4),
]


def mixed_plan(profile: ModelProfile, seed: int) -> Plan:
    """Every linear choice at least once (in a shuffled order), the rest at random; a KV setting per layer."""
    rng = np.random.default_rng(seed)
    units = profile.linear_units
    picks = list(range(len(MIXED_CHOICES))) + list(rng.integers(len(MIXED_CHOICES), size=len(units)))
    order = rng.permutation(len(units))
    settings: dict[str, Setting] = {units[int(i)].key: MIXED_CHOICES[int(picks[n])] for n, i in enumerate(order)}
    settings.update((u.key, KV_CHOICES[u.layer % len(KV_CHOICES)]) for u in profile.kv_units)
    return Plan(settings)


def _held_linear_bytes(model: torch.nn.Module, profile: ModelProfile) -> int:
    held = 0
    for unit in profile.linear_units:
        module = model.get_submodule(unit.key)
        if isinstance(module, PACKED_TYPES):
            held += module.held_bytes()
        else:
            held += sum(t.numel() * t.element_size() for t in module.parameters())
    return held


@pytest.mark.parametrize("calibrated", [False, True])
def test_mixed_format_plan_holds_memory_model_bytes_and_matches_fake_quant(calibrated: bool) -> None:
    source = resolve_model("builtin")
    packed = load_model(source, dtype=torch.bfloat16)
    fake = load_model(source)
    profile = profile_model(packed, name="builtin")
    plan = mixed_plan(profile, seed=1)
    tokens = torch.tensor([list(PROMPT)])
    methods = Methods.parse("bits=gptq,sparsity=sparsegpt,rank=svd-llm") if calibrated else Methods()
    stats = collect_input_stats(fake, tokens.repeat(2, 1)) if calibrated else None
    for unit in profile.linear_units:
        setting = plan[unit.key]
        assert isinstance(setting, LinearSetting)
        if not setting.is_dense:
            linear = fake.get_submodule(unit.key)
            unit_stats = None if stats is None else stats[unit.key]
            variant = compress_weight(linear.weight, setting, methods=methods, stats=unit_stats)
            linear.weight.data = variant_weight(variant)
    apply_plan_(packed, plan, methods=methods, stats=stats)

    for unit in profile.linear_units:
        module = packed.get_submodule(unit.key)
        assert isinstance(module, PACKED_TYPES) != plan[unit.key].is_dense  # type: ignore[union-attr]
    memory = plan_memory(profile, plan, Workload())
    assert _held_linear_bytes(packed, profile) == memory.linear_bytes

    _check_kv_cache(packed, profile, plan, tokens)

    packed.float()
    with torch.no_grad():
        logits = packed(input_ids=tokens, use_cache=False).logits
        torch.testing.assert_close(logits, fake(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)


def _check_kv_cache(model: torch.nn.Module, profile: ModelProfile, plan: Plan, tokens: torch.Tensor) -> None:
    """In bf16, the plan's KV cache holds what the memory model counts, and generate runs with it."""
    workload = Workload(batch=1, context=tokens.shape[1])
    expected = [kv_bytes(u, plan[u.key], workload) for u in profile.kv_units]  # type: ignore[arg-type]
    cache = PlanKVCache.from_plan(plan, n_layers=profile.n_layers)
    with torch.no_grad():
        model(input_ids=tokens, cache=cache)
        assert [layer.held_bytes() for layer in cache.layers] == expected
        fresh = PlanKVCache.from_plan(plan, n_layers=profile.n_layers)
        generated = model.generate(tokens, cache=fresh, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, tokens.shape[1] + 8)
