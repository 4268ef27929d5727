"""Triton kernels for ``SparseLinear``: decode the sparse weight tile by tile in registers, then multiply.

Both kernels walk the ORIGINAL input columns in blocks and rebuild a dense weight tile (zeros at
pruned positions) from the held layout, so HBM traffic is only the compressed bytes:

* unstructured: each column's mask bit comes from its byte; a column's kept-value index (its slot
  in the row's values) is the row's running count of kept columns before the block plus a
  ``tl.cumsum`` of the bits inside it, so the K blocks of a row tile are walked in order.
* 2:4: column ``c`` belongs to slots ``2*(c//4)`` and ``2*(c//4)+1``, whose 2-bit positions share one
  int32 word; the column is kept when its position within the group matches one of them.

Kept values are bf16, or codes read from the row's packed bit stream (a 3-bit code may straddle
two words: the pair is read as one 64-bit value) and dequantized with their original column's
group scale and zero point. Rows ≤ ``GEMV_MAX_ROWS`` take a GEMV kernel (broadcast multiply and
reduce, no tensor cores); more rows take a tiled kernel with ``tl.dot`` (bf16/fp16 on a GPU, fp32
in the interpreter, where bf16 dots are wrong). Accumulation is fp32; the output has ``x``'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from budgetpress.kernels._backend import interpreting
from budgetpress.kernels._sparse import sparse_linear_reference, sparse_pattern
from budgetpress.space import SparsityPattern

GEMV_MAX_ROWS = 16
_TILED_GROUP_M = 8


def _jit(fn: Callable[..., Any]) -> Any:
    # A typed wrapper over triton.jit, which ships without type information.
    return triton.jit(fn)


@_jit
def _unstructured_slots(
    mask_ptr: tl.tensor,
    rows: tl.tensor,
    cols: tl.tensor,
    in_bounds: tl.tensor,
    running: tl.tensor,
    mask_stride: int,
    K_AXIS: tl.constexpr,
) -> Any:
    """Kept flags and value slots of a tile from the bitmask; carries each row's kept count."""
    byte = tl.load(mask_ptr + rows * mask_stride + cols // 8, mask=in_bounds, other=0).to(tl.int32)
    bit = (byte >> (cols % 8)) & 1
    slot = running + tl.cumsum(bit, axis=K_AXIS) - 1
    running = running + tl.sum(bit, axis=K_AXIS, keep_dims=True)
    return bit != 0, slot, running


@_jit
def _semi_slots(idx_ptr: tl.tensor, rows: tl.tensor, cols: tl.tensor, in_bounds: tl.tensor, idx_stride: int) -> Any:
    """Kept flags and value slots of a tile from the packed 2:4 positions."""
    first = (cols // 4) * 2
    # 16 positions per word and ``first`` even: both slots of a group sit in the same word.
    word = tl.load(idx_ptr + rows * idx_stride + first // 16, mask=in_bounds, other=0)
    pair = (word >> ((first % 16) * 2)) & 15
    within = cols % 4
    is_first = within == (pair & 3)
    kept = in_bounds & (is_first | (within == (pair >> 2)))
    return kept, tl.where(is_first, first, first + 1)


@_jit
def _unpack_codes(row_words: tl.tensor, slot: tl.tensor, kept: tl.tensor, BITS: tl.constexpr) -> Any:
    """Code number ``slot`` of each row's bit stream (LSB first), as int32."""
    first_bit = slot * BITS
    word = first_bit // 32
    shift = (first_bit % 32).to(tl.uint64)
    pair = tl.load(row_words + word, mask=kept, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    if BITS == 3:
        # 32 is not a multiple of 3: a code starting past bit 29 continues in the next word.
        straddles = kept & (shift > 29)
        high = tl.load(row_words + word + 1, mask=straddles, other=0).to(tl.uint32, bitcast=True)
        pair = pair | (high.to(tl.uint64) << 32)
    return ((pair >> shift) & ((1 << BITS) - 1)).to(tl.int32)


@_jit
def _kept_weights(
    values_ptr: tl.tensor,
    scales_ptr: tl.tensor,
    zeros_ptr: tl.tensor,
    rows: tl.tensor,
    cols: tl.tensor,
    slot: tl.tensor,
    kept: tl.tensor,
    values_stride: int,
    n_groups: int,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
) -> Any:
    """The fp32 weight of a tile: the kept value (bf16 or dequantized code) where kept, else 0."""
    if BITS == 16:
        weight = tl.load(values_ptr + rows * values_stride + slot, mask=kept, other=0.0).to(tl.float32)
    else:
        code = _unpack_codes(values_ptr + rows * values_stride, slot, kept, BITS)
        group = rows * n_groups + cols // GROUP_SIZE
        scale = tl.load(scales_ptr + group, mask=kept, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group, mask=kept, other=0).to(tl.float32)
        weight = tl.where(kept, (code.to(tl.float32) - zero) * scale, 0.0)
    return weight


@_jit
def _weight_tile(
    values_ptr: tl.tensor,
    meta_ptr: tl.tensor,
    scales_ptr: tl.tensor,
    zeros_ptr: tl.tensor,
    rows: tl.tensor,
    cols: tl.tensor,
    in_bounds: tl.tensor,
    running: tl.tensor,
    values_stride: int,
    meta_stride: int,
    n_groups: int,
    SEMI: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    K_AXIS: tl.constexpr,
) -> Any:
    """Dense fp32 tile of the weight at ``rows`` x ``cols`` (broadcast shapes), and the new running counts."""
    if SEMI:
        kept, slot = _semi_slots(meta_ptr, rows, cols, in_bounds, meta_stride)
    else:
        kept, slot, running = _unstructured_slots(meta_ptr, rows, cols, in_bounds, running, meta_stride, K_AXIS)
    weight = _kept_weights(
        values_ptr, scales_ptr, zeros_ptr, rows, cols, slot, kept, values_stride, n_groups, BITS, GROUP_SIZE
    )
    return weight, running


@_jit
def _store_output(
    acc: tl.tensor,
    bias_ptr: tl.tensor,
    out_ptr: tl.tensor,
    batch: tl.tensor,
    features: tl.tensor,
    M: int,
    N: int,
    out_stride: int,
    HAS_BIAS: tl.constexpr,
) -> None:
    """Add the bias (``features`` along axis 1) and store ``acc`` in the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=features < N, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + batch * out_stride + features, out, mask=(batch < M) & (features < N))


@_jit
def _sparse_gemv_kernel(
    x_ptr: tl.tensor,
    values_ptr: tl.tensor,
    meta_ptr: tl.tensor,
    scales_ptr: tl.tensor,
    zeros_ptr: tl.tensor,
    bias_ptr: tl.tensor,
    out_ptr: tl.tensor,
    M: int,
    N: int,
    K: int,
    x_stride: int,
    out_stride: int,
    values_stride: int,
    meta_stride: int,
    n_groups: int,
    SEMI: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> None:
    """All (≤ 16) rows of ``x`` against one tile of output features: each weight tile is decoded once."""
    first = tl.program_id(0) * BLOCK_N
    rows = first + tl.arange(0, BLOCK_N)[:, None]
    batch = tl.arange(0, BLOCK_M)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    running = tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)[None, :]
        weight, running = _weight_tile(
            values_ptr, meta_ptr, scales_ptr, zeros_ptr, rows, cols, (rows < N) & (cols < K), running,
            values_stride, meta_stride, n_groups, SEMI, BITS, GROUP_SIZE, 1,
        )  # fmt: skip
        x = tl.load(x_ptr + batch * x_stride + cols, mask=(batch < M) & (cols < K), other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * weight[None, :, :], axis=2)
    features = first + tl.arange(0, BLOCK_N)[None, :]
    _store_output(acc, bias_ptr, out_ptr, batch, features, M, N, out_stride, HAS_BIAS)


@_jit
def _tile_ids(M: int, N: int, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr) -> Any:
    """Grouped launch order: GROUP_M row tiles share each weight tile while it is in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@_jit
def _sparse_matmul_kernel(
    x_ptr: tl.tensor,
    values_ptr: tl.tensor,
    meta_ptr: tl.tensor,
    scales_ptr: tl.tensor,
    zeros_ptr: tl.tensor,
    bias_ptr: tl.tensor,
    out_ptr: tl.tensor,
    M: int,
    N: int,
    K: int,
    x_stride: int,
    out_stride: int,
    values_stride: int,
    meta_stride: int,
    n_groups: int,
    SEMI: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
) -> None:
    """One [BLOCK_M, BLOCK_N] output tile; the weight tile is decoded as [BLOCK_K, BLOCK_N] for ``tl.dot``."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    batch = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    running = tl.zeros([1, BLOCK_N], dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        offsets = start + tl.arange(0, BLOCK_K)
        cols = offsets[:, None]
        weight, running = _weight_tile(
            values_ptr, meta_ptr, scales_ptr, zeros_ptr, rows, cols, (rows < N) & (cols < K), running,
            values_stride, meta_stride, n_groups, SEMI, BITS, GROUP_SIZE, 0,
        )  # fmt: skip
        in_x = (batch < M) & (offsets[None, :] < K)
        x = tl.load(x_ptr + batch * x_stride + offsets[None, :], mask=in_x, other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), weight.to(DOT_DTYPE), acc, input_precision=PRECISION)
    _store_output(acc, bias_ptr, out_ptr, batch, rows, M, N, out_stride, HAS_BIAS)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _gemv_config(m: int) -> dict[str, int]:
    block_m = _next_power_of_2(m)
    if interpreting():
        # Small tiles so the tests' odd shapes still span several row tiles and K blocks.
        return {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 32}
    # Keep the [BLOCK_M, BLOCK_N, BLOCK_K] product near 4096 fp32 values: 32 registers a thread.
    block_k = max(16, min(256, 4096 // (block_m * 16)))
    return {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": block_k, "num_warps": 4}


def _tiled_config(m: int) -> dict[str, int]:
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}
    block_m = 64 if m <= 64 else 128
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "num_warps": 4 if block_m == 64 else 8,
        "num_stages": 3,
    }


def _dot_dtype(dtype: torch.dtype) -> tuple[Any, str]:
    # The interpreter's bf16 dots are wrong; fp32 inputs get exact (not tf32) products.
    if interpreting() or dtype not in (torch.bfloat16, torch.float16):
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


def sparse_linear_triton(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    pattern: SparsityPattern | str,
    bits: int,
    in_features: int,
    kept_per_row: int,
    group_size: int,
) -> torch.Tensor:
    """Triton ``x @ W.T + bias`` for a sparse weight; same arguments and result as ``sparse_linear_reference``."""
    semi = sparse_pattern(pattern) is SparsityPattern.SEMI_2_4
    if x.shape[-1] != in_features:
        raise ValueError(f"x must end in {in_features} features; got shape {tuple(x.shape)}")
    if bits != 16 and (scales is None or zeros is None):
        raise ValueError(f"{bits}-bit sparse values need scales and zero points")
    out_features = values.shape[0]
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    if m == 0 or out_features == 0 or kept_per_row == 0:
        # No kernel work (and empty tensors may have no device pointer): the reference is exact.
        return sparse_linear_reference(
            x, values, meta, scales, zeros, bias, pattern=pattern, bits=bits, in_features=in_features,
            kept_per_row=kept_per_row, group_size=group_size,
        )  # fmt: skip
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    _launch(
        x2,
        out,
        values.contiguous(),
        meta.contiguous(),
        scales,
        zeros,
        bias,
        semi=semi,
        bits=bits,
        group_size=group_size,
    )
    return out.view(*x.shape[:-1], out_features)


def _launch(
    x: torch.Tensor,
    out: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    semi: bool,
    bits: int,
    group_size: int,
) -> None:
    """Run the GEMV or the tiled kernel: ``out`` [m, out] = ``x`` [m, in] @ W.T (+ bias); all contiguous."""
    (m, in_features), out_features = x.shape, out.shape[1]
    # Absent tensors are never read (their constexpr flags are off); any pointer fills their places.
    scales = values if scales is None or bits == 16 else scales.contiguous()
    zeros = values if zeros is None or bits == 16 else zeros.contiguous()
    args = (
        x, values, meta, scales, zeros, values if bias is None else bias.contiguous(), out,
        m, out_features, in_features, x.stride(0), out.stride(0), values.stride(0), meta.stride(0),
        scales.shape[1] if bits != 16 else 0,
    )  # fmt: skip
    # The group size only matters to codes; fixing it at 16 bits avoids one compile per layer width.
    constants: dict[str, Any] = {
        "SEMI": semi,
        "BITS": bits,
        "GROUP_SIZE": group_size if bits != 16 else 1,
        "HAS_BIAS": bias is not None,
    }
    if m <= GEMV_MAX_ROWS:
        config = _gemv_config(m)
        grid = (triton.cdiv(out_features, config["BLOCK_N"]),)
        _sparse_gemv_kernel[grid](*args, **constants, **config)
        return
    config = _tiled_config(m)
    dot_dtype, precision = _dot_dtype(x.dtype)
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(out_features, config["BLOCK_N"])
    _sparse_matmul_kernel[(tiles,)](
        *args, **constants, DOT_DTYPE=dot_dtype, PRECISION=precision, GROUP_M=_TILED_GROUP_M, **config
    )
