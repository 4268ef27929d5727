from __future__ import annotations

from typing import Any

import pytest

from budgetpress.space import (
    EvictionPolicy,
    KVSetting,
    KVUnit,
    LinearSetting,
    LinearUnit,
    SparsityPattern,
    UnitKind,
)


def test_linear_unit_properties() -> None:
    unit = LinearUnit(name="model.layers.3.self_attn.q_proj", layer=3, in_features=10, out_features=7, has_bias=True)
    assert unit.key == "model.layers.3.self_attn.q_proj"
    assert unit.role == "q_proj"
    assert unit.kind is UnitKind.LINEAR
    assert unit.n_params == 77
    assert LinearUnit(name="lm_head", layer=0, in_features=10, out_features=7).n_params == 70
    assert LinearUnit(name="lm_head", layer=0, in_features=10, out_features=7).role == "lm_head"


def test_kv_unit_properties() -> None:
    unit = KVUnit(layer=5, n_kv_heads=8, head_dim=128)
    assert unit.key == "kv.5"
    assert unit.kind is UnitKind.KV


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "", "layer": 0, "in_features": 1, "out_features": 1}, "name must be a non-empty"),
        ({"name": "a", "layer": -1, "in_features": 1, "out_features": 1}, r"layer must be an integer >= 0"),
        ({"name": "a", "layer": 0, "in_features": 0, "out_features": 1}, r"in_features .* >= 1; got 0"),
        ({"name": "a", "layer": 0, "in_features": 1, "out_features": 1.5}, r"out_features .*got 1.5"),
        (
            {"name": "a", "layer": 0, "in_features": 1, "out_features": 1, "has_bias": 1},
            "has_bias must be True or False",
        ),
    ],
)
def test_linear_unit_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinearUnit(**kwargs)


def test_kv_unit_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"n_kv_heads must be an integer >= 1; got 0"):
        KVUnit(layer=0, n_kv_heads=0, head_dim=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, r"bits must be one of 2, 3, 4, 8, 16; got 5"),
        ({"bits": True}, r"bits must be one of 2, 3, 4, 8, 16; got True"),
        ({"bits": 4, "group_size": 100}, r"group_size must be one of 32, 64, 128, None; got 100"),
        ({"bits": 4, "sparsity": 1.0, "pattern": "unstructured"}, r"sparsity must be .*\[0, 1\); got 1.0"),
        ({"bits": 4, "sparsity": -0.1, "pattern": "unstructured"}, r"\[0, 1\); got -0.1"),
        ({"bits": 4, "sparsity": float("nan"), "pattern": "unstructured"}, r"\[0, 1\); got nan"),
        ({"bits": 4, "sparsity": 0.3}, r"sparsity > 0 requires a pattern"),
        ({"bits": 4, "pattern": SparsityPattern.UNSTRUCTURED}, r"pattern 'none' requires sparsity 0"),
        (
            {"bits": 4, "sparsity": 0.4, "pattern": "2:4"},
            r"pattern '2:4' requires sparsity 0.5; got sparsity=0.4",
        ),
        (
            {"bits": 4, "pattern": "3:4", "sparsity": 0.5},
            r"pattern must be one of 'none', 'unstructured', '2:4'",
        ),
        ({"bits": 4, "rank": 0}, r"rank must be an integer >= 1; got 0"),
        (
            {"bits": 4, "rank": 8, "sparsity": 0.5, "pattern": "unstructured"},
            r"sparsity and rank cannot both be set",
        ),
    ],
)
def test_linear_setting_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinearSetting(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, r"bits must be one of 2, 4, 8, 16; got 3"),
        ({"kept_tokens": 0, "policy": "snapkv"}, r"kept_tokens must be an integer >= 1; got 0"),
        ({"kept_tokens": 64}, r"kept_tokens must be set exactly when an eviction policy is chosen"),
        ({"policy": EvictionPolicy.SINK_WINDOW}, r"got kept_tokens=None, policy='sink_window'"),
        ({"policy": "lru", "kept_tokens": 4}, r"policy must be one of 'none', 'sink_window', 'snapkv'"),
    ],
)
def test_kv_setting_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVSetting(**kwargs)


def test_group_size_is_normalised_at_16_bits() -> None:
    assert LinearSetting(bits=16, group_size=64) == LinearSetting(bits=16, group_size=None)
    assert LinearSetting(bits=16, group_size=64).group_size is None
    assert hash(LinearSetting(bits=16, group_size=32)) == hash(LinearSetting())
    assert LinearSetting(bits=4, group_size=64) != LinearSetting(bits=4, group_size=None)


def test_int_sparsity_and_string_enums_are_normalised() -> None:
    setting = LinearSetting(bits=4, sparsity=0.5, pattern="2:4")  # type: ignore[arg-type]
    assert setting.pattern is SparsityPattern.SEMI_2_4
    assert type(LinearSetting(bits=4, sparsity=0).sparsity) is float
    assert KVSetting(kept_tokens=8, policy="snapkv").policy is EvictionPolicy.SNAPKV  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "label", "dense"),
    [
        (LinearSetting(), "16b", True),
        (LinearSetting(bits=4), "4b/g128", False),
        (LinearSetting(bits=3, group_size=None), "3b/ch", False),
        (
            LinearSetting(bits=4, group_size=64, sparsity=0.5, pattern=SparsityPattern.UNSTRUCTURED),
            "4b/g64 s50%unstructured",
            False,
        ),
        (LinearSetting(bits=4, rank=64), "4b/g128 r64", False),
        (LinearSetting(rank=64), "16b r64", False),
        (LinearSetting(bits=8, sparsity=0.5, pattern=SparsityPattern.SEMI_2_4), "8b/g128 s50%2:4", False),
        (KVSetting(), "16b", True),
        (KVSetting(bits=4), "4b", False),
        (KVSetting(kept_tokens=512, policy=EvictionPolicy.SNAPKV), "16b keep512/snapkv", False),
    ],
)
def test_labels_and_density(setting: LinearSetting | KVSetting, label: str, dense: bool) -> None:
    assert setting.label() == label
    assert setting.is_dense is dense


@pytest.mark.parametrize(
    "setting",
    [
        LinearSetting(),
        LinearSetting(bits=2, group_size=32),
        LinearSetting(bits=3, group_size=None, sparsity=0.1, pattern=SparsityPattern.UNSTRUCTURED),
        LinearSetting(bits=8, rank=17),
    ],
)
def test_linear_setting_dict_round_trip(setting: LinearSetting) -> None:
    data = setting.to_dict()
    assert set(data) == {"bits", "group_size", "sparsity", "pattern", "rank"}
    assert isinstance(data["pattern"], str) and type(data["pattern"]) is str
    assert LinearSetting.from_dict(data) == setting


def test_kv_setting_dict_round_trip() -> None:
    setting = KVSetting(bits=2, kept_tokens=100, policy=EvictionPolicy.SINK_WINDOW)
    data = setting.to_dict()
    assert data == {"bits": 2, "kept_tokens": 100, "policy": "sink_window"}
    assert type(data["policy"]) is str
    assert KVSetting.from_dict(data) == setting


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) bitz; accepted keys: bits, group_size"):
        LinearSetting.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match=r"unknown key\(s\) group_size; accepted keys: bits, kept_tokens"):
        KVSetting.from_dict({"bits": 4, "group_size": 128})
    with pytest.raises(ValueError, match=r"bits must be one of"):
        LinearSetting.from_dict({"bits": "4"})
