"""Bit-packing round trips and its exact layout; packed modules hold what the memory model counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetpress.evaluators import rtn_quantize
from budgetpress.kernels import QuantLinear, pack_rows, unpack_rows, words_per_row
from budgetpress.space import LinearSetting, LinearUnit, linear_bytes


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), n=st.integers(1, 300), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits: int, rows: int, n: int, seed: int) -> None:
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, words_per_row(n, bits))
    assert torch.equal(unpack_rows(words, bits, n), codes)


def test_three_bit_codes_straddle_words_without_padding() -> None:
    codes = torch.full((1, 11), 7, dtype=torch.uint8)  # 33 one-bits: one full word and one bit more
    words = pack_rows(codes, 3)
    assert words.shape == (1, 2)
    assert int(words[0, 0]) == -1  # all 32 bits set
    assert int(words[0, 1]) == 1
    codes[0, 0] = 5  # 0b101 at bits 0..2 of the first word
    assert int(pack_rows(codes, 3)[0, 0]) & 0b111 == 0b101


def test_pack_rejects_codes_out_of_range_and_bad_bits() -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_rows(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="one of 2, 3, 4, 8"):
        pack_rows(torch.zeros(1, 4, dtype=torch.uint8), 5)


SHAPES = [(128, 256), (37, 100), (256, 96)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_quant_linear_holds_memory_model_bytes_and_exact_weight(
    bits: int, group_size: int | None, out_features: int, in_features: int, has_bias: bool
) -> None:
    generator = torch.Generator().manual_seed(bits * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if has_bias else None
    quantized = rtn_quantize(weight, bits=bits, group_size=group_size)
    module = QuantLinear.from_codes(
        quantized.codes, quantized.scales, quantized.zeros, bits=bits, group_size=group_size, bias=bias
    )
    unit = LinearUnit(name="x.proj", layer=0, in_features=in_features, out_features=out_features, has_bias=has_bias)
    assert module.held_bytes() == linear_bytes(unit, LinearSetting(bits=bits, group_size=group_size))
    assert torch.equal(module.dequantized_weight(), quantized.dequantize())
    x = torch.randn(3, in_features, generator=generator)
    expected = torch.nn.functional.linear(x, quantized.dequantize(), None if bias is None else bias.bfloat16().float())
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
