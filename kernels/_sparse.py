"""A linear layer that holds a sparse weight (unstructured or 2:4), its kept values bf16 or packed codes.

Held tensors are exactly what ``space.linear_bytes`` counts for a sparse setting:

* ``values``: the kept values of each row in column order: bf16 ``[out, k]`` at 16 bits, otherwise
  their group-wise quantized codes packed per row by ``pack_rows`` into int32 ``[out, ceil(k*bits/32)]``.
* ``scales`` (fp16) and ``zeros`` (uint8) ``[out, ceil(in/group_size)]`` when quantized: the groups
  partition the ORIGINAL columns, so the kept value at column ``c`` uses group ``c // group_size``.
* unstructured: ``mask`` uint8 ``[out, ceil(in/8)]``, bit ``c % 8`` of byte ``c // 8`` (least
  significant bit first) set when column ``c`` is kept; every row keeps the same ``k`` values.
* 2:4: ``indices`` int32 ``[out, ceil(in/32)]``: for each kept value, its 2-bit position inside its
  group of 4 columns, packed per row by ``pack_rows(..., 2)``; ``k = in/2``.
* ``bias`` bf16 ``[out]`` if the layer has one.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from budgetpress.kernels._backend import Backend, backend_for
from budgetpress.kernels._packing import PACKABLE_BITS, pack_rows, unpack_rows, words_per_row
from budgetpress.space import SparsityPattern

logger = logging.getLogger(__name__)

SPARSE_PATTERNS = (SparsityPattern.UNSTRUCTURED, SparsityPattern.SEMI_2_4)


class SparseLinearOp(Protocol):
    """The signature shared by ``sparse_linear_reference`` and ``sparse_linear_triton``."""

    def __call__(
        self,
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
    ) -> torch.Tensor: ...


def sparse_pattern(pattern: SparsityPattern | str) -> SparsityPattern:
    """``pattern`` as a sparse ``SparsityPattern`` ('unstructured' or '2:4'), or a clear error."""
    try:
        value = SparsityPattern(pattern)
    except ValueError:
        value = SparsityPattern.NONE
    if value not in SPARSE_PATTERNS:
        raise ValueError(f"sparse pattern must be 'unstructured' or '2:4'; got {pattern!r}")
    return value


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, n]`` → uint8 ``[rows, ceil(n/8)]``; bit ``c % 8`` of byte ``c // 8``, LSB first."""
    rows, n = mask.shape
    padded = torch.zeros(rows, -(-n // 8) * 8, dtype=torch.int32, device=mask.device)
    padded[:, :n] = mask.to(torch.int32)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_bitmask``: uint8 ``[rows, ceil(n/8)]`` → bool ``[rows, n]``."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()


def kept_columns(
    meta: torch.Tensor, *, pattern: SparsityPattern | str, in_features: int, kept_per_row: int
) -> torch.Tensor:
    """The original column (int64 ``[out, k]``) of every kept value, from the mask or 2:4 indices."""
    if sparse_pattern(pattern) is SparsityPattern.UNSTRUCTURED:
        keep = unpack_bitmask(meta, in_features)
        # nonzero lists positions row-major, so each row's columns come out ascending.
        return keep.nonzero()[:, 1].view(meta.shape[0], kept_per_row)
    positions = unpack_rows(meta, 2, kept_per_row).long()
    group_start = 4 * (torch.arange(kept_per_row, device=meta.device) // 2)
    return group_start + positions


def dequantize_sparse(
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    *,
    pattern: SparsityPattern | str,
    bits: int,
    in_features: int,
    kept_per_row: int,
    group_size: int,
) -> torch.Tensor:
    """The float32 weight ``[out, in]``: ``(code - zero) * scale`` (or the bf16 value) where kept, 0 elsewhere."""
    columns = kept_columns(meta, pattern=pattern, in_features=in_features, kept_per_row=kept_per_row)
    if bits == 16:
        kept = values.float()
    else:
        if scales is None or zeros is None:
            raise ValueError(f"{bits}-bit sparse values need scales and zero points")
        codes = unpack_rows(values, bits, kept_per_row).float()
        groups = columns // group_size
        kept = (codes - zeros.float().gather(1, groups)) * scales.float().gather(1, groups)
    weight = torch.zeros(values.shape[0], in_features, dtype=torch.float32, device=values.device)
    return weight.scatter_(1, columns, kept)


def sparse_linear_reference(
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
    """Plain-torch decode-and-multiply: ``x @ W.T + bias`` in ``x``'s dtype (``meta``: mask or 2:4 indices)."""
    weight = dequantize_sparse(
        values,
        meta,
        scales,
        zeros,
        pattern=pattern,
        bits=bits,
        in_features=in_features,
        kept_per_row=kept_per_row,
        group_size=group_size,
    )
    return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def check_sparse_mask(mask: torch.Tensor, pattern: SparsityPattern | str, *, sparsity: float | None = None) -> int:
    """Check a bool keep-mask ``[out, in]`` against ``pattern``; return the values kept per row."""
    pattern = sparse_pattern(pattern)
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 2-D bool [out, in] tensor; got {mask.dtype} of shape {tuple(mask.shape)}")
    out_features, in_features = mask.shape
    if pattern is SparsityPattern.SEMI_2_4:
        return _check_semi_mask(mask)
    counts = mask.sum(dim=1)
    kept = int(counts[0]) if out_features else in_features
    uneven = (counts != kept).nonzero()
    if uneven.numel():
        row = int(uneven[0, 0])
        raise ValueError(
            "an unstructured mask must keep the same number of values in every row; "
            f"row 0 keeps {kept} of {in_features} but row {row} keeps {int(counts[row])}"
        )
    if sparsity is not None and kept != in_features - round(sparsity * in_features):
        raise ValueError(
            f"sparsity {sparsity} of {in_features} columns keeps {in_features - round(sparsity * in_features)} "
            f"values per row; the mask keeps {kept}"
        )
    return kept


def _check_semi_mask(mask: torch.Tensor) -> int:
    out_features, in_features = mask.shape
    if in_features % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4; got in_features={in_features}")
    per_group = mask.view(out_features, in_features // 4, 4).sum(dim=-1)
    wrong = (per_group != 2).nonzero()
    if wrong.numel():
        row, group = (int(v) for v in wrong[0])
        raise ValueError(
            "a 2:4 mask must keep exactly 2 of every 4 consecutive columns; "
            f"row {row} keeps {int(per_group[row, group])} in columns {4 * group}..{4 * group + 3}"
        )
    return in_features // 2


def _pack_meta(mask: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    if pattern is SparsityPattern.UNSTRUCTURED:
        return pack_bitmask(mask)
    out_features, in_features = mask.shape
    within = torch.arange(in_features, device=mask.device).remainder(4).expand(out_features, in_features)
    return pack_rows(within[mask].view(out_features, in_features // 2), 2)


def _kept(tensor: torch.Tensor, mask: torch.Tensor, kept_per_row: int) -> torch.Tensor:
    if tensor.shape != mask.shape:
        raise ValueError(f"values must have the mask's shape {tuple(mask.shape)}; got {tuple(tensor.shape)}")
    # Boolean indexing walks row-major: each row's kept entries come out in column order.
    return tensor[mask].view(mask.shape[0], kept_per_row)


class SparseLinear(nn.Module):
    """Replaces ``nn.Linear``; holds a sparse weight (bf16 or packed codes) as the module docstring lays out."""

    values: torch.Tensor
    mask: torch.Tensor | None
    indices: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        pattern: SparsityPattern | str,
        bits: int,
        group_size: int | None,
        kept_per_row: int,
        values: torch.Tensor,
        meta: torch.Tensor,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.pattern = sparse_pattern(pattern)
        self.bits = bits
        self.kept_per_row = kept_per_row
        # None (per-channel) is stored as one group spanning the row, as QuantLinear does.
        self.group_size = in_features if group_size is None else group_size
        # Opt-in CUDA speed path (bits 16, 2:4): torch's own compressed copy, outside the memory model.
        self._semi_structured: torch.Tensor | None = None
        meta = self._checked_meta(meta)
        values, scales, zeros = self._checked_values(values, scales, zeros)
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must be [{out_features}]; got {tuple(bias.shape)}")
        unstructured = self.pattern is SparsityPattern.UNSTRUCTURED
        self.register_buffer("values", values.contiguous())
        self.register_buffer("mask", meta.contiguous() if unstructured else None)
        self.register_buffer("indices", None if unstructured else meta.contiguous())
        self.register_buffer("scales", None if scales is None else scales.to(torch.float16).contiguous())
        self.register_buffer("zeros", None if zeros is None else zeros.to(torch.uint8).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16).contiguous())

    def _checked_meta(self, meta: torch.Tensor) -> torch.Tensor:
        rows, cols, k = self.out_features, self.in_features, self.kept_per_row
        if self.pattern is SparsityPattern.UNSTRUCTURED:
            if not 0 <= k <= cols:
                raise ValueError(f"kept_per_row must lie in [0, {cols}]; got {k}")
            _expect(meta, "mask", (rows, -(-cols // 8)), torch.uint8)
            counts = unpack_bitmask(meta, cols).sum(dim=1)
            if bool((counts != k).any()):
                raise ValueError(f"every mask row must have {k} bits set; counts range {counts.min()}..{counts.max()}")
            return meta
        if cols % 4 or k != cols // 2:
            raise ValueError(f"2:4 sparsity needs in_features % 4 == 0 and kept_per_row == in/2; got {cols}, {k}")
        _expect(meta, "2:4 indices", (rows, words_per_row(k, 2)), torch.int32)
        pairs = unpack_rows(meta, 2, k).view(rows, -1, 2)
        if bool((pairs[..., 0] >= pairs[..., 1]).any()):
            raise ValueError("2:4 indices must name two distinct positions per group of 4, in ascending order")
        return meta

    def _checked_values(
        self, values: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        rows, k = self.out_features, self.kept_per_row
        if self.bits == 16:
            if scales is not None or zeros is not None:
                raise ValueError("16-bit sparse values take no scales or zero points")
            _expect(values, "16-bit values", (rows, k), None)
            return values.to(torch.bfloat16), None, None
        if self.bits not in PACKABLE_BITS:
            raise ValueError(f"bits must be 16 or one of {PACKABLE_BITS}; got {self.bits}")
        _expect(values, "packed values", (rows, words_per_row(k, self.bits)), torch.int32)
        if scales is None or zeros is None:
            raise ValueError(f"{self.bits}-bit sparse values need scales and zero points")
        n_groups = -(-self.in_features // self.group_size)
        _expect(scales, "scales", (rows, n_groups), None)
        _expect(zeros, "zeros", (rows, n_groups), None)
        return values, scales, zeros

    @classmethod
    def from_dense_codes(
        cls,
        mask: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        *,
        bits: int,
        group_size: int | None,
        pattern: SparsityPattern | str,
        bias: torch.Tensor | None = None,
        sparsity: float | None = None,
    ) -> SparseLinear:
        """Pack codes ``[out, in]`` at the kept positions of ``mask`` (others are ignored) into a module."""
        if bits not in PACKABLE_BITS:
            raise ValueError(f"packed codes need bits in {PACKABLE_BITS}; use from_dense_values for 16-bit values")
        pattern = sparse_pattern(pattern)
        kept_per_row = check_sparse_mask(mask, pattern, sparsity=sparsity)
        out_features, in_features = mask.shape
        return cls(
            in_features=in_features,
            out_features=out_features,
            pattern=pattern,
            bits=bits,
            group_size=group_size,
            kept_per_row=kept_per_row,
            values=pack_rows(_kept(codes, mask, kept_per_row), bits),
            meta=_pack_meta(mask, pattern),
            scales=scales,
            zeros=zeros,
            bias=bias,
        )

    @classmethod
    def from_dense_values(
        cls,
        mask: torch.Tensor,
        weight_values: torch.Tensor,
        *,
        pattern: SparsityPattern | str,
        bias: torch.Tensor | None = None,
        sparsity: float | None = None,
    ) -> SparseLinear:
        """Keep ``weight_values`` ``[out, in]`` at ``mask``'s kept positions as bf16 (bits 16)."""
        pattern = sparse_pattern(pattern)
        kept_per_row = check_sparse_mask(mask, pattern, sparsity=sparsity)
        out_features, in_features = mask.shape
        return cls(
            in_features=in_features,
            out_features=out_features,
            pattern=pattern,
            bits=16,
            group_size=None,
            kept_per_row=kept_per_row,
            values=_kept(weight_values, mask, kept_per_row).to(torch.bfloat16),
            meta=_pack_meta(mask, pattern),
            bias=bias,
        )

    @property
    def meta(self) -> torch.Tensor:
        """The sparsity metadata: the bitmask (unstructured) or the packed 2:4 indices."""
        meta = self.mask if self.pattern is SparsityPattern.UNSTRUCTURED else self.indices
        assert meta is not None
        return meta

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_sparse(
            self.values,
            self.meta,
            self.scales,
            self.zeros,
            pattern=self.pattern,
            bits=self.bits,
            in_features=self.in_features,
            kept_per_row=self.kept_per_row,
            group_size=self.group_size,
        )

    def held_bytes(self) -> int:
        """Bytes of every tensor this module holds (the opt-in semi-structured copy is not one)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def enable_semi_structured_(self) -> bool:
        """On CUDA, for bf16 2:4 values, also keep torch's semi-structured copy and multiply with it.

        A speed path for GPUs with sparse tensor cores; it holds extra memory that the memory model
        does not count, and is not moved by ``.to()``. Returns whether it applies.
        """
        if self.bits != 16 or self.pattern is not SparsityPattern.SEMI_2_4 or not self.values.is_cuda:
            return False
        dense = self.dequantized_weight().to(torch.bfloat16)
        try:
            self._semi_structured = torch.sparse.to_sparse_semi_structured(dense)
        except (RuntimeError, ValueError) as error:
            logger.warning("semi-structured sparse weight not available (%s); using the Triton kernel", error)
            return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._semi_structured is not None and x.is_cuda:
            return nn.functional.linear(x.to(torch.bfloat16), self._semi_structured, self.bias).to(x.dtype)
        op: SparseLinearOp = sparse_linear_reference
        if backend_for(x.device) is Backend.TRITON:
            from budgetpress.kernels._triton_sparse import sparse_linear_triton

            op = sparse_linear_triton
        return self.run(op, x)

    def run(self, op: SparseLinearOp, x: torch.Tensor) -> torch.Tensor:
        """``op`` (``sparse_linear_reference`` or the Triton kernel: same signature) on this module's tensors."""
        return op(
            x,
            self.values,
            self.meta,
            self.scales,
            self.zeros,
            self.bias,
            pattern=self.pattern,
            bits=self.bits,
            in_features=self.in_features,
            kept_per_row=self.kept_per_row,
            group_size=self.group_size,
        )

    def extra_repr(self) -> str:
        group = "" if self.bits == 16 else f", group={self.group_size}"
        return (
            f"in={self.in_features}, out={self.out_features}, pattern={self.pattern.value}, "
            f"kept_per_row={self.kept_per_row}, bits={self.bits}{group}"
        )


def _expect(tensor: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
    if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
        wanted = f"{dtype} " if dtype is not None else ""
        raise ValueError(f"{name} must be {wanted}{list(shape)}; got {tensor.dtype} {list(tensor.shape)}")
