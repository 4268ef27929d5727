"""Triton path of the packed group-wise quantized linear op: ``quant_linear_reference``'s twin.

``quant_linear_triton`` takes exactly the reference's arguments and picks a kernel by the number of
rows of ``x`` (all leading dimensions flattened): up to ``GEMV_MAX_ROWS`` the decode kernel, which
streams the packed weight once and reuses each dequantized tile for every row; beyond, the tiled
matmul kernel, which dequantizes a weight tile in registers and feeds ``tl.dot``. Both accumulate in
float32 and return ``x``'s dtype. ``quant_gemv_triton`` and ``quant_matmul_triton`` run one path
each, whatever the row count, so a benchmark can time them separately.

This module imports no Triton: the kernels live in ``_triton_quant_kernels`` and are imported on
the first launch, so ``import budgetpress.kernels`` works without Triton or a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from budgetpress.kernels._backend import interpreting
from budgetpress.kernels._packing import PACKABLE_BITS, words_per_row

GEMV_MAX_ROWS = 16

# Blocks used where no autotuning happens (the interpreter): small, so that every masking path
# (partial K blocks, partial row blocks, tiles inside one group) shows up on small test shapes.
INTERPRET_GEMV_BLOCKS = (16, 32)  # (BLOCK_N, BLOCK_K)
INTERPRET_MATMUL_BLOCKS = (16, 16, 32)  # (BLOCK_M, BLOCK_N, BLOCK_K)


@dataclass(frozen=True)
class _Packed:
    """The weight side of the op, checked once: packed codes, scales, zero points and bias."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    in_features: int
    group_size: int

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def per_row(self) -> bool:
        """One group spans the row (per-channel, or a group size at least the row length)."""
        return self.group_size >= self.in_features

    def kernel_group_size(self) -> int:
        # Per-row layouts never divide by the group size; passing 0 keeps one compiled kernel
        # for every row length instead of one per in_features.
        return 0 if self.per_row else self.group_size


def _kernels() -> ModuleType:
    from budgetpress.kernels import _triton_quant_kernels

    return _triton_quant_kernels


def _check_packed(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    in_features: int,
    group_size: int,
) -> _Packed:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}; got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive; got {group_size}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension; the layer takes {in_features}")
    out_features = qweight.shape[0]
    n_groups = -(-in_features // group_size)
    expected = {
        "qweight": (qweight, (out_features, words_per_row(in_features, bits))),
        "scales": (scales, (out_features, n_groups)),
        "zeros": (zeros, (out_features, n_groups)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}; got {list(tensor.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}]; got {list(bias.shape)}")
    elsewhere = [t.device for t in (qweight, scales, zeros, bias) if t is not None and t.device != x.device]
    if elsewhere:
        raise ValueError(f"the packed weight must be on x's device {x.device}; found tensors on {elsewhere[0]}")
    return _Packed(
        qweight=qweight.to(torch.int32).contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        bits=bits,
        in_features=in_features,
        group_size=group_size,
    )


def _flatten(x: torch.Tensor, in_features: int) -> torch.Tensor:
    x2d = x.reshape(-1, in_features)
    # The kernels step along a row with unit stride.
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _common_args(x2d: torch.Tensor, packed: _Packed, out: torch.Tensor) -> list[object]:
    """Pointer and size arguments shared by both kernels, in their order."""
    return [
        x2d,
        packed.qweight,
        packed.scales,
        packed.zeros,
        out if packed.bias is None else packed.bias,  # never read without HAS_BIAS
        out,
        x2d.shape[0],
        packed.out_features,
        packed.in_features,
        packed.qweight.shape[1],
        x2d.stride(0),
        packed.qweight.stride(0),
        packed.scales.stride(0),
        out.stride(0),
    ]


def _layout_constants(packed: _Packed) -> dict[str, object]:
    return {
        "BITS": packed.bits,
        "GROUP_SIZE": packed.kernel_group_size(),
        "PER_ROW": packed.per_row,
        "HAS_BIAS": packed.bias is not None,
    }


def _launch_gemv(x2d: torch.Tensor, packed: _Packed, out: torch.Tensor, blocks: tuple[int, int] | None) -> None:
    rows = x2d.shape[0]
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"the decode kernel takes at most {GEMV_MAX_ROWS} rows of x; got {rows}")
    kernels = _kernels()
    constants = {**_layout_constants(packed), "BLOCK_M": _next_power_of_2(rows)}
    n = packed.out_features
    if blocks is None and kernels.tuned_gemv_kernel is not None:

        def grid(meta: dict[str, int]) -> tuple[int]:
            return (_cdiv(n, meta["BLOCK_N"]),)

        kernels.tuned_gemv_kernel[grid](*_common_args(x2d, packed, out), **constants)
        return
    block_n, block_k = blocks or INTERPRET_GEMV_BLOCKS
    _check_block_k(block_k)
    kernels.gemv_kernel[(_cdiv(n, block_n),)](
        *_common_args(x2d, packed, out), **constants, BLOCK_N=block_n, BLOCK_K=block_k
    )


def _dot_constants(dtype: torch.dtype) -> dict[str, object]:
    """``tl.dot`` operand dtype and precision for inputs of ``dtype``.

    The interpreter's ``tl.dot`` is wrong on bf16 operands, so it always gets fp32. On a GPU, 16-bit
    inputs use tensor cores directly; fp32 inputs keep full precision rather than TF32.
    """
    import triton.language as tl

    if not interpreting() and dtype in (torch.float16, torch.bfloat16):
        return {"DOT_DTYPE": tl.float16 if dtype == torch.float16 else tl.bfloat16, "PRECISION": "tf32"}
    return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}


def _launch_matmul(x2d: torch.Tensor, packed: _Packed, out: torch.Tensor, blocks: tuple[int, int, int] | None) -> None:
    kernels = _kernels()
    rows, n = x2d.shape[0], packed.out_features
    args = [*_common_args(x2d, packed, out), _next_power_of_2(rows)]
    constants = {**_layout_constants(packed), **_dot_constants(x2d.dtype)}
    if blocks is None and kernels.tuned_matmul_kernel is not None:

        def grid(meta: dict[str, int]) -> tuple[int]:
            return (_cdiv(rows, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

        kernels.tuned_matmul_kernel[grid](*args, **constants)
        return
    block_m, block_n, block_k = blocks or INTERPRET_MATMUL_BLOCKS
    _check_block_k(block_k)
    if min(block_m, block_n) < 16:
        raise ValueError(f"tl.dot needs BLOCK_M and BLOCK_N of at least 16; got {block_m} and {block_n}")
    grid_size = _cdiv(rows, block_m) * _cdiv(n, block_n)
    kernels.matmul_kernel[(grid_size,)](
        *args, **constants, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8
    )


def _check_block_k(block_k: int) -> None:
    # A K block must start on a word boundary of 2-, 4- and 8-bit codes (16 codes fill a 2-bit word).
    if block_k & (block_k - 1) or block_k < 16:
        raise ValueError(f"BLOCK_K must be a power of two of at least 16; got {block_k}")


def _run(
    x: torch.Tensor,
    packed: _Packed,
    *,
    decode: bool,
    gemv_blocks: tuple[int, int] | None = None,
    matmul_blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    x2d = _flatten(x, packed.in_features)
    out = torch.empty(x2d.shape[0], packed.out_features, dtype=x.dtype, device=x.device)
    if x2d.shape[0] > 0:
        if decode:
            _launch_gemv(x2d, packed, out, gemv_blocks)
        else:
            _launch_matmul(x2d, packed, out, matmul_blocks)
    return out.reshape(*x.shape[:-1], packed.out_features)


def quant_gemv_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    in_features: int,
    group_size: int,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Decode path (at most ``GEMV_MAX_ROWS`` rows of x): ``x @ W.T + bias`` in ``x``'s dtype.

    ``blocks`` = (BLOCK_N, BLOCK_K) fixes the tile instead of autotuning (or the interpreter default).
    """
    packed = _check_packed(x, qweight, scales, zeros, bias, bits=bits, in_features=in_features, group_size=group_size)
    return _run(x, packed, decode=True, gemv_blocks=blocks)


def quant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    in_features: int,
    group_size: int,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Prefill path (any number of rows): tiled ``x @ W.T + bias`` in ``x``'s dtype.

    ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K) fixes the tile instead of autotuning.
    """
    packed = _check_packed(x, qweight, scales, zeros, bias, bits=bits, in_features=in_features, group_size=group_size)
    return _run(x, packed, decode=False, matmul_blocks=blocks)


def quant_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """Triton twin of ``quant_linear_reference``: the decode kernel up to 16 rows, else the tiled one."""
    packed = _check_packed(x, qweight, scales, zeros, bias, bits=bits, in_features=in_features, group_size=group_size)
    rows = x.numel() // in_features if in_features else 0
    return _run(x, packed, decode=rows <= GEMV_MAX_ROWS)
