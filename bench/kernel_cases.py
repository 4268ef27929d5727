"""The cases ``bench/kernels.py`` measures: one per op × format × bit-width, each with its own shapes.

A case carries closures: two that compute the same output on a small odd shape with the reference
and with the Triton kernel (correctness), and three timed at the benchmark shape (reference, Triton,
dense matmul). Packed tensors come from the project's own methods (RTN), so held bytes are real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from budgetpress.evaluators import rtn_quantize
from budgetpress.kernels import QuantLinear, quant_linear_reference
from budgetpress.space import LinearSetting, LinearUnit, linear_bytes

Thunk = Callable[[], torch.Tensor]
BENCH_GROUP = 128


@dataclass(frozen=True, kw_only=True)
class Case:
    op: str
    format: str
    bits: int | None
    shape: tuple[int, ...]
    decode: bool
    held_bytes: int
    model_bytes: int
    moved_bytes: int
    check_reference: Thunk
    check_triton: Thunk
    timed_reference: Thunk
    timed_triton: Thunk
    timed_dense: Thunk


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def timing_sizes(device: str, quick: bool) -> tuple[int, int]:
    """(square layer size, prefill rows) for timing."""
    if device == "cuda":
        return 8192, 2048
    return (1024, 64) if quick else (2048, 128)


def quant_module(out_features: int, in_features: int, *, bits: int, group_size: int | None, seed: int) -> QuantLinear:
    weight = torch.randn(out_features, in_features, generator=_generator(seed)) * 0.02
    q = rtn_quantize(weight, bits=bits, group_size=group_size)
    return QuantLinear.from_codes(q.codes, q.scales, q.zeros, bits=bits, group_size=group_size)


def _quant_call(module: QuantLinear, fn: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        return fn(
            x,
            module.qweight,
            module.scales,
            module.zeros,
            module.bias,
            bits=module.bits,
            in_features=module.in_features,
            group_size=module.group_size,
        )

    return call


def quant_cases(*, device: str, quick: bool) -> Iterator[Case]:
    from budgetpress.kernels import quant_gemv_triton, quant_matmul_triton

    size, prefill_rows = timing_sizes(device, quick)
    dense_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for bits in (2, 3, 4, 8):
        for decode, rows in ((True, 1), (False, prefill_rows)):
            kernel = quant_gemv_triton if decode else quant_matmul_triton
            small = quant_module(96, 200, bits=bits, group_size=64, seed=bits)
            x_small = torch.randn(1 if decode else 19, 200, generator=_generator(1))
            big = quant_module(size, size, bits=bits, group_size=BENCH_GROUP, seed=bits).to(device)
            x = torch.randn(rows, size, generator=_generator(2)).to(device, dense_dtype)
            dense_weight = torch.randn(size, size, generator=_generator(3)).to(device, dense_dtype)
            unit = LinearUnit(name="bench.proj", layer=0, in_features=size, out_features=size)
            held = big.held_bytes()
            yield Case(
                op="linear_decode" if decode else "linear_prefill",
                format="quant",
                bits=bits,
                shape=(rows, size, size),
                decode=decode,
                held_bytes=held,
                model_bytes=linear_bytes(unit, LinearSetting(bits=bits, group_size=BENCH_GROUP)),
                moved_bytes=held + 2 * x.numel() * x.element_size(),
                check_reference=lambda s=small, xs=x_small: _quant_call(s, quant_linear_reference)(xs),
                check_triton=lambda s=small, xs=x_small, k=kernel: _quant_call(s, k)(xs),
                timed_reference=lambda b=big, xb=x: _quant_call(b, quant_linear_reference)(xb),
                timed_triton=lambda b=big, xb=x, k=kernel: _quant_call(b, k)(xb),
                timed_dense=lambda xb=x, w=dense_weight: torch.nn.functional.linear(xb, w),
            )


CASE_BUILDERS: list[Callable[..., Iterator[Case]]] = [quant_cases]
