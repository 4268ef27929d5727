"""Small hand-made profiles shared by the space tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from budgetpress.space import KVUnit, LinearUnit, ModelProfile

# (role, in_features, out_features) for each decoder layer of the toy model.
TOY_LAYER = (
    ("self_attn.q_proj", 128, 128),
    ("self_attn.o_proj", 128, 128),
    ("mlp.up_proj", 128, 256),
    ("mlp.down_proj", 256, 128),
)


def make_profile(n_layers: int = 2, layer: tuple[tuple[str, int, int], ...] = TOY_LAYER) -> ModelProfile:
    linears = tuple(
        LinearUnit(name=f"model.layers.{i}.{role}", layer=i, in_features=n_in, out_features=n_out)
        for i in range(n_layers)
        for role, n_in, n_out in layer
    )
    kvs = tuple(KVUnit(layer=i, n_kv_heads=2, head_dim=32) for i in range(n_layers))
    return ModelProfile(
        name="toy",
        architecture="LlamaForCausalLM",
        n_layers=n_layers,
        linear_units=linears,
        kv_units=kvs,
        other_params=1000,
        other_bytes=2000,
        vocab_size=100,
    )


ProfileFactory = Callable[..., ModelProfile]


@pytest.fixture
def profile() -> ModelProfile:
    return make_profile()


@pytest.fixture(scope="session")
def profile_factory() -> ProfileFactory:
    """Tests import nothing from conftest, so the builder is handed out as a fixture."""
    return make_profile
