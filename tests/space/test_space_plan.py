from __future__ import annotations

import hashlib
import json
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetpress.space import (
    GROUP_SIZES,
    KV_BITS,
    PLAN_FORMAT_VERSION,
    WEIGHT_BITS,
    EvictionPolicy,
    KVSetting,
    KVUnit,
    LinearSetting,
    LinearUnit,
    Plan,
    Setting,
    SparsityPattern,
)

_fractions = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)


@st.composite
def linear_settings(draw: st.DrawFn) -> LinearSetting:
    bits = draw(st.sampled_from(WEIGHT_BITS))
    group = draw(st.sampled_from(GROUP_SIZES))
    mode = draw(st.sampled_from(["plain", "unstructured", "2:4", "rank"]))
    if mode == "unstructured":
        return LinearSetting(
            bits=bits, group_size=group, sparsity=draw(_fractions), pattern=SparsityPattern.UNSTRUCTURED
        )
    if mode == "2:4":
        return LinearSetting(bits=bits, group_size=group, sparsity=0.5, pattern=SparsityPattern.SEMI_2_4)
    rank = draw(st.integers(1, 8192)) if mode == "rank" else None
    return LinearSetting(bits=bits, group_size=group, rank=rank)


@st.composite
def kv_settings(draw: st.DrawFn) -> KVSetting:
    bits = draw(st.sampled_from(KV_BITS))
    policy = draw(st.sampled_from(list(EvictionPolicy)))
    kept = None if policy is EvictionPolicy.NONE else draw(st.integers(1, 1 << 20))
    return KVSetting(bits=bits, kept_tokens=kept, policy=policy)


plans = st.dictionaries(st.text(min_size=1, max_size=20), st.one_of(linear_settings(), kv_settings()), max_size=12).map(
    Plan
)


@settings(max_examples=150, deadline=None)
@given(plans)
def test_json_round_trip_is_exact(plan: Plan) -> None:
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.key == plan.key
    assert back.to_json() == text
    assert dict(back) == dict(plan)
    assert plan.key == hashlib.sha256(text.encode("utf-8")).hexdigest()


@settings(max_examples=100, deadline=None)
@given(plans, st.randoms(use_true_random=False))
def test_insertion_order_does_not_matter(plan: Plan, rng: random.Random) -> None:
    items = list(plan.items())
    rng.shuffle(items)
    shuffled = Plan(dict(items))
    assert shuffled == plan
    assert hash(shuffled) == hash(plan)
    assert shuffled.key == plan.key
    assert list(shuffled) == sorted(plan)


def test_canonical_json_is_pinned() -> None:
    # Plan keys identify cached results across runs, so the text must never drift.
    plan = Plan(
        {
            "m.b": LinearSetting(bits=4, group_size=64, sparsity=0.5, pattern=SparsityPattern.UNSTRUCTURED),
            "kv.0": KVSetting(bits=2, kept_tokens=256, policy=EvictionPolicy.SNAPKV),
            "m.a": LinearSetting(bits=16, group_size=32),
        }
    )
    assert plan.to_json() == (
        '{"units":{'
        '"kv.0":{"bits":2,"kept_tokens":256,"kind":"kv","policy":"snapkv"},'
        '"m.a":{"bits":16,"group_size":null,"kind":"linear","pattern":"none","rank":null,"sparsity":0.0},'
        '"m.b":{"bits":4,"group_size":64,"kind":"linear","pattern":"unstructured","rank":null,'
        '"sparsity":0.5}},"version":1}'
    )
    assert plan.key == hashlib.sha256(plan.to_json().encode()).hexdigest()
    assert repr(plan) == f"Plan(<3 units>, key={plan.key[:12]})"


def test_awkward_floats_survive_round_trip() -> None:
    for value in (0.1, 1 / 3, 5e-324, 0.9999999999999999, 0.30000000000000004):
        setting = LinearSetting(bits=4, sparsity=value, pattern=SparsityPattern.UNSTRUCTURED)
        back = Plan.from_json(Plan({"u": setting}).to_json())["u"]
        assert isinstance(back, LinearSetting) and back.sparsity == value


def test_mapping_behaviour() -> None:
    a, b = LinearSetting(bits=4), KVSetting(bits=8)
    plan = Plan(settings={"z": a, "kv.1": b})
    assert len(plan) == 2
    assert list(plan) == ["kv.1", "z"]
    assert plan["z"] is a
    assert "z" in plan and "y" not in plan
    assert plan.get("y") is None
    with pytest.raises(KeyError):
        plan["y"]
    assert Plan() == Plan({})
    assert plan != {"z": a, "kv.1": b}
    assert len({plan, Plan({"kv.1": b, "z": a})}) == 1


def test_plan_is_immutable_and_picklable() -> None:
    plan = Plan({"a": LinearSetting(bits=4)})
    with pytest.raises(AttributeError):
        plan._items = ()  # type: ignore[misc]
    source = {"a": LinearSetting(bits=4)}
    held = Plan(source)
    source["b"] = LinearSetting(bits=2)
    assert "b" not in held
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_with_settings_returns_new_plan() -> None:
    plan = Plan({"a": LinearSetting(bits=4), "b": LinearSetting(bits=8)})
    changed = plan.with_settings({"b": LinearSetting(bits=2), "kv.0": KVSetting(bits=4)})
    assert plan["b"] == LinearSetting(bits=8)
    assert dict(changed) == {
        "a": LinearSetting(bits=4),
        "b": LinearSetting(bits=2),
        "kv.0": KVSetting(bits=4),
    }
    assert changed.key != plan.key


def test_uniform() -> None:
    units = [
        LinearUnit(name="m.q", layer=0, in_features=8, out_features=8),
        KVUnit(layer=0, n_kv_heads=1, head_dim=8),
    ]
    plan = Plan.uniform(units, linear=LinearSetting(bits=3), kv=KVSetting(bits=4))
    assert dict(plan) == {"m.q": LinearSetting(bits=3), "kv.0": KVSetting(bits=4)}
    assert dict(Plan.uniform(units)) == {"m.q": LinearSetting(), "kv.0": KVSetting()}
    with pytest.raises(ValueError, match="must be a LinearSetting; got KVSetting"):
        Plan.uniform(units, linear=KVSetting())  # type: ignore[arg-type]


def test_constructor_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="must be a LinearSetting or KVSetting; got int"):
        Plan({"a": 4})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="plan keys must be non-empty unit key strings; got ''"):
        Plan({"": LinearSetting()})


def _doc(units: object, version: object = PLAN_FORMAT_VERSION) -> str:
    return json.dumps({"units": units, "version": version})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", r"plan JSON is not valid JSON"),
        ("[]", r"plan JSON must be an object; got list"),
        (_doc({}, version=2), r"plan JSON version must be 1; got 2"),
        (_doc({}, version=True), r"plan JSON version must be 1; got True"),
        ('{"units":{}}', r"plan JSON version must be 1; got None"),
        ('{"units":{},"version":1,"extra":0}', r"unknown key\(s\) extra; accepted keys: units, version"),
        (_doc([]), r"'units' must be an object"),
        (_doc({"a": 3}), r"unit 'a' must be an object"),
        (
            _doc({"a": {"kind": "conv", "bits": 4}}),
            r"unit 'a' has kind 'conv'; accepted kinds: 'linear', 'kv'",
        ),
        (_doc({"a": {"bits": 4}}), r"unit 'a' has kind None"),
        (_doc({"a": {"kind": "linear", "bits": 5}}), r"unit 'a': bits must be one of 2, 3, 4, 8, 16; got 5"),
        (
            _doc({"a": {"kind": "kv", "bits": 4, "rank": 2}}),
            r"unit 'a': kv setting has unknown key\(s\) rank",
        ),
        (
            '{"units":{"a":{"kind":"linear","sparsity":NaN,"pattern":"unstructured"}},"version":1}',
            r"must not contain NaN",
        ),
        ('{"units":{},"units":{},"version":1}', r"duplicate key 'units'"),
    ],
)
def test_from_json_rejects_malformed_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plan.from_json(text)


def test_from_json_accepts_bytes_and_missing_default_fields() -> None:
    plan = Plan.from_json(b'{"units":{"a":{"kind":"linear","bits":4}},"version":1}')
    expected: dict[str, Setting] = {"a": LinearSetting(bits=4)}
    assert dict(plan) == expected
