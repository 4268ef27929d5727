"""A toy model profile and a deterministic, torch-free objective for strategy tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from budgetpress.search import CostedSpace, Outcome
from budgetpress.space import (
    KVUnit,
    LinearSetting,
    LinearUnit,
    ModelProfile,
    Plan,
    Result,
    SearchSpace,
    Workload,
)

ROLES = (
    ("self_attn.q_proj", 128, 128),
    ("self_attn.k_proj", 128, 128),
    ("mlp.up_proj", 128, 256),
    ("mlp.down_proj", 256, 128),
)


def toy_profile(n_layers: int = 4) -> ModelProfile:
    units = tuple(
        LinearUnit(name=f"model.layers.{i}.{r}", layer=i, in_features=a, out_features=b)
        for i in range(n_layers)
        for r, a, b in ROLES
    )
    return ModelProfile(
        name="toy",
        architecture="LlamaForCausalLM",
        n_layers=n_layers,
        linear_units=units,
        kv_units=tuple(KVUnit(layer=i, n_kv_heads=1, head_dim=128) for i in range(n_layers)),
        other_params=256 * 128,
        other_bytes=256 * 128 * 2,
        vocab_size=256,
    )


def synthetic_kl(plan: Plan) -> float:
    """Error grows as bits fall, with early layers and q/k projections more sensitive."""
    total = 0.0
    for key, setting in plan.items():
        if not isinstance(setting, LinearSetting) or setting.bits == 16:
            continue
        layer = int(key.split(".")[2])
        weight = (3.0 if "q_proj" in key or "k_proj" in key else 1.0) / (1 + layer)
        total += weight * math.pow(4.0, -setting.bits)
    return total


class SyntheticEvaluator:
    """Evaluates plans with ``synthetic_kl``; can be told to fail or return NaN for some plans."""

    def __init__(self, *, fail_every: int = 0, nan_every: int = 0) -> None:
        self.calls = 0
        self.seen: list[Plan] = []
        self._fail_every = fail_every
        self._nan_every = nan_every

    def __call__(self, plans: Sequence[Plan]) -> list[Outcome]:
        outcomes = []
        for plan in plans:
            self.calls += 1
            self.seen.append(plan)
            if self._fail_every and self.calls % self._fail_every == 0:
                outcomes.append(Outcome(failure="synthetic failure"))
                continue
            kl = float("nan") if self._nan_every and self.calls % self._nan_every == 0 else synthetic_kl(plan)
            outcomes.append(Outcome(result=Result(kl=kl, ppl=math.exp(kl), memory_bytes=0, tokens=1, seconds=0.0)))
        return outcomes


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.bits_only(toy_profile())


@pytest.fixture
def costed(space: SearchSpace) -> CostedSpace:
    return CostedSpace(space, Workload(context=32))
