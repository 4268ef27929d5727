"""Memory model values worked out by hand from the layouts in _memory's docstring."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from budgetpress.space import (
    KV_GROUP,
    KV_RESIDUAL,
    EvictionPolicy,
    KVSetting,
    KVUnit,
    LinearSetting,
    LinearUnit,
    ModelProfile,
    Plan,
    SparsityPattern,
    Workload,
    dense_bytes,
    effective_bits,
    kv_bytes,
    linear_bytes,
    plan_bytes,
    plan_memory,
)

UNSTRUCTURED, SEMI = SparsityPattern.UNSTRUCTURED, SparsityPattern.SEMI_2_4


def lin(n_in: int, n_out: int, bias: bool = False) -> LinearUnit:
    return LinearUnit(name="m.layers.0.proj", layer=0, in_features=n_in, out_features=n_out, has_bias=bias)


@pytest.mark.parametrize(
    ("unit", "setting", "expected"),
    [
        # dense: 2*out*in
        (lin(256, 256), LinearSetting(), 131072),
        # 4b g128: codes 4*256*ceil(1024/32)=32768 + scales/zeros 256*2*3=1536
        (lin(256, 256), LinearSetting(bits=4, group_size=128), 34304),
        # 3b per-channel, in=256 out=128: 4*128*ceil(768/32)=12288 + 128*1*3=384
        (lin(256, 128), LinearSetting(bits=3, group_size=None), 12672),
        # ragged: in=100 out=7 3b g32: 4*7*ceil(300/32)=280 + 7*ceil(100/32)*3=84
        (lin(100, 7), LinearSetting(bits=3, group_size=32), 364),
        # 2b g32 256x256: 4*256*ceil(512/32)=16384 + 256*8*3=6144
        (lin(256, 256), LinearSetting(bits=2, group_size=32), 22528),
        # 8b g64 in=64 out=2: 4*2*ceil(512/32)=128 + 2*1*3=6
        (lin(64, 2), LinearSetting(bits=8, group_size=64), 134),
        # 2:4 4b g128: indices 4*256*ceil(128*2/32)=8192 + codes 4*256*ceil(512/32)=16384 + 1536
        (lin(256, 256), LinearSetting(bits=4, sparsity=0.5, pattern=SEMI), 26112),
        # 2:4 16b: indices 8192 + 2*256*128=65536
        (lin(256, 256), LinearSetting(sparsity=0.5, pattern=SEMI), 73728),
        # unstructured 50% 4b g128: mask 256*32=8192 + codes 16384 + 1536
        (lin(256, 256), LinearSetting(bits=4, sparsity=0.5, pattern=UNSTRUCTURED), 26112),
        # unstructured 25% on in=10 at 16b: round(2.5)=2 pruned (banker's), k=8: mask 3*2 + 2*3*8
        (lin(10, 3), LinearSetting(sparsity=0.25, pattern=UNSTRUCTURED), 54),
        # unstructured 35% on in=10 at 16b: round(3.5)=4 pruned, k=6: mask 6 + 2*3*6
        (lin(10, 3), LinearSetting(sparsity=0.35, pattern=UNSTRUCTURED), 42),
        # rank 32, in=512 out=256, 4b g128:
        # down 4*32*ceil(2048/32)=8192 + 32*4*3=384; up 4*256*ceil(128/32)=4096 + 256*1*3=768
        (lin(512, 256), LinearSetting(bits=4, rank=32), 13440),
        # rank 32 at 16b: 2*32*512 + 2*256*32
        (lin(512, 256), LinearSetting(rank=32), 49152),
        # bias is 2*out on top of anything
        (lin(256, 256, bias=True), LinearSetting(), 131584),
        (lin(256, 256, bias=True), LinearSetting(bits=4), 34816),
        (lin(512, 256, bias=True), LinearSetting(bits=4, rank=32), 13952),
    ],
)
def test_linear_bytes(unit: LinearUnit, setting: LinearSetting, expected: int) -> None:
    assert linear_bytes(unit, setting) == expected


def test_two_four_needs_in_divisible_by_four() -> None:
    with pytest.raises(ValueError, match=r"2:4 sparsity needs in_features divisible by 4.*in_features=10"):
        linear_bytes(lin(10, 4), LinearSetting(bits=4, sparsity=0.5, pattern=SEMI))


def test_effective_bits() -> None:
    assert effective_bits(lin(256, 256), LinearSetting()) == 16.0
    assert effective_bits(lin(256, 256), LinearSetting(bits=4)) == 34304 * 8 / 65536


KV = KVUnit(layer=0, n_kv_heads=2, head_dim=64)


def per_head(setting: KVSetting, context: int) -> int:
    total = kv_bytes(KV, setting, Workload(batch=3, context=context))
    assert total % 6 == 0
    return total // 6


def test_kivi_constants() -> None:
    assert (KV_GROUP, KV_RESIDUAL) == (32, 32)


@pytest.mark.parametrize(
    ("context", "bits", "expected"),
    [
        (100, 16, 2 * 100 * 64 * 2),
        (1, 16, 256),
        # t <= 32: nothing is quantized yet, so identical to 16 bits
        (20, 4, 2 * 20 * 64 * 2),
        (32, 4, 8192),
        (33, 4, 2 * 33 * 64 * 2),
        # t=64: q=32 f=32. codes 32*64*4/8=1024; keys +1*64*4; values +32*4; full 2*32*64*2
        (64, 4, (1024 + 256) + (1024 + 128) + 8192),
        # t=100: q=64 f=36. codes 2048; keys +2*256; values +256; full 2*36*64*2
        (100, 4, (2048 + 512) + (2048 + 256) + 9216),
        # same at 2 bits: codes 1024
        (100, 2, (1024 + 512) + (1024 + 256) + 9216),
        # 8 bits t=95: q=((95-32)//32)*32=32 f=63. codes 2048; keys +256; values +128; full 16128
        (95, 8, (2048 + 256) + (2048 + 128) + 16128),
    ],
)
def test_kv_bytes(context: int, bits: int, expected: int) -> None:
    assert per_head(KVSetting(bits=bits), context) == expected


def test_kv_kept_tokens_caps_context() -> None:
    window = KVSetting(bits=16, kept_tokens=50, policy=EvictionPolicy.SINK_WINDOW)
    assert per_head(window, 100) == 2 * 50 * 64 * 2
    assert per_head(window, 10) == 2 * 10 * 64 * 2
    snap = KVSetting(bits=4, kept_tokens=100, policy=EvictionPolicy.SNAPKV)
    assert per_head(snap, 4096) == per_head(KVSetting(bits=4), 100)


def test_kv_scales_with_batch_and_heads() -> None:
    unit = KVUnit(layer=0, n_kv_heads=8, head_dim=128)
    one = kv_bytes(unit, KVSetting(), Workload(batch=1, context=512))
    assert one == 8 * 2 * 512 * 128 * 2
    assert kv_bytes(unit, KVSetting(), Workload(batch=5, context=512)) == 5 * one


def test_dense_bytes_by_hand(profile: ModelProfile) -> None:
    # linear: 2 layers * 2*(128*128 + 128*128 + 128*256 + 256*128); kv: 2 layers * 2 heads * 2*512*32*2
    linear = 2 * 2 * (16384 + 16384 + 32768 + 32768)
    kv = 2 * 2 * (2 * 512 * 32 * 2)
    assert dense_bytes(profile, Workload()) == linear + kv + 2000
    assert plan_bytes(profile, Plan(), Workload()) == linear + kv + 2000


def test_plan_memory_is_sum_of_parts(profile: ModelProfile) -> None:
    workload = Workload(batch=2, context=300)
    q0 = "model.layers.0.self_attn.q_proj"
    up1 = "model.layers.1.mlp.up_proj"
    plan = Plan(
        {
            q0: LinearSetting(bits=4, group_size=32),
            up1: LinearSetting(bits=8, sparsity=0.5, pattern=SEMI),
            "kv.1": KVSetting(bits=2),
        }
    )
    memory = plan_memory(profile, plan, workload)
    expected_units = []
    for unit in profile.units():
        if isinstance(unit, LinearUnit):
            setting = plan.get(unit.key, LinearSetting())
            assert isinstance(setting, LinearSetting)
            expected_units.append((unit.key, linear_bytes(unit, setting)))
        else:
            kv_setting = plan.get(unit.key, KVSetting())
            assert isinstance(kv_setting, KVSetting)
            expected_units.append((unit.key, kv_bytes(unit, kv_setting, workload)))
    assert memory.per_unit == tuple(expected_units)
    assert memory.linear_bytes == sum(b for k, b in expected_units if not k.startswith("kv."))
    assert memory.kv_bytes == sum(b for k, b in expected_units if k.startswith("kv."))
    assert memory.other_bytes == 2000
    assert memory.total == memory.linear_bytes + memory.kv_bytes + 2000
    assert plan_bytes(profile, plan, workload) == memory.total
    assert memory.total < dense_bytes(profile, workload)
    # q0 at 4b g32: 4*128*ceil(512/32)=8192 + 128*4*3=1536
    assert dict(memory.per_unit)[q0] == 9728


def test_plan_memory_rejects_unknown_and_mismatched_units(
    profile_factory: Callable[..., ModelProfile],
) -> None:
    profile = profile_factory(n_layers=1)
    with pytest.raises(ValueError, match=r"not in profile 'toy': 'model.layers.9.mlp.up_proj'"):
        plan_memory(profile, Plan({"model.layers.9.mlp.up_proj": LinearSetting()}), Workload())
    with pytest.raises(ValueError, match=r"'kv.0' is a KV unit and needs a KVSetting; got LinearSetting"):
        plan_memory(profile, Plan({"kv.0": LinearSetting()}), Workload())
    with pytest.raises(ValueError, match=r"is a linear unit and needs a LinearSetting; got KVSetting"):
        plan_memory(profile, Plan({"model.layers.0.mlp.up_proj": KVSetting()}), Workload())
