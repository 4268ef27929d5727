"""A toy model profile and a deterministic, torch-free objective for strategy tests."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
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


# Tokens in the synthetic calibration split; an evaluation at ``max_tokens`` scores at most these.
FULL_TOKENS = 4096
# Relative spread of the KL measured on one token: sqrt(tokens) of them shrink it like a mean does.
NOISE_PER_TOKEN = 4.0


def noisy_kl(plan: Plan, max_tokens: int | None) -> float:
    """``synthetic_kl`` as measured on ``max_tokens`` tokens: exact on the whole split, otherwise off
    by a factor exp(σ·z) with σ shrinking like 1/sqrt(tokens) and z fixed by (plan, tokens), so
    that a re-evaluation at the same fidelity repeats and low fidelities can mis-rank plans."""
    exact = synthetic_kl(plan)
    if max_tokens is None or max_tokens >= FULL_TOKENS:
        return exact
    digest = hashlib.sha256(f"{plan.key}:{max_tokens}".encode()).digest()
    z = float(np.random.default_rng(int.from_bytes(digest[:8], "big")).standard_normal())
    return exact * math.exp(NOISE_PER_TOKEN / math.sqrt(max_tokens) * z)


class SyntheticEvaluator:
    """Evaluates plans with ``noisy_kl``; can be told to fail or return NaN for some plans.

    Records every plan (``seen``), the fidelity it was asked at (``fidelities``), and each call's
    fidelity and plans (``batches``).
    """

    def __init__(self, *, fail_every: int = 0, nan_every: int = 0) -> None:
        self.calls = 0
        self.seen: list[Plan] = []
        self.fidelities: list[int | None] = []
        self.batches: list[tuple[int | None, list[Plan]]] = []
        self._fail_every = fail_every
        self._nan_every = nan_every

    def __call__(self, plans: Sequence[Plan], *, max_tokens: int | None = None) -> list[Outcome]:
        self.batches.append((max_tokens, list(plans)))
        outcomes = []
        for plan in plans:
            self.calls += 1
            self.seen.append(plan)
            self.fidelities.append(max_tokens)
            if self._fail_every and self.calls % self._fail_every == 0:
                outcomes.append(Outcome(failure="synthetic failure"))
                continue
            nan = self._nan_every and self.calls % self._nan_every == 0
            kl = float("nan") if nan else noisy_kl(plan, max_tokens)
            tokens = FULL_TOKENS if max_tokens is None else min(max_tokens, FULL_TOKENS)
            result = Result(kl=kl, ppl=math.exp(kl), memory_bytes=0, tokens=tokens, seconds=0.0, fidelity=max_tokens)
            outcomes.append(Outcome(result=result))
        return outcomes


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.bits_only(toy_profile())


@pytest.fixture
def costed(space: SearchSpace) -> CostedSpace:
    return CostedSpace(space, Workload(context=32))
