from __future__ import annotations

import pytest
import torch

from budgetpress.evaluators import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_codes_scales_and_zeros_in_range(bits: int, group_size: int | None) -> None:
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits))
    quantized = rtn_quantize(weight, bits=bits, group_size=group_size)
    assert int(quantized.codes.max()) <= 2**bits - 1
    n_groups = 1 if group_size is None else 256 // group_size
    assert quantized.scales.shape == quantized.zeros.shape == (48, n_groups)
    # Rounding costs at most half a step; the integer zero point shifts the grid by at most another
    # half step, which only the clamped extremes of a group can feel.
    step = quantized.scales.float().repeat_interleave(quantized.group_size, dim=1)[:, :256]
    error = (quantized.dequantize() - weight).abs()
    assert torch.all(error <= step + 1e-6)
    assert float((error <= step / 2 + 1e-6).float().mean()) > 0.95


def test_error_falls_with_bits_and_smaller_groups() -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = [
        float((rtn_quantize(weight, bits=b, group_size=128).dequantize() - weight).pow(2).mean()) for b in (2, 3, 4, 8)
    ]
    assert errors == sorted(errors, reverse=True)
    coarse = (rtn_quantize(weight, bits=3, group_size=None).dequantize() - weight).pow(2).mean()
    fine = (rtn_quantize(weight, bits=3, group_size=32).dequantize() - weight).pow(2).mean()
    assert fine < coarse


def test_odd_width_pads_the_last_group() -> None:
    weight = torch.randn(5, 100, generator=torch.Generator().manual_seed(1))
    quantized = rtn_quantize(weight, bits=4, group_size=32)
    assert quantized.scales.shape == (5, 4)
    assert quantized.dequantize().shape == (5, 100)


def test_dequantize_reproduces_the_grid_exactly() -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    once = rtn_quantize(weight, bits=4, group_size=32)
    twice = rtn_quantize(once.dequantize(), bits=4, group_size=32)
    assert torch.equal(twice.dequantize(), once.dequantize())


def test_rejects_unsupported_bits() -> None:
    with pytest.raises(ValueError, match="between 2 and 8"):
        rtn_quantize(torch.zeros(2, 32), bits=16, group_size=32)
