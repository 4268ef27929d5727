"""Low-rank layers: held bytes equal the memory model; weight, forward and the Triton path are exact."""

from __future__ import annotations

import os

import pytest
import torch

from budgetpress.evaluators import rtn_quantize
from budgetpress.kernels import (
    LowRankLinear,
    QuantLinear,
    low_rank_linear_reference,
    low_rank_linear_triton,
)
from budgetpress.kernels._backend import ENV_VAR
from budgetpress.space import LinearSetting, LinearUnit, linear_bytes

# (out, in, rank): odd ranks, a rank just past a group of 32, a rank above in (still valid).
SHAPES = [(37, 100, 5), (24, 160, 33), (20, 48, 64)]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)


def _factors(out_features: int, in_features: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) / rank**0.5
    return down, up


def _layer(
    out_features: int, in_features: int, rank: int, *, bits: int, group_size: int | None, bias: bool
) -> LowRankLinear:
    down, up = _factors(out_features, in_features, rank, seed=bits + rank)
    b = torch.randn(out_features, generator=torch.Generator().manual_seed(9)) if bias else None
    return LowRankLinear.from_factors(down=down, up=up, bias=b, bits=bits, group_size=group_size, quantize=rtn_quantize)


@pytest.mark.parametrize("bits", [16, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize(("out_features", "in_features", "rank"), SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_held_bytes_equal_the_memory_model(
    bits: int, group_size: int | None, out_features: int, in_features: int, rank: int, has_bias: bool
) -> None:
    layer = _layer(out_features, in_features, rank, bits=bits, group_size=group_size, bias=has_bias)
    unit = LinearUnit(name="x.proj", layer=0, in_features=in_features, out_features=out_features, has_bias=has_bias)
    setting = LinearSetting(bits=bits, group_size=group_size, rank=rank)
    assert layer.held_bytes() == linear_bytes(unit, setting)
    assert (layer.rank, layer.in_features, layer.out_features, layer.bits) == (rank, in_features, out_features, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("out_features", "in_features", "rank"), SHAPES)
def test_dequantized_weight_is_the_product_of_the_stored_factors(
    bits: int, out_features: int, in_features: int, rank: int
) -> None:
    down, up = _factors(out_features, in_features, rank, seed=1)
    q_down = rtn_quantize(down, bits=bits, group_size=32)
    q_up = rtn_quantize(up, bits=bits, group_size=32)
    layer = LowRankLinear(
        down=QuantLinear.from_codes(q_down.codes, q_down.scales, q_down.zeros, bits=bits, group_size=32),
        up=QuantLinear.from_codes(q_up.codes, q_up.scales, q_up.zeros, bits=bits, group_size=32),
    )
    assert torch.equal(layer.dequantized_weight(), q_up.dequantize() @ q_down.dequantize())


def test_dense_factors_are_stored_in_bf16() -> None:
    down, up = _factors(37, 100, 5, seed=2)
    layer = LowRankLinear(down=down, up=up)
    assert layer.down.dtype == torch.bfloat16 and layer.up.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(), up.bfloat16().float() @ down.bfloat16().float())


@pytest.mark.parametrize("bits", [16, 3, 4])
@pytest.mark.parametrize("has_bias", [False, True])
def test_forward_is_x_times_the_effective_weight_plus_bias(bits: int, has_bias: bool) -> None:
    layer = _layer(37, 100, 5, bits=bits, group_size=32, bias=has_bias)
    x = torch.randn(2, 3, 100, generator=torch.Generator().manual_seed(4))
    bias = None if layer.bias is None else layer.bias.float()
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(), bias)
    actual = layer(x)
    assert actual.shape == (2, 3, 37)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    reference = low_rank_linear_reference(x, down=layer.down, up=layer.up, bias=layer.bias)
    assert torch.equal(actual, reference)


def test_bf16_inputs_stay_bf16() -> None:
    layer = _layer(24, 160, 33, bits=16, group_size=None, bias=True)
    x = torch.randn(4, 160, generator=torch.Generator().manual_seed(5))
    actual = layer(x.bfloat16())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), layer(x), rtol=3e-2, atol=3e-2)


@needs_triton
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [3, 20])
def test_triton_path_equals_reference(monkeypatch: pytest.MonkeyPatch, bits: int, rows: int) -> None:
    layer = _layer(24, 160, 33, bits=bits, group_size=32, bias=True).to(DEVICE)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    reference = low_rank_linear_reference(x, down=layer.down, up=layer.up, bias=layer.bias)
    triton_out = low_rank_linear_triton(x, down=layer.down, up=layer.up, bias=layer.bias)
    scale = float(reference.abs().max())
    torch.testing.assert_close(triton_out, reference, rtol=1e-4, atol=1e-4 * scale)
    # The module's forward dispatches each quantized factor to the same kernels.
    monkeypatch.setenv(ENV_VAR, "triton")
    assert torch.equal(layer(x), triton_out)


def test_inconsistent_factors_are_rejected() -> None:
    down, up = _factors(37, 100, 5, seed=3)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(down=down, up=up[:, :4])
    q = rtn_quantize(up, bits=4, group_size=32)
    quant_up = QuantLinear.from_codes(q.codes, q.scales, q.zeros, bits=4, group_size=32)
    with pytest.raises(ValueError, match="stored alike"):
        LowRankLinear(down=down, up=quant_up)
    with_bias = QuantLinear.from_codes(q.codes, q.scales, q.zeros, bits=4, group_size=32, bias=torch.zeros(37))
    qd = rtn_quantize(down, bits=4, group_size=32)
    quant_down = QuantLinear.from_codes(qd.codes, qd.scales, qd.zeros, bits=4, group_size=32)
    with pytest.raises(ValueError, match="no bias"):
        LowRankLinear(down=quant_down, up=with_bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        LowRankLinear(down=down, up=up, bias=torch.zeros(36))
    with pytest.raises(ValueError, match="quantize function"):
        LowRankLinear.from_factors(down=down, up=up, bits=4, group_size=32)
