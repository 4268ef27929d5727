"""Packed linears to tensors and metadata and back: exact buffers and forwards, strict refusals."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from budgetpress.evaluators import Methods, compress_weight, pack_variant
from budgetpress.kernels import LowRankLinear, QuantLinear, SparseLinear, module_from_tensors, module_tensors
from budgetpress.space import LinearSetting, LinearUnit, linear_bytes

OUT_FEATURES, IN_FEATURES = 37, 100
SETTINGS = [
    LinearSetting(bits=2, group_size=32),
    LinearSetting(bits=3, group_size=64),
    LinearSetting(bits=4, group_size=None),
    LinearSetting(bits=8, group_size=32),
    LinearSetting(bits=16, sparsity=0.3, pattern="unstructured"),
    LinearSetting(bits=4, group_size=32, sparsity=0.6, pattern="unstructured"),
    LinearSetting(bits=16, sparsity=0.5, pattern="2:4"),
    LinearSetting(bits=4, group_size=64, sparsity=0.5, pattern="2:4"),
    LinearSetting(bits=16, rank=12),
    LinearSetting(bits=8, group_size=32, rank=12),
]


def packed(setting: LinearSetting, *, has_bias: bool) -> nn.Module:
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    bias = torch.randn(OUT_FEATURES, generator=generator) if has_bias else None
    return pack_variant(compress_weight(weight, setting, methods=Methods()), setting, bias=bias)


def file_round_trip(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Through real safetensors bytes: the metadata must be all strings, the tensors storable."""
    data = save_safetensors(tensors, metadata=metadata)
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    return load_safetensors(data), header["__metadata__"]


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label())
def test_round_trip_is_exact(setting: LinearSetting, has_bias: bool) -> None:
    module = packed(setting, has_bias=has_bias)
    expected = LowRankLinear if setting.rank else SparseLinear if setting.sparsity else QuantLinear
    assert type(module) is expected
    tensors, metadata = module_tensors(module)
    assert set(tensors) == {name for name, _ in module.named_buffers()}
    assert ("bias" in tensors) == has_bias
    unit = LinearUnit(name="x", layer=0, in_features=IN_FEATURES, out_features=OUT_FEATURES, has_bias=has_bias)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == linear_bytes(unit, setting)

    rebuilt = module_from_tensors(*file_round_trip(tensors, metadata))
    assert type(rebuilt) is type(module)
    assert module_tensors(rebuilt)[1] == metadata
    original = dict(module.named_buffers())
    again = dict(rebuilt.named_buffers())
    assert set(again) == set(original)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
    x = torch.randn(3, 5, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))


def test_low_rank_factor_kinds() -> None:
    """Both factor kinds appear: bf16 buffers at 16 bits, QuantLinear submodules below."""
    bf16 = module_tensors(packed(LinearSetting(bits=16, rank=12), has_bias=False))[0]
    assert set(bf16) == {"down", "up"}
    quantized, metadata = module_tensors(packed(LinearSetting(bits=8, group_size=32, rank=12), has_bias=False))
    assert set(quantized) == {f"{f}.{n}" for f in ("down", "up") for n in ("qweight", "scales", "zeros")}
    assert metadata["down.group_size"] == "32" and metadata["up.group_size"] == "32"


def _valid() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return module_tensors(packed(LinearSetting(bits=4, group_size=32), has_bias=True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, m: m.update(type="Conv2d"), "unknown packed module type 'Conv2d'"),
        (lambda t, m: m.pop("type"), "unknown packed module type ''"),
        (lambda t, m: m.update(version="9"), "version"),
        (lambda t, m: m.update(colour="red"), "unknown keys \\['colour'\\]"),
        (lambda t, m: m.pop("group_size"), "misses keys \\['group_size'\\]"),
        (lambda t, m: m.update(bits="5"), "'bits' must be one of"),
        (lambda t, m: m.update(in_features="ten"), "'in_features' must be an integer"),
        (lambda t, m: m.update(in_features="90"), "qweight must be"),
        (lambda t, m: t.pop("scales"), "missing \\['scales'\\]"),
        (lambda t, m: t.update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (lambda t, m: t.update(scales=t["scales"].float()), "'scales' is torch.float32"),
        (lambda t, m: t.update(bias=torch.zeros(5)), "bias must be"),
    ],
)
def test_bad_metadata_or_tensors_are_refused(
    change: Callable[[dict[str, torch.Tensor], dict[str, str]], object], message: str
) -> None:
    tensors, metadata = _valid()
    change(tensors, metadata)
    with pytest.raises(ValueError, match=message):
        module_from_tensors(tensors, metadata)


def test_contradicting_low_rank_metadata_is_refused() -> None:
    tensors, metadata = module_tensors(packed(LinearSetting(bits=16, rank=12), has_bias=False))
    with pytest.raises(ValueError, match="contradict the metadata at \\['rank'\\]"):
        module_from_tensors(tensors, {**metadata, "rank": "11"})
    sparse, sparse_meta = module_tensors(packed(SETTINGS[4], has_bias=False))
    with pytest.raises(ValueError, match="pattern"):
        module_from_tensors(sparse, {**sparse_meta, "pattern": "2:8"})


def test_only_packed_linears_serialize() -> None:
    with pytest.raises(ValueError, match="cannot serialize a Linear"):
        module_tensors(nn.Linear(4, 4))
