"""A linear layer that holds only its packed, group-wise quantized weight, and its reference op.

Held tensors are exactly what ``space.linear_bytes`` counts: packed codes (int32 words per row),
an fp16 scale and a uint8 zero point per (row, group), and a 16-bit bias if the layer has one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from budgetpress.kernels._backend import Backend, backend_for
from budgetpress.kernels._packing import pack_rows, unpack_rows


def dequantize_packed(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, in_features: int, group_size: int
) -> torch.Tensor:
    """The float32 weight [out, in] that packed codes, scales and zero points stand for."""
    codes = unpack_rows(qweight, bits, in_features).float()
    columns_group = torch.arange(in_features, device=qweight.device) // group_size
    return (codes - zeros.float()[:, columns_group]) * scales.float()[:, columns_group]


def quant_linear_reference(
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
    """Plain-torch dequantize-and-multiply: ``x @ W.T + bias`` in ``x``'s dtype."""
    weight = dequantize_packed(qweight, scales, zeros, bits=bits, in_features=in_features, group_size=group_size)
    return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class QuantLinear(nn.Module):
    """Replaces ``nn.Linear``; holds packed codes, scales, zero points and an optional 16-bit bias."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        # None (per-channel) is stored as one group spanning the row.
        self.group_size = in_features if group_size is None else group_size
        n_groups = -(-in_features // self.group_size)
        if scales.shape != (out_features, n_groups) or zeros.shape != (out_features, n_groups):
            raise ValueError(
                f"scales and zeros must be [{out_features}, {n_groups}]; got "
                f"{tuple(scales.shape)} and {tuple(zeros.shape)}"
            )
        self.register_buffer("qweight", qweight.to(torch.int32).contiguous())
        self.register_buffer("scales", scales.to(torch.float16).contiguous())
        self.register_buffer("zeros", zeros.to(torch.uint8).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16).contiguous())

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        *,
        bits: int,
        group_size: int | None,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Pack unpacked codes [out, in] (as a quantization method produces them) into a module."""
        out_features, in_features = codes.shape
        return cls(
            in_features=in_features,
            out_features=out_features,
            bits=bits,
            group_size=group_size,
            qweight=pack_rows(codes, bits),
            scales=scales,
            zeros=zeros,
            bias=bias,
        )

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_packed(
            self.qweight,
            self.scales,
            self.zeros,
            bits=self.bits,
            in_features=self.in_features,
            group_size=self.group_size,
        )

    def held_bytes(self) -> int:
        """Bytes of every tensor this module holds."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def run(self, op: Callable[..., torch.Tensor], x: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:
        """``op`` (``quant_linear_reference`` or the Triton kernel: same signature) on this module's tensors."""
        return op(
            x,
            self.qweight,
            self.scales,
            self.zeros,
            self.bias if with_bias else None,
            bits=self.bits,
            in_features=self.in_features,
            group_size=self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = quant_linear_reference
        if backend_for(x.device) is Backend.TRITON:
            # Imported here: the Triton path loads its kernels (and Triton) on first use only.
            from budgetpress.kernels._triton_quant import quant_linear_triton

            op = quant_linear_triton
        return self.run(op, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
