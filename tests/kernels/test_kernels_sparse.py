"""SparseLinear: exact memory-model bytes and weights; the Triton kernels agree with the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from budgetpress.evaluators import rtn_quantize
from budgetpress.kernels import SparseLinear, pack_bitmask, sparse_linear_reference, unpack_bitmask
from budgetpress.space import LinearSetting, LinearUnit, SparsityPattern, linear_bytes

UNSTRUCTURED = SparsityPattern.UNSTRUCTURED
SEMI = SparsityPattern.SEMI_2_4


@dataclass(frozen=True)
class Case:
    pattern: SparsityPattern
    out_features: int
    in_features: int
    sparsity: float

    def __str__(self) -> str:
        return f"{self.pattern.value}-{self.out_features}x{self.in_features}-s{self.sparsity}"


CASES = [
    Case(UNSTRUCTURED, 37, 100, 0.3),
    Case(UNSTRUCTURED, 37, 100, 0.6),
    Case(SEMI, 24, 96, 0.5),
    Case(SEMI, 24, 100, 0.5),
]
BITS = [16, 2, 3, 4, 8]
# Group size means nothing at 16 bits.
QUANTIZATIONS = [(16, None)] + [(bits, group_size) for bits in BITS[1:] for group_size in (32, None)]


def magnitude_mask(weight: torch.Tensor, case: Case) -> torch.Tensor:
    """Keep the largest magnitudes: ``in - round(s*in)`` per row, or 2 of every 4 columns."""
    out_features, in_features = weight.shape
    if case.pattern is UNSTRUCTURED:
        kept = in_features - round(case.sparsity * in_features)
        top = weight.abs().topk(kept, dim=1).indices
        return torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True)
    top = weight.abs().view(out_features, -1, 4).topk(2, dim=-1).indices
    return torch.zeros(out_features, in_features // 4, 4, dtype=torch.bool).scatter_(2, top, True).view_as(weight)


def build(
    case: Case, bits: int, group_size: int | None, has_bias: bool, seed: int = 0
) -> tuple[SparseLinear, torch.Tensor, torch.Tensor | None]:
    """The module and, computed without it, the float32 weight it must stand for (and its bias)."""
    generator = torch.Generator().manual_seed(seed + bits * 100 + case.in_features)
    weight = torch.randn(case.out_features, case.in_features, generator=generator)
    bias = torch.randn(case.out_features, generator=generator) if has_bias else None
    mask = magnitude_mask(weight, case)
    if bits == 16:
        module = SparseLinear.from_dense_values(mask, weight, pattern=case.pattern, bias=bias, sparsity=case.sparsity)
        return module, weight.bfloat16().float() * mask, bias
    # RTN's ranges always include 0, so quantizing the masked weight gives kept values their group's grid.
    quantized = rtn_quantize(weight * mask, bits=bits, group_size=group_size)
    module = SparseLinear.from_dense_codes(
        mask,
        quantized.codes,
        quantized.scales,
        quantized.zeros,
        bits=bits,
        group_size=group_size,
        pattern=case.pattern,
        bias=bias,
        sparsity=case.sparsity,
    )
    return module, torch.where(mask, quantized.dequantize(), 0.0), bias


def op_arguments(module: SparseLinear) -> dict[str, Any]:
    """Everything but ``x`` that the sparse ops take, from a module's held tensors."""
    return {
        "values": module.values,
        "meta": module.meta,
        "scales": module.scales,
        "zeros": module.zeros,
        "bias": module.bias,
        "pattern": module.pattern,
        "bits": module.bits,
        "in_features": module.in_features,
        "kept_per_row": module.kept_per_row,
        "group_size": module.group_size,
    }


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize(("bits", "group_size"), QUANTIZATIONS)
@pytest.mark.parametrize("has_bias", [False, True])
def test_sparse_linear_holds_memory_model_bytes_and_exact_weight(
    case: Case, bits: int, group_size: int | None, has_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDGETPRESS_KERNELS", "reference")
    module, expected, bias = build(case, bits, group_size, has_bias)
    unit = LinearUnit(
        name="x.proj", layer=0, in_features=case.in_features, out_features=case.out_features, has_bias=has_bias
    )
    setting = LinearSetting(bits=bits, group_size=group_size, sparsity=case.sparsity, pattern=case.pattern)
    assert module.held_bytes() == linear_bytes(unit, setting)
    assert torch.equal(module.dequantized_weight(), expected)
    x = torch.randn(2, 3, case.in_features, generator=torch.Generator().manual_seed(7))
    reference_bias = None if bias is None else bias.bfloat16().float()
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, expected, reference_bias))


def test_layouts_are_the_documented_bytes() -> None:
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [0, 3, 9]] = True
    mask[1, [1, 8, 11]] = True
    assert pack_bitmask(mask).tolist() == [[0b1001, 0b10], [0b10, 0b1001]]
    assert torch.equal(unpack_bitmask(pack_bitmask(mask), 12), mask)
    semi = torch.tensor([[True, False, False, True, False, True, True, False]])
    module = SparseLinear.from_dense_values(semi, torch.arange(8.0).view(1, 8), pattern="2:4")
    assert module.values.tolist() == [[0.0, 3.0, 5.0, 6.0]]
    assert module.indices is not None and module.mask is None
    # Positions 0, 3 | 1, 2 as 2-bit codes, least significant first: 0b10_01_11_00.
    assert module.indices.tolist() == [[0b10011100]]


@pytest.mark.parametrize(
    ("pattern", "mask", "message"),
    [
        (UNSTRUCTURED, torch.tensor([[True, False], [True, True]]), "row 0 keeps 1 of 2 but row 1 keeps 2"),
        (SEMI, torch.tensor([[True, True, True, False]]), "row 0 keeps 3 in columns 0..3"),
        (SEMI, torch.ones(1, 6, dtype=torch.bool), "divisible by 4"),
        (UNSTRUCTURED, torch.ones(2, 3, dtype=torch.int64), "bool"),
        ("none", torch.ones(1, 4, dtype=torch.bool), "'unstructured' or '2:4'"),
    ],
)
def test_bad_masks_raise_clear_errors(pattern: SparsityPattern | str, mask: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparseLinear.from_dense_values(mask, torch.ones(mask.shape), pattern=pattern)


def test_bad_arguments_raise_clear_errors() -> None:
    mask = torch.tensor([[True, False, True, False]] * 2)
    codes = torch.zeros(2, 4, dtype=torch.uint8)
    scales, zeros = torch.ones(2, 1), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="keeps 3 values per row; the mask keeps 2"):
        SparseLinear.from_dense_values(mask, torch.ones(2, 4), pattern=UNSTRUCTURED, sparsity=0.2)
    with pytest.raises(ValueError, match="from_dense_values"):
        SparseLinear.from_dense_codes(mask, codes, scales, zeros, bits=16, group_size=None, pattern=SEMI)
    with pytest.raises(ValueError, match=r"scales must be \[2, 1\]"):
        SparseLinear.from_dense_codes(mask, codes, scales.T, zeros, bits=4, group_size=None, pattern=SEMI)
    with pytest.raises(ValueError, match="mask's shape"):
        SparseLinear.from_dense_codes(mask, codes[:, :3], scales, zeros, bits=4, group_size=None, pattern=SEMI)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        SparseLinear.from_dense_codes(mask, codes + 4, scales, zeros, bits=2, group_size=None, pattern=SEMI)
    with pytest.raises(ValueError, match="ascending"):
        SparseLinear(
            in_features=4,
            out_features=2,
            pattern=SEMI,
            bits=16,
            group_size=None,
            kept_per_row=2,
            values=torch.ones(2, 2),
            meta=torch.full((2, 1), 0b0010, dtype=torch.int32),  # positions (2, 0), not (0, 2)
        )


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_triton_matches_reference(case: Case, bits: int) -> None:
    pytest.importorskip("triton")
    from budgetpress.kernels._triton_sparse import sparse_linear_triton

    # Alternate group sizes and bias across cases to cover both without multiplying interpreter runs.
    index = CASES.index(case)
    group_size = 32 if index % 2 == 0 else None
    module, _, _ = build(case, bits, group_size, has_bias=index < 2, seed=1)
    arguments = op_arguments(module)
    generator = torch.Generator().manual_seed(3)
    for rows in (1, 3, 20):  # GEMV (one and several rows) and the tiled tl.dot kernel
        x = torch.randn(rows, case.in_features, generator=generator)
        expected = sparse_linear_reference(x, **arguments)
        got = sparse_linear_triton(x, **arguments)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [2, 33])
def test_triton_bf16_input_and_module_dispatch(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("BUDGETPRESS_KERNELS", "triton")
    module, expected_weight, bias = build(CASES[1], 3, 32, has_bias=True, seed=2)
    x = torch.randn(rows, 1, CASES[1].in_features, generator=torch.Generator().manual_seed(5)).bfloat16()
    got = module(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1, CASES[1].out_features)
    assert bias is not None
    expected = torch.nn.functional.linear(x.float(), expected_weight, bias.bfloat16().float())
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=5e-2)


def test_rows_that_keep_nothing_give_the_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("BUDGETPRESS_KERNELS", "triton")
    mask = torch.zeros(5, 10, dtype=torch.bool)  # sparsity 0.95 of 10 columns prunes round(9.5) = 10
    codes, scales, zeros = torch.zeros(5, 10, dtype=torch.uint8), torch.ones(5, 1), torch.zeros(5, 1)
    module = SparseLinear.from_dense_codes(
        mask, codes, scales, zeros, bits=3, group_size=None, pattern=UNSTRUCTURED, bias=torch.ones(5), sparsity=0.95
    )
    unit = LinearUnit(name="x.proj", layer=0, in_features=10, out_features=5, has_bias=True)
    setting = LinearSetting(bits=3, group_size=None, sparsity=0.95, pattern=UNSTRUCTURED)
    assert module.held_bytes() == linear_bytes(unit, setting)
    assert torch.equal(module(torch.randn(2, 10)), torch.ones(2, 5))
