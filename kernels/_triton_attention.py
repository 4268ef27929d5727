# Triton kernels take unannotated arguments (Triton reads annotations as specialization hints) and
# triton.jit is an untyped decorator; the host-side functions are fully typed.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton decode attention over one layer's cache: KIVI-quantized groups dequantized on the fly, then the
full-precision tail. Same contract as ``quantized_decode_attention_reference``.

Flash-decoding: the program grid is (batch row x KV head, split). A program loads the queries of all the
query heads that share its KV head (GQA: padded to 16 rows for ``tl.dot``) and walks its share of the
sequence in blocks of 32 tokens, one quantized group per block (so a block's per-channel key scale and
zero are one ``[D]`` vector each) followed by the full-precision blocks, with an online softmax. Splits
write a partial (max, sum, accumulator) each; a second kernel merges them. A 2-bit group of 32 tokens and
64 channels is 512 bytes of codes, so each block's loads are small and the splits keep the GPU's SMs busy
even at batch 1. Dots run at ``tf32x3`` (fp32-accurate on tensor cores; decode is bound by memory).

Imported lazily (it imports Triton); ``TRITON_INTERPRET=1`` must be set before the first import to run on
the CPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from budgetpress.kernels._backend import interpreting
from budgetpress.kernels._kv_quant import QuantizedKV
from budgetpress.space import KV_GROUP

_MIN_ROWS = 16  # tl.dot needs at least 16 rows
# Finite "minus infinity": a fully masked block must not turn the running max into NaN.
_NEG: tl.constexpr = tl.constexpr(-1.0e30)
_LOG2E = 1.4426950408889634


@triton.jit
def _load_group(codes_ptr, row, shift, d, d_mask, D_STRIDE: tl.constexpr, BITS: tl.constexpr):
    """Codes ``[32, BLOCK_D]`` of one packed group (tokens down, channels across) as float32."""
    packed = tl.load(codes_ptr + row[:, None] * D_STRIDE + d[None, :], mask=d_mask[None, :], other=0)
    return ((packed.to(tl.int32) >> shift[:, None]) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _dequantized_group(
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, group, t, d, d_mask,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    """Keys and values ``[32, BLOCK_D]`` (float32) of quantized group ``group`` (flat over batch, head, group)."""
    # Token t of a group sits in byte row t // (8 // BITS), at bit (t % (8 // BITS)) * BITS.
    row = t // (8 // BITS)
    shift = (t % (8 // BITS)) * BITS
    codes = group * (4 * BITS) * HEAD_DIM
    keys = _load_group(kc_ptr + codes, row, shift, d, d_mask, HEAD_DIM, BITS)
    k_scale = tl.load(ks_ptr + group * HEAD_DIM + d, mask=d_mask, other=0.0).to(tl.float32)
    k_zero = tl.load(kz_ptr + group * HEAD_DIM + d, mask=d_mask, other=0.0).to(tl.float32)
    values = _load_group(vc_ptr + codes, row, shift, d, d_mask, HEAD_DIM, BITS)
    v_scale = tl.load(vs_ptr + group * 32 + t).to(tl.float32)
    v_zero = tl.load(vz_ptr + group * 32 + t).to(tl.float32)
    return keys * k_scale[None, :] + k_zero[None, :], values * v_scale[:, None] + v_zero[:, None]


@triton.jit
def _online_softmax_step(q, keys, values, valid, m_i, l_i, acc):
    """Fold one block (keys and values ``[32, D]``) into the running max, sum and accumulator of ``q``."""
    scores = tl.dot(q, tl.trans(keys), input_precision="tf32x3")  # [R, 32], log2 units (q is pre-scaled)
    scores = tl.where(valid[None, :], scores, _NEG)
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.where(valid[None, :], tl.exp2(scores - m_new[:, None]), 0.0)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="tf32x3")
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kf_ptr, vf_ptr, mask_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    q_scale, n_groups, n_full, blocks_per_split, n_splits,
    stride_qb, stride_qh, stride_fb, stride_fh, stride_ft, stride_vfb, stride_vfh, stride_vft,
    stride_ob, stride_oh,
    KV_HEADS: tl.constexpr, N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, BITS: tl.constexpr, HAS_MASK: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64: offsets into a large cache (batch x heads x groups x 4*bits x D bytes) overflow int32.
    b = (pid_bh // KV_HEADS).to(tl.int64)
    h = pid_bh % KV_HEADS
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, 32)
    r_mask = r < N_REP
    d_mask = d < HEAD_DIM
    q_rows = q_ptr + b * stride_qb + (h * N_REP + r)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_rows, mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32) * q_scale
    m_i = tl.full([BLOCK_R], _NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    head = b * KV_HEADS + h
    mask_row = mask_ptr + head * (n_groups * 32 + n_full)
    first = pid_s * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_groups + tl.cdiv(n_full, 32))

    for g in range(first, tl.minimum(last, n_groups)):
        keys, values = _dequantized_group(
            kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, head * n_groups + g, t, d, d_mask, HEAD_DIM, BITS
        )
        valid = t < 32
        if HAS_MASK:
            valid = tl.load(mask_row + g * 32 + t) != 0
        m_i, l_i, acc = _online_softmax_step(q, keys, values, valid, m_i, l_i, acc)

    for fb in range(tl.maximum(first, n_groups) - n_groups, last - n_groups):
        tok = fb * 32 + t
        valid = tok < n_full
        tile_mask = valid[:, None] & d_mask[None, :]
        k_rows = kf_ptr + b * stride_fb + h * stride_fh + tok[:, None] * stride_ft + d[None, :]
        v_rows = vf_ptr + b * stride_vfb + h * stride_vfh + tok[:, None] * stride_vft + d[None, :]
        # other=0: a masked-out lane must not bring NaN garbage into the p @ v product.
        keys = tl.load(k_rows, mask=tile_mask, other=0.0).to(tl.float32)
        values = tl.load(v_rows, mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = valid & (tl.load(mask_row + n_groups * 32 + tok, mask=valid, other=0) != 0)
        m_i, l_i, acc = _online_softmax_step(q, keys, values, valid, m_i, l_i, acc)

    if SINGLE_SPLIT:
        out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
        out_rows = out_ptr + b * stride_ob + (h * N_REP + r)[:, None] * stride_oh + d[None, :]
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
    else:
        part = (pid_bh * n_splits + pid_s) * BLOCK_R + r
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc)
        tl.store(part_ml_ptr + part * 2, m_i)
        tl.store(part_ml_ptr + part * 2 + 1, l_i)


@triton.jit
def _decode_combine_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, n_splits, stride_ob, stride_oh,
    KV_HEADS: tl.constexpr, N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b = pid_bh // KV_HEADS
    h = pid_bh % KV_HEADS
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < n_splits
    part = (pid_bh * n_splits + s) * BLOCK_R + r
    m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=_NEG)
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.maximum(tl.sum(l_s * weight, axis=0), 1.0e-30)
    d_mask = d < HEAD_DIM
    tl.store(out_ptr + b * stride_ob + (h * N_REP + r) * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _target_programs(device_index: int | None) -> int:
    """Programs worth launching: a few per SM on a GPU; a handful in the interpreter (runs one at a time)."""
    if device_index is None:
        return 8
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_plan(n_blocks: int, n_heads: int, device: torch.device) -> tuple[int, int]:
    """(blocks per split, number of splits) covering ``n_blocks`` blocks of 32 tokens."""
    index = None if interpreting() or device.type != "cuda" else (device.index or 0)
    wanted = max(1, -(-_target_programs(index) // max(n_heads, 1)))
    per_split = max(1, -(-n_blocks // min(wanted, max(n_blocks, 1))))
    return per_split, max(1, -(-n_blocks // per_split))


def _check_shapes(query: torch.Tensor, quantized: QuantizedKV | None, full_keys: torch.Tensor) -> None:
    batch, q_heads, head_dim = query.shape
    kv_heads = full_keys.shape[1]
    if full_keys.shape[0] != batch or full_keys.shape[3] != head_dim or q_heads % kv_heads:
        raise ValueError(
            f"query [B, Hq, D] = {tuple(query.shape)} does not fit full keys [B, H, F, D] = {tuple(full_keys.shape)}"
        )
    if quantized is not None and quantized.key_codes.shape[:2] != (batch, kv_heads):
        raise ValueError(f"quantized part is for {tuple(quantized.key_codes.shape[:2])}, not ({batch}, {kv_heads})")


def quantized_decode_attention_triton(
    query: torch.Tensor,
    quantized: QuantizedKV | None,
    full_keys: torch.Tensor,
    full_values: torch.Tensor,
    *,
    scaling: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``quantized_decode_attention_reference`` (same arguments, same result)."""
    _check_shapes(query, quantized, full_keys)
    batch, q_heads, head_dim = query.shape
    kv_heads, n_full = full_keys.shape[1], full_keys.shape[2]
    n_groups = 0 if quantized is None else quantized.n_groups
    bits = 8 if quantized is None else quantized.bits
    tensors = _quantized_tensors(quantized, batch, kv_heads, head_dim, query.device)
    n_rep = q_heads // kv_heads
    block_r = max(_MIN_ROWS, triton.next_power_of_2(n_rep))
    block_d = max(16, triton.next_power_of_2(head_dim))
    per_split, n_splits = _split_plan(n_groups + -(-n_full // KV_GROUP), batch * kv_heads, query.device)
    out = torch.empty(batch, q_heads, head_dim, dtype=query.dtype, device=query.device)
    part_acc = torch.empty(batch * kv_heads * n_splits * block_r, block_d, dtype=torch.float32, device=query.device)
    part_ml = torch.empty(batch * kv_heads * n_splits * block_r, 2, dtype=torch.float32, device=query.device)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else out
    full_values = full_values if full_values.stride(3) == 1 else full_values.contiguous()
    full_keys = full_keys if full_keys.stride(3) == 1 else full_keys.contiguous()
    query = query if query.stride(2) == 1 else query.contiguous()
    _decode_split_kernel[(batch * kv_heads, n_splits)](
        query, *tensors, full_keys, full_values, mask, out, part_acc, part_ml,
        scaling * _LOG2E, n_groups, n_full, per_split, n_splits,
        query.stride(0), query.stride(1), full_keys.stride(0), full_keys.stride(1), full_keys.stride(2),
        full_values.stride(0), full_values.stride(1), full_values.stride(2), out.stride(0), out.stride(1),
        KV_HEADS=kv_heads, N_REP=n_rep, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d, BITS=bits,
        HAS_MASK=key_mask is not None, SINGLE_SPLIT=n_splits == 1,
    )  # fmt: skip
    if n_splits > 1:
        _decode_combine_kernel[(batch * kv_heads, n_rep)](
            part_acc, part_ml, out, n_splits, out.stride(0), out.stride(1),
            KV_HEADS=kv_heads, N_REP=n_rep, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(n_splits),
        )  # fmt: skip
    return out


def _quantized_tensors(
    quantized: QuantizedKV | None, batch: int, kv_heads: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The six quantized tensors, contiguous (the kernel indexes them densely); placeholders when empty."""
    if quantized is None:
        codes = torch.zeros(1, dtype=torch.uint8, device=device)
        meta = torch.zeros(1, dtype=torch.float16, device=device)
        return codes, meta, meta, codes, meta, meta
    return tuple(t.contiguous() for t in quantized.tensors())
