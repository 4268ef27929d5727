from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetpress.space import (
    Grouping,
    KVSetting,
    LinearSetting,
    ModelProfile,
    Plan,
    SearchSpace,
    SparsityPattern,
)

Q0, O0, UP0, DOWN0 = (
    f"model.layers.0.{r}" for r in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
)
Q1, O1, UP1, DOWN1 = (
    f"model.layers.1.{r}" for r in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
)
BITS = tuple(LinearSetting(bits=b) for b in (2, 3, 4, 8, 16))


def test_groups_unit(profile: ModelProfile) -> None:
    space = SearchSpace.bits_only(profile)
    assert space.groups() == (
        (Q0, (Q0,)),
        (O0, (O0,)),
        (UP0, (UP0,)),
        (DOWN0, (DOWN0,)),
        (Q1, (Q1,)),
        (O1, (O1,)),
        (UP1, (UP1,)),
        (DOWN1, (DOWN1,)),
        ("kv.0", ("kv.0",)),
        ("kv.1", ("kv.1",)),
    )
    assert space.linear_choices == BITS
    assert space.choices(Q0) == BITS
    assert space.choices("kv.1") == (KVSetting(),)
    assert space.size() == 5**8


def test_groups_layer(profile: ModelProfile) -> None:
    space = SearchSpace.bits_only(profile, grouping=Grouping.LAYER)
    assert space.groups() == (
        ("layer.0", (Q0, O0, UP0, DOWN0)),
        ("layer.1", (Q1, O1, UP1, DOWN1)),
        ("kv.0", ("kv.0",)),
        ("kv.1", ("kv.1",)),
    )
    assert space.size() == 25


def test_groups_role(profile: ModelProfile) -> None:
    kv = (KVSetting(), KVSetting(bits=4), KVSetting(bits=2))
    space = SearchSpace(profile=profile, linear_choices=BITS[:2], kv_choices=kv, grouping=Grouping.ROLE)
    assert space.groups() == (
        ("role.q_proj", (Q0, Q1)),
        ("role.o_proj", (O0, O1)),
        ("role.up_proj", (UP0, UP1)),
        ("role.down_proj", (DOWN0, DOWN1)),
        ("kv.0", ("kv.0",)),
        ("kv.1", ("kv.1",)),
    )
    assert space.choices("kv.0") == kv
    assert space.size() == 2**4 * 3**2
    with pytest.raises(KeyError, match=r"no group 'role\.gate_proj'"):
        space.choices("role.gate_proj")


@settings(max_examples=60, deadline=None)
@given(grouping=st.sampled_from(list(Grouping)), data=st.data())
def test_plan_from_choices_and_choices_of_are_inverse(
    profile_factory: Callable[..., ModelProfile], grouping: Grouping, data: st.DataObject
) -> None:
    kv = (KVSetting(), KVSetting(bits=4))
    space = SearchSpace(profile=profile_factory(), linear_choices=BITS, kv_choices=kv, grouping=grouping)
    indices = {name: data.draw(st.integers(0, len(space.choices(name)) - 1), label=name) for name, _ in space.groups()}
    plan = space.plan_from_choices(indices)
    assert set(plan) == {u.key for u in space.profile.units()}
    for name, members in space.groups():
        assert {plan[key] for key in members} == {space.choices(name)[indices[name]]}
    assert space.choices_of(plan) == indices
    assert space.choices_of(Plan.from_json(plan.to_json())) == indices


def test_plan_from_choices_errors(profile: ModelProfile) -> None:
    space = SearchSpace.bits_only(profile, grouping=Grouping.LAYER)
    full = {"layer.0": 0, "layer.1": 4, "kv.0": 0, "kv.1": 0}
    assert dict(space.plan_from_choices(full))[UP1] == LinearSetting()
    with pytest.raises(ValueError, match=r"no choice given for group 'kv.1'"):
        space.plan_from_choices({k: v for k, v in full.items() if k != "kv.1"})
    with pytest.raises(ValueError, match=r"group 'layer.0' must be an integer in \[0, 4\]; got 5"):
        space.plan_from_choices({**full, "layer.0": 5})
    with pytest.raises(ValueError, match=r"in \[0, 4\]; got -1"):
        space.plan_from_choices({**full, "layer.0": -1})
    with pytest.raises(ValueError, match=r"unknown group\(s\) 'layer.7'"):
        space.plan_from_choices({**full, "layer.7": 0})


def test_choices_of_errors(profile: ModelProfile) -> None:
    space = SearchSpace.bits_only(profile, bits=(2, 4), grouping=Grouping.LAYER)
    uniform = space.uniform_plans()[0]
    mixed = uniform.with_settings({Q0: LinearSetting(bits=4)})
    with pytest.raises(ValueError, match=r"group 'layer.0' several settings \(2b/g128, 4b/g128\)"):
        space.choices_of(mixed)
    outside = uniform.with_settings({n: LinearSetting(bits=8) for n in (Q1, O1, UP1, DOWN1)})
    with pytest.raises(ValueError, match=r"setting '8b/g128', which is not a choice; accepted: 2b/g128, 4b/g128"):
        space.choices_of(outside)
    with pytest.raises(ValueError, match=r"plan has unit\(s\) 'model.layers.5.mlp.up_proj'"):
        space.choices_of(uniform.with_settings({"model.layers.5.mlp.up_proj": LinearSetting()}))
    # Absent units are dense, so the empty plan is only expressible when 16-bit is a choice.
    with pytest.raises(ValueError, match=r"setting '16b', which is not a choice"):
        space.choices_of(Plan())
    dense_space = SearchSpace.bits_only(profile, grouping=Grouping.LAYER)
    assert dense_space.choices_of(Plan()) == {"layer.0": 4, "layer.1": 4, "kv.0": 0, "kv.1": 0}


def test_uniform_plans(profile: ModelProfile) -> None:
    kv = (KVSetting(bits=8), KVSetting())
    space = SearchSpace(profile=profile, linear_choices=BITS, kv_choices=kv, grouping=Grouping.ROLE)
    plans = space.uniform_plans()
    expected = [Plan.uniform(profile.units(), linear=choice, kv=kv_choice) for choice in BITS for kv_choice in kv]
    assert plans == expected


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        (
            LinearSetting(bits=4, group_size=64),
            r"'4b/g64' does not fit unit 'model.layers.0.x': group size must divide in_features=96",
        ),
        (
            LinearSetting(bits=4, sparsity=0.5, pattern=SparsityPattern.SEMI_2_4, group_size=32),
            r"2:4 sparsity needs in_features divisible by 4 \(in_features=98\)",
        ),
        (
            LinearSetting(bits=4, rank=48, group_size=None),
            r"'4b/ch r48' does not fit unit 'model.layers.0.x': "
            r"rank must be < min\(in_features, out_features\) = 48",
        ),
    ],
)
def test_invalid_choices_are_rejected(
    profile_factory: Callable[..., ModelProfile], choice: LinearSetting, message: str
) -> None:
    n_in = 98 if choice.pattern is SparsityPattern.SEMI_2_4 else 96
    odd = profile_factory(n_layers=1, layer=(("x", n_in, 48),))
    with pytest.raises(ValueError, match=message):
        SearchSpace(profile=odd, linear_choices=(LinearSetting(), choice))


def test_choices_that_fit_are_accepted(profile_factory: Callable[..., ModelProfile]) -> None:
    odd = profile_factory(n_layers=1, layer=(("x", 96, 48),))
    fine = (
        LinearSetting(bits=4, group_size=32),
        LinearSetting(bits=3, group_size=None),
        LinearSetting(rank=47),
    )
    assert SearchSpace(profile=odd, linear_choices=fine).size() == 3


def test_choice_lists_are_validated(profile: ModelProfile) -> None:
    with pytest.raises(ValueError, match=r"linear_choices must not be empty"):
        SearchSpace(profile=profile, linear_choices=())
    with pytest.raises(ValueError, match=r"kv_choices must not be empty"):
        SearchSpace(profile=profile, linear_choices=BITS, kv_choices=())
    with pytest.raises(ValueError, match=r"linear_choices lists '16b' twice"):
        SearchSpace(profile=profile, linear_choices=(LinearSetting(), LinearSetting(bits=16, group_size=64)))
    with pytest.raises(ValueError, match=r"kv_choices must hold KVSetting values"):
        SearchSpace(profile=profile, linear_choices=BITS, kv_choices=(LinearSetting(),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"grouping must be one of 'unit', 'layer', 'role'"):
        SearchSpace(profile=profile, linear_choices=BITS, grouping="block")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bits must be one of 2, 3, 4, 8, 16; got 6"):
        SearchSpace.bits_only(profile, bits=(4, 6))


def test_bits_only_per_channel(profile: ModelProfile) -> None:
    space = SearchSpace.bits_only(profile, bits=(3, 16), group_size=None)
    assert space.linear_choices == (LinearSetting(bits=3, group_size=None), LinearSetting())
    assert space.kv_choices == (KVSetting(),)
    assert space.grouping is Grouping.UNIT


def test_dimensions_parse_and_reject_unknown_names() -> None:
    from budgetpress.space import Dimension, parse_dimensions

    assert parse_dimensions(" kv,bits ") == {Dimension.KV, Dimension.BITS}
    assert parse_dimensions("bits,sparsity,rank,kv") == set(Dimension)
    with pytest.raises(ValueError, match="unknown space dimension 'depth'; accepted: bits, sparsity, rank, kv"):
        parse_dimensions("bits,depth")
    with pytest.raises(ValueError, match="at least one dimension"):
        parse_dimensions(" , ")


@pytest.mark.parametrize("text", ["bits", "sparsity", "rank", "kv", "bits,sparsity", "bits,sparsity,rank,kv"])
def test_space_for_dimensions_offers_exactly_those_dimensions(profile: ModelProfile, text: str) -> None:
    from budgetpress.space import Dimension, parse_dimensions, plan_dimensions

    dims = parse_dimensions(text)
    space = SearchSpace.for_dimensions(profile, dims, context=512)
    assert space.linear_choices[0].is_dense and space.kv_choices[0].is_dense
    offered: set[Dimension] = set()
    for plan in space.uniform_plans():
        offered |= plan_dimensions(plan)
    offered |= {Dimension.KV} if len(space.kv_choices) > 1 else set()
    assert offered == dims
    for choice in space.kv_choices:
        assert choice.kept_tokens is None or choice.kept_tokens in (256, 128)
    ranks = {c.rank for c in space.linear_choices if c.rank is not None}
    narrowest = min(min(u.in_features, u.out_features) for u in profile.linear_units)
    assert all(r < narrowest for r in ranks)


def test_plan_dimensions_names_what_a_plan_uses() -> None:
    from budgetpress.space import Dimension, plan_dimensions

    plan = Plan(
        {
            Q0: LinearSetting(bits=16, rank=8),
            O0: LinearSetting(bits=4, sparsity=0.5, pattern=SparsityPattern.SEMI_2_4),
            "kv.0": KVSetting(bits=16),
        }
    )
    assert plan_dimensions(plan) == {Dimension.RANK, Dimension.SPARSITY, Dimension.BITS}
    assert plan_dimensions(Plan({"kv.1": KVSetting(bits=4)})) == {Dimension.KV}
    assert plan_dimensions(Plan({})) == frozenset()
