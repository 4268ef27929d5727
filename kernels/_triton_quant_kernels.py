"""Triton kernels for the packed group-wise quantized linear op; launched from ``_triton_quant.py``.

This module imports Triton at the top and defines ``@triton.jit`` functions, so it is imported only
when a kernel first runs (``TRITON_INTERPRET=1`` must be set before that on a machine without a
GPU). The byte layout is ``_packing.py``'s: each weight row is one little-endian bit stream of codes
in int32 words; code ``j`` holds bits ``[j*bits, (j+1)*bits)``. 2-, 4- and 8-bit codes never
straddle a word, so a tile of consecutive words unpacks by broadcasting shifts; 3-bit codes may
straddle, so each code reads its word and the next one as one 64-bit value.

Triton reads parameter annotations (``tl.constexpr``), so pointers and runtime scalars are
annotated ``tl.tensor``, which Triton ignores and mypy sees as ``Any``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from budgetpress.kernels._backend import interpreting


@triton.jit  # type: ignore[untyped-decorator]
def _codes_tile(
    qw_ptr: tl.tensor,
    rows: tl.tensor,
    row_mask: tl.tensor,
    k0: tl.tensor,
    K: tl.tensor,
    W: tl.tensor,
    stride_qn: tl.tensor,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> tl.tensor:
    """Unsigned codes [BLOCK_N, BLOCK_K] (int32) of columns ``k0 .. k0+BLOCK_K`` of ``rows``."""
    row_base = qw_ptr + rows[:, None].to(tl.int64) * stride_qn
    if BITS == 3:
        cols = k0 + tl.arange(0, BLOCK_K)
        bit = cols * 3
        word = bit // 32
        shift = bit % 32
        col_ok = cols < K
        lo = tl.load(row_base + word[None, :], mask=row_mask[:, None] & col_ok[None, :], other=0)
        # The next word exists unless this code is in the row's last word.
        hi_ok = col_ok & (word + 1 < W)
        hi = tl.load(row_base + word[None, :] + 1, mask=row_mask[:, None] & hi_ok[None, :], other=0)
        # Zero-extend the low word (a bitcast to uint32 first) so its sign bit does not smear.
        pair = lo.to(tl.uint32, bitcast=True).to(tl.int64) | (hi.to(tl.int64) << 32)
        codes = ((pair >> shift[None, :].to(tl.int64)) & 7).to(tl.int32)
    else:
        CODES_PER_WORD: tl.constexpr = 32 // BITS
        BLOCK_W: tl.constexpr = BLOCK_K // CODES_PER_WORD
        # BLOCK_K is a multiple of CODES_PER_WORD, so k0 starts a word: one coalesced load per row.
        words_idx = k0 // CODES_PER_WORD + tl.arange(0, BLOCK_W)
        words = tl.load(row_base + words_idx[None, :], mask=row_mask[:, None] & (words_idx < W)[None, :], other=0)
        shifts = tl.arange(0, CODES_PER_WORD) * BITS
        unpacked = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(unpacked, (BLOCK_N, BLOCK_K))
    return codes


@triton.jit  # type: ignore[untyped-decorator]
def _dequant_tile(
    qw_ptr: tl.tensor,
    s_ptr: tl.tensor,
    z_ptr: tl.tensor,
    rows: tl.tensor,
    row_mask: tl.tensor,
    k0: tl.tensor,
    K: tl.tensor,
    W: tl.tensor,
    stride_qn: tl.tensor,
    stride_sn: tl.tensor,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PER_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> tl.tensor:
    """Float32 weights [BLOCK_N, BLOCK_K]: ``(code - zero) * scale`` of each column's group."""
    codes = _codes_tile(qw_ptr, rows, row_mask, k0, K, W, stride_qn, BITS, BLOCK_N, BLOCK_K).to(tl.float32)
    if PER_ROW:
        # One group spans the row: one scale and zero point per row.
        scale = tl.load(s_ptr + rows * stride_sn, mask=row_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rows * stride_sn, mask=row_mask, other=0).to(tl.float32)
        weight = (codes - zero[:, None]) * scale[:, None]
    elif GROUP_SIZE % BLOCK_K == 0:
        # The whole tile lies in one group.
        group = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + rows * stride_sn + group, mask=row_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rows * stride_sn + group, mask=row_mask, other=0).to(tl.float32)
        weight = (codes - zero[:, None]) * scale[:, None]
    elif BLOCK_K % GROUP_SIZE == 0:
        # The tile holds whole groups: one scale per (row, group), broadcast over the group.
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
        groups = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
        offsets = rows[:, None] * stride_sn + groups[None, :]
        mask = row_mask[:, None] & (groups * GROUP_SIZE < K)[None, :]
        scale = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offsets, mask=mask, other=0).to(tl.float32)
        grouped = tl.reshape(codes, (BLOCK_N, GROUPS, GROUP_SIZE))
        weight = tl.reshape((grouped - zero[:, :, None]) * scale[:, :, None], (BLOCK_N, BLOCK_K))
    else:
        # A group ends inside the tile but the tile is no whole number of groups: gather per column.
        cols = k0 + tl.arange(0, BLOCK_K)
        offsets = rows[:, None] * stride_sn + (cols // GROUP_SIZE)[None, :]
        mask = row_mask[:, None] & (cols < K)[None, :]
        scale = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offsets, mask=mask, other=0).to(tl.float32)
        weight = (codes - zero) * scale
    return weight


@triton.jit  # type: ignore[untyped-decorator]
def gemv_kernel(
    x_ptr: tl.tensor,
    qw_ptr: tl.tensor,
    s_ptr: tl.tensor,
    z_ptr: tl.tensor,
    b_ptr: tl.tensor,
    out_ptr: tl.tensor,
    M: tl.tensor,
    N: tl.tensor,
    K: tl.tensor,
    W: tl.tensor,
    stride_xm: tl.tensor,
    stride_qn: tl.tensor,
    stride_sn: tl.tensor,
    stride_om: tl.tensor,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> None:
    """Decode: each program owns BLOCK_N output rows and all (≤ BLOCK_M) rows of x.

    The weight tile is read once per K step and dequantized in registers; every x row reuses it,
    so the packed weight crosses memory once whatever the batch (up to BLOCK_M).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    batch = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        # Plain decode: accumulate products elementwise and reduce across K once at the end, so
        # the loop body has no cross-thread reduction.
        wide = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _dequant_tile(
                qw_ptr, s_ptr, z_ptr, rows, row_mask, k0, K, W, stride_qn, stride_sn,
                BITS, GROUP_SIZE, PER_ROW, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            cols = k0 + tl.arange(0, BLOCK_K)
            x0 = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            wide += w * x0[None, :]
        acc = tl.sum(wide, axis=1)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _dequant_tile(
                qw_ptr, s_ptr, z_ptr, rows, row_mask, k0, K, W, stride_qn, stride_sn,
                BITS, GROUP_SIZE, PER_ROW, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            cols = k0 + tl.arange(0, BLOCK_K)
            for m in tl.static_range(BLOCK_M):
                # Rows past M read nothing: their column limit drops to 0 (one compare, one mask).
                k_limit = tl.where(m < M, K, 0)
                xm = tl.load(x_ptr + m * stride_xm + cols, mask=cols < k_limit, other=0.0).to(tl.float32)
                part = tl.sum(w * xm[None, :], axis=1)
                # Add row m's partial sums to its accumulator row (a select; BLOCK_M is small).
                acc += tl.where(batch[:, None] == m, part[None, :], 0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = (batch < M)[:, None] & row_mask[None, :]
    out_offsets = batch[:, None].to(tl.int64) * stride_om + rows[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit  # type: ignore[untyped-decorator]
def matmul_kernel(
    x_ptr: tl.tensor,
    qw_ptr: tl.tensor,
    s_ptr: tl.tensor,
    z_ptr: tl.tensor,
    b_ptr: tl.tensor,
    out_ptr: tl.tensor,
    M: tl.tensor,
    N: tl.tensor,
    K: tl.tensor,
    W: tl.tensor,
    stride_xm: tl.tensor,
    stride_qn: tl.tensor,
    stride_sn: tl.tensor,
    stride_om: tl.tensor,
    M_BUCKET: tl.tensor,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
) -> None:
    """Prefill: tiled ``x @ W.T``, the weight tile dequantized in registers before ``tl.dot``.

    ``M_BUCKET`` (the next power of two of M) is unused in the body; it is an autotune key, so
    prompts of similar length share one tuned configuration.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-blocks of x sweep the same weight columns together (L2 reuse).
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_rows
    pid_n = (pid % pids_in_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    row_mask = rows < N
    x_base = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_base + cols[None, :], mask=m_mask[:, None] & (cols < K)[None, :], other=0.0)
        w = _dequant_tile(
            qw_ptr, s_ptr, z_ptr, rows, row_mask, k0, K, W, stride_qn, stride_sn,
            BITS, GROUP_SIZE, PER_ROW, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    out_offsets = offs_m[:, None].to(tl.int64) * stride_om + rows[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


def _gemv_configs() -> list[triton.Config]:
    """Small BLOCK_N gives many programs on a wide layer; long BLOCK_K keeps loads in flight."""
    shapes = [(8, 256, 4), (16, 128, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8), (64, 64, 4)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for n, k, warps in shapes
        for stages in (2, 4)
    ]


def _matmul_configs() -> list[triton.Config]:
    shapes = [
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 64, 128, 4, 3),
        (16, 64, 128, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in shapes
    ]


# On a GPU the launchers use these autotuned wrappers; the interpreter has no timer worth tuning
# with, so there (and whenever a caller fixes the blocks) the plain kernels run with given blocks.
if interpreting():
    tuned_gemv_kernel = None
    tuned_matmul_kernel = None
else:
    tuned_gemv_kernel = triton.autotune(
        configs=_gemv_configs(), key=["N", "K", "BITS", "GROUP_SIZE", "PER_ROW", "BLOCK_M"]
    )(gemv_kernel)
    tuned_matmul_kernel = triton.autotune(
        configs=_matmul_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "PER_ROW", "DOT_DTYPE"]
    )(matmul_kernel)
