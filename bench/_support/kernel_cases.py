"""The cases ``bench/kernels.py`` measures: one per op × format × bit-width, each with its own shapes.

A case carries closures: two that compute the same output on a small odd shape with the reference
and with the Triton kernel (correctness), and three timed at the benchmark shape (reference, Triton,
dense matmul). Packed tensors come from the project's own methods (RTN), so held bytes are real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from budgetpress.evaluators import pack_variant, prune_magnitude, rtn_quantize, svd_low_rank
from budgetpress.kernels import (
    LowRankLinear,
    QuantizedKV,
    QuantLinear,
    SparseLinear,
    low_rank_linear_reference,
    low_rank_linear_triton,
    quant_linear_reference,
    quantized_decode_attention_reference,
    sparse_linear_reference,
)
from budgetpress.space import (
    KV_GROUP,
    KV_RESIDUAL,
    KVSetting,
    KVUnit,
    LinearSetting,
    LinearUnit,
    SparsityPattern,
    Workload,
    kv_bytes,
    linear_bytes,
)

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


def _quant_call(fn: Callable[..., torch.Tensor]) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    def call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, QuantLinear)
        return module.run(fn, x)

    return call


def quant_cases(*, device: str, quick: bool) -> Iterator[Case]:
    from budgetpress.kernels import quant_gemv_triton, quant_matmul_triton

    size = timing_sizes(device, quick)[0]
    for bits in (2, 3, 4, 8):
        small = quant_module(96, 200, bits=bits, group_size=64, seed=bits)
        big = quant_module(size, size, bits=bits, group_size=BENCH_GROUP, seed=bits).to(device)
        yield from _decode_and_prefill(
            op_format="quant",
            bits=bits,
            device=device,
            quick=quick,
            small=small,
            big=big,
            setting=LinearSetting(bits=bits, group_size=BENCH_GROUP),
            reference=_quant_call(quant_linear_reference),
            triton=lambda decode: _quant_call(quant_gemv_triton if decode else quant_matmul_triton),
        )


def _linear_case(
    *,
    op_format: str,
    bits: int,
    decode: bool,
    size: int,
    rows: int,
    device: str,
    small: torch.nn.Module,
    big: torch.nn.Module,
    setting: LinearSetting,
    reference: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    triton: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
) -> Case:
    """A linear op's case: ``reference``/``triton`` call the op on a module's tensors."""
    dense_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x_small = torch.randn(1 if decode else 19, small.in_features, generator=_generator(1))
    x = torch.randn(rows, size, generator=_generator(2)).to(device, dense_dtype)
    dense_weight = torch.randn(size, size, generator=_generator(3)).to(device, dense_dtype)
    unit = LinearUnit(name="bench.proj", layer=0, in_features=size, out_features=size)
    held = big.held_bytes()  # type: ignore[operator]
    return Case(
        op="linear_decode" if decode else "linear_prefill",
        format=op_format,
        bits=bits,
        shape=(rows, size, size),
        decode=decode,
        held_bytes=held,
        model_bytes=linear_bytes(unit, setting),
        moved_bytes=held + 2 * x.numel() * x.element_size(),
        check_reference=lambda: reference(small, x_small),
        check_triton=lambda: triton(small, x_small),
        timed_reference=lambda: reference(big, x),
        timed_triton=lambda: triton(big, x),
        timed_dense=lambda: torch.nn.functional.linear(x, dense_weight),
    )


def _decode_and_prefill(
    *,
    op_format: str,
    bits: int,
    device: str,
    quick: bool,
    small: torch.nn.Module,
    big: torch.nn.Module,
    setting: LinearSetting,
    reference: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    triton: Callable[[bool], Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]],
) -> Iterator[Case]:
    """The op's decode case (one row) and prefill case; ``triton(decode)`` picks the kernel path."""
    size, prefill_rows = timing_sizes(device, quick)
    for decode, rows in ((True, 1), (False, prefill_rows)):
        yield _linear_case(
            op_format=op_format,
            bits=bits,
            decode=decode,
            size=size,
            rows=rows,
            device=device,
            small=small,
            big=big,
            setting=setting,
            reference=reference,
            triton=triton(decode),
        )


def sparse_module(out_features: int, in_features: int, setting: LinearSetting, *, seed: int) -> SparseLinear:
    weight = torch.randn(out_features, in_features, generator=_generator(seed)) * 0.02
    pruned = prune_magnitude(
        weight, sparsity=setting.sparsity, pattern=setting.pattern, bits=setting.bits, group_size=setting.group_size
    )
    module = pack_variant(pruned, setting, bias=None)
    assert isinstance(module, SparseLinear)
    return module


def _sparse_call(fn: Callable[..., torch.Tensor]) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    def call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, SparseLinear)
        return module.run(fn, x)

    return call


def sparse_cases(*, device: str, quick: bool) -> Iterator[Case]:
    from budgetpress.kernels._triton_sparse import sparse_linear_triton

    size = timing_sizes(device, quick)[0]
    for pattern, sparsity in ((SparsityPattern.UNSTRUCTURED, 0.5), (SparsityPattern.SEMI_2_4, 0.5)):
        for bits in (16, 2, 3, 4, 8):
            group = None if bits == 16 else BENCH_GROUP
            setting = LinearSetting(bits=bits, group_size=group, sparsity=sparsity, pattern=pattern)
            small_setting = LinearSetting(
                bits=bits, group_size=None if bits == 16 else 64, sparsity=sparsity, pattern=pattern
            )
            small = sparse_module(96, 200, small_setting, seed=bits)
            big = sparse_module(size, size, setting, seed=bits).to(device)
            yield from _decode_and_prefill(
                op_format=f"sparse-{pattern.value}",
                bits=bits,
                device=device,
                quick=quick,
                small=small,
                big=big,
                setting=setting,
                reference=_sparse_call(sparse_linear_reference),
                triton=lambda _decode: _sparse_call(sparse_linear_triton),
            )


def low_rank_module(out_features: int, in_features: int, setting: LinearSetting, *, seed: int) -> LowRankLinear:
    weight = torch.randn(out_features, in_features, generator=_generator(seed)) * 0.02
    assert setting.rank is not None
    variant = svd_low_rank(weight, rank=setting.rank, bits=setting.bits, group_size=setting.group_size)
    module = pack_variant(variant, setting, bias=None)
    assert isinstance(module, LowRankLinear)
    return module


def _low_rank_call(fn: Callable[..., torch.Tensor]) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    def call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, LowRankLinear)
        return fn(x, down=module.down, up=module.up, bias=module.bias)

    return call


def low_rank_cases(*, device: str, quick: bool) -> Iterator[Case]:
    size = timing_sizes(device, quick)[0]
    for bits in (16, 4, 8):
        group = None if bits == 16 else BENCH_GROUP
        setting = LinearSetting(bits=bits, group_size=group, rank=size // 8)
        small = low_rank_module(
            96, 200, LinearSetting(bits=bits, group_size=None if bits == 16 else 64, rank=24), seed=1
        )
        big = low_rank_module(size, size, setting, seed=bits).to(device)
        yield from _decode_and_prefill(
            op_format=f"low-rank-r{size // 8}",
            bits=bits,
            device=device,
            quick=quick,
            small=small,
            big=big,
            setting=setting,
            reference=_low_rank_call(low_rank_linear_reference),
            triton=lambda _decode: _low_rank_call(low_rank_linear_triton),
        )


@dataclass(frozen=True)
class _CacheState:
    query: torch.Tensor
    quantized: QuantizedKV
    full_keys: torch.Tensor
    full_values: torch.Tensor
    dense_keys: torch.Tensor
    dense_values: torch.Tensor

    def held_bytes(self) -> int:
        full = self.full_keys.numel() * self.full_keys.element_size() * 2
        return self.quantized.held_bytes() + full


def _cache_state(
    batch: int, q_heads: int, kv_heads: int, head_dim: int, tokens: int, bits: int, device: str
) -> _CacheState:
    """A layer's cache after ``tokens`` tokens in the KIVI layout the memory model counts."""
    quantized_tokens = ((tokens - KV_RESIDUAL) // KV_GROUP) * KV_GROUP if tokens > KV_RESIDUAL else 0
    g = _generator(bits)
    keys = torch.randn(batch, kv_heads, tokens, head_dim, generator=g).to(device, torch.bfloat16)
    values = torch.randn(batch, kv_heads, tokens, head_dim, generator=g).to(device, torch.bfloat16)
    query = torch.randn(batch, q_heads, head_dim, generator=g).to(device, torch.bfloat16)
    quantized = QuantizedKV.quantize(keys[:, :, :quantized_tokens], values[:, :, :quantized_tokens], bits)
    return _CacheState(
        query=query,
        quantized=quantized,
        full_keys=keys[:, :, quantized_tokens:].contiguous(),
        full_values=values[:, :, quantized_tokens:].contiguous(),
        dense_keys=keys,
        dense_values=values,
    )


def _attend(fn: Callable[..., torch.Tensor], state: _CacheState) -> torch.Tensor:
    scaling = state.query.shape[-1] ** -0.5
    return fn(state.query, state.quantized, state.full_keys, state.full_values, scaling=scaling)


def _dense_attention(state: _CacheState) -> torch.Tensor:
    groups = state.query.shape[1] // state.dense_keys.shape[1]
    query = state.query.unsqueeze(2)
    return torch.nn.functional.scaled_dot_product_attention(
        query, state.dense_keys, state.dense_values, enable_gqa=groups > 1
    )


def kv_cases(*, device: str, quick: bool) -> Iterator[Case]:
    from budgetpress.kernels import quantized_decode_attention_triton

    if device == "cuda":
        batch, q_heads, kv_heads, head_dim, tokens = 8, 32, 8, 128, 8192
    else:
        batch, q_heads, kv_heads, head_dim, tokens = 1, 8, 2, 64, 1024 if quick else 2048
    for bits in (2, 4, 8):
        small = _cache_state(2, 4, 2, 64, 100, bits, "cpu")
        big = _cache_state(batch, q_heads, kv_heads, head_dim, tokens, bits, device)
        unit = KVUnit(layer=0, n_kv_heads=kv_heads, head_dim=head_dim)
        held = big.held_bytes()
        yield Case(
            op="attention_decode",
            format="kv-kivi",
            bits=bits,
            shape=(batch, q_heads, kv_heads, head_dim, tokens),
            decode=True,
            held_bytes=held,
            model_bytes=kv_bytes(unit, KVSetting(bits=bits), Workload(batch=batch, context=tokens)),
            moved_bytes=held + 2 * big.query.numel() * big.query.element_size(),
            check_reference=lambda s=small: _attend(quantized_decode_attention_reference, s),
            check_triton=lambda s=small: _attend(quantized_decode_attention_triton, s),
            timed_reference=lambda b=big: _attend(quantized_decode_attention_reference, b),
            timed_triton=lambda b=big: _attend(quantized_decode_attention_triton, b),
            timed_dense=lambda b=big: _dense_attention(b),
        )


CASE_BUILDERS: list[Callable[..., Iterator[Case]]] = [quant_cases, sparse_cases, low_rank_cases, kv_cases]
