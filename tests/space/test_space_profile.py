from __future__ import annotations

import json
from typing import Any

import pytest

from budgetpress.space import KVUnit, LinearUnit, ModelProfile


def test_units_order_and_lookup(profile: ModelProfile) -> None:
    units = profile.units()
    assert units[: len(profile.linear_units)] == profile.linear_units
    assert units[len(profile.linear_units) :] == profile.kv_units
    assert profile.unit("kv.1") == KVUnit(layer=1, n_kv_heads=2, head_dim=32)
    q = profile.unit("model.layers.1.self_attn.q_proj")
    assert isinstance(q, LinearUnit) and q.layer == 1
    with pytest.raises(KeyError, match=r"no unit 'model.layers.7.mlp.up_proj' in profile 'toy'"):
        profile.unit("model.layers.7.mlp.up_proj")


def test_n_params(profile: ModelProfile) -> None:
    assert profile.n_params == 2 * (16384 + 16384 + 32768 + 32768) + 1000


def test_dict_and_json_round_trip(profile: ModelProfile) -> None:
    biased = ModelProfile.from_dict(
        {
            **profile.to_dict(),
            "linear_units": [
                {
                    "name": "model.layers.0.x",
                    "layer": 0,
                    "in_features": 3,
                    "out_features": 5,
                    "has_bias": True,
                }
            ],
        }
    )
    for original in (profile, biased):
        assert ModelProfile.from_dict(original.to_dict()) == original
        assert ModelProfile.from_json(original.to_json()) == original
        assert json.loads(original.to_json()) == original.to_dict()
        assert hash(ModelProfile.from_json(original.to_json())) == hash(original)
    assert ModelProfile.from_json(profile.to_json()).unit("kv.0") == profile.unit("kv.0")


def _profile_kwargs(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "p",
        "architecture": "A",
        "n_layers": 1,
        "linear_units": (LinearUnit(name="a", layer=0, in_features=4, out_features=4),),
        "kv_units": (KVUnit(layer=0, n_kv_heads=1, head_dim=4),),
        "other_params": 0,
        "other_bytes": 0,
        "vocab_size": 10,
    }
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layers": 0}, r"n_layers must be an integer >= 1; got 0"),
        ({"name": ""}, r"name must be a non-empty string"),
        ({"other_bytes": -1}, r"other_bytes must be an integer >= 0; got -1"),
        (
            {"kv_units": (KVUnit(layer=1, n_kv_heads=1, head_dim=4),)},
            r"unit 'kv.1' has layer 1; accepted layers are 0..0",
        ),
        (
            {"linear_units": (LinearUnit(name="a", layer=0, in_features=4, out_features=4),) * 2},
            r"unit key 'a' appears twice",
        ),
        (
            {"kv_units": (LinearUnit(name="b", layer=0, in_features=4, out_features=4),)},
            r"kv_units must hold only KVUnit",
        ),
    ],
)
def test_profile_validation(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelProfile(**_profile_kwargs(**changes))


def test_from_dict_errors(profile: ModelProfile) -> None:
    data = profile.to_dict()
    with pytest.raises(ValueError, match=r"model profile has unknown key\(s\) extra; accepted keys: name"):
        ModelProfile.from_dict({**data, "extra": 1})
    missing = {k: v for k, v in data.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match=r"model profile is missing key\(s\) vocab_size"):
        ModelProfile.from_dict(missing)
    with pytest.raises(ValueError, match=r"linear unit is missing key\(s\) out_features"):
        ModelProfile.from_dict({**data, "linear_units": [{"name": "a", "layer": 0, "in_features": 4}]})
    with pytest.raises(ValueError, match=r"kv unit has unknown key\(s\) heads"):
        ModelProfile.from_dict({**data, "kv_units": [{"layer": 0, "heads": 1, "head_dim": 4}]})
    with pytest.raises(ValueError, match=r"model profile JSON is not valid JSON"):
        ModelProfile.from_json("{")
