"""A mixed-bit plan applied with packed modules: bytes equal the memory model, logits equal fake-quant."""

from __future__ import annotations

import numpy as np
import torch

from budgetpress.evaluators import apply_plan_, load_model, profile_model, resolve_model, rtn_quantize
from budgetpress.kernels import QuantLinear
from budgetpress.space import LinearSetting, Plan, Workload, plan_memory


def _mixed_plan(profile, seed: int) -> Plan:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    choices = [LinearSetting(bits=int(b), group_size=g) for b in (2, 3, 4, 8) for g in (32, 128, None)]
    choices.append(LinearSetting())
    return Plan({u.key: choices[int(rng.integers(len(choices)))] for u in profile.linear_units})


def test_builtin_model_with_packed_plan_matches_memory_model_and_fake_quant() -> None:
    source = resolve_model("builtin")
    packed = load_model(source, dtype=torch.bfloat16)
    profile = profile_model(packed, name="builtin")
    plan = _mixed_plan(profile, seed=0)
    fake = load_model(source)
    apply_plan_(packed, plan)

    held = 0
    for unit in profile.linear_units:
        module = packed.get_submodule(unit.key)
        setting = plan[unit.key]
        assert isinstance(module, QuantLinear) != setting.is_dense  # type: ignore[union-attr]
        held += module.held_bytes() if isinstance(module, QuantLinear) else module.weight.numel() * 2
        if not setting.is_dense:  # type: ignore[union-attr]
            linear = fake.get_submodule(unit.key)
            quantized = rtn_quantize(linear.weight, bits=setting.bits, group_size=setting.group_size)  # type: ignore[union-attr]
            linear.weight.data = quantized.dequantize()
    memory = plan_memory(profile, plan, Workload())
    assert held == memory.linear_bytes
    other = sum(p.numel() * p.element_size() for n, p in packed.named_parameters())
    assert other == memory.other_bytes + sum(
        packed.get_submodule(u.key).weight.numel() * 2
        for u in profile.linear_units
        if plan[u.key].is_dense  # type: ignore[union-attr]
    )

    packed.float()
    tokens = torch.tensor([list(b"import os\nfrom pathlib import Path\n\ndef main():\n    ")])
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=tokens).logits, fake(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)
        generated = packed.generate(tokens, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, tokens.shape[1] + 8)
